"""The backtest (``overnight backtest``): the nightly steps run at rolling cutoffs against a scratch work folder and
database, and the lists they published and every baseline scored on the days after each cutoff, with bootstrap
intervals paired user by user (the protocol: docs/evaluation.md#backtest).
"""

import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

import sql
from common.text import first_line
from jobs import diversity, lake, nightly, workdir
from jobs.database import connect, database_url
from jobs.errors import BadInputError, DatabaseError, MissingDataError, OvernightError
from jobs.evaluation import evaluate
from jobs.settings import Settings
from jobs.steps import train
from jobs.steps.ranking_metrics import K, novelty, per_user_metrics, ranking_metrics
from sql.contract import PRODUCTION_VARIANT

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

DEFAULT_WINDOWS = 6
DEFAULT_HORIZON_DAYS = 28
PUBLISHED = "published"
BASELINES = tuple(name for name in evaluate.MODEL_ORDER if name != train.RANKER)
MODELS = (PUBLISHED, *BASELINES)
# The metrics that are means over users (so resampled), by the column of `per_user_metrics` they average.
# graded_ndcg equals ndcg unless OVERNIGHT_EVENT_WEIGHTS grades the relevant items.
PER_USER = {f"ndcg@{K}": "ndcg", f"graded_ndcg@{K}": "graded_ndcg", f"recall@{K}": "recall", f"map@{K}": "ap"}
COVERAGE = f"coverage@{K}"
DIVERSITY = f"intra_list_diversity@{K}"
NOVELTY = f"novelty@{K}"
RATIO_METRIC = f"ndcg@{K}"
LIST_COLUMNS = ((DIVERSITY, 13), (NOVELTY, 11))
RESAMPLES = 1000
CONFIDENCE = 0.95
DIGITS = 6
SCRATCH_DATABASE_PREFIX = "overnight_backtest_"


# ---------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class Window:
    """One cutoff: the nightly run of the day before it, scored on [cutoff, horizon_end)."""

    number: int  # 1 is the newest
    cutoff: date  # the run sees the events before the start of this day
    horizon_end: date  # the first day after the scored horizon

    @property
    def run_date(self) -> date:
        return self.cutoff - timedelta(days=1)


def check_options(windows: int, horizon_days: int) -> None:
    if windows < 1:
        raise BadInputError(f"--windows must be at least 1, got {windows}")
    if horizon_days < 1:
        raise BadInputError(f"--horizon-days must be at least 1, got {horizon_days}")


def plan_windows(first_day: date, last_day: date, windows: int, horizon_days: int, label_days: int) -> list[Window]:
    """The cutoffs of data spanning [first_day, last_day], newest first.

    The newest leaves ``horizon_days`` whole days after it (through ``last_day``); each older one is
    ``horizon_days`` before the next. The oldest must leave the nightly run its newest label window
    (``label_days``) and at least a day of history before that, or the run could not train.
    """
    check_options(windows, horizon_days)
    newest = last_day + timedelta(days=1 - horizon_days)
    planned = []
    for number in range(1, windows + 1):
        cutoff = newest - timedelta(days=(number - 1) * horizon_days)
        planned.append(Window(number, cutoff, cutoff + timedelta(days=horizon_days)))
    if planned[-1].cutoff - timedelta(days=label_days) <= first_day:
        have = (last_day - first_day).days + 1
        need = windows * horizon_days + label_days + 1
        raise BadInputError(
            f"{have} days of events ({first_day} to {last_day}) are too few for {windows} windows of {horizon_days} "
            f"days: that takes at least {need} days ({windows} x {horizon_days} to score on, then the nightly run's "
            f"{label_days}-day label window and a day of history before the oldest cutoff); ask for fewer --windows "
            "or a shorter --horizon-days"
        )
    return planned


