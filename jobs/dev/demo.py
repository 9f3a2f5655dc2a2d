"""`overnight demo`: sample data ending yesterday, the nightly run over it, and an API key to try it with."""

import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import polars as pl

from jobs import nightly, workdir
from jobs.dev import generate
from jobs.settings import Settings

logger = logging.getLogger(__name__)

DEMO_USERS, DEMO_ITEMS, DEMO_DAYS = 3000, 600, 60
# The demo's batches have segment fallbacks: users the batch does not score get their country's popular list.
DEMO_SEGMENT_ATTRIBUTE = "country"


@dataclass(frozen=True)
class Demo:
    api_key: str
    user_id: str
    run: nightly.RunResult
    newcomer_id: str | None = None  # a user the batch did not score, served their segment's popular list

    @property
    def publish_summary(self) -> str:
        """What the last night's publish said: whether its batch went live, and if not why."""
        return self.run.results["publish"].outcome().summary

    @property
    def live(self) -> bool:
        return bool(getattr(self.run.results["publish"], "live", False))


def prepare_demo(settings: Settings, progress: nightly.Progress = logger.info, nights: int = 1) -> Demo:
    """Generate sample data ending yesterday, run the pipeline on it and make an API key.

    With ``nights`` above 1 the nights before yesterday run first, oldest first, so the run history
    and the monitoring dashboard have a few nights to show. Unless the settings name another segment
    attribute, the batches segment users by country (``DEMO_SEGMENT_ATTRIBUTE``).
    """
    if settings.segment_attribute is None:
        settings = settings.model_copy(update={"segment_attribute": DEMO_SEGMENT_ATTRIBUTE})
    logical_date = datetime.now(UTC).date() - timedelta(days=1)
    source = settings.machine_dir / "sample" / logical_date.isoformat()
    if not all((source / f"{table}.parquet").exists() for table in ("interactions", "items", "users")):
        progress(f"generating sample data ({DEMO_USERS:,} users, {DEMO_ITEMS} items, {DEMO_DAYS} days) in {source}")
        data = generate.generate(DEMO_USERS, DEMO_ITEMS, DEMO_DAYS, end_date=logical_date, seed=42)
        generate.write_dataset(data, source)
    for earlier in range(nights - 1, 0, -1):
        nightly.run(nightly.night_of(settings, logical_date - timedelta(days=earlier), source), progress)
    result = nightly.run(nightly.night_of(settings, logical_date, source), progress)
    key_file = settings.machine_dir / "demo-api-key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(24) + "\n")
        key_file.chmod(0o600)
    first_shard = workdir.read_manifests(settings, logical_date)[0].path
    user_id = str(pl.read_parquet(first_shard, n_rows=1)["user_id"][0])
    newcomers = pl.read_parquet(str(workdir.table_path(settings, logical_date, workdir.USER_SEGMENTS)), n_rows=1)
    newcomer_id = str(newcomers["user_id"][0]) if newcomers.height else None
    return Demo(api_key=key_file.read_text().strip(), user_id=user_id, run=result, newcomer_id=newcomer_id)
