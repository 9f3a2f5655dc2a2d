"""Canary, promote, stop and shadow batches on real published batches; feedback into ingest."""

import asyncio
import json
import re
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import psycopg
import pytest
from psycopg import sql as pgsql

import sql
from jobs import batches, lake, nightly, registry, workdir
from jobs.errors import FutureModelError, MissingDataError, RolloutError
from jobs.rollouts import canary, model_canary, shadow
from jobs.settings import Settings
from jobs.steps import ingest, publish, ranking_metrics, train
from serving.live import read_rollout
from serving.variants import CANARY, PRODUCTION
from tests.support.batches import batch_status, register_challenger
from tests.support.commands import overnight, overnight_env
from tests.support.data import PREVIOUS_DATE, SAMPLE_DATE

pytestmark = pytest.mark.integration


def scored_rows(settings: Settings, day: date, model_id: str | None = None) -> dict[str, list[str]]:
    folder = workdir.scores_dir(settings, day, model_id)
    frames = [pl.read_parquet(p) for p in sorted(folder.glob("shard-*.parquet"))]
    return dict(pl.concat(frames).select("user_id", "item_ids").iter_rows())


async def rollout_of(settings: Settings):  # type: ignore[no-untyped-def]
    async with await psycopg.AsyncConnection.connect(str(settings.database_url), autocommit=True) as conn:
        return await read_rollout(conn)


def test_canary_start_ramp_stop_and_promote(batch_settings: Settings, two_batches: tuple[int, int]) -> None:
    production, candidate = two_batches
    rollout = asyncio.run(rollout_of(batch_settings))
    assert rollout is not None and rollout.canary is None
    assert rollout.route("anyone") == (PRODUCTION, rollout.production)

    started = canary.start_canary(batch_settings, candidate, 0.3, salt="exp-1")
    assert (started.batch_id, started.traffic, started.salt, started.production_batch_id) == (
        candidate,
        0.3,
        "exp-1",
        production,
    )
    assert batch_status(batch_settings, candidate) == "canary"
    rollout = asyncio.run(rollout_of(batch_settings))
    assert rollout is not None and rollout.canary is not None
    assert rollout.production.batch_id == production and rollout.canary.batch.batch_id == candidate
    users = list(scored_rows(batch_settings, SAMPLE_DATE))
    routed = [rollout.route(user) for user in users]
    share = sum(variant == CANARY for variant, _ in routed) / len(users)
    assert 0.15 < share < 0.45, share  # 300 users at 30%
    assert all(batch.batch_id == (candidate if variant == CANARY else production) for variant, batch in routed)

    ramped = canary.ramp_canary(batch_settings, 0.6)
    assert (ramped.batch_id, ramped.salt, ramped.traffic) == (candidate, "exp-1", 0.6)
    assert ramped.started_at == started.started_at  # the same canary
    rollout = asyncio.run(rollout_of(batch_settings))
    assert rollout is not None
    assert {u for u in users if rollout.route(u)[0] == CANARY} >= {
        u for (u, (variant, _)) in zip(users, routed, strict=True) if variant == CANARY
    }

    stopped = canary.stop_canary(batch_settings)
    assert stopped.batch_id == candidate
    assert batch_status(batch_settings, candidate) == "ready"
    rollout = asyncio.run(rollout_of(batch_settings))
    assert rollout is not None and rollout.canary is None

    canary.start_canary(batch_settings, candidate, 0.05)
    switched = canary.promote_canary(batch_settings)
    assert (switched.batch_id, switched.previous_batch_id) == (candidate, production)
    rollout = asyncio.run(rollout_of(batch_settings))
    assert rollout is not None and rollout.canary is None and rollout.production.batch_id == candidate
    assert batch_status(batch_settings, production) == "retired"

    status = batches.canary_status(batch_settings)
    assert status["canary"] is None and status["production_batch_id"] == candidate
    assert [event["action"] for event in status["history"]] == ["promote", "start", "stop", "ramp", "start"]
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        actions = [r[0] for r in conn.execute("SELECT action FROM overnight.live_history ORDER BY switch_id")]
    assert actions[-1] == "promote"


