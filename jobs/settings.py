"""The batch side's configuration: every ``OVERNIGHT_*`` environment variable it reads, in one place."""

import math
import urllib.parse
from pathlib import Path
from typing import Annotated, Self

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from upath import UPath

MAX_WEIGHT = 1e6  # default OVERNIGHT_MAX_WEIGHT: ratings and counts are far below it
# The largest OVERNIGHT_MAX_WEIGHT: about float32's largest number, as the lake stores weights
# (jobs.lake.INTERACTIONS_SCHEMA); a weight above it would be stored as infinity.
FLOAT32_WEIGHT_LIMIT = 3.4e38

OBJECT_STORAGE_PROTOCOLS = ("s3", "s3a")


def data_folder(value: object) -> UPath:
    """OVERNIGHT_DATA_DIR: a local path, or ``s3://bucket/prefix`` (see ``jobs.storage``); ValueError else."""
    if isinstance(value, UPath):
        return value
    if isinstance(value, Path):
        return UPath(value)
    if isinstance(value, dict):  # a UPath as pydantic dumps it (Settings.model_dump)
        protocol = value.get("protocol") or ""
        value = f"{protocol}://{value['path']}" if protocol not in ("", "file", "local") else value["path"]
    text = str(value)
    if "://" not in text:
        return UPath(Path(text))
    protocol, _, rest = text.partition("://")
    if protocol not in OBJECT_STORAGE_PROTOCOLS or not rest.strip("/"):
        raise ValueError(f"data folder {text!r}: expected a local path or s3://bucket/prefix")
    # No listing cache: another worker's shards and manifests must show up on the next look.
    return UPath(f"s3://{rest}", use_listings_cache=False)


