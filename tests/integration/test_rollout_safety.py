"""What canary, promote and shadow must never do to production: its monitoring, its model, its live batch."""

import json
import math
from datetime import date, datetime, timedelta

import psycopg
import pytest

import sql
from jobs import batches, lake, registry, workdir
from jobs.errors import MissingDataError, RolloutError
from jobs.rollouts import canary, model_canary, shadow
from jobs.settings import Settings
from jobs.steps import ranking_metrics, score, train
from tests.support.batches import batch_status, register_challenger
from tests.support.commands import overnight, overnight_env
from tests.support.data import PREVIOUS_DATE, SAMPLE_DATE

pytestmark = pytest.mark.integration


def monitoring_of(settings: Settings, day: date) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], int]:
    """(reports, checks, alerts sent) of a date's monitoring, as the dashboard and `overnight drift` read it."""
    with psycopg.connect(str(settings.database_url)) as conn:
        reports = conn.execute(
            "SELECT stage, batch_id, model_id, verdict, report::text FROM overnight.monitor_reports "
            "WHERE logical_date = %s ORDER BY stage",
            (day,),
        ).fetchall()
        checks = conn.execute(
            "SELECT stage, statistic, subject, batch_id, level, value FROM overnight.monitor_checks "
            "WHERE logical_date = %s ORDER BY stage, statistic, subject",
            (day,),
        ).fetchall()
        alerts = conn.execute("SELECT count(*) FROM overnight.alerts").fetchone()
    assert alerts is not None
    return reports, checks, alerts[0]


def test_a_shadow_never_touches_production_monitoring(batch_settings: Settings, two_batches: tuple[int, int]) -> None:
    """Regression: a shadow publish replaced the date's output report with its own, and a shadow failing
    an output check sent a "held back" alert and failed, although production had published fine."""
    production, _ = two_batches
    before = monitoring_of(batch_settings, PREVIOUS_DATE)
    assert ("output", production) in [(stage, batch) for stage, batch, *_ in before[0]]
    model_id = workdir.read_manifests(batch_settings, PREVIOUS_DATE)[0].model_id
    # every output check of the shadow fails at these thresholds: it must still publish, silently
    strict = batch_settings.model_copy(
        update={"monitor_thresholds": {"catalogue_coverage": {"fail": 1.01}, "short_list_share": {"fail": -1.0}}}
    )
    result = shadow.run_shadow(strict, PREVIOUS_DATE, model_id)
    assert batch_status(batch_settings, result.batch_id) == "shadow"
    assert monitoring_of(batch_settings, PREVIOUS_DATE) == before
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        row = conn.execute(sql.query("batch_by_id"), (result.batch_id,)).fetchone()
    assert row is not None
    output = row[10]["output"]  # the shadow's own output statistics, kept with its batch
    assert output["verdict"] == "fail"
    assert {c["statistic"] for c in output["checks"] if c["level"] == "fail"} == {
        "catalogue_coverage",
        "short_list_share",
    }


def test_canary_stop_and_promote_print_json(batch_settings: Settings, two_batches: tuple[int, int]) -> None:
    env = overnight_env(str(batch_settings.database_url), batch_settings.data_dir)
    production, candidate = two_batches
    overnight("canary", "start", "batch", str(candidate), "--traffic", "0.05", "--salt", "j", env=env)
    stopped = json.loads(overnight("canary", "stop", "--json", env=env).stdout)
    assert (stopped["batch_id"], stopped["salt"], stopped["production_batch_id"]) == (candidate, "j", production)
    overnight("canary", "start", "batch", str(candidate), "--traffic", "0.05", env=env)
    promoted = json.loads(overnight("promote", "--json", env=env).stdout)
    assert (promoted["batch_id"], promoted["previous_batch_id"]) == (candidate, production)


