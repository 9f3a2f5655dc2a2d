"""Thresholds and checks: levels by bad side, overrides from the environment, run-history row counts."""

import pytest

from jobs.errors import OvernightError
from jobs.monitoring.checks import DEFAULT_THRESHOLDS, judge, thresholds, verdict
from jobs.monitoring.drift import render_report
from jobs.settings import Settings


def test_levels_follow_the_bad_side() -> None:
    limits = thresholds(Settings(monitor_thresholds={"feature_psi": {"warn": 0.1, "fail": 0.25}}))
    assert judge(limits, "drift", "feature_psi", 0.05, "x").level == "ok"
    assert judge(limits, "drift", "feature_psi", 0.2, "x").level == "warn"
    failed = judge(limits, "drift", "feature_psi", 0.9, "item_mean_weight")
    assert failed.level == "fail"
    assert failed.message == "feature_psi of item_mean_weight is 0.9, above the fail threshold 0.25"
    # below is bad for coverage
    assert judge(limits, "output", "catalogue_coverage", 0.01).level == "warn"
    assert judge(limits, "output", "catalogue_coverage", 0.5).level == "ok"


def test_a_value_that_cannot_be_measured_is_ok_and_says_so() -> None:
    check = judge(thresholds(Settings()), "input", "weight_psi", None)
    assert (check.level, check.value, check.message) == ("ok", None, "weight_psi: not measured")
    assert judge(thresholds(Settings()), "input", "weight_psi", float("nan")).value is None


def test_overrides_can_turn_a_level_off_and_unknown_names_are_errors() -> None:
    limits = thresholds(Settings(monitor_thresholds={"fallback_share": {"fail": None}}))
    assert limits["fallback_share"].fail is None
    assert limits["fallback_share"].warn == DEFAULT_THRESHOLDS["fallback_share"].warn
    with pytest.raises(OvernightError, match="unknown statistic 'psi'"):
        thresholds(Settings(monitor_thresholds={"psi": {"warn": 1.0}}))
    with pytest.raises(OvernightError, match="only 'warn' and 'fail'"):
        thresholds(Settings(monitor_thresholds={"feature_psi": {"error": 1.0}}))


def test_feedback_drops_warn_but_never_fail_unless_asked() -> None:
    limits = thresholds(Settings())
    assert judge(limits, "input", "feedback_dropped_share", 0.99).level == "warn"
    assert judge(limits, "input", "feedback_dropped_share", 0.05).level == "ok"
    strict = thresholds(Settings(monitor_thresholds={"feedback_dropped_share": {"fail": 0.5}}))
    assert judge(strict, "input", "feedback_dropped_share", 0.8).level == "fail"


def test_the_environment_sets_thresholds_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERNIGHT_MONITOR_THRESHOLDS", '{"feature_psi": {"fail": 0.3}}')
    assert thresholds(Settings())["feature_psi"].fail == 0.3


def test_verdict_is_the_worst_level() -> None:
    limits = thresholds(Settings())
    checks = [judge(limits, "output", "fallback_share", v) for v in (0.0, 0.3)]
    assert verdict(checks) == "warn"
    assert verdict([]) == "ok"


def test_the_drift_table_shows_a_feature_whose_psi_could_not_be_measured() -> None:
    drift_stage = {
        "verdict": "ok",
        "model_id": "m1",
        "batch_id": None,
        "run_id": 3,
        "report": {
            "features": {
                "item_popularity": {"psi": 0.012, "ks": 0.05, "ks_pvalue": 0.4},
                "user_genre_share": {"psi": None, "ks": None, "ks_pvalue": None},
            }
        },
    }
    found = {
        "logical_date": "2026-12-06",
        "verdict": "ok",
        "stages": {"drift": drift_stage},
        "checks": [],
        "retrain_reason": None,
    }
    lines = render_report(found)
    assert "  user_genre_share                -   0.000         0  ok" in lines
    assert "  item_popularity             0.012   0.050       0.4  ok" in lines