class Settings(BaseSettings):
    # hide_input_in_errors: a DSN or a webhook URL may be a secret, and Airflow shows a task's or a DAG
    # file's errors in its UI.
    model_config = SettingsConfigDict(env_prefix="OVERNIGHT_", extra="ignore", hide_input_in_errors=True)

    database_url: str | None = Field(
        default=None,
        description="Postgres DSN. Unset: an embedded Postgres is started under DATA_DIR/pgdata "
        "(LOCAL_DIR/pgdata when DATA_DIR is on object storage).",
    )
    data_dir: Annotated[UPath, BeforeValidator(data_folder)] = Field(
        default=Path("var"),
        validate_default=True,
        description="The lake, the work files, models and reports: a local folder, or s3://bucket/prefix on an "
        "S3-compatible object store (credentials and endpoint from the AWS_* variables, docs/operations.md).",
    )
    local_dir: Path = Field(
        default=Path("var"),
        description="This machine's own folder when DATA_DIR is on object storage: local copies of the models "
        "and their compiled libraries, scratch folders, the embedded Postgres. Unused when DATA_DIR is local.",
    )

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
    max_weight: float = Field(
        default=MAX_WEIGHT,
        gt=0.0,
        le=FLOAT32_WEIGHT_LIMIT,
        allow_inf_nan=False,
        description=(
            "Ingest quarantines an interaction whose weight (rating, count) is above this as `bad_weight`, like a "
            "negative or non-finite one: such a value is a unit or column mistake (an epoch or an id read as a "
            "weight) that would outweigh millions of ordinary interactions. A finite number: the lake stores "
            "weights as 32-bit floats, so it is at most 3.4e38."
        ),
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

    event_weights: Annotated[dict[str, float] | None, NoDecode] = Field(
        default=None,
        description="What each event type means, as `type=weight,...` (`view=1,cart=3,purchase=8`): the graded "
        "relevance of the ranker's labels and the weight of each event in the candidate signals (popularity, "
        "co-visitation, similarity, genre tastes); a type not listed weighs 1. Unset: every event counts once and "
        "labels are binary.",
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
    label_windows: int = Field(
        default=3,
        gt=0,
        description="Rolling label windows to train on, history permitting; up to four times as many while the "
        "windows so far hold fewer than train_max_users labelled users.",
    )
    early_stopping_rounds: int = Field(
        default=30,
        gt=0,
        description=(
            "Boosting rounds without improvement on the validation users (a fifth of every label window's) before "
            "training stops; the model is then refit on every user."
        ),
    )
    train_max_users: int = Field(
        default=200_000,
        gt=0,
        description="Users sampled per label window to train on; windows past label_windows are added while the "
        "windows so far hold fewer labelled users than this.",
    )
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
    num_leaves: int = Field(
        default=7,
        gt=1,
        description="Leaves per tree of the LightGBM ranker: few, so that small data (a few hundred users per label "
        "window) does not learn its noise.",
    )
    min_data_in_leaf: int = Field(default=50, gt=0, description="Fewest training rows per leaf of the LightGBM ranker.")
    tune_budget_minutes: float | None = Field(
        default=None,
        gt=0.0,
        description="Minutes a retrain may spend searching the ranker's and the candidate generators' parameters "
        "(jobs/tuning.py) before the model is trained with the best found; unset: no search, the settings as given.",
    )
    seed: int = Field(
        default=7,
        description=(
            "Seed of every random choice in training and monitoring (LightGBM, user samples, the held-out fifth, "
            "the drift reference): the same data trains the same model."
        ),
    )

    # scoring and publishing
    top_k: int = Field(default=50, gt=0, description="Items published per user.")
    diversity: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Strength of the MMR re-ranking of each published list over the genres and text attributes of "
        "its items (jobs/diversity.py): 0 publishes the ranker's order, 1 the most varied lists.",
    )
    explanations: bool = Field(
        default=True,
        description="Publish a reason with every item of a user's list (`?explain=true`): the source that proposed "
        "it and the user's item or genre it was proposed for; two bytes an item and the names they point to.",
    )
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
        default=6.0,
        ge=0.0,
        description=(
            "Alert when a scheduled nightly run has not finished this many hours after its day ends (when it"
            " starts, midnight UTC); 0 turns the alert off."
        ),
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
    # Types of sql.contract.FEEDBACK_EVENT_TYPES (ingest refuses others; tests/unit/test_contract.py checks
    # the default), written out: this module imports no project module, it is the bottom import layer.
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

    @field_validator("alert_webhook_url")
    @classmethod
    def _check_webhook_url(cls, value: str | None) -> str | None:
        # A chat webhook's URL is a secret: the message names the problem, never the value.
        if value is None or not value.strip():
            return None
        value = value.strip()
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
            raise ValueError("not an http:// or https:// URL with a host (the value is not repeated: it may be secret)")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError("its port is not a number (the value is not repeated: it may be secret)") from None
        return value

    @model_validator(mode="after")
    def _check_feedback_weights(self) -> Self:
        # Ingest would set every event of a type weighed outside these bounds aside as bad_weight, each night.
        for name, weight in self.feedback_weights.items():
            if not name.strip() or not math.isfinite(weight) or not 0 <= weight <= self.max_weight:
                raise ValueError(
                    f"OVERNIGHT_FEEDBACK_WEIGHTS: feedback type {name!r} weighs {weight}: a weight is a number from 0 "
                    f"to OVERNIGHT_MAX_WEIGHT ({self.max_weight:g})"
                )
        return self

    @field_validator("event_weights", mode="before")
    @classmethod
    def _parse_event_weights(cls, value: object) -> object:
        return parse_event_weights(value) if isinstance(value, str) else value

    @field_validator("event_weights")
    @classmethod
    def _check_event_weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for name, weight in (value or {}).items():
            if not name.strip() or not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"event type {name!r} weighs {weight}: {EVENT_WEIGHTS_FORM}")
        return value

    @property
    def lake_dir(self) -> UPath:
        return self.data_dir / "lake"

    @property
    def models_dir(self) -> UPath:
        return self.data_dir / "models"

    @property
    def reports_dir(self) -> UPath:
        return self.data_dir / "reports"

    @property
    def machine_dir(self) -> Path:
        """Where files that must be on this machine go: DATA_DIR itself when local, else LOCAL_DIR."""
        return self.data_dir if isinstance(self.data_dir, Path) else self.local_dir


EVENT_WEIGHTS_FORM = (
    "give OVERNIGHT_EVENT_WEIGHTS as type=weight pairs with positive weights, e.g. view=1,cart=3,purchase=8"
)


def parse_event_weights(text: str) -> dict[str, float] | None:
    """``view=1,cart=3`` as {"view": 1.0, "cart": 3.0}; an empty text is no weights at all."""
    if not text.strip():
        return None
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, equals, number = (piece.strip() for piece in part.partition("="))
        try:
            weight = float(number)
        except ValueError:
            weight = math.nan
        if not equals or not name or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{part.strip()!r} is not type=weight: {EVENT_WEIGHTS_FORM}")
        if name in weights:
            raise ValueError(f"event type {name!r} is given twice: {EVENT_WEIGHTS_FORM}")
        weights[name] = weight
    return weights


def get_settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]
