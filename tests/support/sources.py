"""Source files for ingest as the tests write them, byte for byte, and settings to ingest them with."""

from pathlib import Path

from jobs.settings import Settings


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    """A source's own validation and merge: no database, so no feedback events."""
    return Settings(data_dir=tmp_path / "var", ingest_feedback=False, **overrides)  # type: ignore[arg-type]


def write_bytes(folder: Path, content: bytes, name: str = "interactions.csv") -> Path:
    """``content`` as the file ``name`` of ``folder``, exactly those bytes (bad encodings included)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content)
    return path
