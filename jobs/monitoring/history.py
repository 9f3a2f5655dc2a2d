"""Run history: every pipeline run, and per step its wall time, peak memory, rows in and out and outcome, in
``overnight.runs`` and ``overnight.run_steps``; ``overnight run`` records through :func:`step`, the Airflow DAG
through task hooks. A run whose recording process died reads ``abandoned`` (docs/operations.md#abandoned-runs).
"""

import logging
import resource
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

import sql
from common.text import first_line
from jobs.database import connect, database_url, upgrade
from jobs.errors import DatabaseError, PublishBlockedError
from jobs.outcome import Outcome
from jobs.settings import Settings, get_settings

logger = logging.getLogger(__name__)

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")

# The run a step of this process belongs to, so monitoring can link what it records to it.
_current_run_id: int | None = None


def current_run_id() -> int | None:
    return _current_run_id


# ---------------------------------------------------------------------------- abandoned runs


# A process that dies cannot record its end, so the recording process holds a connection while it runs, and a CLI
# run does not start without one: a running run or step whose recorder's backend is gone is abandoned.
@dataclass(frozen=True)
class Recorder:
    """The connection a recording process holds while its run or step runs, under a name of its own:
    while its backend lives (``pg_stat_activity``), what it owns is not abandoned."""

    pid: int
    name: str
    conn: psycopg.Connection


# This process's recorder: the CLI run's, or the Airflow task's (which owns that task's step).
_recorder: Recorder | None = None


def open_recorder(settings: Settings, *, required: bool = False) -> Recorder | None:
    """The recorder's connection; None (a warning) when it cannot be opened, or a `DatabaseError` if
    `required`: a run without one could never be told abandoned if its process died."""
    name = f"overnight-recorder-{secrets.token_hex(8)}"
    conn: psycopg.Connection | None = None
    try:
        conn = psycopg.connect(database_url(settings), autocommit=True, connect_timeout=10, application_name=name)
        row = conn.execute(sql.query("recorder_session")).fetchone()
        assert row is not None
    except Exception as error:
        if conn is not None:
            conn.close()
        if required:
            raise DatabaseError(
                f"run history: could not open the connection that tells a dead run from a live one: {first_line(error)}"
            ) from error
        logger.warning("run history: no recorder connection, so a death of this process goes unnoticed: %s", error)
        return None
    return Recorder(pid=int(row[0]), name=name, conn=conn)


def close_recorder(recorder: Recorder | None) -> None:
    if recorder is not None:
        recorder.conn.close()


def _owned_by(recorder: Recorder | None) -> dict[str, Any]:
    return {"owner_pid": recorder.pid if recorder else None, "owner_name": recorder.name if recorder else None}


def mark_abandoned(conn: psycopg.Connection) -> list[int]:
    """Mark the runs and steps whose recording process died as abandoned; returns the runs marked."""
    with conn.transaction():
        steps = conn.execute(sql.query("mark_abandoned_steps")).fetchall()
        abandoned = [int(row[0]) for row in conn.execute(sql.query("mark_abandoned_runs"))]
    for run_id, name in steps:
        logger.warning("run history: step %s of run %d is abandoned: the process recording it is gone", name, run_id)
    for run_id in abandoned:
        logger.warning("run history: run %d is abandoned: no process is recording it any more", run_id)
    return abandoned


def recent_runs(conn: psycopg.Connection, limit: int) -> list[dict[str, Any]]:
    """The newest runs, newest first, each with its steps' statuses and its accepted checks; runs
    whose process died are marked abandoned first."""
    mark_abandoned(conn)
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql.query("recent_runs"), (limit,)).fetchall()


# ---------------------------------------------------------------------------- runs


def start_run(
    settings: Settings,
    logical_date: date,
    trigger: str = "cli",
    external_id: str | None = None,
    recorder: Recorder | None = None,
) -> int:
    with connect(settings) as conn:
        upgrade(conn)
        mark_abandoned(conn)
        row = conn.execute(
            sql.query("start_run"),
            {"logical_date": logical_date, "trigger": trigger, "external_id": external_id, **_owned_by(recorder)},
        ).fetchone()
    assert row is not None
    return int(row[0])


