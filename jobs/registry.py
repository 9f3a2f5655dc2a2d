"""The model registry (``overnight.model_versions``): register, promote, and find the model a date may use."""

import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from upath import UPath

import sql
from jobs.errors import MissingDataError
from jobs.settings import Settings
from jobs.storage import download, is_local

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelVersion:
    model_id: str
    logical_date: date
    status: str
    status_reason: str | None
    data_window: dict[str, Any]
    params: dict[str, Any]
    features: list[str]
    metrics: dict[str, Any]
    artifact_path: str
    artifact_sha256: str
    created_at: datetime | None = None


def file_sha256(path: Path | UPath) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def register(conn: psycopg.Connection, model: ModelVersion) -> None:
    conn.execute(
        sql.query("upsert_model_version"),
        {
            "model_id": model.model_id,
            "logical_date": model.logical_date,
            "status": model.status,
            "status_reason": model.status_reason,
            "data_window": Jsonb(model.data_window),
            "params": Jsonb(model.params),
            "features": list(model.features),
            "metrics": Jsonb(model.metrics),
            "artifact_path": model.artifact_path,
            "artifact_sha256": model.artifact_sha256,
        },
    )


def promote(conn: psycopg.Connection, model: ModelVersion) -> ModelVersion:
    """Make ``model`` a promoted model; it becomes *the* production model unless a newer date's already is.

    A model trained for a backfilled past date is promoted for scoring that date, but it does not
    take production away from a model trained on a later date.
    """
    with conn.transaction():
        conn.execute(sql.query("lock_registry"))
        current = production_model(conn)
        if current is not None and current.model_id != model.model_id and current.logical_date > model.logical_date:
            promoted = with_status(
                model,
                "retired",
                f"promoted for {model.logical_date}; production stays {current.model_id} ({current.logical_date})",
            )
            register(conn, promoted)
            return promoted
        reason = f"replaced by {model.model_id}"
        conn.execute(sql.query("retire_production_model"), (reason, model.model_id))
        promoted = with_status(model, "production", model.status_reason)
        register(conn, promoted)
        return promoted


def make_production(conn: psycopg.Connection, model_id: str, why: str) -> str | None:
    """Inside the caller's transaction: make ``model_id`` the production model whatever its status (an
    operator's decision, such as "canary promotion of batch 18", not the training gate's); the
    production model before it is retired, its reason naming the replacement. Returns that previous
    production model's id (``model_id`` itself when it already was production: nothing changes)."""
    conn.execute(sql.query("lock_registry"))
    current = production_model(conn)
    if current is not None and current.model_id == model_id:
        return model_id
    if model_by_id(conn, model_id) is None:
        raise MissingDataError(f"model {model_id} is not registered")
    conn.execute(sql.query("retire_production_model"), (f"replaced by {model_id}: {why}", model_id))
    conn.execute(sql.query("make_production_model"), (f"made production by {why}", model_id))
    return current.model_id if current is not None else None


def with_status(model: ModelVersion, status: str, reason: str | None) -> ModelVersion:
    return ModelVersion(**{**model.__dict__, "status": status, "status_reason": reason})


# A tuned model's params: the settings its search chose (jobs.tuning), applied wherever it is used, and the search.
TUNED_SETTINGS = "tuned_settings"
TUNING = "tuning"


def settings_with(settings: Settings, values: dict[str, Any]) -> Settings:
    """``settings`` with ``values`` (setting name: value) in place of its own, validated as the settings are."""
    unknown = set(values) - set(Settings.model_fields)
    if unknown:
        raise MissingDataError(f"unknown settings: {', '.join(sorted(unknown))}")
    return Settings.model_validate({**dict(settings), **values}) if values else settings


def tuned_settings(settings: Settings, model: ModelVersion) -> Settings:
    """The settings ``model`` was trained with and must score with: its tuned ones over ``settings``."""
    return settings_with(settings, model.params.get(TUNED_SETTINGS) or {})


def _fetch(conn: psycopg.Connection, name: str, params: tuple[object, ...] = ()) -> list[ModelVersion]:
    with conn.cursor(row_factory=class_row(ModelVersion)) as cur:
        return cur.execute(sql.query(name), params).fetchall()


def production_model(conn: psycopg.Connection) -> ModelVersion | None:
    found = _fetch(conn, "production_model")
    return found[0] if found else None


def model_for_date(conn: psycopg.Connection, logical_date: date) -> ModelVersion | None:
    """The newest promoted model trained on or before ``logical_date``: never one that saw its future."""
    found = _fetch(conn, "model_for_date", (logical_date,))
    return found[0] if found else None


