"""Where OVERNIGHT_DATA_DIR lives: a local folder, or a prefix in an S3-compatible bucket, both a ``UPath`` that the
steps use alike (docs/operations.md#the-data-folder-on-object-storage); polars and pyarrow take one as ``str(path)``.
What has to be a file on this machine (a model LightGBM loads, scratch folders) lives under ``Settings.machine_dir``.
"""

import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from typing_extensions import TypeIs
from upath import UPath


def is_local(path: Path | UPath) -> TypeIs[Path]:
    return isinstance(path, Path)


def upload(path: UPath, write: Callable[[Path], object]) -> None:
    """`write(tmp)` into a local file, then put it at `path` as one object.

    A PUT (or a multipart upload, which shows nothing until it completes) replaces an object whole:
    readers see the old object or the new one, and a writer killed midway leaves the old one.
    """
    with tempfile.TemporaryDirectory(prefix="overnight-upload-") as scratch:
        tmp = Path(scratch) / path.name
        write(tmp)
        path.fs.put_file(str(tmp), path.path)


def glob(folder: Path | UPath, pattern: str) -> list[UPath]:
    """The files under `folder` matching `pattern` (``*`` within one name, no ``**``), sorted.

    On object storage one recursive listing, filtered here: fsspec's own glob (and UPath's) asks about
    every entry it meets, a request each, so its time grows with the lake's partitions.
    """
    if is_local(folder):
        return sorted(UPath(path) for path in folder.glob(pattern))
    depth = len(PurePosixPath(pattern).parts)
    prefix = folder.path.rstrip("/") + "/"
    found = []
    for key in folder.fs.find(folder.path):
        relative = PurePosixPath(key.removeprefix(prefix))
        if len(relative.parts) == depth and relative.match(pattern):
            found.append(folder.joinpath(*relative.parts))
    return sorted(found, key=str)


def download(path: UPath, local: Path) -> None:
    path.fs.get_file(path.path, str(local))
