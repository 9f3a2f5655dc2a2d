"""The publish protocol against a real Postgres: load, validate, switch, keep, roll back."""

import json
import math
import threading
from collections.abc import Callable
from datetime import date

import polars as pl
import psycopg
import pytest

import sql
from common.text import jsonable
from jobs import batches, registry, workdir
from jobs.errors import BatchValidationError, MissingDataError
from jobs.monitoring import gate, outputs
from jobs.rollouts import canary, model_canary
from jobs.settings import Settings
from jobs.steps import publish, score
from tests.support.batches import register_challenger
from tests.support.data import PREVIOUS_DATE, SAMPLE_DATE

pytestmark = pytest.mark.integration


def live_batch(settings: Settings) -> int | None:
    with psycopg.connect(str(settings.database_url)) as conn:
        row = conn.execute("SELECT batch_id FROM overnight.live").fetchone()
    return row[0] if row else None


def statuses(settings: Settings) -> dict[int, str]:
    with psycopg.connect(str(settings.database_url)) as conn:
        return dict(conn.execute("SELECT batch_id, status FROM overnight.batches").fetchall())  # type: ignore[arg-type]


def table_exists(settings: Settings, batch_id: int) -> bool:
    with psycopg.connect(str(settings.database_url)) as conn:
        name = f"overnight.{sql.recs_table_name(batch_id)}"
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]  # type: ignore[index]


def test_publish_loads_validates_and_goes_live(batch_settings: Settings) -> None:
    result = publish.publish_nightly(batch_settings, SAMPLE_DATE)
    assert result.live
    assert live_batch(batch_settings) == result.batch_id
    assert result.validation["rows"] == result.users > 0
    assert result.validation["unknown_items"] == 0
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        # the primary key exists (built after the load)
        key = conn.execute(
            "SELECT count(*) FROM pg_index WHERE indrelid = to_regclass(%s) AND indisprimary",
            (f"overnight.{sql.recs_table_name(result.batch_id)}",),
        ).fetchone()
        assert key == (1,)
        k, fallback = conn.execute(
            "SELECT k, fallback_item_ids FROM overnight.batches WHERE batch_id = %s", (result.batch_id,)
        ).fetchone()  # type: ignore[misc]
        assert k == batch_settings.top_k
        assert 0 < len(fallback) <= batch_settings.top_k
        history = conn.execute("SELECT action, batch_id FROM overnight.live_history").fetchall()
        assert history == [("publish", result.batch_id)]


def test_the_published_table_keeps_statistics_of_user_id_alone(batch_settings: Settings) -> None:
    # every query finds a list by user_id: ANALYZE of the wide lists and reasons would cost most of the key's time
    result = publish.publish_nightly(batch_settings, SAMPLE_DATE)
    table = sql.recs_table_name(result.batch_id)
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        columns = conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
            (f"overnight.{table}",),
        ).fetchall()
        analyzed = conn.execute(
            "SELECT attname FROM pg_stats WHERE schemaname = 'overnight' AND tablename = %s", (table,)
        ).fetchall()
    assert {"item_ids", "scores", "reason_codes", "reason_refs"} <= {c for (c,) in columns}
    assert analyzed == [("user_id",)]


def corrupt_shard(settings: Settings, change: Callable[[pl.DataFrame], pl.DataFrame]) -> None:
    path = workdir.shard_path(settings, SAMPLE_DATE, 0, 2)
    pl.read_parquet(path).pipe(change).write_parquet(path)