def model_by_id(conn: psycopg.Connection, model_id: str) -> ModelVersion | None:
    found = _fetch(conn, "model_by_id", (model_id,))
    return found[0] if found else None


def list_models(conn: psycopg.Connection, limit: int = 50) -> list[ModelVersion]:
    return _fetch(conn, "list_models", (limit,))


def describe(model: ModelVersion) -> dict[str, Any]:
    """A registry row as plain values for ``overnight models`` and ``overnight status``."""
    baselines = model.metrics.get("baselines") or {}
    best = max(baselines.items(), key=lambda item: item[1].get("ndcg@10", 0.0), default=None)
    return {
        "model_id": model.model_id,
        "logical_date": model.logical_date.isoformat(),
        "status": model.status,
        "status_reason": model.status_reason,
        "created_at": model.created_at.isoformat() if model.created_at else None,
        "ndcg@10": model.metrics.get("ndcg@10"),
        "best_baseline": best[0] if best else None,
        "best_baseline_ndcg@10": best[1].get("ndcg@10") if best else None,
        "metrics": {k: v for k, v in model.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)},
        "feature_importance_gain": model.params.get("feature_importance_gain", {}),
        TUNED_SETTINGS: model.params.get(TUNED_SETTINGS),
        TUNING: model.params.get(TUNING),
    }


def metric_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def render_models(rows: list[dict[str, Any]], online_days: int) -> list[str]:
    """``describe`` rows, each with its ``online`` numbers (or None), as the table ``overnight models`` prints."""
    if not rows:
        return ["no models yet: run `overnight train --date D`"]
    lines = [f"{'model':<34} {'date':<10} {'status':<10} {'ndcg@10':>8} {'baseline':>8} {'CTR':>7} {'IPS':>7}  reason"]
    for row in rows:
        ctr, ips = (row["online"][key]["value"] if row["online"] else None for key in ("ctr", "ips_click_rate"))
        lines.append(
            f"{row['model_id']:<34} {row['logical_date']:<10} {row['status']:<10} {metric_text(row['ndcg@10']):>8} "
            f"{metric_text(row['best_baseline_ndcg@10']):>8} {metric_text(ctr):>7} {metric_text(ips):>7}  "
            f"{row['status_reason'] or ''}"
        )
        if row[TUNED_SETTINGS]:
            tuning = row[TUNING] or {}
            lines.append(
                f"  tuned ({tuning.get('trials')} trials in {tuning.get('seconds')}s): "
                + ", ".join(f"{name}={value}" for name, value in row[TUNED_SETTINGS].items())
            )
    if online_days:
        lines.append(
            f"CTR and IPS click rate: online, over the last {online_days} days; - where no impression was logged"
        )
    return lines


def artifact_location(settings: Settings, model: ModelVersion) -> Path | UPath:
    """Where the registry says the model file is: its recorded path, under DATA_DIR when relative."""
    if "://" in model.artifact_path or Path(model.artifact_path).is_absolute():
        return UPath(model.artifact_path)
    return settings.data_dir / model.artifact_path


def artifact_file(settings: Settings, model: ModelVersion) -> Path:
    """The model file on this machine, checked against the sha256 the registry recorded for it.

    A model on object storage is copied into LOCAL_DIR once (LightGBM and the compiled library load
    local files); the copy is checked like the original, so an altered copy is fetched again.
    """
    path = artifact_location(settings, model)
    if is_local(path):
        _check_sha256(model, path)
        return path
    local = settings.local_dir / "models" / model.model_id / path.name
    if not (local.is_file() and file_sha256(local) == model.artifact_sha256):
        if not path.is_file():
            raise MissingDataError(f"model {model.model_id}: artifact {path} is missing")
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
        try:
            download(path, tmp)
            _check_sha256(model, tmp, shown=path)
            tmp.replace(local)  # scoring shards fetching the same model at once each leave a whole file
        finally:
            tmp.unlink(missing_ok=True)
    return local


def _check_sha256(model: ModelVersion, path: Path, shown: Path | UPath | None = None) -> None:
    if not path.is_file():
        raise MissingDataError(f"model {model.model_id}: artifact {shown or path} is missing")
    actual = file_sha256(path)
    if actual != model.artifact_sha256:
        raise MissingDataError(
            f"model {model.model_id}: artifact {shown or path} has sha256 {actual[:12]}…, "
            f"the registry recorded {model.artifact_sha256[:12]}…; refusing to use it"
        )
