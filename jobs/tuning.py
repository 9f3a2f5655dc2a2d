"""The retrain's parameter search: the ranker's and the candidate generators' settings, within a time budget
(``tune_budget_minutes``), by Optuna's TPE on training users only, starting from the production model's settings
(docs/evaluation.md#tuning).
"""

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

from psycopg.types.json import Jsonb

import sql
from jobs import registry
from jobs.database import connect, upgrade
from jobs.errors import MissingDataError
from jobs.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    integer: bool = True
    log: bool = False

    def clip(self, value: float) -> float | int:
        clipped = min(max(value, self.low), self.high)
        return round(clipped) if self.integer else float(clipped)


# The ranker's settings (jobs.steps.train.lightgbm_params reads them).
RANKER_SPACE: dict[str, Range] = {
    "learning_rate": Range(0.01, 0.3, integer=False, log=True),
    "num_leaves": Range(7, 127, log=True),
    "min_data_in_leaf": Range(5, 200, log=True),
}
# The candidate generators' (jobs.steps.candidates): history caps, neighbour counts, candidates per
# source and in all, half-life and recency window. Changing them changes the night's candidate tables.
CANDIDATE_SPACE: dict[str, Range] = {
    "recent_days": Range(3, 60, log=True),
    "popular_candidates": Range(20, 200, log=True),
    "covisit_history": Range(5, 100, log=True),
    "covisit_neighbours": Range(10, 100, log=True),
    "covisit_candidates": Range(20, 200, log=True),
    "covisit_half_life_days": Range(7.0, 365.0, integer=False, log=True),
    "similarity_history": Range(20, 300, log=True),
    "similarity_neighbours": Range(10, 200, log=True),
    "knn_candidates": Range(20, 200, log=True),
    "genre_candidates": Range(10, 100, log=True),
    "max_candidates": Range(50, 400, log=True),
}
SPACE = {**RANKER_SPACE, **CANDIDATE_SPACE}


@dataclass(frozen=True)
class Trial:
    number: int
    params: dict[str, float | int]
    score: float | None  # NDCG@10 on the training users of the newest window; None when it failed
    seconds: float
    warm_start: bool
    state: str  # complete, failed
    error: str | None = None


@dataclass(frozen=True)
class Search:
    search_id: str
    logical_date: str
    budget_minutes: float
    seconds: float
    trials: list[Trial]

    @property
    def best(self) -> Trial:
        complete = [t for t in self.trials if t.score is not None]
        if not complete:
            raise MissingDataError(f"tuning {self.search_id}: no trial could train a ranker")
        return max(complete, key=lambda t: (t.score, -t.number))  # the first of equals: the warm start

    def summary(self) -> dict[str, Any]:
        """What the model keeps in its params (``tuning``) and ``overnight tune`` prints."""
        best = self.best
        warm = next((t for t in self.trials if t.warm_start), None)
        return {
            "search_id": self.search_id,
            "budget_minutes": self.budget_minutes,
            "seconds": self.seconds,
            "trials": len(self.trials),
            "failed_trials": sum(t.state == "failed" for t in self.trials),
            "best_trial": best.number,
            "best_ndcg@10": best.score,
            "warm_start_ndcg@10": warm.score if warm else None,
            "objective": "ndcg@10 of the newest label window's training users",
        }


def current_values(settings: Settings) -> dict[str, float | int]:
    """The searched settings as ``settings`` has them."""
    return {name: getattr(settings, name) for name in SPACE}


def warm_start(settings: Settings, logical_date: date) -> dict[str, float | int]:
    """The first trial: the parameters of the model scoring ``logical_date`` (its tuned settings, else the
    ranker parameters it was trained with and today's candidate settings), or the settings as given."""
    with connect(settings) as conn:
        upgrade(conn)
        current = registry.model_for_date(conn, logical_date)
    values = current_values(settings if current is None else registry.tuned_settings(settings, current))
    if current is not None and not current.params.get(registry.TUNED_SETTINGS):
        values |= {name: current.params[name] for name in RANKER_SPACE if name in current.params}
    return {name: SPACE[name].clip(value) for name, value in values.items()}


def record(settings: Settings, search_id: str, logical_date: date, trial: Trial) -> None:
    with connect(settings) as conn:
        conn.execute(
            sql.query("record_tuning_trial"),
            {
                "search_id": search_id,
                "logical_date": logical_date,
                **{k: v for k, v in asdict(trial).items() if k not in ("number", "params")},
                "trial_number": trial.number,
                "params": Jsonb(trial.params),
            },
        )


def recorded_trials(settings: Settings, search_id: str) -> list[Trial]:
    with connect(settings) as conn:
        rows = conn.execute(sql.query("tuning_trials"), (search_id,)).fetchall()
    return [
        Trial(number=n, params=params, score=score, seconds=seconds, warm_start=warm, state=state, error=error)
        for n, state, params, score, seconds, warm, error in rows
    ]


def search(
    settings: Settings,
    logical_date: date,
    budget_minutes: float,
    objective: Callable[[Settings], float],
) -> Search:
    """Trials of ``objective`` (higher is better) on settings the sampler proposes, the first being
    :func:`warm_start`'s, until ``budget_minutes`` have passed; each recorded as it ends."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search_id = f"tune-{logical_date:%Y%m%d}-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    trials: list[Trial] = []

    def run(trial: optuna.Trial) -> float:
        params: dict[str, float | int] = {
            name: trial.suggest_int(name, int(r.low), int(r.high), log=r.log)
            if r.integer
            else trial.suggest_float(name, r.low, r.high, log=r.log)
            for name, r in SPACE.items()
        }
        trial_started = time.perf_counter()
        try:
            score = objective(registry.settings_with(settings, params))
        except MissingDataError as error:
            ended = Trial(trial.number, params, None, _since(trial_started), trial.number == 0, "failed", str(error))
            trials.append(ended)
            record(settings, search_id, logical_date, ended)
            raise
        ended = Trial(trial.number, params, score, _since(trial_started), trial.number == 0, "complete")
        trials.append(ended)
        record(settings, search_id, logical_date, ended)
        logger.info("tune %s: trial %d ndcg@10 %.4f in %.1fs", search_id, trial.number, score, ended.seconds)
        return score

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=settings.seed))
    study.enqueue_trial(warm_start(settings, logical_date))
    study.optimize(run, timeout=budget_minutes * 60.0, catch=(MissingDataError,))
    result = Search(search_id, logical_date.isoformat(), budget_minutes, _since(started), trials)
    logger.info("tune %s: %d trials in %.0fs, best %s", search_id, len(trials), result.seconds, result.summary())
    return result


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)