# ---------------------------------------------------------------------------- the bootstrap


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its bootstrap interval (None where resampling users does not measure it)."""

    value: float
    low: float | None
    high: float | None

    def text(self, digits: int = 4) -> str:
        if self.low is None or self.high is None:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def resample_counts(users: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """How many times each of ``users`` is drawn in each resample (resamples x users): users drawn
    with replacement, as many as there are."""
    return rng.multinomial(users, np.full(users, 1.0 / users), size=resamples)


def percentile_interval(samples: np.ndarray, value: float) -> Estimate:
    """``value`` with the central CONFIDENCE share of its resampled ``samples`` (non-finite ones left out)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return Estimate(round(value, DIGITS), None, None)
    tail = (1.0 - CONFIDENCE) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return Estimate(round(value, DIGITS), round(float(low), DIGITS), round(float(high), DIGITS))


def ratio_estimate(
    numerator: float, denominator: float, numerators: np.ndarray, denominators: np.ndarray
) -> Estimate | None:
    """numerator / denominator with the interval of the paired resampled ratios; None when it is undefined."""
    if denominator <= 0:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        return percentile_interval(numerators / denominators, numerator / denominator)


# ---------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class Summary:
    """Every model on the same users: the metrics with intervals, and published / each baseline."""

    users: int
    models: dict[str, dict[str, Estimate]]
    best_baseline: str  # by ndcg@10
    ratio_to_best_baseline: Estimate | None  # published / best baseline, ndcg@10
    ratios: dict[str, Estimate | None]  # published / each baseline, ndcg@10


@dataclass(frozen=True)
class ScoredWindow:
    """One window's per-user metrics of every model (users x MODELS x PER_USER, users sorted by id),
    their coverage, and each user's draws in every resample (RESAMPLES x users)."""

    values: np.ndarray
    coverage: dict[str, float]
    counts: np.ndarray
    beyond_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # model: DIVERSITY, NOVELTY

    @property
    def users(self) -> int:
        return int(self.values.shape[0])

    def sums(self) -> np.ndarray:
        """MODELS x PER_USER sums over the users."""
        return self.values.sum(axis=0)

    def resampled_sums(self) -> np.ndarray:
        """RESAMPLES x MODELS x PER_USER sums over each resample's users."""
        flat = self.values.reshape(self.users, -1)
        return (self.counts @ flat).reshape(self.counts.shape[0], *self.values.shape[1:])


def summarise(scored: list[ScoredWindow]) -> Summary:
    """The metrics of every model over the users of ``scored`` taken together (one window, or all pooled):
    means over user-windows, each window's users resampled within it; coverage is the windows' mean."""
    users = sum(s.users for s in scored)
    sums = sum((s.sums() for s in scored), start=np.zeros((len(MODELS), len(PER_USER))))
    resampled = sum((s.resampled_sums() for s in scored), start=np.zeros((RESAMPLES, len(MODELS), len(PER_USER))))
    models: dict[str, dict[str, Estimate]] = {}
    for m, model in enumerate(MODELS):
        estimates = {
            metric: percentile_interval(resampled[:, m, j] / users, sums[m, j] / users)
            for j, metric in enumerate(PER_USER)
        }
        coverage = float(np.mean([s.coverage[model] for s in scored]))
        models[model] = {**estimates, COVERAGE: Estimate(round(coverage, DIGITS), None, None)}
        for metric in (DIVERSITY, NOVELTY):
            if all(model in s.beyond_accuracy for s in scored):
                value = float(np.mean([s.beyond_accuracy[model][metric] for s in scored]))
                models[model][metric] = Estimate(round(value, DIGITS), None, None)
    j = list(PER_USER).index(RATIO_METRIC)
    ratios = {
        name: ratio_estimate(sums[0, j], sums[m, j], resampled[:, 0, j], resampled[:, m, j])
        for m, name in enumerate(MODELS)
        if name != PUBLISHED
    }
    best = max(BASELINES, key=lambda name: models[name][RATIO_METRIC].value)  # the first of equals
    return Summary(users, models, best, ratios[best], ratios)


# ---------------------------------------------------------------------------- one window


