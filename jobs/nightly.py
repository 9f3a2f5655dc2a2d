"""The nightly graph: one list of steps, `STEPS`. The Airflow DAG builds its tasks from it and `overnight run` runs
it in order, so the two cannot drift apart. Importing this module loads no data library, so the DAG file stays
light for the scheduler that parses it.
"""

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from common.text import first_line, printable
from jobs.errors import BadInputError
from jobs.monitoring import history
from jobs.outcome import Outcome, StepResult
from jobs.settings import Settings

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Night:
    """One night's run: its date, and the params the DAG's trigger form or the CLI's options give."""

    settings: Settings
    logical_date: date
    source: str | None = None  # default OVERNIGHT_SOURCE ({date} filled in)
    source_format: str | None = None  # default OVERNIGHT_SOURCE_FORMAT
    shards: int | None = None  # default: enough for OVERNIGHT_SHARD_USERS users each
    publish_live: bool | None = None  # None: live unless a newer date is live
    shadow_model: str | None = None  # default OVERNIGHT_SHADOW_MODEL
    accept_checks: str | None = None  # an operator's reason to publish what monitoring holds back
    accepted_by: str | None = None  # who (default: this process's user at its host)
    retrain: bool = False  # train even when the model is current (`overnight train`)
    shard: int | None = None  # score only this shard (`overnight score --shard`)

    def __post_init__(self) -> None:
        if (late := after_today(self.logical_date)) is not None:
            raise BadInputError(late)


def after_today(day: date) -> str | None:
    """Why a night of `day` must not run, if `day` is after today (UTC): a typo a year ahead, or a future
    logical_date given to the DAG's REST API, would go live and hold every real night back as a backfill
    (a newer date is live)."""
    today = datetime.now(UTC).date()
    return f"{day} is after today ({today}, UTC): a night scores a day that has begun" if day > today else None


@dataclass(frozen=True)
class Skipped:
    """A step a night goes without, and why."""

    reason: str

    def summary(self) -> str:
        return f"skipped: {self.reason}"

    def outcome(self) -> Outcome:
        return Outcome(self.summary())


@dataclass(frozen=True)
class Sharded:
    """How a step splits into shards: the DAG maps `run_shard` over `plan`'s shard numbers, on as many
    workers as there are; `overnight run` runs them one after another (or only ``night.shard``) and
    `combine`s their results."""

    plan: Callable[[Night], list[int]]
    run_shard: Callable[[Night, int, int], StepResult]  # (night, shards, shard)
    combine: Callable[[list[Any]], StepResult]


def _never(night: Night) -> str | None:
    return None


@dataclass(frozen=True)
class Step:
    """One step of the night: what it runs (``run``, or ``sharded`` shard by shard), the steps it waits
    on, when the night goes without it (``skip``) and whether it runs after an earlier step failed."""

    name: str
    run: Callable[[Night], StepResult] | None = None
    upstream: tuple[str, ...] = ()
    skip: Callable[[Night], str | None] = _never
    even_after_failure: bool = False
    sharded: Sharded | None = None
    retries: int | None = None  # the DAG task's, when not the DAG's default

    def __post_init__(self) -> None:
        if (self.run is None) == (self.sharded is None):
            raise ValueError(f"step {self.name}: give it either run or sharded")
        # the DAG maps a sharded step's tasks over its plan: it has no place for a skip or trigger rule
        if self.sharded is not None and (self.skip is not _never or self.even_after_failure):
            raise ValueError(f"step {self.name}: a sharded step is never skipped nor run after a failure")

    @property
    def task_id(self) -> str:
        return self.name.replace("-", "_")


# ---------------------------------------------------------------------------- the steps


def _ingest(night: Night) -> StepResult:
    from jobs.steps.ingest import ingest, source_for

    settings = night.settings
    source = source_for(settings, night.logical_date, night.source)
    return ingest(settings, source, night.logical_date, night.source_format or settings.source_format)


def _features(night: Night) -> StepResult:
    from jobs.steps.features import prepare

    return prepare(night.settings, night.logical_date)


def _candidates(night: Night) -> StepResult:
    from jobs.steps.candidates import prepare, settings_for_date

    return prepare(settings_for_date(night.settings, night.logical_date), night.logical_date)


