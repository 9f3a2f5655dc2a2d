"""Batches and models as tests set them up and read them back."""

from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path

import psycopg

import sql
from jobs import registry
from jobs.settings import Settings


@dataclass(frozen=True)
class ScoredLake:
    data_dir: Path
    model: registry.ModelVersion
    dates: tuple[date, date]


def register_challenger(settings: Settings) -> registry.ModelVersion:
    """A second registered model, "challenger": the production model's artifact under another id, trained
    a day earlier (so it may score both days) and kept out by the gate (status trained)."""
    with psycopg.connect(str(settings.database_url)) as conn:
        original = registry.production_model(conn)
        assert original is not None
        challenger = registry.with_status(
            replace(original, model_id="challenger", logical_date=original.logical_date - timedelta(days=1)),
            "trained",
            "kept out by the gate",
        )
        registry.register(conn, challenger)
    return original


def batch_status(settings: Settings, batch_id: int) -> str:
    """A batch's status (live, ready, canary, shadow, ...), as the database has it."""
    with psycopg.connect(str(settings.database_url)) as conn:
        row = conn.execute(sql.query("batch_by_id"), (batch_id,)).fetchone()
    assert row is not None
    return str(row[3])


def ingest_and_prepare(settings: Settings, source: Path, day: date) -> None:
    """What training and scoring a date need, made as the nightly run makes it: ingest, then the
    candidate and feature tables."""
    from jobs.steps import candidates, features, ingest

    ingest.ingest(settings, source, day)
    candidates.prepare(settings, day)
    features.prepare(settings, day)