def test_a_model_canary_promoted_becomes_the_production_model(
    batch_settings: Settings, two_batches: tuple[int, int]
) -> None:
    """Canary a registered model (a batch scored with it, not live), promote it: the registry's production
    model is now that model, so the next night scores with it instead of silently going back."""
    production, candidate = two_batches
    original = register_challenger(batch_settings)  # older than the model it will replace
    challenger_trained_for = original.logical_date - timedelta(days=1)
    before = monitoring_of(batch_settings, PREVIOUS_DATE)

    started = model_canary.start_model_canary(batch_settings, "challenger", 0.1, salt="m1")
    assert (started.traffic, started.salt, started.production_batch_id) == (0.1, "m1", production)
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        batch = conn.execute(sql.query("batch_by_id"), (started.batch_id,)).fetchone()
    assert batch is not None
    assert (batch[1], batch[2], batch[3]) == (PREVIOUS_DATE, "challenger", "canary")  # the live batch's date
    assert batch_status(batch_settings, production) == "live"  # not replaced, although of the same date
    assert monitoring_of(batch_settings, PREVIOUS_DATE) == before  # production's monitoring record stands
    with pytest.raises(RolloutError, match=r"already the canary.*canary refresh"):
        model_canary.start_model_canary(batch_settings, "challenger", 0.2)
    assert score.ranker_for(batch_settings, SAMPLE_DATE).model_id == original.model_id  # until promoted

    promotion = canary.promote_canary(batch_settings)
    assert (promotion.batch_id, promotion.previous_batch_id) == (started.batch_id, production)
    assert (promotion.model_id, promotion.previous_model_id, promotion.model_changed) == (
        "challenger",
        original.model_id,
        True,
    )
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        now_production = registry.production_model(conn)
        replaced = registry.model_by_id(conn, original.model_id)
        next_night = registry.model_for_date(conn, SAMPLE_DATE)
    assert now_production is not None and now_production.model_id == "challenger"
    assert now_production.status_reason == f"made production by canary promotion of batch {started.batch_id}"
    assert replaced is not None and replaced.status == "retired"
    assert replaced.status_reason == f"replaced by challenger: canary promotion of batch {started.batch_id}"
    assert next_night is not None and next_night.model_id == "challenger"
    assert score.ranker_for(batch_settings, SAMPLE_DATE).model_id == "challenger"
    # a date before the promoted model was trained still gets a model that existed then
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        assert registry.model_for_date(conn, challenger_trained_for - timedelta(days=1)) is None

    # going back is a canary of the old batch, promoted: its model is production again
    canary.start_canary(batch_settings, production, 0.1)
    back = canary.promote_canary(batch_settings)
    assert (back.model_id, back.previous_model_id, back.model_changed) == (original.model_id, "challenger", True)
    # and promoting a batch of the production model leaves the registry as it is
    canary.start_canary(batch_settings, candidate, 0.1)
    same = canary.promote_canary(batch_settings)
    assert (same.model_id, same.previous_model_id, same.model_changed) == (original.model_id, original.model_id, False)
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        assert registry.production_model(conn) == registry.model_by_id(conn, original.model_id)


def test_rollback_refuses_a_canary_batch_under_the_live_lock(
    batch_settings: Settings, two_batches: tuple[int, int]
) -> None:
    production, candidate = two_batches
    canary.start_canary(batch_settings, candidate, 0.1)
    with pytest.raises(MissingDataError, match=f"batch {candidate} is canary"):
        batches.rollback(batch_settings, to_batch=candidate)
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        assert conn.execute(sql.query("live_batch_id")).fetchone() == (production,)


def assert_latest_window_compares(report: shadow.ShadowReport, settings: Settings) -> None:
    """Both models on the newest label window as of the date, on its held-out users, as training's gate."""
    latest = report.latest_window
    end = lake.day_end(date.fromisoformat(report.logical_date))
    newest = end - timedelta(days=settings.label_days)
    judged = math.ceil(train.GATE_DAYS / settings.label_days)
    assert datetime.fromisoformat(latest["cutoff"]) == end - timedelta(days=settings.label_days * judged)
    assert latest["window"].startswith(f"[{newest:%Y-%m-%d}, ")
    assert latest["users"] > 0
    for name in ("production", "shadow"):
        assert set(latest[name]) == {*ranking_metrics.metric_names(10), "users"}
        assert latest[name]["users"] == latest["users"] and 0 < latest[name]["ndcg@10"] <= 1
    expected = {key: latest["shadow"][key] - latest["production"][key] for key in latest["production"] if "@" in key}
    assert latest["deltas"] == pytest.approx(expected) and set(latest["deltas"]) == set(expected)
    if report.production["model_id"] == report.shadow["model_id"]:
        assert all(delta == 0 for delta in latest["deltas"].values())