def _train(night: Night) -> StepResult:
    from jobs.steps.train import train, train_if_due

    result = (train if night.retrain else train_if_due)(night.settings, night.logical_date)
    if result.trained and not result.promoted:  # kept out by the gate: not a failure of the night
        logger.warning("%s", result.summary())
    return result


def _model_is_current(night: Night) -> str | None:
    from jobs.database import connect
    from jobs.steps.train import retrain_due

    if night.retrain:
        return None
    with connect(night.settings) as conn:
        due, reason = retrain_due(night.settings, conn, night.logical_date)
    return None if due else f"the model is current: {reason}"


def _refit_candidates(night: Night) -> StepResult:
    from jobs.steps.train import write_late_reference

    rebuilt = _candidates(night)
    write_late_reference(night.settings, night.logical_date)
    return rebuilt


def _candidate_tables_fit(night: Night) -> str | None:
    from jobs import registry
    from jobs.database import connect
    from jobs.steps.candidates import tables_fit

    with connect(night.settings) as conn:
        model = registry.model_for_date(conn, night.logical_date)
    if model is None:
        return "no model scores the date yet"
    if tables_fit(night.settings, night.logical_date, model):
        return f"the candidate tables fit {model.model_id}"
    return None


def _plan_shards(night: Night) -> list[int]:
    from jobs.steps.score import plan_shards

    return plan_shards(night.settings, night.logical_date, night.shards)


def _score_shard(night: Night, shards: int, shard: int) -> StepResult:
    from jobs.steps.score import score_shard

    return score_shard(night.settings, night.logical_date, shards, shard)


def _scored(manifests: list[Any]) -> StepResult:
    from jobs.steps.score import ScoredShards

    return ScoredShards(manifests)


def _every_shard(sharded: Sharded, night: Night) -> StepResult:
    """A sharded step in one process: every shard in turn, or only ``night.shard``."""
    planned = sharded.plan(night)
    chosen = planned if night.shard is None else [night.shard]
    if not set(chosen) <= set(planned):
        raise BadInputError(f"there is no shard {night.shard}: {night.logical_date} has {len(planned)} (0-based)")
    return sharded.combine([sharded.run_shard(night, len(planned), shard) for shard in chosen])


def _monitor(night: Night) -> StepResult:
    from jobs.monitoring.drift import monitor_input

    return monitor_input(night.settings, night.logical_date)


def _publish(night: Night) -> StepResult:
    from jobs.steps.publish import publish_nightly

    return publish_nightly(
        night.settings, night.logical_date, night.publish_live, night.accept_checks, night.accepted_by
    )


def _check_freshness(night: Night) -> StepResult:
    from jobs.monitoring.freshness import check_freshness

    return check_freshness(night.settings)


def _shadow_model(night: Night) -> str | None:
    return night.shadow_model or night.settings.shadow_model


def _no_shadow_model(night: Night) -> str | None:
    return None if _shadow_model(night) else "no shadow_model param and OVERNIGHT_SHADOW_MODEL is unset"


def _shadow(night: Night) -> StepResult:
    from jobs.rollouts.shadow import nightly_shadow

    model_id = _shadow_model(night)
    assert model_id is not None
    return nightly_shadow(night.settings, night.logical_date, model_id, night.shards)


def _canary_refresh_off(night: Night) -> str | None:
    return None if night.settings.refresh_canary else "OVERNIGHT_REFRESH_CANARY is off"


def _refresh_canary(night: Night) -> StepResult:
    from jobs.rollouts.model_canary import refresh_canary

    return refresh_canary(night.settings, night.logical_date, night.shards)


def _online(night: Night) -> StepResult:
    from jobs.rollouts.online import nightly_upkeep

    return nightly_upkeep(night.settings, night.logical_date)


