"""Offline evaluation (``overnight evaluate``): the protocols of docs/evaluation.md (``user-holdout``, ``global``)
over a whole source: the whole pipeline trained on the training part with the nightly run's own code, and every
model, item-to-item answers included (``jobs.evaluation.item_quality``), scored on the held-out part.
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

from jobs import diversity, lake, workdir
from jobs.errors import BadInputError, MissingDataError
from jobs.evaluation import item_quality
from jobs.settings import Settings
from jobs.steps import features, ingest, popularity, train
from jobs.steps.ranking_metrics import K, novelty

logger = logging.getLogger(__name__)

PROTOCOLS = ("user-holdout", "global")
HOLDOUT_SHARE = 0.2
DIVERSITY = f"intra_list_diversity@{K}"
NOVELTY = f"novelty@{K}"
MODEL_ORDER = ("ranker", "most-popular", "recent-popular", "co-visitation", "item-knn", "genre-popular")
# Below this many users a metric@10 moves by whole points between neighbouring cutoffs: noise, not a ranking.
MIN_EVALUATED_USERS = 100
# The global protocol's horizon is widened up to a quarter; past that it no longer says what a nightly
# run's next days look like.
MAX_WIDENED_HORIZON_DAYS = 90
TOO_NOISY = "these numbers are too noisy to compare models by"
# Visitors are answered in Python, one blend_session each: enough for a stable mean, bounded on big sources.
SESSION_MAX_VISITORS = 5_000
# Printed above user-holdout numbers wherever they appear: comparable with papers, not what users get.
LITERATURE_PROTOCOL = (
    "user-holdout: the literature's protocol, not how the nightly run trains and publishes; "
    "`overnight backtest` scores the published lists"
)


@dataclass(frozen=True)
class Evaluation:
    source: str
    protocol: str
    cutoff: str | None
    horizon_days: int | None  # the horizon used: the requested one, or wider when too few users fell in it
    requested_horizon_days: int | None
    events: int
    users: int
    items: int
    training_windows: list[str]
    seconds: dict[str, float]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    feature_importance: dict[str, float] = field(default_factory=dict)
    warning: str | None = None  # set when the numbers rest on too few users to compare models by
    similar_items: item_quality.SimilarItemsQuality | None = None
    session: item_quality.SessionQuality | None = None

    def table(self) -> str:
        """The ranker and its baselines, then the similar-items and session tables."""
        tables = [self.ranking_table()]
        tables += [part.table() for part in (self.similar_items, self.session) if part is not None]
        return "\n\n".join(tables)

    def ranking_table(self) -> str:
        columns = (
            "ndcg@10",
            "graded_ndcg@10",
            "recall@10",
            "map@10",
            "hit_rate@10",
            "coverage@10",
            DIVERSITY,
            NOVELTY,
            "candidate_recall",
            "users",
        )
        lines = [f"warning: {self.warning}"] if self.warning else []
        if self.protocol == "user-holdout":
            lines.append(LITERATURE_PROTOCOL)
        lines.append(f"{'model':<16}" + "".join(f"{c.removeprefix('intra_list_'):>18}" for c in columns))
        for name, metrics in self.models.items():
            cells = [f"{metrics[c]:>18,}" if c == "users" else f"{metrics[c]:>18.4f}" for c in columns]
            lines.append(f"{name:<16}" + "".join(cells))
        return "\n".join(lines)


def user_holdout_split(events: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(history, held out): each user's last 20% of interactions by time (at least one; users with two or
    more) are held out; ties in time go by item id."""
    ordered = events.sort("user_id", "timestamp", "item_id").with_columns(
        _position=pl.int_range(pl.len()).over("user_id"), _count=pl.len().over("user_id")
    )
    held = pl.max_horizontal((pl.col("_count") * HOLDOUT_SHARE).ceil().cast(pl.Int64), pl.lit(1))
    is_label = (pl.col("_count") >= 2) & (pl.col("_position") >= pl.col("_count") - held)
    return ordered.filter(~is_label).drop("_position", "_count"), ordered.filter(is_label).drop("_position", "_count")


