"""The real-data smoke test: `overnight run` on MovieLens 100K, then ten recommendations for user 1."""

from pathlib import Path

import httpx
import polars as pl
import pytest

from tests.support.commands import overnight, overnight_env, running_service
from tests.support.data import MOVIELENS_100K

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.movielens,
    pytest.mark.skipif(
        not (MOVIELENS_100K / "u.data").exists(), reason=f"MovieLens 100K not found at {MOVIELENS_100K}"
    ),
]


def test_movielens_100k_runs_and_serves_user_1(database_url: str, tmp_path: Path) -> None:
    env = overnight_env(database_url, tmp_path / "var", OVERNIGHT_API_KEYS="ml-key")
    run = overnight("run", "--source", str(MOVIELENS_100K), "--date", "1998-04-22", env=env)
    assert "100,000 rows from" in run.stderr
    seen = set(
        pl.read_csv(MOVIELENS_100K / "u.data", separator="\t", has_header=False, new_columns=["u", "i", "r", "t"])
        .filter(pl.col("u") == 1)["i"]
        .cast(pl.String)
    )
    with running_service(env) as base:
        response = httpx.get(
            f"{base}/v1/users/1/recommendations", params={"k": 10}, headers={"Authorization": "Bearer ml-key"}
        )
    assert response.status_code == 200
    body = response.json()
    assert body["source"] == "personalized"
    items = [item["item_id"] for item in body["items"]]
    assert len(items) == len(set(items)) == 10
    assert not set(items) & seen, "user 1 was recommended movies they already rated"
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)