STEPS: tuple[Step, ...] = (
    Step("ingest", _ingest),
    Step("features", _features, upstream=("ingest",)),
    Step("candidates", _candidates, upstream=("ingest",)),
    Step("train", _train, upstream=("features", "candidates"), skip=_model_is_current),
    # A model trained tonight may have been tuned with other candidate settings than the tables were built
    # with (for the model before it): then the candidates step runs again, for it, before any shard scores.
    Step("refit-candidates", _refit_candidates, upstream=("train",), skip=_candidate_tables_fit),
    Step("score", upstream=("refit-candidates",), sharded=Sharded(_plan_shards, _score_shard, _scored), retries=3),
    Step("monitor", _monitor, upstream=("score",)),
    Step("publish", _publish, upstream=("monitor",)),
    Step("check-freshness", _check_freshness, upstream=("publish",), retries=1),
    Step("shadow", _shadow, upstream=("check-freshness",), skip=_no_shadow_model),
    Step("refresh-canary", _refresh_canary, upstream=("shadow",), skip=_canary_refresh_off),
    Step("online", _online, upstream=("refresh-canary",), even_after_failure=True),
)
STEP_BY_NAME = {step.name: step for step in STEPS}
LAST_STEP = STEPS[-1].name  # its end is the run's end


def run_step(name: str, night: Night) -> StepResult:
    """One step of the night, as the DAG's task and `overnight run` run it (skipped when it says so)."""
    step = STEP_BY_NAME[name]
    reason = step.skip(night)
    if reason is not None:
        logger.info("%s: %s", name, reason)
        return Skipped(reason)
    if step.sharded is not None:
        return _every_shard(step.sharded, night)
    assert step.run is not None
    return step.run(night)


def plan_shards(name: str, night: Night) -> list[int]:
    sharded = STEP_BY_NAME[name].sharded
    assert sharded is not None
    return sharded.plan(night)


def run_shard(name: str, night: Night, shards: int, shard: int) -> StepResult:
    sharded = STEP_BY_NAME[name].sharded
    assert sharded is not None
    return sharded.run_shard(night, shards, shard)


# ---------------------------------------------------------------------------- `overnight run`


@dataclass(frozen=True)
class StepTiming:
    step: str
    seconds: float
    summary: str


@dataclass(frozen=True)
class RunResult:
    logical_date: str
    batch_id: int | None
    model_id: str | None
    steps: list[StepTiming] = field(default_factory=list)
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_id: int | None = None
    results: dict[str, StepResult] = field(default_factory=dict, repr=False)  # each step's own result

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.steps)


def run(night: Night, progress: Progress = logger.info, only: Iterable[str] | None = None) -> RunResult:
    """The night's steps in order in this process (`only`: just those), recorded in the run history as
    one run. A failed step fails the run; the steps after it that wait on it do not run, those that
    run even after a failure do, and then the first error is raised."""
    settings = night.settings
    chosen = [step for step in STEPS if only is None or step.name in set(only)]
    timings: list[StepTiming] = []
    outcomes: dict[str, dict[str, Any]] = {}
    results: dict[str, StepResult] = {}
    failed: set[str] = set()
    first_error: BaseException | None = None
    with history.recording(settings, night.logical_date) as run_id:
        for number, step in enumerate(chosen, start=1):
            if failed.intersection(step.upstream) and not step.even_after_failure:
                failed.add(step.name)
                continue
            progress(f"[{number}/{len(chosen)}] {step.name} ...")
            started = time.perf_counter()
            try:
                with history.step(settings, run_id, step.name) as recorded:
                    results[step.name] = run_step(step.name, night)
                    outcome = results[step.name].outcome()
                    recorded.append(outcome)
            except Exception as error:
                failed.add(step.name)
                first_error = first_error or error
                progress(f"[{number}/{len(chosen)}] {step.name} failed: {first_line(error)}")
                continue
            elapsed = time.perf_counter() - started
            progress(f"[{number}/{len(chosen)}] {step.name} done in {elapsed:.1f}s: {printable(outcome.summary)}")
            timings.append(StepTiming(step.name, round(elapsed, 3), outcome.summary))
            outcomes[step.name] = asdict(outcome)
        if first_error is not None:
            raise first_error
    published = outcomes.get("publish", {})
    return RunResult(
        logical_date=night.logical_date.isoformat(),
        batch_id=published.get("batch_id"),
        model_id=published.get("model_id"),
        steps=timings,
        outcomes=outcomes,
        run_id=run_id,
        results=results,
    )


def night_of(settings: Settings, logical_date: date, source: Path | str | None = None, **params: Any) -> Night:
    """A night from the CLI's options (None: the default)."""
    return replace(Night(settings, logical_date, None if source is None else str(source)), **params)
