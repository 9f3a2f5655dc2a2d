"""Offline evaluation (``overnight evaluate``): the protocols of DESIGN §4 over a whole source.

The source goes through ingest's validation into a scratch lake; the whole pipeline, candidate
tables and ranker included, is then trained on the training part only, with the same label
windows, candidate and feature code as the nightly run, and every model is scored on the
held-out part by ``train.evaluate_models``.

- ``user-holdout``: each user's last 20% of interactions by time (at least one, users with two or
  more) are the relevant set; every other interaction is training data. The ranker learns from
  the same split applied again inside the training data (``label_windows`` times, each on what the
  previous one left).
- ``global``: cutoff C (default: the last ``horizon_days`` of the data); training data is every
  event before C, and the ranker learns from the nightly rolling windows ending at C; the relevant
  items of a user are the new items they touched in [C, C + horizon).
"""

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from jobs import features, ingest, lake, train
from jobs.errors import BadInputError, MissingDataError
from jobs.settings import Settings

logger = logging.getLogger(__name__)

PROTOCOLS = ("user-holdout", "global")
HOLDOUT_SHARE = 0.2
MODEL_ORDER = ("ranker", "most-popular", "recent-popular", "co-visitation", "item-knn", "genre-popular")


@dataclass(frozen=True)
class Evaluation:
    source: str
    protocol: str
    cutoff: str | None
    horizon_days: int | None
    events: int
    users: int
    items: int
    training_windows: list[str]
    seconds: dict[str, float]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    feature_importance: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        columns = ("ndcg@10", "recall@10", "map@10", "hit_rate@10", "coverage@10", "candidate_recall", "users")
        lines = [f"{'model':<16}" + "".join(f"{c:>18}" for c in columns)]
        for name, metrics in self.models.items():
            cells = [f"{metrics[c]:>18,}" if c == "users" else f"{metrics[c]:>18.4f}" for c in columns]
            lines.append(f"{name:<16}" + "".join(cells))
        return "\n".join(lines)


def user_holdout_window(events: pl.DataFrame, settings: Settings, name: str) -> train.LabelWindow:
    """Each user's last 20% of interactions by time (at least one; users with two or more) as labels."""
    ordered = events.sort("user_id", "timestamp", "item_id").with_columns(
        _position=pl.int_range(pl.len()).over("user_id"), _count=pl.len().over("user_id")
    )
    held = pl.max_horizontal((pl.col("_count") * HOLDOUT_SHARE).ceil().cast(pl.Int64), pl.lit(1))
    is_label = (pl.col("_count") >= 2) & (pl.col("_position") >= pl.col("_count") - held)
    history = ordered.filter(~is_label).drop("_position", "_count")
    later = ordered.filter(is_label).drop("_position", "_count")
    last = history["timestamp"].max()
    assert isinstance(last, datetime), "every user has history"
    cutoff = last + timedelta(microseconds=1)
    return train.LabelWindow(
        name=name,
        cutoff=cutoff,
        history=history.lazy(),
        relevant=train.new_items(history.lazy(), later.lazy(), settings),
    )


def split(
    events: pl.DataFrame, protocol: str, settings: Settings, cutoff: datetime | None, horizon_days: int
) -> tuple[train.LabelWindow, list[train.LabelWindow]]:
    """(the test window, the training windows newest first) of a protocol."""
    if protocol == "user-holdout":
        test = user_holdout_window(events, settings, "user-holdout")
        windows: list[train.LabelWindow] = []
        rest = test.history.collect()
        for number in range(1, settings.label_windows + 1):
            window = user_holdout_window(rest, settings, f"user-holdout inside the training data #{number}")
            if window.relevant.height == 0:
                break
            windows.append(window)
            rest = window.history.collect()
        return test, windows
    if cutoff is None:
        last = events["timestamp"].max()
        cutoff = lake.day_end(last.date()) - timedelta(days=horizon_days)  # type: ignore[union-attr]
    test = train.time_window(events.lazy(), cutoff, cutoff + timedelta(days=horizon_days), settings)
    return test, train.rolling_windows(events.lazy().filter(pl.col("timestamp") < cutoff), cutoff, settings)


def load_source(settings: Settings, source: Path, fmt: str, scratch: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(valid interactions, catalogue) of a source, through ingest's validation into a scratch lake."""
    as_of = datetime.now(UTC).date()
    # The source alone: the feedback the service collected belongs to the nightly lake, not to this evaluation.
    scratch_settings = settings.model_copy(update={"data_dir": scratch, "ingest_feedback": False})
    ingest.ingest(scratch_settings, source, as_of, fmt)
    events = lake.scan_interactions(scratch_settings.lake_dir, as_of).collect()
    return events, lake.read_catalogue(scratch_settings.lake_dir, as_of)


def evaluate(
    settings: Settings,
    source: Path,
    protocol: str = "user-holdout",
    cutoff: date | None = None,
    horizon_days: int = 7,
    fmt: str = "auto",
) -> Evaluation:
    if protocol not in PROTOCOLS:
        raise BadInputError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if horizon_days <= 0:
        raise BadInputError(f"--horizon-days must be positive, got {horizon_days}")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="evaluate-", dir=settings.work_dir))
    try:
        events, catalogue = load_source(settings, source, fmt, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds["load"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    test, windows = split(events, protocol, settings, lake.day_start(cutoff) if cutoff else None, horizon_days)
    if test.relevant.height == 0:
        raise MissingDataError(f"{protocol}: no user has both training data and relevant items to evaluate")
    if not windows:
        raise MissingDataError(f"{protocol}: the training data has no label window to train the ranker on")
    logger.info(
        "evaluate %s: training on %s, testing %d users",
        protocol,
        [w.name for w in windows],
        test.relevant["user_id"].n_unique(),
    )
    training = [
        train.build_examples(
            w, catalogue, settings, train.sample_users(w.relevant["user_id"], settings.train_max_users, settings.seed)
        )
        for w in windows
    ]
    fitted = train.fit(training, settings)
    seconds["train"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    examples = train.build_examples(test, catalogue, settings)
    results = train.evaluate_models(examples, {train.RANKER: (fitted.booster, list(features.FEATURES))}, settings)
    seconds["evaluate"] = round(time.perf_counter() - started, 2)
    models = {name: _public(results[name]) for name in MODEL_ORDER if name in results}
    return Evaluation(
        source=str(source),
        protocol=protocol,
        cutoff=test.cutoff.isoformat() if protocol == "global" else None,
        horizon_days=horizon_days if protocol == "global" else None,
        events=events.height,
        users=events["user_id"].n_unique(),
        items=catalogue.height,
        training_windows=[w.name for w in windows],
        seconds=seconds,
        models=models,
        feature_importance=dict(sorted(fitted.importance.items(), key=lambda kv: -kv[1])),
    )


METRIC_KEYS = ("ndcg@10", "recall@10", "map@10", "hit_rate@10", "coverage@10", "users", "candidate_recall")


def _public(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: metrics[key] for key in METRIC_KEYS}
