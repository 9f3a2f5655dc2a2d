"""The dates and datasets the tests run on."""

from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobs.dev.generate import GeneratedData

SAMPLE_DATE = date(2026, 11, 20)  # the generated sample's last day
PREVIOUS_DATE = SAMPLE_DATE - timedelta(days=1)
MOVIELENS_100K = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-100k"


def write_movielens_100k(data: "GeneratedData", folder: Path) -> Path:
    """``data`` as a MovieLens 100K release (``u.data``: user, item, rating, unix time by tabs, no header;
    ``u.item``: id|title|date|video date|url|a 0/1 flag a genre, in latin-1), read by the MovieLens
    reader as the real one is: for tests that need a MovieLens source where ../shared is not beside the clone."""
    import polars as pl

    from jobs.steps.ingest import MOVIELENS_100K_GENRES

    folder.mkdir(parents=True, exist_ok=True)
    data.interactions.select(
        "user_id", "item_id", pl.col("rating").round().cast(pl.Int32), pl.col("timestamp").dt.epoch("s")
    ).write_csv(folder / "u.data", separator="\t", include_header=False)
    flags = [pl.col("genres").list.contains(genre).cast(pl.Int8).cast(pl.String) for genre in MOVIELENS_100K_GENRES]
    lines = data.items.select(
        pl.concat_str(
            [pl.col("item_id"), pl.col("title"), pl.lit("01-Jan-1995"), pl.lit(""), pl.lit(""), *flags], separator="|"
        )
    ).to_series()
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return folder
