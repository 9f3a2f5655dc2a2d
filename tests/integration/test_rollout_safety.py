"""What canary, promote and shadow must never do to production: its monitoring, its model, its live batch."""

import json
from datetime import date

import psycopg
import pytest

import sql
from jobs import publish, score, shadow
from jobs.settings import Settings
from tests.conftest import SAMPLE_DATE, overnight, overnight_env
from tests.integration.conftest import PREVIOUS_DATE

pytestmark = pytest.mark.integration


def batch_status(settings: Settings, batch_id: int) -> str:
    with psycopg.connect(str(settings.database_url)) as conn:
        row = conn.execute(sql.query("batch_by_id"), (batch_id,)).fetchone()
    assert row is not None
    return str(row[3])


@pytest.fixture
def two_batches(batch_settings: Settings) -> tuple[int, int]:
    """(production, candidate): PREVIOUS_DATE's batch is live, SAMPLE_DATE's is published but not live."""
    candidate = publish.publish(batch_settings, SAMPLE_DATE, make_live=False).batch_id
    production = publish.publish(batch_settings, PREVIOUS_DATE, make_live=True).batch_id
    return production, candidate


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
    model_id = score.read_manifests(batch_settings, PREVIOUS_DATE)[0].model_id
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
    overnight("canary", "--batch", str(candidate), "--traffic", "0.05", "--salt", "j", env=env)
    stopped = json.loads(overnight("canary", "--stop", "--json", env=env).stdout)
    assert (stopped["batch_id"], stopped["salt"], stopped["production_batch_id"]) == (candidate, "j", production)
    overnight("canary", "--batch", str(candidate), "--traffic", "0.05", env=env)
    promoted = json.loads(overnight("promote", "--json", env=env).stdout)
    assert (promoted["batch_id"], promoted["previous_batch_id"]) == (candidate, production)
