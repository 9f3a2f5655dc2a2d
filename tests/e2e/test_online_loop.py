"""The online loop end to end, through the real `overnight serve` and a real Postgres: a canary serves a
slice of users, every answer is logged, simulated users click (more on the canary's items), their
feedback comes back through POST /v1/events with the request ids of the lists, and
`overnight online-report` finds the difference; and the next night's ingest takes that feedback in.
"""

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import polars as pl
import psycopg
import pytest
from psycopg.types.json import Jsonb

import sql
from jobs import batches, lake, nightly
from jobs.dev.generate import generate, write_dataset
from jobs.rollouts import canary, online
from jobs.settings import Settings
from jobs.steps import ingest
from tests.support.commands import overnight, overnight_env, running_service

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

API_KEY = "online-loop-key"
USERS = 2000
K = 10
TRAFFIC = 0.3
# The simulated users: examination falls off as 1/position (the report's default propensity model),
# and an examined item is clicked with the relevance of its variant's lists.
RELEVANCE = {"canary": 0.15, "production": 0.08}
CONVERSION_GIVEN_CLICK = 0.3


def make_batch(conn: psycopg.Connection, model_id: str, prefix: str, ndcg: float) -> int:
    conn.execute(
        sql.query("upsert_model_version"),
        {
            "model_id": model_id,
            "logical_date": datetime.now(UTC).date(),
            "status": "trained",
            "status_reason": None,
            "data_window": Jsonb({}),
            "params": Jsonb({}),
            "features": [],
            "metrics": Jsonb({"ndcg@10": ndcg, "recall@10": ndcg / 2, "baselines": {}}),
            "artifact_path": f"models/{model_id}.txt",
            "artifact_sha256": "0" * 64,
        },
    )
    row = conn.execute(
        sql.query("insert_batch"),
        {
            "logical_date": datetime.now(UTC).date(),
            "model_id": model_id,
            "k": K,
            "users_scored": USERS,
            "active_users": USERS,
            "fallback_item_ids": [f"{prefix}-popular"],
            "fallback_scores": [1.0],
            "generated_at": datetime.now(UTC) - timedelta(hours=1),
        },
    ).fetchone()
    assert row is not None
    batch_id = int(row[0])
    conn.execute(sql.batch_query("create_recs_table", batch_id))
    with conn.cursor() as cur, cur.copy(sql.batch_query("copy_recs", batch_id)) as copy:
        copy.set_types(["text", "text[]", "float4[]"])
        for n in range(USERS):
            copy.write_row(
                (f"user-{n}", [f"{prefix}-{n}-{p}" for p in range(1, K + 1)], [float(K - p) for p in range(K)])
            )
    conn.execute(sql.batch_query("add_recs_primary_key", batch_id))
    conn.execute(sql.query("mark_batch_ready"), (Jsonb({"rows": USERS}), batch_id))
    conn.commit()
    return batch_id


def simulate(base_url: str, rng: random.Random) -> dict[str, int]:
    """Every user asks once, looks down the list, clicks and converts; feedback goes back in bulk."""
    requests = {"canary": 0, "production": 0}
    pending: list[dict[str, Any]] = []
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10) as client:
        for n in range(USERS):
            user = f"user-{n}"
            request_id = f"req-{n}"
            answer = client.get(f"/v1/users/{user}/recommendations", headers={"X-Request-Id": request_id})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert answer.headers["X-Request-Id"] == request_id
            requests[body["variant"]] += 1
            now = datetime.now(UTC).isoformat()
            for position, item in enumerate(body["items"], start=1):
                common = {"user_id": user, "item_id": item["item_id"], "timestamp": now, "request_id": request_id}
                pending.append({**common, "type": "impression"})
                examined = rng.random() < 1 / position
                if examined and rng.random() < RELEVANCE[body["variant"]]:
                    pending.append({**common, "type": "click"})
                    if rng.random() < CONVERSION_GIVEN_CLICK:
                        pending.append({**common, "type": "conversion"})
            if len(pending) >= 500 or n == USERS - 1:
                posted = client.post("/v1/events", json={"events": pending})
                assert posted.status_code == 202, posted.text
                pending = []
        # Feedback the report cannot attribute: no such request.
        stray = {
            "user_id": "user-1",
            "item_id": "x",
            "type": "click",
            "timestamp": datetime.now(UTC).isoformat(),
            "request_id": "unknown",
        }
        assert client.post("/v1/events", json={"events": [stray]}).status_code == 202
    return requests


