"""What the lake's writes promise, checked alike on a local folder and on object storage."""

import json
from pathlib import Path

import pytest
from upath import UPath

from jobs import lake


def assert_a_writer_dying_midway_leaves_the_old_file_alone(folder: Path | UPath) -> None:
    """A write of ``folder``'s manifest that dies half written leaves the earlier manifest, and no temporary."""
    path = folder / "shard-00000-of-00001.json"
    lake.write_json_atomically({"users": 1}, path)

    def dies_midway(tmp: Path) -> None:
        tmp.write_text('{"users": ')
        raise OSError("killed")

    with pytest.raises(OSError, match="killed"):
        lake.write_atomically(path, dies_midway)
    assert json.loads(path.read_text()) == {"users": 1}
    assert [p.name for p in folder.iterdir()] == [path.name]
