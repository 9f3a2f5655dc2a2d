import json
import threading
from pathlib import Path

from jobs import lake
from tests.support.lake_files import assert_a_writer_dying_midway_leaves_the_old_file_alone


def test_a_writer_that_dies_midway_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    assert_a_writer_dying_midway_leaves_the_old_file_alone(tmp_path)


def test_concurrent_writers_of_one_path_never_show_a_reader_half_a_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    lake.write_json_atomically({"writer": -1, "padding": "x" * 4096}, path)
    stop = threading.Event()
    problems: list[str] = []

    def write(writer: int) -> None:
        try:
            for _ in range(300):
                lake.write_json_atomically({"writer": writer, "padding": "x" * 4096}, path)
        except OSError as error:
            problems.append(f"writer {writer}: {error}")

    def read() -> None:
        while not stop.is_set():
            try:
                json.loads(path.read_text())
            except ValueError as error:
                problems.append(f"reader: {error}")

    reader = threading.Thread(target=read)
    writers = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    reader.start()
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert problems == []
    assert json.loads(path.read_text())["writer"] in (0, 1)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
