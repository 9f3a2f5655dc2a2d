"""What is live, the canary beside it, the production model and the latest batches and runs:
``overnight status``."""

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from psycopg.rows import dict_row

import sql
from common.text import jsonable
from jobs import registry
from jobs.batches import live_status, running_canary
from jobs.database import connect, upgrade
from jobs.monitoring import history
from jobs.settings import Settings


def status(settings: Settings, recent: int = 5) -> dict[str, Any]:
    """What is live, the canary beside it, which model is in production, the latest batches, and the
    latest runs (a run whose process died is marked abandoned first)."""
    with connect(settings) as conn:
        upgrade(conn)
        recent_runs = history.recent_runs(conn, recent)
        live = live_status(conn)
        canary = running_canary(conn)
        model = registry.production_model(conn)
        with conn.cursor(row_factory=dict_row) as cur:
            batches = cur.execute(sql.query("recent_batches"), (recent,)).fetchall()
            canary_batch = cur.execute(sql.query("canary_batch_status")).fetchone() if canary else None
    return {
        "live": jsonable(live) if live else None,
        # with its batch's date, model and age: a canary that is not refreshed ages beside production
        "canary": {**asdict(canary), **jsonable(canary_batch)} if canary and canary_batch else None,
        "production_model": (
            {**registry.describe(model), "baselines": model.metrics.get("baselines", {})} if model else None
        ),
        "recent_batches": [jsonable(b) for b in batches],
        "recent_runs": [jsonable(r) for r in recent_runs],
    }


def render_status(report: dict[str, Any]) -> list[str]:
    """A ``status`` as the lines ``overnight status`` prints."""
    live = report["live"]
    if live is None:
        lines = ["live: nothing published yet"]
    else:
        lines = [
            f"live: batch {live['batch_id']} for {live['logical_date']}, model {live['model_id']}, "
            f"{live['users_scored']:,} users of {live['active_users']:,} active, "
            f"{float(live['age_seconds']) / 3600:.1f} h old"
        ]
    if report["canary"]:
        canary = report["canary"]
        lines.append(
            f"canary: batch {canary['batch_id']} for {canary['logical_date']}, model {canary['model_id']}, "
            f"{float(canary['age_seconds']) / 3600:.1f} h old, serves {canary['traffic']:.2%} of users "
            f"(since {canary['started_at']}); `overnight promote` or `overnight canary stop`"
        )
    model = report["production_model"]
    if model:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in model["metrics"].items() if "@" in k)
        lines.append(f"production model: {model['model_id']} ({model['logical_date']}): {shown}")
        if model["best_baseline"]:
            lines.append(f"  best baseline {model['best_baseline']}: ndcg@10 {model['best_baseline_ndcg@10']:.4f}")
    lines.append("recent batches:")
    for batch in report["recent_batches"]:
        reason = f"  ({batch['failure_reason']})" if batch["failure_reason"] else ""
        lines.append(
            f"  {batch['batch_id']:>5}  {batch['logical_date']}  {_batch_status(batch):<8} "
            f"{batch['users_scored']:>9,} users{reason}"
        )
    lines.append("recent runs:")
    lines += [_run_line(run) for run in report["recent_runs"]]
    return lines


def _batch_status(batch: dict[str, Any]) -> str:
    """A batch the publish gate held back is stored as failed, with the gate's message as its reason
    (``jobs.monitoring.gate.check_batch``): it is shown as blocked, as its run is."""
    held_back = f"batch {batch['batch_id']} for {batch['logical_date']} blocked by monitoring: "
    if batch["status"] == "failed" and (batch["failure_reason"] or "").startswith(held_back):
        return "blocked"
    return str(batch["status"])


def _run_line(run: dict[str, Any]) -> str:
    """One run of ``status``'s ``recent_runs``: its date, status and start, when an abandoned run was
    noticed, the steps that failed, were blocked or abandoned, and who accepted failing checks."""
    line = f"  {run['run_id']:>5}  {run['logical_date']}  {run['status']:<9} started {_shown_time(run['started_at'])}"
    if run["abandoned_at"]:
        line += f", noticed abandoned {_shown_time(run['abandoned_at'])}"
    stopped = [
        f"{step} {status}" for step, status in run["steps"].items() if status in ("failed", "blocked", "abandoned")
    ]
    if stopped:
        line += f"; {'steps' if len(stopped) > 1 else 'step'} {', '.join(stopped)}"
    if run["accepted"]:
        line += f"; failing checks accepted by {run['accepted']['accepted_by']}"
    return line


def _shown_time(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
