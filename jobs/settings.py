"""The batch side's configuration: every ``OVERNIGHT_*`` environment variable it reads, in one place."""

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
    source_format: str = Field(
        default="auto",
        description="Format of the nightly source: auto (detected from the path), movielens, parquet or csv.",
    )
    max_bad_fraction: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description=(
            "Ingest fails when more than this share of rows is bad (quarantined); "
            "`overnight ingest --max-bad-fraction` overrides it."
        ),
    )

    # candidates
    recent_days: int = Field(default=14, gt=0, description="Window of the recent-popularity generator.")
    popular_candidates: int = Field(
        default=100,
        gt=0,
        description=(
            "Candidates per user from the recent-popularity generator (most popular available items of the last "
            "recent_days)."
        ),
    )
    covisit_history: int = Field(default=20, gt=0, description="Latest items per user used for co-visitation.")
    covisit_neighbours: int = Field(default=30, gt=0, description="Neighbours kept per item.")
    covisit_candidates: int = Field(default=100, gt=0, description="Candidates per user from co-visitation.")
    covisit_half_life_days: float = Field(
        default=60.0, gt=0.0, description="Days over which a co-visit loses half its weight."
    )
    similarity_history: int = Field(default=100, gt=0, description="Latest items per user used for item similarity.")
    similarity_neighbours: int = Field(default=50, gt=0, description="Most similar items kept per item.")
    similarity_min_support: int = Field(default=2, gt=0, description="Users two items must share to be similar.")
    knn_candidates: int = Field(
        default=100, gt=0, description="Candidates per user from item-to-item similarity (knn)."
    )
    max_candidates: int = Field(default=200, gt=0, description="Candidates ranked per user, all sources together.")
    genre_candidates: int = Field(default=50, gt=0, description="Candidates per user from their favourite genres.")
    covisit_max_users: int = Field(
        default=100_000,
        gt=0,
        description="Co-visitation is counted over the histories of at most this many users, the most recently "
        "active: its cost grows with users, its statistics settle long before.",
    )
    similarity_max_users: int = Field(
        default=20_000,
        gt=0,
        description="Item similarity is counted over at most this many of the most recently active users: "
        "it pairs up to similarity_history items per user, so its memory grows with users x history squared.",
    )

    # training
    label_days: int = Field(default=14, gt=0, description="Label window before the logical date.")
    retrain_days: int = Field(default=1, gt=0, description="Retrain when the newest model is this old.")
    label_windows: int = Field(default=3, gt=0, description="Rolling label windows to train on, history permitting.")
    early_stopping_rounds: int = Field(
        default=30,
        gt=0,
        description=(
            "Boosting rounds without improvement on the newest label window before training stops; the model is "
            "then refit on every window."
        ),
    )
    train_max_users: int = Field(default=200_000, gt=0, description="Users sampled per label window to train on.")
    promotion_margin: float = Field(
        default=0.0,
        ge=0.0,
        description="A new model must beat production and the best baseline on NDCG@10 by this relative margin.",
    )
    promotion_min_user_coverage: float = Field(
        default=0.95, ge=0.0, le=1.0, description="Share of evaluated users that must get a full top-10 list."
    )
    num_boost_round: int = Field(default=200, gt=0, description="Most boosting rounds of the LightGBM ranker.")
    learning_rate: float = Field(default=0.05, gt=0.0, description="Learning rate of the LightGBM ranker.")
    num_leaves: int = Field(default=31, gt=1, description="Leaves per tree of the LightGBM ranker.")
    min_data_in_leaf: int = Field(default=20, gt=0, description="Fewest training rows per leaf of the LightGBM ranker.")
    seed: int = Field(
        default=7,
        description=(
            "Seed of every random choice in training and monitoring (LightGBM, user samples, the held-out fifth, "
            "the drift reference): the same data trains the same model."
        ),
    )

    # scoring and publishing
    top_k: int = Field(default=50, gt=0, description="Items published per user.")
    exclude_seen: bool = Field(
        default=True, description="Leave out of a user's list the items they already interacted with."
    )
    score_shards: int = Field(default=2, gt=0, description="Fewest score shards.")
    shard_users: int = Field(
        default=100_000,
        gt=0,
        description="Most users per score shard: more users make more shards, so a shard's memory stays the same.",
    )
    compile_ranker: bool = Field(
        default=True,
        description="Score with the ranker compiled to native code (tl2cgen and gcc; cached beside the model "
        "file, compiled when it is trained or first scores); off, or where compiling fails, LightGBM's predict.",
    )
    similar_k: int = Field(
        default=50, gt=0, description="Neighbours published per item (GET /v1/items/{item_id}/similar, sessions)."
    )
    segment_attribute: str | None = Field(
        default=None,
        description=(
            "User attribute (a column of the users table: country, platform, ...) whose values are segments: "
            "users the batch did not score get their segment's popular list. Unset: one global list."
        ),
    )
    segment_min_users: int = Field(
        default=50, gt=0, description="Fewest recently active users a segment needs for a popular list of its own."
    )
    keep_batches: int = Field(default=3, ge=2, description="Batches kept for instant rollback.")
    publish_workers: int = Field(default=2, gt=0, description="Parallel COPY connections.")

    # scheduling and freshness
    nightly_deadline_hours: float = Field(
        default=6.0, ge=0.0, description="Alert when a nightly run takes longer than this; 0 turns the alert off."
    )
    alert_webhook_url: str | None = Field(default=None, description="Generic JSON POST for alerts.")
    max_age_hours: float = Field(
        default=26.0,
        gt=0.0,
        description=(
            "Freshness limit: check-freshness and the hourly freshness DAG fail when the live batch is older than this."
        ),
    )
    min_coverage: float = Field(
        default=0.95,
        ge=0.0,
        le=1.0,
        description=(
            "Smallest share of active users a batch must cover: publish validation refuses a batch below it, and "
            "freshness checks fail below it."
        ),
    )
    airflow_admin_password: str | None = Field(
        default=None, description="Admin password of `overnight airflow` (default: generated once, then kept)."
    )

    # monitoring (jobs/monitoring/checks.py has the default thresholds and what each statistic means)
    monitor_thresholds: dict[str, dict[str, float | None]] = Field(
        default_factory=dict,
        description='Overrides of the warn/fail thresholds, as JSON: {"feature_psi": {"warn": 0.1, "fail": 0.5}}; '
        "null turns a level off.",
    )
    drift_retrain_psi: float | None = Field(
        default=0.25, gt=0.0, description="A feature PSI at or above this marks the model due for retraining."
    )
    drift_sample_users: int = Field(default=2000, gt=0, description="Users whose scoring features drift compares.")
    drift_reference_rows: int = Field(default=20_000, gt=0, description="Training rows kept as the drift reference.")
    dashboard_url: str | None = Field(default=None, description="Base URL of /dashboard, linked from alerts.")
    alert_max_per_run: int = Field(
        default=5, gt=0, description="Alerts sent per night at most; the rest are summed up."
    )

    # rollouts and the online loop
    shadow_model: str | None = Field(
        default=None, description="Registered model the nightly DAG also scores into a shadow batch (never served)."
    )
    refresh_canary: bool = Field(
        default=True,
        description="The nightly DAG scores its date with the running canary's model too and moves the canary "
        "to that batch (same users); off: the canary keeps the batch it was started on.",
    )
    ingest_feedback: bool = Field(
        default=True,
        description="Ingest also reads overnight.feedback_events (POST /v1/events) as interactions; turn it off "
        "when the source already holds the same events.",
    )
    feedback_weights: dict[str, float] = Field(
        default={"click": 1.0, "conversion": 3.0},
        description="Interaction weight per feedback type; a type not listed (impressions by default) is not ingested.",
    )
    feedback_late_days: int = Field(
        default=2,
        ge=0,
        description="Ingest of D reads the feedback the service received on D and on this many days before it "
        "(whenever the events happened; each is stored at its own time, once).",
    )

    online_keep_days: int = Field(default=90, gt=0, description="Days of served predictions and feedback kept.")

    @property
    def lake_dir(self) -> Path:
        return self.data_dir / "lake"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"


def get_settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]