@dataclass(frozen=True)
class WindowResult:
    number: int
    cutoff: str
    run_date: str
    horizon_end: str
    batch_id: int  # the batch the run made live, whose lists were read back
    model_id: str
    run_events: int  # the events the window's source held, all before the cutoff
    run_last_event: str  # the newest event in the run's lake: before the cutoff
    fallback_users: int  # evaluated users the batch did not know: a lookup gives them its fallback list
    scratch_database: str  # created for the run, dropped after it
    seconds: dict[str, float]
    scores: Summary


@contextmanager
def scratch_database(settings: Settings, label: str) -> Iterator[str]:
    """A new database on the server the settings point at (the embedded one when none is configured),
    dropped on leaving; yields its URL."""
    server = database_url(settings)
    name = f"{SCRATCH_DATABASE_PREFIX}{label}_{uuid.uuid4().hex[:8]}"
    statement = pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name))
    try:
        with psycopg.connect(server, autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)
    except psycopg.Error as error:
        raise DatabaseError(f"cannot create the backtest's scratch database {name}: {first_line(error)}") from error
    try:
        yield make_conninfo(server, dbname=name)
    finally:
        with psycopg.connect(server, autocommit=True, connect_timeout=10) as conn:
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))


def published_lists(settings: Settings, users: list[str]) -> tuple[pl.DataFrame, int, str, int]:
    """What a lookup of k=10 returns each of ``users`` from the live batch: (user_id, item_id, rank) of
    their list, the batch's fallback list for users it does not know; with the batch id, its model id
    and how many users got the fallback."""
    with connect(settings) as conn:
        with conn.cursor(row_factory=dict_row) as cursor:
            batches = cursor.execute(sql.query("serving_batches")).fetchall()
        live = next((b for b in batches if b["variant"] == PRODUCTION_VARIANT), None)
        if live is None:
            raise MissingDataError("the nightly run published no live batch")
        rows = conn.execute(sql.batch_query("top_items_for_users", live["batch_id"]), (K, users)).fetchall()
    known = {user_id: list(item_ids) for user_id, item_ids in rows}
    fallback = list(live["fallback_item_ids"][:K])
    lists = [(user, known.get(user, fallback)) for user in users]
    frame = pl.DataFrame(
        {
            "user_id": [user for user, items in lists for _ in items],
            "item_id": [item for _, items in lists for item in items],
            "rank": [rank for _, items in lists for rank in range(1, len(items) + 1)],
        },
        schema={"user_id": pl.String, "item_id": pl.String, "rank": pl.Int64},
    )
    return frame, int(live["batch_id"]), str(live["model_id"]), len(users) - len(known)