@contextmanager
def recording(settings: Settings, logical_date: date) -> Iterator[int]:
    """A CLI run around the block: started, then finished as success, failed or blocked; what
    monitoring records meanwhile is linked to it. This process records it and its steps."""
    global _current_run_id, _recorder
    recorder = open_recorder(settings, required=True)
    outer_recorder, _recorder = _recorder, recorder
    try:
        run_id = start_run(settings, logical_date, "cli", recorder=recorder)
        outer, _current_run_id = _current_run_id, run_id
        try:
            yield run_id
        except BaseException as error:
            finish_run(settings, run_id, outcome_of(error), error)
            raise
        else:
            finish_run(settings, run_id, "success")
        finally:
            _current_run_id = outer
    finally:
        _recorder = outer_recorder
        close_recorder(recorder)  # after the end is recorded: never abandoned while it finishes


def finish_run(settings: Settings, run_id: int, status: str, error: BaseException | str | None = None) -> None:
    try:
        with connect(settings) as conn:
            conn.execute(
                sql.query("finish_run"),
                {"run_id": run_id, "status": status, "error": first_line(error) if error else None},
            )
    except Exception as failure:
        logger.warning("run history: could not record the end of run %d: %s", run_id, failure)


def outcome_of(error: BaseException) -> str:
    """'blocked' when monitoring held the publish back (also when raised again as the cause of another
    error, as the DAG fails a task without retries), 'failed' for anything else."""
    blocked = isinstance(error, PublishBlockedError) or isinstance(error.__cause__, PublishBlockedError)
    return "blocked" if blocked else "failed"


# ---------------------------------------------------------------------------- measuring a step


def reset_peak_memory() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux 4.0+), so the next reading is this step's."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_memory_bytes() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak_kib) * 1024 if peak_kib else None


# Once a run has started, recording never fails it: a write that fails is a warning in the log.
def begin_step(settings: Settings, run_id: int, name: str) -> float:
    try:
        with connect(settings) as conn:
            conn.execute(sql.query("start_run_step"), {"run_id": run_id, "step": name, **_owned_by(_recorder)})
            conn.execute(sql.query("resume_run"), {"run_id": run_id, "step": name})
    except Exception as error:
        logger.warning("run history: could not record the start of %s: %s", name, error)
    reset_peak_memory()
    return time.perf_counter()


RETRYING = "retrying"  # an Airflow attempt that failed with a retry due (migration 0023)


def end_step(
    settings: Settings,
    run_id: int,
    name: str,
    started: float,
    outcome: Outcome | None = None,
    error: BaseException | None = None,
    status: str | None = None,
) -> None:
    seconds = time.perf_counter() - started
    try:
        with connect(settings) as conn:
            conn.execute(
                sql.query("finish_run_step"),
                {
                    "run_id": run_id,
                    "step": name,
                    "status": status or ("success" if error is None else outcome_of(error)),
                    "seconds": round(seconds, 3),
                    "peak_memory_bytes": peak_memory_bytes(),
                    "rows_in": outcome.rows_in if outcome else None,
                    "rows_out": outcome.rows_out if outcome else None,
                    "summary": outcome.summary if outcome else None,
                    "error": first_line(error) if error is not None else None,
                    "batch_id": outcome.batch_id if outcome else None,
                    "model_id": outcome.model_id if outcome else None,
                },
            )
            if outcome is not None and outcome.production and (outcome.batch_id or outcome.model_id):
                conn.execute(
                    sql.query("note_run_result"),
                    {"run_id": run_id, "batch_id": outcome.batch_id, "model_id": outcome.model_id},
                )
    except Exception as failure:
        logger.warning("run history: could not record the end of %s: %s", name, failure)


@contextmanager
def step(settings: Settings, run_id: int, name: str) -> Iterator[list[Outcome]]:
    """Record one step of a run around the block; the block appends the step's outcome."""
    outcome: list[Outcome] = []
    started = begin_step(settings, run_id, name)
    try:
        yield outcome
    except BaseException as error:
        end_step(settings, run_id, name, started, error=error)
        raise
    end_step(settings, run_id, name, started, outcome[0] if outcome else None)


# ---------------------------------------------------------------------------- Airflow task hooks

# A step's task id is its name with "_" for "-" (see jobs.nightly), so a step's row has the same name from
# either; a sharded step's DAG tasks record its plan and each shard ("score[3]"), `overnight run` one row.
_airflow_started: dict[str, float] = {}