def user_holdout_window(events: pl.DataFrame, settings: Settings, name: str) -> train.LabelWindow:
    """Each user's last 20% of interactions by time (at least one; users with two or more) as labels."""
    history, later = user_holdout_split(events)
    last = history["timestamp"].max()
    assert isinstance(last, datetime), "every user has history"
    cutoff = last + timedelta(microseconds=1)
    return train.LabelWindow(
        name=name,
        cutoff=cutoff,
        history=history.lazy(),
        relevant=train.new_items(history.lazy(), later.lazy(), settings),
    )


@dataclass(frozen=True)
class Horizon:
    """The global protocol's test horizon: the one asked for, or the one widened to."""

    requested_days: int
    days: int
    users: int  # users evaluated with it: history before the cutoff, new items within the horizon
    users_by_days: dict[int, int]  # every horizon tried
    warning: str | None


def widened_horizons(requested_days: int) -> list[int]:
    """The requested horizon, then doubled up to MAX_WIDENED_HORIZON_DAYS (the last step capped)."""
    days = [requested_days]
    while days[-1] < MAX_WIDENED_HORIZON_DAYS:
        days.append(min(days[-1] * 2, MAX_WIDENED_HORIZON_DAYS))
    return days


def choose_horizon(events: pl.DataFrame, settings: Settings, cutoff: datetime | None, requested_days: int) -> Horizon:
    """The first horizon, from the requested one widening, that evaluates MIN_EVALUATED_USERS users;
    when none does, the one that evaluates the most (the narrowest of equals), with a warning.

    Widening stops where the cutoff (moving back with a default one) leaves the ranker no label window.
    """
    users_by_days: dict[int, int] = {}
    for days in widened_horizons(requested_days):
        test = global_test_window(events, settings, cutoff, days)
        if days != requested_days and not _has_label_window(events, test.cutoff, settings):
            break
        users_by_days[days] = test.relevant["user_id"].n_unique()
        if users_by_days[days] >= MIN_EVALUATED_USERS:
            break
    # The first of equals (max keeps it): a wider horizon that finds no one more is not worth its older cutoff.
    days = max(users_by_days, key=users_by_days.__getitem__)
    users = users_by_days[days]
    tried = ", ".join(f"{d} days: {n:,}" for d, n in users_by_days.items())
    warning = None
    if users < MIN_EVALUATED_USERS:
        scope = (
            f"even with the horizon widened up to {max(users_by_days)} days"
            if len(users_by_days) > 1
            else f"in the {requested_days}-day horizon"
        )
        warning = (
            f"only {users:,} users evaluated {scope}, fewer than {MIN_EVALUATED_USERS} (users per horizon: "
            f"{tried}; used {days} days): {TOO_NOISY}"
        )
    elif days != requested_days:
        warning = (
            f"only {users_by_days[requested_days]:,} users fell in the requested {requested_days}-day horizon, "
            f"fewer than {MIN_EVALUATED_USERS}: widened it to {days} days, which evaluates {users:,} users "
            f"(users per horizon: {tried})"
        )
    return Horizon(requested_days, days, users, users_by_days, warning)


def _has_label_window(events: pl.DataFrame, cutoff: datetime, settings: Settings) -> bool:
    """Whether train.rolling_windows finds its first (newest) window before ``cutoff``."""
    before = events.lazy().filter(pl.col("timestamp") < cutoff)
    return train.time_window(before, cutoff - timedelta(days=settings.label_days), cutoff, settings).relevant.height > 0


def global_test_window(
    events: pl.DataFrame, settings: Settings, cutoff: datetime | None, horizon_days: int
) -> train.LabelWindow:
    """[C, C + horizon) after the cutoff; a cutoff left to default is the horizon's length before the data's end."""
    if cutoff is None:
        last = events["timestamp"].max()
        cutoff = lake.day_end(last.date()) - timedelta(days=horizon_days)  # type: ignore[union-attr]
    return train.time_window(events.lazy(), cutoff, cutoff + timedelta(days=horizon_days), settings)


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
    test = global_test_window(events, settings, cutoff, horizon_days)
    return test, train.rolling_windows(events.lazy().filter(pl.col("timestamp") < test.cutoff), test.cutoff, settings)