@pytest.mark.slow
def test_online_report_detects_the_better_variant(database_url: str, tmp_path: Any) -> None:
    settings = Settings(database_url=database_url, data_dir=tmp_path / "var")
    with psycopg.connect(database_url) as conn:
        production = make_batch(conn, "ranker-production", "p", ndcg=0.21)
        candidate = make_batch(conn, "ranker-candidate", "c", ndcg=0.25)
        batches.switch_live(conn, production, "publish")
    canary.start_canary(settings, candidate, TRAFFIC, salt="online-loop")

    env = overnight_env(database_url, settings.data_dir, OVERNIGHT_API_KEYS=API_KEY)
    with running_service(env, "--workers", "2") as base:
        requests = simulate(base, random.Random(8))
    # leaving the block stopped the service (SIGTERM), which wrote out every queued log row and event

    share = requests["canary"] / USERS
    assert abs(share - TRAFFIC) < 4 * (TRAFFIC * (1 - TRAFFIC) / USERS) ** 0.5

    today = datetime.now(UTC).date()
    report = online.online_report(settings, today, today)
    print("\n" + "\n".join(online.render(report)))
    treated, control = report["variants"]["canary"], report["variants"]["production"]
    assert (treated["requests"], control["requests"]) == (requests["canary"], requests["production"])
    assert treated["impressions"] == treated["served"] == K * requests["canary"]
    assert [b["batch_id"] for b in report["batches"]] == [candidate, production]

    delta = report["canary_minus_production"]
    # The canary started before the first request: every answer is in the comparison.
    assert delta["while_canary_ran"]["canary"]["impressions"] == treated["impressions"]
    assert delta["while_canary_ran"]["production"]["impressions"] == control["impressions"]
    assert delta["ctr"]["low"] > 0, delta  # the interval excludes zero: the canary is better
    assert delta["ips_click_rate"]["low"] > 0, delta
    # The simulation follows the default propensity model, so IPS recovers each variant's relevance.
    for name, values in report["variants"].items():
        ips = values["ips_click_rate"]
        standard_error = (ips["high"] - ips["low"]) / (2 * online.Z)
        assert abs(ips["value"] - RELEVANCE[name]) < 4 * standard_error, (name, ips)
    # Conversion given click is the same in both arms, so the conversion rate follows CTR.
    assert delta["conversion_rate"]["low"] > 0
    assert report["unattributed_feedback"] == {"click": 1}

    # Offline beside online: each batch and model with the held-out metrics its model was registered with.
    assert [(b["model_id"], b["offline"]["ndcg@10"]) for b in report["batches"]] == [
        ("ranker-candidate", 0.25),
        ("ranker-production", 0.21),
    ]
    assert report["models"]["ranker-candidate"]["ctr"] == treated["ctr"]
    assert report["models"]["ranker-production"]["offline"]["recall@10"] == 0.105

    env = overnight_env(database_url, settings.data_dir)
    period = ("--from", today.isoformat(), "--to", today.isoformat())
    text = overnight("online-report", *period, "--record", env=env).stdout
    assert "canary - production over the answers served while a canary ran" in text
    assert "beside online, per model" in text
    with psycopg.connect(database_url) as conn:
        recorded = dict(conn.execute("SELECT model_id, summary FROM overnight.online_daily").fetchall())
    assert recorded.keys() == {"ranker-candidate", "ranker-production"}
    assert recorded["ranker-candidate"]["ctr"] == treated["ctr"]
    assert recorded["ranker-production"]["impressions"] == control["impressions"]
    listed = {row["model_id"]: row for row in json.loads(overnight("models", "--json", env=env).stdout)}
    assert listed["ranker-candidate"]["online"]["ctr"] == treated["ctr"]
    assert listed["ranker-production"]["online"]["ips_click_rate"] == control["ips_click_rate"]
    table = overnight("models", env=env).stdout
    candidate_line = next(line for line in table.splitlines() if line.startswith("ranker-candidate"))
    assert f"{treated['ctr']['value']:.4f}" in candidate_line and "0.2500" in candidate_line
    assert overnight("models", "--online-days", "0", "--json", env=env).stdout.count('"online": null') == 2


@pytest.mark.slow
def test_feedback_sent_to_the_service_is_in_the_next_nights_interactions(database_url: str, tmp_path: Any) -> None:
    """The loop closed: last night's batch is served, users click through POST /v1/events, and tonight's
    ingest takes the clicks and conversions into the lake as interactions, with their weights."""
    today = datetime.now(UTC).date()
    yesterday = today - timedelta(days=1)
    data = generate(users=150, items=80, days=40, end_date=yesterday, seed=5, events_per_user=20)
    source = write_dataset(data, tmp_path / "source")
    settings = Settings(database_url=database_url, data_dir=tmp_path / "var", num_boost_round=20)
    nightly.run(nightly.night_of(settings, yesterday, source))

    env = overnight_env(database_url, settings.data_dir, OVERNIGHT_API_KEYS=API_KEY)
    sent: dict[tuple[str, str, str], str] = {}
    with (
        running_service(env) as base,
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10) as client,
    ):
        for user in sorted(set(data.interactions["user_id"].to_list()))[:30]:
            answer = client.get(f"/v1/users/{user}/recommendations", params={"k": 3}, headers={"X-Request-Id": user})
            assert answer.json()["source"] == "personalized"
            items = [item["item_id"] for item in answer.json()["items"]]
            now = datetime.now(UTC).isoformat()
            events = [{"type": "impression", "item_id": item} for item in items]
            events += [{"type": "click", "item_id": items[0]}, {"type": "conversion", "item_id": items[0]}]
            body = {"events": [{**event, "user_id": user, "request_id": user, "timestamp": now} for event in events]}
            assert client.post("/v1/events", json=body).status_code == 202
            sent[(user, items[0], "click")] = sent[(user, items[0], "conversion")] = now
    # leaving the block stopped the service, which wrote out every accepted event

    night = ingest.ingest(settings, source, today)
    assert (night.feedback_read, night.feedback_used) == (60, 60)  # clicks and conversions: impressions are not read
    taken = (
        lake.scan_interactions(settings.lake_dir, today)
        .filter(pl.col("timestamp") >= lake.day_start(today))
        .select("user_id", "item_id", "event_type", "weight", "timestamp")
        .collect()
    )
    assert {(row[0], row[1], row[2]): row[4].isoformat() for row in taken.rows()} == sent
    weights = dict(taken.group_by("event_type").agg(pl.col("weight").unique()).rows())
    assert weights == {kind: [settings.feedback_weights[kind]] for kind in ("click", "conversion")}