def test_canary_refuses_what_it_cannot_serve(batch_settings: Settings, two_batches: tuple[int, int]) -> None:
    production, candidate = two_batches
    for traffic in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(RolloutError, match="between 0 and 1"):
            canary.start_canary(batch_settings, candidate, traffic)
    with pytest.raises(MissingDataError, match="batch 999 does not exist"):
        canary.start_canary(batch_settings, 999, 0.05)
    with pytest.raises(RolloutError, match="already live"):
        canary.start_canary(batch_settings, production, 0.05)
    with pytest.raises(RolloutError, match="no canary is running"):
        canary.stop_canary(batch_settings)
    with pytest.raises(RolloutError, match="no canary is running"):
        canary.promote_canary(batch_settings)
    with pytest.raises(RolloutError, match="no canary is running: start one with `overnight canary start batch B"):
        canary.ramp_canary(batch_settings, 0.1)

    canary.start_canary(batch_settings, candidate, 0.05, salt="s1")
    # Starting only starts: the running canary is changed by a ramp, or stopped first, whatever the batch.
    for batch_id, salt in ((candidate, None), (candidate, "s2"), (production, None)):
        with pytest.raises(
            RolloutError,
            match=rf"batch {candidate} is already the canary \(5\.00% of users\): change its share with "
            r"`overnight canary ramp --traffic T`, or stop it with `overnight canary stop`",
        ):
            canary.start_canary(batch_settings, batch_id, 0.1, salt=salt)
    for traffic in (0.0, 1.0):
        with pytest.raises(RolloutError, match="between 0 and 1"):
            canary.ramp_canary(batch_settings, traffic)
    assert batches.canary_status(batch_settings)["canary"]["salt"] == "s1"
    # The canary is out of reach of rollback and retention.
    with pytest.raises(MissingDataError, match="is canary"):
        batches.rollback(batch_settings, to_batch=candidate)
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        expired = [r[0] for r in conn.execute(sql.query("expired_batches"), (0,))]
    assert candidate not in expired
    publish.publish_nightly(batch_settings, SAMPLE_DATE, make_live=False)  # a re-run of the canary's date
    assert batch_status(batch_settings, candidate) == "canary"


def test_canary_ramp_down_needs_allow_shrink(batch_settings: Settings, two_batches: tuple[int, int]) -> None:
    """A smaller share moves users back to production mid-experiment: refused unless asked for by name."""
    _, candidate = two_batches
    users = list(scored_rows(batch_settings, SAMPLE_DATE))

    def canary_users() -> set[str]:
        rollout = asyncio.run(rollout_of(batch_settings))
        assert rollout is not None
        return {user for user in users if rollout.route(user)[0] == CANARY}

    canary.start_canary(batch_settings, candidate, 0.5, salt="shrink")
    before = canary_users()
    canary.ramp_canary(batch_settings, 0.5)  # the same share is no ramp down
    with pytest.raises(RolloutError, match=r"50\.00% of users; lowering it to 20\.00% .*--allow-shrink"):
        canary.ramp_canary(batch_settings, 0.2)
    assert batches.canary_status(batch_settings)["canary"]["traffic"] == 0.5
    assert canary_users() == before

    env = overnight_env(str(batch_settings.database_url), batch_settings.data_dir)
    refused = overnight("canary", "ramp", "--traffic", "0.2", env=env, check=False)
    assert refused.returncode == 1
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("overnight: error: batch") and "back to production" in line and "--allow-shrink" in line
    assert "--allow-shrink" in overnight("canary", "ramp", "--help", env=env).stdout
    assert "--allow-shrink" not in overnight("canary", "start", "batch", "--help", env=env).stdout
    # the old way to shrink, a start of the running canary's batch with --allow-shrink, names the ramp
    old = ("canary", "start", "--batch", str(candidate), "--traffic", "0.2", "--allow-shrink")
    moved = overnight(*old, env=env, check=False)
    assert moved.returncode == 2 and "`overnight canary ramp --traffic 0.2 --allow-shrink`" in moved.stderr
    assert batches.canary_status(batch_settings)["canary"]["traffic"] == 0.5

    shrunk = overnight("canary", "ramp", "--traffic", "0.2", "--allow-shrink", env=env)
    assert "traffic: 0.2" in shrunk.stdout and "salt: shrink" in shrunk.stdout
    after = canary_users()
    assert after < before and len(after) < len(before)  # the same salt: a subset stays, the rest is production
    status = batches.canary_status(batch_settings)
    assert [(e["action"], e["traffic"]) for e in status["history"]] == [("ramp", 0.2), ("ramp", 0.5), ("start", 0.5)]


