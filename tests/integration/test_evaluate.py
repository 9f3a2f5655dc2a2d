"""`overnight evaluate` under both protocols, and the registry as `overnight models` and `status` show it."""

import json
from pathlib import Path

import pytest

from jobs.evaluate import METRIC_KEYS, MODEL_ORDER
from tests.conftest import SAMPLE_DATE, overnight, overnight_env

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
    assert list(report["models"]) == list(MODEL_ORDER)
    for name, metrics in report["models"].items():
        assert set(metrics) == set(METRIC_KEYS), name
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

    wrong = overnight("evaluate", "--source", str(sample_source), "--protocol", "random", env=env, check=False)
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == "overnight: error: unknown protocol 'random'; choose one of user-holdout, global"


def test_models_and_status_show_the_registry(env: dict[str, str], sample_source: Path) -> None:
    assert "no models yet" in overnight("models", env=env).stdout
    overnight("ingest", "--source", str(sample_source), "--date", SAMPLE_DATE.isoformat(), env=env)
    overnight("train", "--date", SAMPLE_DATE.isoformat(), env=env)
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