def session_visitors(events: pl.DataFrame, settings: Settings) -> pl.Series:
    """The anonymous visitors of the session protocol: the held-out fifth of the users the promotion gate
    also keeps apart (``train.held_out_users``), at most SESSION_MAX_VISITORS of them."""
    held_out = train.held_out_users(events["user_id"], settings.seed)
    return train.sample_users(held_out, SESSION_MAX_VISITORS, settings.seed)


def session_split(events: pl.DataFrame, visitors: pl.Series) -> item_quality.Sessions | None:
    """The session protocol's split: each visitor's last 20% of interactions by time (as ``user-holdout``
    holds them out) predicted from the items before it; everyone else's events build the neighbours."""
    is_visitor = pl.col("user_id").is_in(visitors.implode())
    before, later = user_holdout_split(events.filter(is_visitor))
    return item_quality.sessions_of(before, later, events.filter(~is_visitor))


def held_out_events(events: pl.DataFrame, protocol: str, test: train.LabelWindow, horizon_days: int) -> pl.DataFrame:
    """Every held-out event of a protocol's test split (the relevant sets keep only the new items)."""
    if protocol == "user-holdout":
        return user_holdout_split(events)[1]
    end = test.cutoff + timedelta(days=horizon_days)
    return events.filter((pl.col("timestamp") >= test.cutoff) & (pl.col("timestamp") < end))


@dataclass(frozen=True)
class Scratch:
    """A source ingested into a scratch lake as of a date: what the evaluation reads."""

    settings: Settings  # the evaluation's settings with the scratch lake as the data dir
    as_of: date