def _run_window(
    settings: Settings,
    window: Window,
    windows: int,
    events: pl.DataFrame,
    catalogue: pl.DataFrame,
    rng: np.random.Generator,
    progress: Progress,
) -> tuple[WindowResult, ScoredWindow]:
    label = f"window {window.number}/{windows}"
    cutoff = lake.day_start(window.cutoff)
    seconds: dict[str, float] = {}
    workdir.scratch_root(settings).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"backtest-{window.cutoff}-", dir=workdir.scratch_root(settings)))
    try:
        source = scratch / "source"
        source.mkdir()
        before = events.filter(pl.col("timestamp") < cutoff)
        before.write_parquet(source / "interactions.parquet")
        catalogue.write_parquet(source / "items.parquet")
        with scratch_database(settings, f"{window.cutoff:%Y%m%d}") as url:
            # The same settings as `overnight run`, but every write goes to the scratch folder and database,
            # and nothing reaches the outside: no alert, no shadow model of the real registry.
            run_settings = settings.model_copy(
                update={
                    "data_dir": scratch / "var",
                    "database_url": url,
                    "source": None,
                    "shadow_model": None,
                    "alert_webhook_url": None,
                }
            )
            started = time.perf_counter()
            night = nightly.night_of(run_settings, window.run_date, source, source_format="parquet")
            try:
                nightly.run(night, progress=lambda line: progress(f"{label} {line}"))
            except OvernightError as error:
                raise type(error)(f"backtest {label} (cutoff {window.cutoff}): {error}") from error
            seconds["run"] = round(time.perf_counter() - started, 2)

            started = time.perf_counter()
            # What the run ingested, all of it (no date filter): the baselines learn from exactly these events.
            partitions = lake.interaction_partitions(run_settings.lake_dir, date.max)
            seen = pl.scan_parquet([str(p) for p in partitions], schema=lake.INTERACTIONS_SCHEMA).collect()
            run_catalogue = lake.read_catalogue(run_settings.lake_dir, window.run_date)
            later = events.lazy().filter(
                (pl.col("timestamp") >= cutoff) & (pl.col("timestamp") < lake.day_start(window.horizon_end))
            )
            relevant = train.new_items(seen.lazy(), later, settings)
            users = relevant["user_id"].unique().sort().to_list()
            if not users:
                raise MissingDataError(
                    f"backtest {label} (cutoff {window.cutoff}): no user with events before the cutoff touched a "
                    f"new item in the {(window.horizon_end - window.cutoff).days} days after it; ask for fewer "
                    "--windows or a longer --horizon-days"
                )
            published, batch_id, model_id, fallback_users = published_lists(run_settings, users)
            scratch_name = str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])
        test = train.LabelWindow(f"[{window.cutoff}, {window.horizon_end})", cutoff, seen.lazy(), relevant)
        examples = train.build_examples(test, run_catalogue, settings)
        lists = {
            PUBLISHED: published,
            **{name: top for name, (top, _) in train.baseline_lists(examples, settings).items()},
        }
        tokens = diversity.item_tokens(run_catalogue)
        beyond_accuracy = {
            model: {DIVERSITY: diversity.intra_list_diversity(listed, tokens), NOVELTY: novelty(listed, seen)}
            for model, listed in lists.items()
        }
        scored = _score(lists, relevant, run_catalogue.height, users, rng, beyond_accuracy)
        seconds["score"] = round(time.perf_counter() - started, 2)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    last_seen = seen["timestamp"].max()
    result = WindowResult(
        number=window.number,
        cutoff=window.cutoff.isoformat(),
        run_date=window.run_date.isoformat(),
        horizon_end=window.horizon_end.isoformat(),
        batch_id=batch_id,
        model_id=model_id,
        run_events=before.height,
        run_last_event=last_seen.isoformat() if last_seen is not None else "",  # type: ignore[union-attr]
        fallback_users=fallback_users,
        scratch_database=scratch_name,
        seconds=seconds,
        scores=summarise([scored]),
    )
    return result, scored


def _score(
    lists: dict[str, pl.DataFrame],
    relevant: pl.DataFrame,
    catalogue_size: int,
    users: list[str],
    rng: np.random.Generator,
    beyond_accuracy: dict[str, dict[str, float]],
) -> ScoredWindow:
    values = np.empty((len(users), len(MODELS), len(PER_USER)))
    coverage = {}
    for m, model in enumerate(MODELS):
        per_user = per_user_metrics(lists[model], relevant)
        assert per_user["user_id"].to_list() == users, "every model is scored on the same users"
        values[:, m, :] = per_user.select(list(PER_USER.values())).to_numpy()
        coverage[model] = ranking_metrics(lists[model], relevant, catalogue_size)[COVERAGE]
    return ScoredWindow(values, coverage, resample_counts(len(users), RESAMPLES, rng), beyond_accuracy)


# ---------------------------------------------------------------------------- the backtest