def _airflow_run(context: Any) -> tuple[Settings, int]:
    """The run of the context's dag run (one row per dag run, whichever reports first)."""
    dag_run = context["dag_run"]
    when = context.get("logical_date") or getattr(dag_run, "logical_date", None) or dag_run.run_after
    settings = get_settings()
    return settings, start_run(settings, when.date(), "airflow", f"{dag_run.dag_id}/{dag_run.run_id}")


def _airflow_step(context: Any) -> tuple[Settings, int, str]:
    global _current_run_id  # a task has its own process: the run stays bound until it ends
    ti = context["task_instance"]
    settings, run_id = _airflow_run(context)
    _current_run_id = run_id
    name = ti.task_id.replace("_", "-")
    map_index = getattr(ti, "map_index", -1)
    if map_index is not None and map_index >= 0:
        name = f"{name}[{map_index}]"
    return settings, run_id, name


def _release_recorder() -> None:
    """The task ended: this process records nothing more of its run (a process may run another task)."""
    global _recorder, _current_run_id
    close_recorder(_recorder)
    _recorder = None
    _current_run_id = None


def airflow_task_started(context: Any) -> None:
    """``on_execute_callback``: the step starts (and the run, for its first task), owned by this
    task's process; a retry's start makes an abandoned step and run running again."""
    global _recorder
    try:
        settings, run_id, name = _airflow_step(context)
        if _recorder is None:
            _recorder = open_recorder(settings)
        _airflow_started[name] = begin_step(settings, run_id, name)
    except Exception as error:
        logger.warning("run history: could not record the task start: %s", error)


def airflow_task_finished(context: Any, result: Any, *, ends_run: bool = False) -> None:
    """``post_execute``: the step succeeded with ``result``, the task's return value: its outcome as a
    dict. The DAG's last step (`ends_run`) finishes the run."""
    try:
        settings, run_id, name = _airflow_step(context)
        outcome = Outcome(**result) if isinstance(result, dict) else None
        end_step(settings, run_id, name, _airflow_started.pop(name, time.perf_counter()), outcome)
        if ends_run:
            finish_run(settings, run_id, "success")
    except Exception as error:
        logger.warning("run history: could not record the task end: %s", error)
    finally:
        _release_recorder()


def airflow_task_retrying(context: Any) -> None:
    """``on_retry_callback``: this attempt failed and Airflow will run the task again: the step is recorded
    ``retrying`` with its error until the retry starts it again; the run goes on (neither ended by it nor
    abandoned)."""
    try:
        settings, run_id, name = _airflow_step(context)
        error = context.get("exception") or RuntimeError("task failed")
        started = _airflow_started.pop(name, time.perf_counter())
        end_step(settings, run_id, name, started, error=error, status=RETRYING)
    except Exception as failure:
        logger.warning("run history: could not record the failed attempt: %s", failure)
    finally:
        _release_recorder()


def airflow_dag_run_succeeded(context: Any) -> None:
    """The dag's ``on_success_callback``: its run ends a success (also after a clear re-ran some tasks, when
    the last step, which ends the run, did not run again)."""
    _airflow_dag_run_ended(context, "success")


def airflow_dag_run_failed(context: Any) -> None:
    """The dag's ``on_failure_callback``: its run ends as its first failed or blocked step."""
    _airflow_dag_run_ended(context, "failed")


def _airflow_dag_run_ended(context: Any, status: str) -> None:
    try:
        settings, run_id = _airflow_run(context)
        finish_run(settings, run_id, status, None if status == "success" else str(context.get("reason") or status))
    except Exception as failure:
        logger.warning("run history: could not record the end of the dag run: %s", failure)


def airflow_task_failed(context: Any) -> None:
    """``on_failure_callback``: the step and its run failed (or were blocked by monitoring). It may run
    in another process than the task's (a task whose process died); it records the same."""
    try:
        settings, run_id, name = _airflow_step(context)
        error = context.get("exception") or RuntimeError("task failed")
        end_step(settings, run_id, name, _airflow_started.pop(name, time.perf_counter()), error=error)
        finish_run(settings, run_id, outcome_of(error), error)
    except Exception as failure:
        logger.warning("run history: could not record the task failure: %s", failure)
    finally:
        _release_recorder()