def test_readers_see_no_error_while_canaries_start_stop_and_promote(
    batch_settings: Settings, two_batches: tuple[int, int]
) -> None:
    """Readers route users and read their batch, as a lookup does, while the rollout changes under them."""
    production, candidate = two_batches
    expected = {
        production: scored_rows(batch_settings, PREVIOUS_DATE),
        candidate: scored_rows(batch_settings, SAMPLE_DATE),
    }
    users = sorted(set(expected[production]) & set(expected[candidate]))[:60]
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    async def read_loop() -> None:
        async with await psycopg.AsyncConnection.connect(str(batch_settings.database_url), autocommit=True) as conn:
            while not stop.is_set():
                try:
                    rollout = await read_rollout(conn)
                    assert rollout is not None
                    for user in users[:: 1 + reads[0] % 7]:
                        _, batch = rollout.route(user)
                        cur = await conn.execute(batch.recs_for_users, ([user],))
                        row = await cur.fetchone()
                        if row is None or row[1] != expected[batch.batch_id][user]:
                            problems.append(f"user {user}: batch {batch.batch_id} answered {row}")
                except Exception as error:
                    problems.append(f"read failed: {error!r}")
                reads[0] += 1

    threads = [threading.Thread(target=asyncio.run, args=(read_loop(),)) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        live, other = production, candidate
        for _ in range(3):
            canary.start_canary(batch_settings, other, 0.2)
            canary.ramp_canary(batch_settings, 0.5)
            canary.stop_canary(batch_settings)
            canary.start_canary(batch_settings, other, 0.5)
            canary.promote_canary(batch_settings)
            live, other = other, live
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert reads[0] > 10
    assert problems == []


def test_shadow_batch_is_published_but_never_served(batch_settings: Settings, two_batches: tuple[int, int]) -> None:
    production, _ = two_batches
    model_id = workdir.read_manifests(batch_settings, PREVIOUS_DATE)[0].model_id
    result = shadow.run_shadow(batch_settings, PREVIOUS_DATE, model_id)
    assert result.users == len(scored_rows(batch_settings, PREVIOUS_DATE, model_id)) > 0
    assert batch_status(batch_settings, result.batch_id) == "shadow"
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        live = conn.execute(sql.query("live_batch_id")).fetchone()
        conn.commit()
        assert live == (production,)
        with pytest.raises(psycopg.errors.CheckViolation, match="shadow batches are never served"):
            batches.switch_live(conn, result.batch_id, "publish")
    with pytest.raises(MissingDataError, match="is shadow"):
        batches.rollback(batch_settings, to_batch=result.batch_id)
    with pytest.raises(RolloutError, match="shadow batch"):
        canary.start_canary(batch_settings, result.batch_id, 0.05)
    # Publishing production again for that date leaves the shadow alone, and vice versa.
    publish.publish_nightly(batch_settings, PREVIOUS_DATE, make_live=True)
    assert batch_status(batch_settings, result.batch_id) == "shadow"

    # The same model as production: identical lists, zero deltas, on a real window (SAMPLE_DATE's events).
    report = shadow.shadow_report(batch_settings, PREVIOUS_DATE)
    assert report.overlap["overlap@10"] == 1.0
    assert report.overlap["users_in_both"] == report.overlap["identical_lists"] == result.users
    assert report.evaluation["window"]["users"] > 0
    assert report.evaluation["production"]["ndcg@10"] > 0
    assert set(report.deltas) >= {"ndcg@10", "recall@10", "map@10", "hit_rate@10", "coverage@10"}
    assert all(delta == 0 for delta in report.deltas.values())
    assert report.production["scores"] == report.shadow["scores"]
    assert report.production["scores"]["top_scores"]["p50"] >= report.production["scores"]["all_scores"]["p50"]
    latest = report.latest_window  # and the same metrics on the latest label window's held-out users
    assert latest["users"] > 0 and latest["production"] == latest["shadow"]
    assert latest["deltas"] == dict.fromkeys(
        ["ndcg@10", "graded_ndcg@10", "recall@10", "map@10", "hit_rate@10", "coverage@10"], 0.0
    )

    rerun = shadow.run_shadow(batch_settings, PREVIOUS_DATE, model_id)
    assert batch_status(batch_settings, result.batch_id) == "dropped"  # replaced by the re-run of its date
    assert batch_status(batch_settings, rerun.batch_id) == "shadow"


def test_shadow_report_of_a_different_model(batch_settings: Settings, two_batches: tuple[int, int]) -> None:
    """A shadow model that ranks differently: every part of the report checked against what the tables
    and the registry say on their own."""
    production_batch, _ = two_batches
    challenger = train.train(batch_settings.model_copy(update={"num_leaves": 2, "learning_rate": 0.5}), PREVIOUS_DATE)
    production_model = workdir.read_manifests(batch_settings, PREVIOUS_DATE)[0].model_id
    assert challenger.trained and challenger.model_id != production_model
    shadow_batch = shadow.run_shadow(batch_settings, PREVIOUS_DATE, challenger.model_id).batch_id

    report = shadow.shadow_report(batch_settings, PREVIOUS_DATE)
    assert (report.production["batch_id"], report.shadow["batch_id"]) == (production_batch, shadow_batch)
    assert (report.production["model_id"], report.shadow["model_id"]) == (production_model, challenger.model_id)
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        lists = {
            name: {
                user: (items, scores)
                for user, items, scores in conn.execute(
                    pgsql.SQL("SELECT user_id, item_ids, scores FROM {}").format(sql.recs_table(batch))
                )
            }
            for name, batch in (("production", production_batch), ("shadow", shadow_batch))
        }
        registered = {
            name: registry.model_by_id(conn, model_id)
            for name, model_id in (("production", production_model), ("shadow", challenger.model_id))
        }

    users = lists["production"].keys() & lists["shadow"].keys()
    shares = []
    for user in users:
        top_p, top_s = lists["production"][user][0][:10], lists["shadow"][user][0][:10]
        shares.append(len(set(top_p) & set(top_s)) / min(10, len(top_p), len(top_s)))
    assert report.overlap["users_in_both"] == len(users)
    assert report.overlap["overlap@10"] == pytest.approx(sum(shares) / len(shares), abs=1e-6)
    assert report.overlap["identical_lists"] == sum(share == 1 for share in shares) < len(users)

    for name in ("production", "shadow"):
        all_scores = np.array([s for _, scores in lists[name].values() for s in scores], dtype=np.float64)
        top_scores = np.array([scores[0] for _, scores in lists[name].values()], dtype=np.float64)
        for key, values in (("all_scores", all_scores), ("top_scores", top_scores)):
            expected = np.quantile(values, shadow.QUANTILES)
            assert list(getattr(report, name)["scores"][key].values()) == pytest.approx(expected, abs=1e-5)
    assert report.production["scores"] != report.shadow["scores"]

    relevant, _ = shadow.evaluation_window(batch_settings, PREVIOUS_DATE, 7)
    catalogue = lake.read_catalogue(batch_settings.lake_dir, PREVIOUS_DATE).height
    for name in ("production", "shadow"):
        ranked = pl.DataFrame(
            [(user, item, rank) for user, (items, _) in lists[name].items() for rank, item in enumerate(items, 1)],
            schema={"user_id": pl.String, "item_id": pl.String, "rank": pl.Int64},
            orient="row",
        )
        assert report.evaluation[name] == pytest.approx(ranking_metrics.ranking_metrics(ranked, relevant, catalogue))
    assert report.deltas == pytest.approx(
        {key: report.evaluation["shadow"][key] - report.evaluation["production"][key] for key in report.deltas}
    )
    assert any(report.deltas.values())

    # On the latest window each model scores what the training night registered for it: the same window,
    # the same held-out users, the same evaluation.
    latest = report.latest_window
    for name, model in registered.items():
        assert model is not None
        assert {key: latest[name][key] for key in latest["deltas"]} == pytest.approx(
            {key: model.metrics[key] for key in latest["deltas"]}
        )
    assert latest["deltas"] == pytest.approx(
        {key: latest["shadow"][key] - latest["production"][key] for key in latest["deltas"]}
    )
    assert any(latest["deltas"].values())


def test_a_model_canary_of_a_date_before_the_model_says_which_date_to_use(
    batch_settings: Settings, two_batches: tuple[int, int]
) -> None:
    model_id = workdir.read_manifests(batch_settings, PREVIOUS_DATE)[0].model_id
    older = PREVIOUS_DATE - timedelta(days=3)
    with pytest.raises(FutureModelError) as refused:
        model_canary.start_model_canary(batch_settings, model_id, 0.1, older)
    trained_for = refused.value.trained_for
    assert trained_for is not None and trained_for > older
    assert str(refused.value).endswith(
        f"`overnight canary start model {model_id} --traffic 0.1 --date {trained_for}`"
    ), refused.value


def test_shadow_refuses_unknown_and_future_models(batch_settings: Settings) -> None:
    with pytest.raises(MissingDataError, match="model nope is not registered"):
        shadow.run_shadow(batch_settings, SAMPLE_DATE, "nope")
    model_id = workdir.read_manifests(batch_settings, PREVIOUS_DATE)[0].model_id
    older = PREVIOUS_DATE - timedelta(days=3)
    with pytest.raises(FutureModelError, match="would use the future"):
        shadow.run_shadow(batch_settings, older, model_id)
    # The nightly DAG's shadow of a backfilled older date: skipped with the reason, nothing published.
    skipped = shadow.nightly_shadow(batch_settings, older, model_id)
    assert isinstance(skipped, shadow.ShadowSkipped) and skipped.skipped
    assert (skipped.logical_date, skipped.model_id) == (older.isoformat(), model_id)
    assert f"after {older}" in skipped.reason and "would use the future" in skipped.reason
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        shadows = conn.execute("SELECT count(*) FROM overnight.batches WHERE logical_date = %s", (older,)).fetchone()
    assert shadows == (0,)
    with pytest.raises(MissingDataError, match="model nope is not registered"):  # a typo still fails the night
        shadow.nightly_shadow(batch_settings, older, "nope")
    # Asked for explicitly, the impossible shadow is an error.
    env = overnight_env(str(batch_settings.database_url), batch_settings.data_dir)
    refused = overnight("shadow", "--date", older.isoformat(), "--model", model_id, env=env, check=False)
    assert refused.returncode == 1
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith(f"overnight: error: model {model_id} was trained for") and "would use the future" in line
    with pytest.raises(MissingDataError, match="no production batch for 2026-11-20"):
        shadow.shadow_report(batch_settings, SAMPLE_DATE)


def test_ingest_merges_feedback_with_configured_weights(batch_settings: Settings, sample_source) -> None:  # type: ignore[no-untyped-def]
    day = lake.day_start(SAMPLE_DATE)
    events = [  # occurred, received (items of the sample catalogue: "1" to "120")
        (day + timedelta(hours=9), day + timedelta(hours=9), "u-fb", "7", "click"),
        (day + timedelta(hours=9, minutes=1), day + timedelta(hours=9, minutes=1), "u-fb", "8", "conversion"),
        (day + timedelta(hours=8), day + timedelta(hours=8), "u-fb", "9", "impression"),
        (day - timedelta(days=1, hours=-3), day + timedelta(hours=1), "u-fb", "10", "click"),  # the day before, late
        (day + timedelta(days=1, hours=1), day + timedelta(days=1, hours=1), "u-fb", "11", "click"),  # after D
    ]
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        for occurred, received, user, item, kind in events:
            conn.execute(
                "INSERT INTO overnight.feedback_events VALUES (%s, %s, %s, %s, %s, 'r1')",
                (occurred, received, user, item, kind),
            )
    settings = batch_settings  # OVERNIGHT_INGEST_FEEDBACK is on by default
    ingest.ingest(settings, sample_source, SAMPLE_DATE)
    result = ingest.ingest(settings, sample_source, SAMPLE_DATE)  # idempotent: nothing twice
    assert (result.feedback_read, result.feedback_used, result.feedback_dropped_by_reason) == (3, 3, {})

    seen = (
        lake.scan_interactions(settings.lake_dir, SAMPLE_DATE)
        .filter(pl.col("user_id") == "u-fb")
        .sort("timestamp")
        .collect()
    )
    assert seen.select("item_id", "event_type", "weight").rows() == [
        ("10", "click", 1.0),
        ("7", "click", 1.0),
        ("8", "conversion", 3.0),
    ]
    assert seen["timestamp"][1] == datetime.combine(SAMPLE_DATE, datetime.min.time(), UTC) + timedelta(hours=9)


def test_cli_rollout_errors_are_one_line(batch_settings: Settings, two_batches: tuple[int, int]) -> None:
    env = overnight_env(str(batch_settings.database_url), batch_settings.data_dir)
    production, candidate = two_batches
    for args, message in (
        (["canary", "start", "batch", "999", "--traffic", "0.05"], "batch 999 does not exist"),
        (["canary", "ramp", "--traffic", "0.05"], "no canary is running"),
        (["promote"], "no canary is running"),
    ):
        result = overnight(*args, env=env, check=False)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"overnight: error: {message}" + result.stderr.split(message)[1].rstrip()
        ]
    assert overnight("canary", "status", env=env).stdout == "no canary is running\n"
    started = overnight("canary", "start", "batch", str(candidate), "--traffic", "0.05", "--salt", "cli", env=env)
    assert "salt: cli" in started.stdout and "traffic: 0.05" in started.stdout
    again = overnight("canary", "start", "batch", str(candidate), "--traffic", "0.1", env=env, check=False)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f"overnight: error: batch {candidate} is already the canary (5.00% of users): change its share with "
        "`overnight canary ramp --traffic T`, or stop it with `overnight canary stop` before starting another"
    ]
    running, heading, *history = overnight("canary", env=env).stdout.splitlines()
    assert running.startswith(f"canary batch {candidate} serves 5.00% of users (salt 'cli'); production is batch")
    assert re.fullmatch(r".*; since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d", running), running
    assert heading == "history, newest first:" and len(history) == 1
    assert history[0].endswith(f"  start    batch {candidate} at 5.00% (salt 'cli'), production batch {production}")
    shown = overnight("status", env=env).stdout
    assert f"canary: batch {candidate} for {SAMPLE_DATE}, model ranker-" in shown and "serves 5.00% of users" in shown
    status = json.loads(overnight("status", "--json", env=env).stdout)
    assert (status["live"]["batch_id"], status["canary"]["batch_id"]) == (production, candidate)
    assert status["canary"]["logical_date"] == SAMPLE_DATE.isoformat() and status["canary"]["age_seconds"] >= 0
    promoted = overnight("promote", env=env)
    assert f"canary batch {candidate} is now production (was {production})" in promoted.stdout
    assert "canary:" not in overnight("status", env=env).stdout
    after = overnight("canary", "status", env=env).stdout.splitlines()
    assert after[:2] == ["no canary is running", "history, newest first:"] and len(after) == 4
    assert "promote  batch" in after[2] and "start    batch" in after[3]


