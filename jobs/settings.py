"""The batch side's configuration: every ``OVERNIGHT_*`` environment variable it reads, in one place."""

from datetime import date
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OVERNIGHT_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="Postgres DSN. Unset: an embedded Postgres is started under DATA_DIR/pgdata.",
    )
    data_dir: Path = Field(default=Path("var"), description="The local lake: Parquet, models, reports.")

    # ingest
    source: str | None = Field(
        default=None,
        description="What the nightly DAG ingests when its run gives no `source` param; "
        "`{date}` in it is replaced by the logical date (YYYY-MM-DD).",
    )
    source_format: str = "auto"
    max_bad_fraction: float = Field(default=0.05, ge=0.0, le=1.0)

    # candidates
    recent_days: int = Field(default=14, gt=0, description="Window of the recent-popularity generator.")
    popular_candidates: int = Field(default=100, gt=0)
    covisit_history: int = Field(default=20, gt=0, description="Latest items per user used for co-visitation.")
    covisit_neighbours: int = Field(default=30, gt=0, description="Neighbours kept per item.")
    covisit_candidates: int = Field(default=100, gt=0)

    # training
    label_days: int = Field(default=14, gt=0, description="Label window before the logical date.")
    retrain_days: int = Field(default=1, gt=0, description="Retrain when the newest model is this old.")
    num_boost_round: int = Field(default=200, gt=0)
    learning_rate: float = Field(default=0.05, gt=0.0)
    num_leaves: int = Field(default=31, gt=1)
    min_data_in_leaf: int = Field(default=20, gt=0)
    seed: int = 7

    # scoring and publishing
    top_k: int = Field(default=50, gt=0, description="Items published per user.")
    exclude_seen: bool = True
    score_shards: int = Field(default=2, gt=0)
    keep_batches: int = Field(default=3, ge=2, description="Batches kept for instant rollback.")
    publish_workers: int = Field(default=2, gt=0, description="Parallel COPY connections.")

    # scheduling and freshness
    nightly_deadline_hours: float = Field(
        default=6.0, ge=0.0, description="Alert when a nightly run takes longer than this; 0 turns the alert off."
    )
    alert_webhook_url: str | None = Field(default=None, description="Generic JSON POST for alerts.")
    max_age_hours: float = Field(default=26.0, gt=0.0)
    min_coverage: float = Field(default=0.95, ge=0.0, le=1.0)

    @property
    def lake_dir(self) -> Path:
        return self.data_dir / "lake"

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "work"

    def work_dir_for(self, logical_date: date) -> Path:
        """Intermediate files of one logical date's run (shared tables, score shards)."""
        return self.work_dir / f"date={logical_date.isoformat()}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"


def get_settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]