def test_shadow_report_says_how_much_of_its_window_has_data(
    batch_settings: Settings, two_batches: tuple[int, int]
) -> None:
    """The lake holds one day after PREVIOUS_DATE: a 7-day window is 1/7 there, and the report says so."""
    model_id = workdir.read_manifests(batch_settings, PREVIOUS_DATE)[0].model_id
    shadow.run_shadow(batch_settings, PREVIOUS_DATE, model_id)

    partial = shadow.shadow_report(batch_settings, PREVIOUS_DATE, horizon_days=7)
    assert_latest_window_compares(partial, batch_settings)
    window = partial.evaluation["window"]
    assert {"start", "end", "users", "pairs"} <= set(window)  # the keys there were before stay
    assert (window["days"], window["days_with_data"], window["last_day_with_data"]) == (7, 1, SAMPLE_DATE.isoformat())
    assert partial.evaluation["window_complete"] is False
    assert "interactions for 1 of its 7 days" in partial.evaluation["warning"]
    assert "partial window" in partial.evaluation["warning"]
    assert partial.deltas  # still computed, on what there is

    whole = shadow.shadow_report(batch_settings, PREVIOUS_DATE, horizon_days=1)
    assert whole.evaluation["window_complete"] is True and "warning" not in whole.evaluation
    assert whole.evaluation["window"]["days_with_data"] == 1

    shadow.run_shadow(batch_settings, SAMPLE_DATE, model_id)  # last night's shadow: nothing after it yet
    empty = shadow.shadow_report(batch_settings, SAMPLE_DATE)
    assert (empty.evaluation["window"]["days_with_data"], empty.evaluation["window_complete"]) == (0, False)
    assert "nothing to evaluate yet" in empty.evaluation["warning"] and empty.deltas == {}
    assert_latest_window_compares(empty, batch_settings)  # the morning after, the latest window is there

    env = overnight_env(str(batch_settings.database_url), batch_settings.data_dir)
    text = overnight("shadow-report", "--date", PREVIOUS_DATE.isoformat(), env=env).stdout
    assert "1 of 7 days with data (INCOMPLETE)" in text and "  warning: the evaluation window" in text
    latest_line = f"latest window {partial.latest_window['window']}: {partial.latest_window['users']} held-out users"
    assert text.index(latest_line) < text.index("overlap: ")
    data = json.loads(overnight("shadow-report", "--date", PREVIOUS_DATE.isoformat(), "--json", env=env).stdout)
    assert data["evaluation"]["window_complete"] is False and data["evaluation"]["window"]["days_with_data"] == 1
    assert data["latest_window"] == partial.latest_window

    longer_than_the_history = batch_settings.model_copy(update={"label_days": 60})
    unlabelled = shadow.latest_window_comparison(longer_than_the_history, PREVIOUS_DATE, model_id, model_id)
    assert set(unlabelled) == {"note"} and "no labelled window" in unlabelled["note"]


def test_shadow_report_outlives_the_production_batch_table(
    batch_settings: Settings, two_batches: tuple[int, int]
) -> None:
    """Retention drops a production batch's table within OVERNIGHT_KEEP_BATCHES nights, before the window
    after its date has data: the report still compares the models on the latest window, and says why the
    rest is missing."""
    production, candidate = two_batches
    register_challenger(batch_settings)
    shadow_batch = shadow.run_shadow(batch_settings, PREVIOUS_DATE, "challenger").batch_id
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        batches.switch_live(conn, candidate, "publish")  # the next night goes live; production is retired
        # Dropped, but its row not yet marked: as a report that looked the batch up just before the drop.
        assert batches.drop_batch(conn, production, mark_dropped=False)

    report = shadow.shadow_report(batch_settings, PREVIOUS_DATE)
    assert (report.production["batch_id"], report.shadow["batch_id"]) == (production, shadow_batch)
    assert report.shadow["model_id"] == "challenger"
    assert_latest_window_compares(report, batch_settings)
    unavailable = report.overlap["unavailable"]
    assert f"batch {production} (production)" in unavailable and "OVERNIGHT_KEEP_BATCHES (3)" in unavailable
    assert f"batch {shadow_batch}" not in unavailable
    assert report.evaluation == report.production["scores"] == report.shadow["scores"] == report.overlap
    assert report.deltas == {}

    env = overnight_env(str(batch_settings.database_url), batch_settings.data_dir)
    text = overnight("shadow-report", "--date", PREVIOUS_DATE.isoformat(), env=env).stdout
    assert text.index("latest window ") < text.index(f"unavailable: the table of batch {production} (production)")

    # Retention marks both batches dropped (the shadow's too): their rows, and so their models, remain.
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        conn.execute(sql.query("mark_batch_dropped"), (production,))
        assert batches.drop_batch(conn, shadow_batch)
    later = shadow.shadow_report(batch_settings, PREVIOUS_DATE)
    assert (later.production["batch_id"], later.shadow["batch_id"]) == (production, shadow_batch)
    assert later.latest_window == report.latest_window
    assert f"batch {shadow_batch} (shadow)" in later.overlap["unavailable"]
    with pytest.raises(MissingDataError, match=f"no shadow batch for {SAMPLE_DATE}"):
        shadow.shadow_report(batch_settings, SAMPLE_DATE)