CORRUPTIONS: dict[str, tuple[Callable[[pl.DataFrame], pl.DataFrame], str]] = {
    "unknown item": (
        lambda f: f.with_columns(
            pl.col("item_ids").list.concat(pl.lit(["no-such-item"])),
            pl.col("scores").list.concat(pl.lit([0.0], dtype=pl.List(pl.Float32))),
        ),
        "item ids not in the catalogue (e.g. no-such-item)",
    ),
    "empty list": (
        lambda f: f.with_columns(
            pl.when(pl.int_range(pl.len()) == 0)
            .then(pl.lit([], dtype=pl.List(pl.String)))
            .otherwise(pl.col("item_ids"))
            .alias("item_ids"),
            pl.when(pl.int_range(pl.len()) == 0)
            .then(pl.lit([], dtype=pl.List(pl.Float32)))
            .otherwise(pl.col("scores"))
            .alias("scores"),
        ),
        "1 empty lists",
    ),
    "non-finite score": (
        lambda f: f.with_columns(pl.col("scores").list.eval(pl.element() / 0.0)),
        "rows with non-finite scores",
    ),
    "duplicate user": (lambda f: pl.concat([f, f.head(1)]), "duplicate user ids"),
    "reasons cut short": (
        lambda f: f.with_columns(
            pl.when(pl.int_range(pl.len()) == 0)
            .then(pl.lit(b""))
            .otherwise(pl.col("reason_codes"))
            .alias("reason_codes")
        ),
        "1 rows whose reasons do not match their items",
    ),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_failed_validation_leaves_the_live_batch_untouched(batch_settings: Settings, corruption: str) -> None:
    good = publish.publish_nightly(batch_settings, PREVIOUS_DATE)
    change, expected = CORRUPTIONS[corruption]
    corrupt_shard(batch_settings, change)
    with pytest.raises(BatchValidationError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        publish.publish_nightly(batch_settings, SAMPLE_DATE)
    assert live_batch(batch_settings) == good.batch_id
    failed = max(statuses(batch_settings))
    assert statuses(batch_settings)[failed] == "failed"
    assert not table_exists(batch_settings, failed)  # no orphan table left behind


def test_output_checks_measured_beside_the_load_hold_the_batch_back(batch_settings: Settings) -> None:
    good = publish.publish_nightly(batch_settings, PREVIOUS_DATE)
    strict = batch_settings.model_copy(update={"monitor_thresholds": {"catalogue_coverage": {"fail": 1.01}}})
    with pytest.raises(gate.MonitoringBlockedError, match="blocked by monitoring"):
        publish.publish_nightly(strict, SAMPLE_DATE)
    assert live_batch(batch_settings) == good.batch_id
    failed = max(statuses(batch_settings))
    assert statuses(batch_settings)[failed] == "failed"
    assert not table_exists(batch_settings, failed)
    # the gate judged, and recorded, what was measured of the shard files while the batch loaded: the batch's
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        recorded = conn.execute(
            "SELECT report FROM overnight.monitor_reports WHERE logical_date = %s AND stage = 'output'",
            (SAMPLE_DATE,),
        ).fetchone()
        measured_after = outputs.batch_statistics(batch_settings, SAMPLE_DATE, failed, conn)
    assert recorded is not None and recorded[0]["batch_id"] == failed
    assert recorded[0] == json.loads(json.dumps(jsonable(measured_after)))


def test_too_little_coverage_fails_validation(batch_settings: Settings) -> None:
    corrupt_shard(batch_settings, lambda f: f.head(1))
    with pytest.raises(BatchValidationError, match="active users"):
        publish.publish_nightly(batch_settings, SAMPLE_DATE)
    assert live_batch(batch_settings) is None


def test_republishing_a_date_replaces_its_batch(batch_settings: Settings) -> None:
    first = publish.publish_nightly(batch_settings, SAMPLE_DATE)
    second = publish.publish_nightly(batch_settings, SAMPLE_DATE)
    assert live_batch(batch_settings) == second.batch_id
    assert second.dropped_batches == [first.batch_id]
    assert statuses(batch_settings) == {first.batch_id: "dropped", second.batch_id: "live"}
    assert not table_exists(batch_settings, first.batch_id)


def test_a_backfilled_date_does_not_move_live_backwards_unless_asked(batch_settings: Settings) -> None:
    newest = publish.publish_nightly(batch_settings, SAMPLE_DATE)
    backfill = publish.publish_nightly(batch_settings, PREVIOUS_DATE)
    assert not backfill.live
    assert "newer date" in backfill.reason
    assert live_batch(batch_settings) == newest.batch_id
    assert statuses(batch_settings)[backfill.batch_id] == "ready"
    forced = publish.publish_nightly(batch_settings, PREVIOUS_DATE, make_live=True)
    assert forced.live
    assert live_batch(batch_settings) == forced.batch_id


def test_rollback_switches_to_the_batch_before_and_back(batch_settings: Settings) -> None:
    older = publish.publish_nightly(batch_settings, PREVIOUS_DATE)
    newer = publish.publish_nightly(batch_settings, SAMPLE_DATE)
    switched = batches.rollback(batch_settings)
    assert (switched.batch_id, switched.previous_batch_id) == (older.batch_id, newer.batch_id)
    assert live_batch(batch_settings) == older.batch_id
    with pytest.raises(MissingDataError, match="no kept batch before"):
        batches.rollback(batch_settings)
    batches.rollback(batch_settings, to_batch=newer.batch_id)
    assert live_batch(batch_settings) == newer.batch_id
    with pytest.raises(MissingDataError, match="does not exist"):
        batches.rollback(batch_settings, to_batch=999)


def test_retention_keeps_the_newest_batches_and_the_live_one(batch_settings: Settings) -> None:
    settings = batch_settings.model_copy(update={"keep_batches": 2})
    first = publish.publish_nightly(settings, PREVIOUS_DATE)
    second = publish.publish_nightly(settings, SAMPLE_DATE)
    third = publish.publish_nightly(settings, PREVIOUS_DATE, make_live=False)
    assert statuses(settings) == {first.batch_id: "dropped", second.batch_id: "live", third.batch_id: "ready"}
    assert [table_exists(settings, b) for b in (first.batch_id, second.batch_id, third.batch_id)] == [False, True, True]


def test_a_publish_that_died_mid_load_is_cleaned_up(batch_settings: Settings) -> None:
    live = publish.publish_nightly(batch_settings, PREVIOUS_DATE)
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        orphan = conn.execute(
            "INSERT INTO overnight.batches (logical_date, model_id, status, k, users_scored, active_users,"
            " fallback_item_ids, fallback_scores, generated_at, loader_pid)"
            " SELECT logical_date, model_id, 'loading', k, 1, 1, fallback_item_ids, fallback_scores, now(), 2147483000"
            " FROM overnight.batches WHERE batch_id = %s RETURNING batch_id",
            (live.batch_id,),
        ).fetchone()[0]  # type: ignore[index]
        conn.execute(sql.batch_query("create_recs_table", orphan))
    publish.publish_nightly(batch_settings, SAMPLE_DATE)
    assert statuses(batch_settings)[orphan] == "failed"
    assert not table_exists(batch_settings, orphan)


LIVE_DATE = "SELECT b.batch_id, b.logical_date FROM overnight.live JOIN overnight.batches b USING (batch_id)"


def expected_rows(settings: Settings, day: date) -> dict[str, list[str]]:
    frames = [pl.read_parquet(p) for p in sorted(workdir.scores_dir(settings, day).glob("shard-*.parquet"))]
    return dict(pl.concat(frames).select("user_id", "item_ids").iter_rows())


def test_readers_never_see_a_mix_or_a_gap_while_batches_switch(batch_settings: Settings) -> None:
    """Readers resolve the live batch and read users from it while publishes and rollbacks switch it."""
    by_date = {day: expected_rows(batch_settings, day) for day in (PREVIOUS_DATE, SAMPLE_DATE)}
    users = sorted(set(by_date[PREVIOUS_DATE]) & set(by_date[SAMPLE_DATE]))[:50]
    assert any(by_date[PREVIOUS_DATE][u] != by_date[SAMPLE_DATE][u] for u in users)
    publish.publish_nightly(batch_settings, PREVIOUS_DATE)
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def reader() -> None:
        with psycopg.connect(str(batch_settings.database_url), autocommit=True) as conn:
            while not stop.is_set():
                try:
                    batch_id, day = conn.execute(LIVE_DATE).fetchone()  # type: ignore[misc]
                    rows = conn.execute(sql.batch_query("recs_for_users", batch_id), (users,)).fetchall()
                except psycopg.errors.UndefinedTable:
                    # The pointer moved on and a same-date publish dropped the batch between the two
                    # statements; the lookup service re-reads the pointer then, and so does this reader.
                    continue
                except psycopg.Error as error:
                    problems.append(f"read failed: {error}")
                    continue
                got = {user: items for user, items, _scores in rows}
                if got != {u: by_date[day][u] for u in users}:
                    problems.append(f"batch {batch_id} ({day}) returned rows of another batch or missed users")
                reads[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(2):
            publish.publish_nightly(batch_settings, SAMPLE_DATE)
            batches.rollback(batch_settings)
            publish.publish_nightly(batch_settings, PREVIOUS_DATE, make_live=True)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert reads[0] > 10
    assert problems == []


def test_publish_needs_every_shard(batch_settings: Settings) -> None:
    workdir.shard_path(batch_settings, SAMPLE_DATE, 1, 2).with_suffix(".json").unlink()
    with pytest.raises(MissingDataError, match=r"missing 1 shard\(s\) of 2: 1; "):
        publish.publish_nightly(batch_settings, SAMPLE_DATE)


def test_a_manifest_cut_short_is_named_in_the_error(batch_settings: Settings) -> None:
    manifest = workdir.shard_path(batch_settings, SAMPLE_DATE, 0, 2).with_suffix(".json")
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(MissingDataError, match=rf"shard manifest {manifest} is unreadable .*re-run `overnight score`"):
        publish.publish_nightly(batch_settings, SAMPLE_DATE)


def test_publish_without_the_monitor_step_loads_nothing_and_names_it(batch_settings: Settings) -> None:
    with psycopg.connect(batch_settings.database_url) as conn:
        conn.execute("DELETE FROM overnight.monitor_checks")
        conn.execute("DELETE FROM overnight.monitor_reports")
    with pytest.raises(MissingDataError) as raised:
        publish.publish_nightly(batch_settings, SAMPLE_DATE)
    assert str(raised.value) == (
        f"no input and drift checks for {SAMPLE_DATE} in the database: run the monitor step first "
        f"(`overnight monitor --date {SAMPLE_DATE}`, or `overnight run`)"
    )
    with psycopg.connect(batch_settings.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM overnight.batches").fetchone() == (0,)  # no load was begun


def test_scoring_uses_no_model_newer_than_the_date(batch_settings: Settings) -> None:
    with pytest.raises(MissingDataError, match="no promoted model trained on or before"):
        score.score(batch_settings, date(2020, 1, 1))


def test_more_users_than_a_shard_holds_make_more_shards_that_cover_everyone(batch_settings: Settings) -> None:
    users = pl.read_parquet(workdir.table_path(batch_settings, SAMPLE_DATE, workdir.USERS))["user_id"]
    settings = batch_settings.model_copy(update={"shard_users": math.ceil(users.len() / 3), "score_shards": 1})
    assert score.shard_count(settings, SAMPLE_DATE) == 3
    results = score.score(settings, SAMPLE_DATE)
    assert [r.shard for r in results] == [0, 1, 2] and {r.shards for r in results} == {3}
    scored = pl.concat([pl.read_parquet(r.path) for r in results])["user_id"]
    assert scored.is_unique().all()
    assert sum(r.users + r.users_without_candidates for r in results) == users.len()
    assert set(scored) <= set(users)
    assert all(0 < r.predict_seconds <= r.seconds for r in results)
    assert [m.shards for m in workdir.read_manifests(settings, SAMPLE_DATE)] == [3, 3, 3]  # the 2-shard run is gone
    assert publish.publish_nightly(settings, SAMPLE_DATE).users == scored.len()


def test_a_canarys_batch_that_never_went_live_is_neither_a_rollback_target_nor_a_rollback_slot(
    batch_settings: Settings,
) -> None:
    """A batch scored for a canary whose start failed (or whose canary was stopped) was never production:
    rollback must skip it, and it must not push production's batches out of the places kept for rollback."""
    register_challenger(batch_settings)
    settings = batch_settings.model_copy(update={"keep_batches": 2})
    yesterday = publish.publish_nightly(settings, PREVIOUS_DATE)
    score.score(settings, SAMPLE_DATE, model_id="challenger")
    never_started = publish.publish_canary_batch(settings, SAMPLE_DATE, "challenger")
    assert not never_started.live and never_started.dropped_batches == []
    tonight = publish.publish_nightly(settings, SAMPLE_DATE)  # a same-date publish does not replace the canary's batch
    assert tonight.dropped_batches == []
    assert statuses(settings) == {
        yesterday.batch_id: "retired",
        never_started.batch_id: "ready",
        tonight.batch_id: "live",
    }
    with psycopg.connect(str(settings.database_url)) as conn:
        assert conn.execute(sql.query("rollback_target"), (tonight.batch_id,)).fetchone() == (yesterday.batch_id,)
    # Canaries' never-live batches have their own retention: the newest keep_batches of them.
    again = [publish.publish_canary_batch(settings, SAMPLE_DATE, "challenger").batch_id for _ in range(2)]
    assert statuses(settings)[never_started.batch_id] == "dropped"
    assert [statuses(settings)[b] for b in again] == ["ready", "ready"]
    assert table_exists(settings, yesterday.batch_id)
    switched = batches.rollback(settings)
    assert (switched.batch_id, switched.previous_batch_id) == (yesterday.batch_id, tonight.batch_id)


def test_rollback_after_a_promotion_makes_the_old_model_production_again(batch_settings: Settings) -> None:
    """Promoting a model canary makes its model production; rolling back must undo that too, or the next
    night would score with the model just rolled back from."""
    original = register_challenger(batch_settings)
    production = publish.publish_nightly(batch_settings, SAMPLE_DATE).batch_id
    model_canary.start_model_canary(batch_settings, "challenger", 0.1)
    promoted = canary.promote_canary(batch_settings)
    assert promoted.model_changed
    switched = batches.rollback(batch_settings)
    assert (switched.batch_id, switched.previous_batch_id) == (production, promoted.batch_id)
    assert (switched.model_id, switched.previous_model_id) == (original.model_id, "challenger")
    assert f"model {original.model_id} is the production model again (was challenger)" in switched.summary()
    assert score.ranker_for(batch_settings, SAMPLE_DATE).model_id == original.model_id
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        challenger = registry.model_by_id(conn, "challenger")
    assert challenger is not None and challenger.status == "retired"
    assert challenger.status_reason == f"replaced by {original.model_id}: rollback to batch {production}"
    # `--to` a batch of another model does the same: challenger is production again, then the original.
    assert batches.rollback(batch_settings, to_batch=promoted.batch_id).model_id == "challenger"
    back = batches.rollback(batch_settings)
    assert (back.batch_id, back.model_id, back.previous_model_id) == (production, original.model_id, "challenger")


def test_retention_leaves_alone_a_batch_that_became_the_canary_after_it_was_chosen(batch_settings: Settings) -> None:
    """Retention lists the batches to drop, then drops them one by one: one that a canary took meanwhile
    is read again under the live lock and kept."""
    live = publish.publish_nightly(batch_settings, PREVIOUS_DATE).batch_id
    chosen = publish.publish_nightly(batch_settings, SAMPLE_DATE, make_live=False).batch_id
    canary.start_canary(batch_settings, chosen, 0.1)
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        assert not batches.drop_batch(conn, chosen)
        assert not batches.drop_batch(conn, live)
    assert table_exists(batch_settings, chosen) and table_exists(batch_settings, live)
    assert statuses(batch_settings) == {live: "live", chosen: "canary"}


def test_a_once_live_batch_stays_a_rollback_target_after_serving_as_a_canary(batch_settings: Settings) -> None:
    """Canarying yesterday's batch again and stopping it must not make it look like a never-live canary."""
    yesterday = publish.publish_nightly(batch_settings, PREVIOUS_DATE).batch_id
    tonight = publish.publish_nightly(batch_settings, SAMPLE_DATE).batch_id
    canary.start_canary(batch_settings, yesterday, 0.1)
    canary.stop_canary(batch_settings)
    assert statuses(batch_settings) == {yesterday: "retired", tonight: "live"}
    assert batches.rollback(batch_settings).batch_id == yesterday