def load_source(settings: Settings, source: Path, fmt: str, scratch: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(valid interactions, catalogue) of a source, through ingest's validation into a scratch lake."""
    events, catalogue, _ = ingest_source(settings, source, fmt, scratch)
    return events, catalogue


def ingest_source(
    settings: Settings, source: Path, fmt: str, scratch: Path
) -> tuple[pl.DataFrame, pl.DataFrame, Scratch]:
    """(valid interactions, catalogue, the scratch lake) of a source, through ingest's validation."""
    as_of = datetime.now(UTC).date()
    # The source alone: the feedback the service collected belongs to the nightly lake, not to this evaluation.
    scratch_settings = settings.model_copy(update={"data_dir": scratch, "ingest_feedback": False})
    ingest.ingest(scratch_settings, source, as_of, fmt)
    events = lake.scan_interactions(scratch_settings.lake_dir, as_of).collect()
    return events, lake.read_catalogue(scratch_settings.lake_dir, as_of), Scratch(scratch_settings, as_of)


def segment_popular(
    scratch: Scratch, sessions: item_quality.Sessions, catalogue: pl.DataFrame
) -> item_quality.SegmentPopular | str:
    """Each segment's popular list among the session split's training users and every user's segment, as
    the nightly run would publish them; or why there are none."""
    attribute = scratch.settings.segment_attribute
    if attribute is None:
        return "no segment attribute (OVERNIGHT_SEGMENT_ATTRIBUTE is unset)"
    users_path = lake.latest_snapshot(scratch.settings.lake_dir, "users", scratch.as_of)
    try:
        members = popularity.read_user_segments(users_path, scratch.as_of, attribute)
    except (MissingDataError, BadInputError) as error:
        return str(error)
    no_one_scored = pl.DataFrame(schema={"user_id": pl.String})
    lists, _ = popularity.build_segments(
        sessions.training, catalogue, no_one_scored, users_path, scratch.as_of, sessions.cutoff, scratch.settings
    )
    if lists.height == 0:
        return f"no segment of {attribute!r} has {scratch.settings.segment_min_users} recently active users"
    return item_quality.SegmentPopular(members=members, lists=lists)


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
    workdir.scratch_root(settings).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="evaluate-", dir=workdir.scratch_root(settings)))
    try:
        events, catalogue, lake_scratch = ingest_source(settings, source, fmt, scratch)
        seconds["load"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        sessions = session_split(events, session_visitors(events, settings))
        session = None
        if sessions is not None:  # while the scratch lake is there: the segment baseline reads its users table
            baseline = segment_popular(lake_scratch, sessions, catalogue)
            session = item_quality.session_quality(sessions, catalogue, settings, baseline)
        seconds["session"] = round(time.perf_counter() - started, 2)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    started = time.perf_counter()
    cutoff_start = lake.day_start(cutoff) if cutoff else None
    horizon = choose_horizon(events, settings, cutoff_start, horizon_days) if protocol == "global" else None
    test, windows = split(events, protocol, settings, cutoff_start, horizon.days if horizon else horizon_days)
    if test.relevant.height == 0:
        raise MissingDataError(f"{protocol}: no user has both training data and relevant items to evaluate")
    if not windows:
        raise MissingDataError(f"{protocol}: the training data has no label window to train the ranker on")
    warning = horizon.warning if horizon else _few_users_warning(test.relevant["user_id"].n_unique())
    if warning:
        logger.warning("evaluate %s: %s", protocol, warning)
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
    beyond = beyond_accuracy(examples, fitted.booster, catalogue, settings)
    models = {
        name: {**item_quality.public_metrics(results[name], METRIC_KEYS), **beyond[name]}
        for name in MODEL_ORDER
        if name in results
    }

    started = time.perf_counter()
    later = held_out_events(events, protocol, test, horizon.days if horizon else horizon_days)
    similar_items = item_quality.similar_items_quality(test.history, later.lazy(), catalogue, test.cutoff, settings)
    seconds["similar_items"] = round(time.perf_counter() - started, 2)
    return Evaluation(
        source=str(source),
        protocol=protocol,
        cutoff=test.cutoff.isoformat() if protocol == "global" else None,
        horizon_days=horizon.days if horizon else None,
        requested_horizon_days=horizon.requested_days if horizon else None,
        events=events.height,
        users=events["user_id"].n_unique(),
        items=catalogue.height,
        training_windows=[w.name for w in windows],
        seconds=seconds,
        models=models,
        feature_importance=dict(sorted(fitted.importance.items(), key=lambda kv: -kv[1])),
        warning=warning,
        similar_items=similar_items,
        session=session,
    )


def beyond_accuracy(
    examples: train.Examples, booster: Any, catalogue: pl.DataFrame, settings: Settings
) -> dict[str, dict[str, float]]:
    """Intra-list diversity and novelty of every model's top 10 for the evaluated users: the ranker's own
    order (the published lists, diversified when OVERNIGHT_DIVERSITY is set, are the backtest's to measure)."""
    frame = examples.frame
    predicted = train.predict(booster, frame, list(features.FEATURES))
    lists = {
        train.RANKER: train.top_k(frame.with_columns(_ranker=pl.Series(predicted)), pl.col("_ranker"), K),
        **{name: top for name, (top, _) in train.baseline_lists(examples, settings).items()},
    }
    tokens = diversity.item_tokens(catalogue)
    history = examples.window.history.select("user_id", "item_id").collect()
    return {
        name: {DIVERSITY: diversity.intra_list_diversity(listed, tokens), NOVELTY: novelty(listed, history)}
        for name, listed in lists.items()
    }


def _few_users_warning(users: int) -> str | None:
    if users >= MIN_EVALUATED_USERS:
        return None
    return f"only {users:,} users evaluated, fewer than {MIN_EVALUATED_USERS}: {TOO_NOISY}"


METRIC_KEYS = (
    "ndcg@10",
    "graded_ndcg@10",  # equals ndcg@10 unless OVERNIGHT_EVENT_WEIGHTS grades the relevant items
    "recall@10",
    "map@10",
    "hit_rate@10",
    "coverage@10",
    "users",
    "candidate_recall",
)
