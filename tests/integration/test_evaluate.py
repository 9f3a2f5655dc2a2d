"""`overnight evaluate` under both protocols, and the registry as `overnight models` and `status` show it."""

import json
from datetime import timedelta
from pathlib import Path

import pytest

from jobs.dev.generate import generate, write_dataset
from jobs.evaluation import item_quality
from jobs.evaluation.evaluate import (
    DIVERSITY,
    MAX_WIDENED_HORIZON_DAYS,
    METRIC_KEYS,
    MIN_EVALUATED_USERS,
    MODEL_ORDER,
    NOVELTY,
)
from tests.support.commands import overnight, overnight_env
from tests.support.data import SAMPLE_DATE

pytestmark = pytest.mark.integration


@pytest.fixture
def env(database_url: str, tmp_path: Path) -> dict[str, str]:
    return overnight_env(database_url, tmp_path / "var")


def test_evaluate_reports_every_model_under_both_protocols(
    env: dict[str, str], sample_source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "global.json"
    run = overnight(
        "evaluate", "--source", str(sample_source), "--protocol", "global", "--horizon-days", "7", "--json", str(out),
        env=env,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["protocol"] == "global"
    assert report["cutoff"].startswith((SAMPLE_DATE.replace(day=SAMPLE_DATE.day - 6)).isoformat())
    # enough users fall in the requested horizon: it is kept, and there is nothing to warn about
    assert report["models"]["ranker"]["users"] >= MIN_EVALUATED_USERS
    assert report["horizon_days"] == report["requested_horizon_days"] == 7
    assert report["warning"] is None and "warning" not in run.stdout + run.stderr
    assert list(report["models"]) == list(MODEL_ORDER)
    for name, metrics in report["models"].items():
        assert set(metrics) == {*METRIC_KEYS, DIVERSITY, NOVELTY}, name
        assert 0.0 < metrics[DIVERSITY] <= 1.0 and metrics[NOVELTY] > 0.0, name
        assert metrics["users"] == report["models"]["ranker"]["users"] > 0
        assert all(0.0 <= metrics[k] <= 1.0 for k in METRIC_KEYS if k != "users"), name
        assert metrics["recall@10"] <= metrics["candidate_recall"] + 1e-9, name  # candidates cap recall
    assert report["feature_importance"]
    for name in MODEL_ORDER:
        assert f"\n{name} " in "\n" + run.stdout

    holdout = json.loads(overnight("evaluate", "--source", str(sample_source), "--json", "-", env=env).stdout)
    assert holdout["protocol"] == "user-holdout" and holdout["cutoff"] is None
    # users whose held-out items are all items they had seen before have nothing new to find
    assert 200 < holdout["models"]["ranker"]["users"] <= 300
    assert_item_to_item_quality(report)
    assert_item_to_item_quality(holdout)
    assert "segment-popular   not applicable: no segment attribute" in run.stdout

    wrong = overnight("evaluate", "--source", str(sample_source), "--protocol", "random", env=env, check=False)
    assert wrong.returncode == 2  # a usage error, as every malformed option
    assert wrong.stderr.strip() == (
        "overnight: error: Invalid value for '--protocol': 'random' is not one of user-holdout, global"
    )


def assert_item_to_item_quality(report: dict) -> None:
    """The similar-items and session tables beside the ranker's: every model on the same pairs or visitors."""
    similar = report["similar_items"]
    assert list(similar["models"]) == [item_quality.BLEND, item_quality.ITEM_KNN, item_quality.CO_VISITATION]
    assert similar["pairs"] > 100
    for metrics in similar["models"].values():
        assert metrics["users"] == similar["pairs"]
        assert 0.0 < metrics["ndcg@10"] <= metrics["hit_rate@10"] <= 1.0
    session = report["session"]
    popular = session["models"][item_quality.POPULAR]
    assert popular["users"] == session["visitors"] > 20
    assert session["models"][item_quality.BLEND]["ndcg@10"] > popular["ndcg@10"]
    assert session["lift"] == pytest.approx(session["models"][item_quality.BLEND]["ndcg@10"] / popular["ndcg@10"], 1e-3)
    assert session["models"][item_quality.SEGMENT_POPULAR] == {
        item_quality.NOT_APPLICABLE: "no segment attribute (OVERNIGHT_SEGMENT_ATTRIBUTE is unset)"
    }


def test_models_and_status_show_the_registry(env: dict[str, str], sample_source: Path) -> None:
    assert "no models yet" in overnight("models", env=env).stdout
    overnight("ingest", "--source", str(sample_source), "--date", SAMPLE_DATE.isoformat(), env=env)
    refused = overnight("train", "--date", SAMPLE_DATE.isoformat(), env=env, check=False)
    assert refused.returncode == 1  # a step never rebuilds another's output: it names the step to run
    assert f"run the candidates step first (`overnight candidates --date {SAMPLE_DATE}`" in refused.stderr
    for step in ("candidates", "features", "train"):
        overnight(step, "--date", SAMPLE_DATE.isoformat(), env=env)
    models = json.loads(overnight("models", "--json", env=env).stdout)
    assert len(models) == 1
    assert models[0]["status"] == "production"
    assert models[0]["best_baseline"] in MODEL_ORDER
    assert models[0]["online"] is None  # never served
    assert set(models[0]["feature_importance_gain"]) >= {"knn_score", "covisit_score", "genre_affinity"}
    listed = overnight("models", env=env).stdout
    assert models[0]["model_id"] in listed and "production" in listed
    status = overnight("status", env=env).stdout
    assert f"production model: {models[0]['model_id']}" in status
    assert "best baseline" in status


def sparse_source(tmp_path: Path, users: int, days: int, events_per_user: float) -> Path:
    """Few events per user over many days: a 7-day horizon holds only a few dozen users."""
    data = generate(users=users, items=100, days=days, end_date=SAMPLE_DATE, seed=11, events_per_user=events_per_user)
    return write_dataset(data, tmp_path / "sparse")


def test_global_widens_a_horizon_with_too_few_users_and_says_so(env: dict[str, str], tmp_path: Path) -> None:
    source = sparse_source(tmp_path, users=800, days=180, events_per_user=5)
    out = tmp_path / "global.json"
    run = overnight("evaluate", "--source", str(source), "--protocol", "global", "--json", str(out), env=env)
    report = json.loads(out.read_text())
    users = report["models"]["ranker"]["users"]
    assert report["requested_horizon_days"] == 7
    assert 7 < report["horizon_days"] <= MAX_WIDENED_HORIZON_DAYS
    assert users >= MIN_EVALUATED_USERS
    # the default cutoff is the widened horizon's length before the data's end
    assert report["cutoff"].startswith((SAMPLE_DATE - timedelta(days=report["horizon_days"] - 1)).isoformat())
    warning = report["warning"]
    assert "users fell in the requested 7-day horizon, fewer than 100" in warning
    assert f"widened it to {report['horizon_days']} days, which evaluates {users:,} users" in warning
    assert run.stdout.startswith(f"warning: {warning}\n")  # above the table it qualifies
    assert warning in run.stderr  # and logged
    assert f"horizon {report['horizon_days']} days" in run.stderr


def test_global_reports_the_numbers_with_a_warning_when_even_the_widest_horizon_has_too_few_users(
    env: dict[str, str], tmp_path: Path
) -> None:
    source = sparse_source(tmp_path, users=120, days=150, events_per_user=5)
    report = json.loads(
        overnight("evaluate", "--source", str(source), "--protocol", "global", "--json", "-", env=env).stdout
    )
    users = report["models"]["ranker"]["users"]
    assert 0 < users < MIN_EVALUATED_USERS
    assert report["requested_horizon_days"] == 7 and report["horizon_days"] > 7
    assert (
        f"only {users} users evaluated even with the horizon widened up to {MAX_WIDENED_HORIZON_DAYS} days"
        in (report["warning"])
    )
    assert f"used {report['horizon_days']} days" in report["warning"]
    assert list(report["models"]) == list(MODEL_ORDER)  # every number is still there, beside the warning
    for name, metrics in report["models"].items():
        assert metrics["users"] == users, name
        assert all(0.0 <= metrics[k] <= 1.0 for k in METRIC_KEYS if k != "users"), name
