"""Migration 0017 renames in place: a canary's batch kind 'candidate' becomes 'canary', an undecided model's
status 'candidate' becomes 'trained', and every other row keeps what it had."""

import json
from datetime import UTC, date, datetime

import psycopg
import pytest

import sql
from jobs.database import upgrade
from tests.support.databases import create_database, drop_database, migrate_before

pytestmark = pytest.mark.integration

RENAMES = 17  # sql/migrations/0017_canary_batches_and_trained_models.sql
DAY = date(2024, 3, 1)


def add_model(conn: psycopg.Connection, model_id: str, status: str) -> None:
    conn.execute(
        "INSERT INTO overnight.model_versions (model_id, logical_date, status, status_reason, data_window, params,"
        " features, metrics, artifact_path, artifact_sha256) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            model_id,
            DAY,
            status,
            f"why {model_id}",
            json.dumps({"features_before": str(DAY)}),
            json.dumps({"seed": 1}),
            ["f1", "f2"],
            json.dumps({"ndcg": 0.5}),
            f"models/{model_id}.txt",
            "0" * 64,
        ),
    )


def add_batch(conn: psycopg.Connection, model_id: str, kind: str, status: str) -> int:
    row = conn.execute(
        "INSERT INTO overnight.batches (logical_date, model_id, status, kind, k, users_scored, active_users,"
        " fallback_item_ids, fallback_scores, generated_at) VALUES (%s, %s, %s, %s, 10, 100, 120, %s, %s, %s)"
        " RETURNING batch_id",
        (DAY, model_id, status, kind, ["i1", "i2"], [0.5, 0.25], datetime(2024, 3, 1, 4, tzinfo=UTC)),
    ).fetchone()
    assert row is not None
    return int(row[0])


MODEL_COLUMNS = "model_id, logical_date, status, status_reason, data_window, params, features, metrics, artifact_path"
BATCH_COLUMNS = "batch_id, logical_date, model_id, status, kind, k, users_scored, fallback_item_ids, generated_at"


def models(conn: psycopg.Connection) -> dict[str, tuple[object, ...]]:
    return {row[0]: row for row in conn.execute(f"SELECT {MODEL_COLUMNS} FROM overnight.model_versions")}


def batches(conn: psycopg.Connection) -> dict[int, tuple[object, ...]]:
    return {row[0]: row for row in conn.execute(f"SELECT {BATCH_COLUMNS} FROM overnight.batches")}


def test_0017_renames_candidate_batches_and_models_and_leaves_the_rest(postgres_admin_url: str) -> None:
    assert [m.name for m in sql.migrations() if m.version == RENAMES] == ["canary_batches_and_trained_models"]
    url = create_database(postgres_admin_url)
    try:
        with psycopg.connect(url) as conn:
            migrate_before(conn, RENAMES)
            # Rows of every kind and status the old names allowed.
            for model_id, status in [
                ("m-undecided", "candidate"),
                ("m-production", "production"),
                ("m-rejected", "rejected"),
                ("m-retired", "retired"),
            ]:
                add_model(conn, model_id, status)
            canary_batch = add_batch(conn, "m-undecided", "candidate", "canary")
            stopped_canary_batch = add_batch(conn, "m-undecided", "candidate", "ready")
            live = add_batch(conn, "m-production", "serving", "live")
            serving_canary = add_batch(conn, "m-production", "serving", "canary")
            retired = add_batch(conn, "m-retired", "serving", "retired")
            shadow = add_batch(conn, "m-rejected", "shadow", "shadow")
            conn.execute("INSERT INTO overnight.live (batch_id) VALUES (%s)", (live,))
            conn.execute(
                "INSERT INTO overnight.canary (batch_id, traffic, salt) VALUES (%s, 0.1, 'salt')", (canary_batch,)
            )
            conn.commit()
            models_before, batches_before = models(conn), batches(conn)
            assert models_before["m-undecided"][2] == "candidate"
            assert [batches_before[b][4] for b in (canary_batch, stopped_canary_batch)] == ["candidate"] * 2

            applied = upgrade(conn)

            assert applied[0] == RENAMES
            assert applied == [m.version for m in sql.migrations() if m.version >= RENAMES]
            models_after, batches_after = models(conn), batches(conn)
            live_after = conn.execute("SELECT batch_id FROM overnight.live").fetchall()
            canary_after = conn.execute("SELECT batch_id, traffic, salt FROM overnight.canary").fetchall()

        # the renamed rows: only the one column changes
        assert models_after["m-undecided"] == _with(models_before["m-undecided"], 2, "trained")
        for batch_id in (canary_batch, stopped_canary_batch):
            assert batches_after[batch_id][4] == "canary"
            assert batches_after[batch_id] == _with(batches_before[batch_id], 4, "canary")
        # and nothing else: a production, rejected and retired model, serving and shadow batches (a serving
        # batch's status 'canary' is a status, not the kind), the live pointer and the running canary
        for model_id in ("m-production", "m-rejected", "m-retired"):
            assert models_after[model_id] == models_before[model_id]
        for batch_id in (live, serving_canary, retired, shadow):
            assert batches_after[batch_id] == batches_before[batch_id]
        assert models_after.keys() == models_before.keys()
        assert batches_after.keys() == batches_before.keys()
        assert live_after == [(live,)]
        assert canary_after == [(canary_batch, 0.1, "salt")]
    finally:
        drop_database(postgres_admin_url, url)


def test_after_0017_the_old_names_are_refused_and_the_new_ones_taken(postgres_admin_url: str) -> None:
    url = create_database(postgres_admin_url)
    try:
        with psycopg.connect(url) as conn:
            upgrade(conn)
            conn.commit()
            add_model(conn, "m-trained", "trained")
            assert add_batch(conn, "m-trained", "canary", "canary")
            conn.commit()
            with pytest.raises(psycopg.errors.CheckViolation, match="model_versions_status_check"):
                add_model(conn, "m-old", "candidate")
            conn.rollback()
            with pytest.raises(psycopg.errors.CheckViolation, match="batches_kind_check"):
                add_batch(conn, "m-trained", "candidate", "canary")
            conn.rollback()
    finally:
        drop_database(postgres_admin_url, url)


def _with(row: tuple[object, ...], index: int, value: object) -> tuple[object, ...]:
    return (*row[:index], value, *row[index + 1 :])
