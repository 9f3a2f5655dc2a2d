"""The whole nightly pipeline in one process (``overnight run``), and the demo's preparation.

The steps are the same functions the Airflow DAG calls, in the same order:
ingest → features → candidates → train when due → score every shard → monitor input and drift →
publish (behind monitoring's gate) → check freshness; then, as the DAG's tasks after publish, the
shadow (when OVERNIGHT_SHADOW_MODEL is set), the canary's refresh (unless OVERNIGHT_REFRESH_CANARY is
off) and the online tables' upkeep with the day before's online numbers. Every run and step is
recorded in the run history.
"""

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from jobs.dev import generate
from jobs.jsonable import jsonable
from jobs.monitoring import drift, freshness, history
from jobs.rollouts import canary, online, shadow
from jobs.settings import Settings
from jobs.steps import candidates, features, ingest, publish, score, train

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class StepTiming:
    step: str
    seconds: float
    summary: str


@dataclass(frozen=True)
class ShadowStep:
    """The shadow's result under its own key: the run history notes a batch_id or model_id at the top
    of a step's result as the night's, and the shadow's are not."""

    shadow: shadow.ShadowResult | shadow.ShadowSkipped

    def summary(self) -> str:
        return self.shadow.summary()


@dataclass(frozen=True)
class RunResult:
    logical_date: str
    batch_id: int
    model_id: str
    steps: list[StepTiming] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    run_id: int | None = None

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.steps)


def run(
    settings: Settings, source: Path, logical_date: date, fmt: str = "auto", progress: Progress = logger.info
) -> RunResult:
    steps: list[StepTiming] = []
    results: dict[str, Any] = {}
    plan: list[tuple[str, Callable[[], Any]]] = [
        ("ingest", lambda: ingest.ingest(settings, source, logical_date, fmt)),
        ("features", lambda: features.prepare(settings, logical_date)),
        ("candidates", lambda: candidates.prepare(settings, logical_date)),
        ("train", lambda: train.train_if_due(settings, logical_date)),
        ("score", lambda: score.score(settings, logical_date)),
        ("monitor", lambda: drift.monitor_input(settings, logical_date)),
        ("publish", lambda: publish.publish(settings, logical_date)),
        ("check-freshness", lambda: freshness.check_freshness(settings)),
    ]
    if settings.shadow_model:
        model_id = settings.shadow_model
        plan.append(("shadow", lambda: ShadowStep(shadow.nightly_shadow(settings, logical_date, model_id))))
    if settings.refresh_canary:
        plan.append(("refresh-canary", lambda: canary.refresh_canary(settings, logical_date)))
    plan.append(("online", lambda: online.nightly_upkeep(settings, logical_date)))
    with history.recording(settings, logical_date) as run_id:
        for number, (name, step) in enumerate(plan, start=1):
            progress(f"[{number}/{len(plan)}] {name} ...")
            started = time.perf_counter()
            with history.step(settings, run_id, name) as recorded:
                recorded.result = result = step()
            elapsed = time.perf_counter() - started
            summary = score.summarise(result) if isinstance(result, list) else result.summary()
            progress(f"[{number}/{len(plan)}] {name} done in {elapsed:.1f}s: {summary}")
            steps.append(StepTiming(name, round(elapsed, 3), summary))
            results[name] = jsonable(result)
    published = results["publish"]
    return RunResult(
        logical_date=logical_date.isoformat(),
        batch_id=published["batch_id"],
        model_id=published["model_id"],
        steps=steps,
        results=results,
        run_id=run_id,
    )


@dataclass(frozen=True)
class Demo:
    api_key: str
    user_id: str
    run: RunResult


DEMO_USERS, DEMO_ITEMS, DEMO_DAYS = 3000, 600, 60


def prepare_demo(settings: Settings, progress: Progress = logger.info, nights: int = 1) -> Demo:
    """Generate sample data ending yesterday, run the pipeline on it and make an API key.

    With ``nights`` above 1 the nights before yesterday run first, oldest first, so the run history
    and the monitoring dashboard have a few nights to show.
    """
    logical_date = datetime.now(UTC).date() - timedelta(days=1)
    source = settings.data_dir / "sample" / logical_date.isoformat()
    if not (source / "interactions.parquet").exists():
        progress(f"generating sample data ({DEMO_USERS:,} users, {DEMO_ITEMS} items, {DEMO_DAYS} days) in {source}")
        data = generate.generate(DEMO_USERS, DEMO_ITEMS, DEMO_DAYS, end_date=logical_date, seed=42)
        generate.write_dataset(data, source)
    for earlier in range(nights - 1, 0, -1):
        run(settings, source, logical_date - timedelta(days=earlier), progress=progress)
    result = run(settings, source, logical_date, progress=progress)
    key_file = settings.data_dir / "demo-api-key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(24) + "\n")
        key_file.chmod(0o600)
    first_shard = result.results["score"][0]["path"]
    user_id = str(pl.read_parquet(first_shard, n_rows=1)["user_id"][0])
    return Demo(api_key=key_file.read_text().strip(), user_id=user_id, run=result)