@dataclass(frozen=True)
class Backtest:
    source: str
    horizon_days: int
    events: int
    first_event: str
    last_event: str
    resamples: int
    confidence: float
    seed: int
    seconds: float
    windows: list[WindowResult]
    pooled: Summary

    def table(self) -> str:
        pooled = self.pooled
        lines = [
            f"pooled over {len(self.windows)} windows of {self.horizon_days} days, {pooled.users:,} user-windows "
            f"({self.confidence:.0%} intervals, {self.resamples:,} bootstrap resamples of users):",
            f"{'model':<16}" + "".join(f"{metric:>26}" for metric in PER_USER) + f"{COVERAGE:>13}"
            f"{'diversity@10':>13}{'novelty@10':>11}{'published / model':>26}",
        ]
        for model, estimates in pooled.models.items():
            ratio = pooled.ratios.get(model)
            lines.append(
                f"{model:<16}"
                + "".join(f"{estimates[metric].text():>26}" for metric in PER_USER)
                + f"{estimates[COVERAGE].text():>13}"
                + "".join(f"{estimates[m].text():>{w}}" if m in estimates else f"{'-':>{w}}" for m, w in LIST_COLUMNS)
                + f"{(ratio.text(2) if ratio else '-' if model != PUBLISHED else ''):>26}"
            )
        best = pooled.ratio_to_best_baseline
        lines.append(
            f"published / best baseline ({pooled.best_baseline}), {RATIO_METRIC}: "
            + (best.text(2) if best else "undefined")
        )
        lines.append("per window (newest first):")
        for window in self.windows:
            scores = window.scores
            ratio = scores.ratio_to_best_baseline
            lines.append(
                f"  {window.number}  cutoff {window.cutoff}  {scores.users:>6,} users"
                f" ({window.fallback_users} fallback)"
                f"  published {scores.models[PUBLISHED][RATIO_METRIC].text()}"
                f"  {scores.best_baseline} {scores.models[scores.best_baseline][RATIO_METRIC].text()}"
                f"  ratio {ratio.text(2) if ratio else 'undefined'}"
            )
        return "\n".join(lines)


def run_backtest(
    settings: Settings,
    source: Path,
    windows: int = DEFAULT_WINDOWS,
    horizon_days: int = DEFAULT_HORIZON_DAYS,
    fmt: str = "auto",
    progress: Progress = logger.info,
) -> Backtest:
    """Run the nightly steps at each of ``windows`` rolling cutoffs of ``source`` and score what they
    published, and every baseline, against the ``horizon_days`` after each cutoff."""
    started = time.perf_counter()
    check_options(windows, horizon_days)  # before loading anything
    progress(f"backtest: loading {source} ...")
    workdir.scratch_root(settings).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="backtest-source-", dir=workdir.scratch_root(settings)))
    try:
        events, catalogue = evaluate.load_source(settings, source, fmt, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if events.height == 0:
        raise BadInputError(f"{source}: no valid events to backtest on")
    first, last = events["timestamp"].min(), events["timestamp"].max()
    assert isinstance(first, datetime) and isinstance(last, datetime)
    planned = plan_windows(first.date(), last.date(), windows, horizon_days, settings.label_days)
    progress(
        f"backtest: {events.height:,} events from {first:%Y-%m-%d} to {last:%Y-%m-%d}; cutoffs "
        + ", ".join(w.cutoff.isoformat() for w in planned)
    )
    rng = np.random.default_rng(settings.seed)
    results: list[WindowResult] = []
    scored: list[ScoredWindow] = []
    for window in planned:
        progress(
            f"backtest window {window.number}/{windows}: `overnight run --date {window.run_date}` on the events "
            f"before {window.cutoff}, scored on {window.cutoff} to {window.horizon_end - timedelta(days=1)}"
        )
        result, scores = _run_window(settings, window, windows, events, catalogue, rng, progress)
        ratio = result.scores.ratio_to_best_baseline
        progress(
            f"backtest window {window.number}/{windows}: {result.scores.users:,} users, published "
            f"{result.scores.models[PUBLISHED][RATIO_METRIC].value:.4f}, {result.scores.best_baseline} "
            f"{result.scores.models[result.scores.best_baseline][RATIO_METRIC].value:.4f} ({RATIO_METRIC}), "
            f"ratio {ratio.text(2) if ratio else 'undefined'}; {sum(result.seconds.values()):.0f}s"
        )
        results.append(result)
        scored.append(scores)
    return Backtest(
        source=str(source),
        horizon_days=horizon_days,
        events=events.height,
        first_event=first.isoformat(),
        last_event=last.isoformat(),
        resamples=RESAMPLES,
        confidence=CONFIDENCE,
        seed=settings.seed,
        seconds=round(time.perf_counter() - started, 2),
        windows=results,
        pooled=summarise(scored),
    )