def test_a_model_canary_is_refreshed_onto_the_new_night_for_the_same_users(
    batch_settings: Settings, two_batches: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    production, candidate = two_batches
    register_challenger(batch_settings)
    assert model_canary.refresh_canary(batch_settings, SAMPLE_DATE).reason == "no canary is running"
    # A canary of production's own model: a refresh would serve production's lists (no scoring is tried).
    canary.start_canary(batch_settings, candidate, 0.1)
    same_model = model_canary.refresh_canary(batch_settings, SAMPLE_DATE + timedelta(days=1))
    assert not same_model.refreshed and "is production's" in same_model.reason
    canary.stop_canary(batch_settings)

    started = model_canary.start_model_canary(batch_settings, "challenger", 0.2, PREVIOUS_DATE, salt="fresh")
    same_night = model_canary.refresh_canary(batch_settings, PREVIOUS_DATE)
    assert not same_night.refreshed and f"is of {PREVIOUS_DATE} already" in same_night.reason
    tonight = publish.publish_nightly(batch_settings, SAMPLE_DATE, make_live=True)  # the next night

    # Stopped while the night was scored: the new batch is kept ready, the stop stands.
    publish_canary_batch = publish.publish_canary_batch

    def stopped_meanwhile(*args: object) -> publish.PublishResult:
        published = publish_canary_batch(*args)  # type: ignore[arg-type]
        canary.stop_canary(batch_settings)
        return published

    monkeypatch.setattr(publish, "publish_canary_batch", stopped_meanwhile)
    raced = model_canary.refresh_canary(batch_settings, SAMPLE_DATE)
    assert not raced.refreshed and raced.canary_batch is None and "the canary was stopped" in raced.reason
    assert batches.canary_status(batch_settings)["canary"] is None
    # The stopped canary's batch (ready, of the previous date, of another model) was never production:
    # rollback from tonight goes to the batch that was.
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        assert conn.execute(sql.query("rollback_target"), (tonight.batch_id,)).fetchone() == (production,)
    monkeypatch.undo()

    started = canary.start_canary(batch_settings, started.batch_id, 0.2, salt="fresh")
    refreshed = model_canary.refresh_canary(batch_settings, SAMPLE_DATE)
    assert refreshed.refreshed and (refreshed.canary_model, refreshed.previous_canary_batch) == (
        "challenger",
        started.batch_id,
    )
    new = refreshed.canary_batch
    assert new is not None
    assert (batch_status(batch_settings, new), batch_status(batch_settings, started.batch_id)) == ("canary", "dropped")
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        batch = conn.execute(sql.query("batch_by_id"), (new,)).fetchone()
    assert batch is not None and (batch[1], batch[2]) == (SAMPLE_DATE, "challenger")
    status = batches.canary_status(batch_settings)
    running = status["canary"]
    assert (running["batch_id"], running["traffic"], running["salt"]) == (new, 0.2, "fresh")  # the same users
    assert (running["started_at"], running["production_batch_id"]) == (started.started_at, tonight.batch_id)
    assert [event["action"] for event in status["history"][:2]] == ["refresh", "start"]
    rollout = asyncio.run(rollout_of(batch_settings))  # what the lookup service reads
    assert rollout is not None and rollout.canary is not None
    assert (rollout.production.batch_id, rollout.canary.batch.batch_id) == (tonight.batch_id, new)
    # The chosen model's scores have a folder of their own, beside production's, for the same users.
    assert set(scored_rows(batch_settings, SAMPLE_DATE, "challenger")) == set(scored_rows(batch_settings, SAMPLE_DATE))

    ahead = model_canary.refresh_canary(batch_settings, SAMPLE_DATE + timedelta(days=1))  # production is of SAMPLE_DATE
    assert not ahead.refreshed and ahead.reason.startswith(f"production serves {SAMPLE_DATE}")
    # Ramping needs no batch id: the refresh moved the canary off the batch it was started with.
    with pytest.raises(RolloutError, match=rf"batch {new} is already the canary .*overnight canary ramp --traffic T"):
        canary.start_canary(batch_settings, started.batch_id, 0.3)
    env = overnight_env(str(batch_settings.database_url), batch_settings.data_dir)
    ramped = json.loads(overnight("canary", "ramp", "--traffic", "0.3", "--json", env=env).stdout)
    assert (ramped["batch_id"], ramped["traffic"], ramped["salt"]) == (new, 0.3, "fresh")
    assert "--allow-shrink" in overnight("canary", "ramp", "--traffic", "0.1", env=env, check=False).stderr

    again = overnight("canary", "refresh", "--date", SAMPLE_DATE.isoformat(), "--json", env=env, check=False)
    assert again.returncode == 1, again.stderr
    assert json.loads(again.stdout)["reason"] == f"canary batch {new} is of {SAMPLE_DATE} already"
    # without --json, the CLI's failure line on stderr, as every command's
    plain = overnight("canary", "refresh", "--date", SAMPLE_DATE.isoformat(), env=env, check=False)
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr.strip().splitlines()[-1].startswith("overnight: error: canary not refreshed")


def test_overnight_run_also_scores_the_shadow_and_keeps_the_online_tables(
    database_url: str, tmp_path: Path, sample_source: Path
) -> None:
    """`overnight run` does what the DAG's tasks after publish do; the run history names the night's
    serving batch, not the shadow's."""
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, num_boost_round=20)
    first = nightly.run(nightly.night_of(settings, SAMPLE_DATE, sample_source))
    assert first.outcomes["shadow"]["summary"].startswith("skipped: no shadow_model")
    assert "partitions created" in first.outcomes["online"]["summary"]
    assert "recorded for 0 served models" in first.outcomes["online"]["summary"]

    shadowed = settings.model_copy(update={"shadow_model": first.model_id})
    night = nightly.run(nightly.night_of(shadowed, SAMPLE_DATE, sample_source))
    with psycopg.connect(database_url) as conn:
        shadows = conn.execute("SELECT batch_id FROM overnight.batches WHERE kind = 'shadow'").fetchall()
    assert len(shadows) == 1 and f"shadow batch {shadows[0][0]}" in night.outcomes["shadow"]["summary"]
    shadow_batch = shadows[0][0]
    assert batch_status(settings, shadow_batch) == "shadow" and shadow_batch != night.batch_id
    assert [step.step for step in night.steps][-3:] == ["shadow", "refresh-canary", "online"]
    with psycopg.connect(database_url) as conn:
        recorded = conn.execute("SELECT batch_id FROM overnight.runs WHERE run_id = %s", (night.run_id,)).fetchone()
    assert recorded == (night.batch_id,)
