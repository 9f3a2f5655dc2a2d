"""The lookup service under load while things change: batch switches and a rollback, Postgres stopping
and coming back; and the read-only role it connects with.

The service runs as `overnight serve` (granian, several workers) in its own process; client threads
load it over loopback and every response is kept and checked afterwards.
"""

import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from jobs.batches import rollback
from jobs.database import upgrade
from jobs.rollouts.canary import promote_canary, ramp_canary, start_canary, stop_canary
from jobs.settings import Settings
from serving.lookup import POOL_APPLICATION_NAME
from serving.variants import CANARY, PRODUCTION, TrafficSplit
from tests.support.commands import free_port, overnight_env, running_service
from tests.support.polling import wait_until
from tests.support.serving import API_KEY, K, Publisher

pytestmark = pytest.mark.integration

USERS = [f"u{n}" for n in range(200)]
SWITCH_DEADLINE = 1.0
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def tagged_recs(tag: str) -> dict[str, list[str]]:
    """Every user's items carry the batch's tag, so a response mixing two batches shows at once."""
    return {user: [f"{tag}-{user}-{rank}" for rank in range(K)] for user in USERS}


def tagged_fallback(tag: str) -> list[str]:
    return [f"{tag}-popular-{rank}" for rank in range(K)]


@dataclass(frozen=True)
class Sample:
    started: float
    elapsed: float
    status: int
    headers: httpx.Headers
    body: Any


class Load:
    """Client threads asking for a mix of known users (some repeatedly, so they are cached) and unknown ones;
    with `batch_every`, every so many requests is a batch request for several of them."""

    def __init__(self, base_url: str, threads: int = 4, batch_every: int = 0) -> None:
        self.base_url = base_url
        self.batch_every = batch_every
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def _run(self, seed: int) -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=10) as client:
            n = seed
            deadline = time.monotonic() + 120  # bounded, whatever happens to the test
            while not self._stop.is_set() and time.monotonic() < deadline:
                n += 1
                user = USERS[n % 10] if n % 2 else (USERS[n % len(USERS)] if n % 3 else f"nobody-{uuid.uuid4().hex}")
                started = time.time()
                try:
                    if self.batch_every and n % self.batch_every == 0:
                        users = [*USERS[n % 50 : n % 50 + 7], user]
                        response = client.post("/v1/recommendations:batch", json={"user_ids": users, "k": 5})
                    else:
                        response = client.get(f"/v1/users/{user}/recommendations", params={"k": 5})
                    body = response.json()
                    status = response.status_code
                    response_headers = response.headers
                except httpx.HTTPError as error:
                    status, body, response_headers = 0, {"error": repr(error)}, httpx.Headers()
                self.samples.append(Sample(started, time.time() - started, status, response_headers, body))

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)


def answers(sample: Sample) -> list[dict[str, Any]]:
    """Every user's answer in a response: one for a lookup, several for a batch request."""
    results: list[dict[str, Any]] = sample.body.get("results", [sample.body])
    return results


# ---------------------------------------------------------------------------- swaps and a rollback


@pytest.mark.slow
def test_swaps_and_a_rollback_under_load_serve_whole_batches_within_a_second(database_url: str, tmp_path: Path) -> None:
    publisher = Publisher(database_url)
    tag_of: dict[int, str] = {}

    def publish(tag: str) -> int:
        batch_id = publisher.publish(tagged_recs(tag), fallback=tagged_fallback(tag), model_id=f"model-{tag}")
        tag_of[batch_id] = tag
        return batch_id

    first = publish("a")
    env = overnight_env(database_url, tmp_path / "var", OVERNIGHT_API_KEYS=API_KEY, OVERNIGHT_LIVE_POLL_SECONDS="60")
    # (asked at, committed by, batch): a switch is live somewhere between the two.
    switches: list[tuple[float, float, int]] = []

    def switch(action: Callable[[], int]) -> None:
        asked_at = time.time()
        batch_id = action()
        switches.append((asked_at, time.time(), batch_id))

    with running_service(env, "--workers", "2") as base, Load(base) as load:
        time.sleep(1.0)
        switch(lambda: publish("b"))
        time.sleep(1.5)
        switch(lambda: publish("c"))
        time.sleep(1.5)
        settings = Settings(database_url=database_url, data_dir=tmp_path / "var")
        switch(lambda: rollback(settings, to_batch=switches[0][2]).batch_id)
        time.sleep(1.5)
    second, third = switches[0][2], switches[1][2]
    assert switches[2][2] == second

    samples = load.samples
    assert len(samples) > 200, f"only {len(samples)} requests: the load did not run"
    failures = [(s.status, s.body) for s in samples if s.status != 200]
    assert not failures, f"{len(failures)} of {len(samples)} responses failed, e.g. {failures[:3]}"
    for sample in samples:
        batch_id = sample.body["batch_id"]
        assert int(sample.headers["X-Batch-Id"]) == batch_id
        tag = tag_of[batch_id]
        assert sample.body["model_id"] == f"model-{tag}"
        mixed = [item["item_id"] for item in sample.body["items"] if not item["item_id"].startswith(f"{tag}-")]
        assert not mixed, f"batch {batch_id} answered with items of another batch: {mixed}"
    assert {sample.body["batch_id"] for sample in samples} == {first, second, third}

    # Every request sent a second after a switch committed (and before the next one was asked for) is
    # answered by the new batch.
    ends = [asked_at for asked_at, _, _ in switches[1:]] + [float("inf")]
    for (_, switched_at, batch_id), next_switch in zip(switches, ends, strict=True):
        late = [s for s in samples if switched_at + SWITCH_DEADLINE <= s.started < next_switch]
        assert late, f"no request between {SWITCH_DEADLINE} s after the switch to {batch_id} and the next switch"
        stale = [
            (s.body["batch_id"], round(s.started - switched_at, 3), round(s.elapsed, 3), s.headers.get("X-Stale"))
            for s in late
            if s.body["batch_id"] != batch_id
        ]
        assert not stale, f"answers (batch, sent after the switch, took) from other batches than {batch_id}: {stale}"


# ---------------------------------------------------------------------------- Postgres stops


@dataclass(frozen=True)
class PrivatePostgres:
    data_dir: Path
    port: int
    run_as: list[str]

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.run_as, str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-w", "-t", "30", *args],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.ctl("-o", options, "-l", str(self.data_dir / "log"), "start")

    def stop(self) -> None:
        self.ctl("-m", "fast", "stop")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A Postgres of this test's own, to stop and start: the shared server must keep running for everyone else."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"needs the PostgreSQL 15 server binaries in {PG_BIN}")
    # Not under pytest's tmp_path: as root that is a folder the postgres user cannot enter.
    folder = Path(tempfile.mkdtemp(prefix="overnight-private-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    data_dir = folder / "data"
    subprocess.run(
        [*run_as, str(PG_BIN / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust", "--no-sync"],
        check=True,
        capture_output=True,
    )
    server = PrivatePostgres(data_dir, free_port(), run_as)
    server.start()
    try:
        yield server
    finally:
        subprocess.run(
            [*run_as, str(PG_BIN / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_postgres_stopping_under_load_gives_fast_503s_or_stale_cache_and_recovers(
    private_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    db_timeout = 0.5
    url = make_conninfo(private_postgres.admin_url, dbname="overnight")
    with psycopg.connect(private_postgres.admin_url, autocommit=True) as admin:
        admin.execute("CREATE DATABASE overnight")
    with psycopg.connect(url) as conn:
        upgrade(conn)
    Publisher(url).publish(tagged_recs("a"), fallback=tagged_fallback("a"))
    env = overnight_env(
        url,
        tmp_path / "var",
        OVERNIGHT_API_KEYS=API_KEY,
        OVERNIGHT_DB_TIMEOUT_SECONDS=str(db_timeout),
        OVERNIGHT_LIVE_POLL_SECONDS="1",
    )
    with running_service(env, "--workers", "1") as base, Load(base) as load:
        time.sleep(1.0)
        stopped_at = time.time()
        private_postgres.stop()
        time.sleep(3.0)
        starting_at = time.time()  # the watcher may reconnect, and answer fresh again, before start() returns
        private_postgres.start()
        started_at = time.time()

        def healthy() -> bool:
            recent = [s for s in load.samples[-40:] if s.started > time.time() - 0.5]
            return len(recent) > 5 and all(s.status == 200 and "X-Stale" not in s.headers for s in recent)

        wait_until(healthy, within=10, interval=0.05)
        recovered_after = time.time() - started_at
        time.sleep(0.5)

    samples = load.samples
    unexpected = [(s.status, s.body) for s in samples if s.status not in (200, 503)]
    assert not unexpected, f"answers other than 200 and 503: {unexpected[:3]}"
    too_slow = [round(s.elapsed, 3) for s in samples if s.elapsed > db_timeout + 1.0]
    assert not too_slow, f"{len(too_slow)} requests took longer than the timeout allows: {too_slow[:5]}"
    refused = [s for s in samples if s.status == 503]
    assert refused, "no request failed while Postgres was down: the outage was not exercised"
    for sample in refused:
        assert sample.headers["Retry-After"]
        assert sample.body["detail"], "a 503 without a reason"
        # a request in flight when the stop began may fail too: what must not fail is one answered before
        assert stopped_at <= sample.started + sample.elapsed, "a 503 before Postgres was stopped"
    # The watcher marks answers stale once it has lost its connection: allow it a poll interval to notice.
    during = [
        s for s in samples if stopped_at + 1.5 < s.started and s.started + s.elapsed < starting_at and s.status == 200
    ]
    assert during, "no cached user was answered during the outage"
    assert all("X-Stale" in s.headers for s in during), "answers during the outage are not marked stale"
    assert recovered_after < 10


# ---------------------------------------------------------------------------- the read-only role


def test_the_serving_role_reads_batches_published_later_and_only_appends_to_the_online_logs(
    database_url: str, serving_login: str, tmp_path: Path
) -> None:
    with psycopg.connect(database_url) as conn:
        assert upgrade(conn) == []  # migration 0003 ran with the others, and running again is a no-op
    batch_id = Publisher(database_url).publish(tagged_recs("a"), fallback=tagged_fallback("a"))

    env = overnight_env(serving_login, tmp_path / "var", OVERNIGHT_API_KEYS=API_KEY)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with running_service(env) as base:
        response = httpx.get(f"{base}/v1/users/u1/recommendations", headers={**auth, "X-Request-Id": "as-api"})
        assert response.status_code == 200
        assert response.json()["batch_id"] == batch_id
        item = response.json()["items"][0]["item_id"]
        click = {"user_id": "u1", "item_id": item, "type": "click", "request_id": "as-api", "timestamp": utc_now()}
        assert httpx.post(f"{base}/v1/events", json={"events": [click]}, headers=auth).status_code == 202
    # Stopping the service wrote out both logs, with the serving role's INSERT grants.
    with psycopg.connect(database_url) as conn:
        served = "SELECT request_id, user_id FROM overnight.served_predictions"
        assert conn.execute(served).fetchall() == [("as-api", "u1")]
        events = "SELECT request_id, item_id, event_type FROM overnight.feedback_events"
        assert conn.execute(events).fetchall() == [("as-api", item, "click")]

    with psycopg.connect(serving_login, autocommit=True) as conn:
        for statement in (
            "UPDATE overnight.live SET switched_at = now()",
            "DELETE FROM overnight.batches",
            f"INSERT INTO overnight.recs_{batch_id} VALUES ('x', '{{}}', '{{}}')",
            f"DROP TABLE overnight.recs_{batch_id}",
            "CREATE TABLE overnight.intruder (x int)",
            "UPDATE overnight.model_versions SET status = 'production'",
            "DELETE FROM overnight.served_prediction_chunks",
            "UPDATE overnight.feedback_events SET event_type = 'click'",
            "DELETE FROM overnight.bulk_writes",
            "TRUNCATE overnight.feedback_events",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement.encode())


def utc_now() -> str:
    return datetime.now(UTC).isoformat()


# ---------------------------------------------------------------------------- canaries


@dataclass(frozen=True)
class Serving:
    """What should be served after a rollout change: production, and the canary with its split."""

    production: int
    canary: int | None = None
    split: TrafficSplit | None = None

    def expected(self, user: str) -> tuple[int, str]:
        if self.canary is not None and self.split is not None and self.split.variant(user) == CANARY:
            return self.canary, CANARY
        return self.production, PRODUCTION


@pytest.mark.slow
def test_canary_start_ramp_stop_and_promote_under_load(database_url: str, tmp_path: Path) -> None:
    """Every answer is wholly from one batch and names the variant of that batch, with no error, while a
    canary starts, ramps, stops, starts again and is promoted; a second after each change (NOTIFY, no
    polling) every user is answered from the arm the split puts them in, also in batch requests."""
    publisher = Publisher(database_url)
    settings = Settings(database_url=database_url, data_dir=tmp_path / "var")
    tag_of: dict[int, str] = {}
    for tag in "abc":
        batch_id = publisher.publish(
            tagged_recs(tag), fallback=tagged_fallback(tag), model_id=f"model-{tag}", switch=tag == "a"
        )
        tag_of[batch_id] = tag
    a, b, c = tag_of
    env = overnight_env(database_url, tmp_path / "var", OVERNIGHT_API_KEYS=API_KEY, OVERNIGHT_LIVE_POLL_SECONDS="60")
    # (asked at, committed by, what is served from then on)
    changes: list[tuple[float, float, Serving]] = []

    def change(action: Callable[[], object], serving: Serving) -> None:
        asked_at = time.time()
        action()
        changes.append((asked_at, time.time(), serving))
        time.sleep(1.6)

    with running_service(env, "--workers", "2") as base, Load(base, batch_every=4) as load:
        change(lambda: None, Serving(a))
        change(lambda: start_canary(settings, b, 0.3, salt="one"), Serving(a, b, TrafficSplit("one", 0.3)))
        change(lambda: ramp_canary(settings, 0.6), Serving(a, b, TrafficSplit("one", 0.6)))
        change(lambda: stop_canary(settings), Serving(a))
        change(lambda: start_canary(settings, c, 0.5, salt="two"), Serving(a, c, TrafficSplit("two", 0.5)))
        change(lambda: promote_canary(settings), Serving(c))

    samples = load.samples
    assert len(samples) > 300, f"only {len(samples)} requests: the load did not run"
    failures = [(s.status, s.body) for s in samples if s.status != 200]
    assert not failures, f"{len(failures)} of {len(samples)} responses failed, e.g. {failures[:3]}"
    for sample in samples:
        for answer in answers(sample):
            tag = tag_of[answer["batch_id"]]
            assert answer["model_id"] == f"model-{tag}"
            mixed = [item["item_id"] for item in answer["items"] if not item["item_id"].startswith(f"{tag}-")]
            assert not mixed, f"batch {answer['batch_id']} answered with items of another batch: {mixed}"
            # A canary answer always comes from a canary batch, and only for users its split takes in.
            if answer["variant"] == CANARY:
                split = {b: TrafficSplit("one", 0.6), c: TrafficSplit("two", 0.5)}[answer["batch_id"]]
                assert split.variant(answer["user_id"]) == CANARY, answer
            else:
                assert answer["variant"] == PRODUCTION and answer["batch_id"] in (a, c), answer
    ends = [asked_at for asked_at, _, _ in changes[1:]] + [float("inf")]
    arms_seen: set[tuple[int, str]] = set()
    for (_, changed_at, serving), next_change in zip(changes, ends, strict=True):
        late = [s for s in samples if changed_at + SWITCH_DEADLINE <= s.started < next_change]
        assert any("results" in s.body for s in late), f"no batch request while serving {serving}"
        for sample in late:
            for answer in answers(sample):
                served = (answer["batch_id"], answer["variant"])
                assert served == serving.expected(answer["user_id"]), (serving, answer, sample.started - changed_at)
                arms_seen.add(served)
    assert arms_seen == {(a, PRODUCTION), (b, CANARY), (c, CANARY), (c, PRODUCTION)}
    mixed_requests = [s for s in samples if len({answer["variant"] for answer in answers(s)}) == 2]
    assert mixed_requests, "no batch request had users in both arms"
    lists = sum(len(answers(s)) for s in samples)
    mixing = len(mixed_requests)
    print(f"\n{len(samples)} requests ({lists} user lists, {mixing} batch requests mixing both arms), 0 errors")


# ---------------------------------------------------------------------------- connections killed while idle


@pytest.mark.slow
def test_pooled_connections_killed_under_load_cost_no_lookup_an_error(database_url: str, tmp_path: Path) -> None:
    """pg_terminate_backend on every lookup connection (what a Postgres restart or failover does to the
    idle ones) a few times under load from 16 clients: each lookup, and each readiness check, that lands on
    a dead connection is asked once more on a fresh one, so no client sees an error. One worker, so its
    /metrics shows every retry."""
    Publisher(database_url).publish(tagged_recs("a"), fallback=tagged_fallback("a"))
    env = overnight_env(
        database_url,
        tmp_path / "var",
        OVERNIGHT_API_KEYS=API_KEY,
        OVERNIGHT_CACHE_ENTRIES="0",
        OVERNIGHT_POOL_MAX_SIZE="8",
    )
    killed = 0
    readiness: list[int] = []
    with (
        running_service(env, "--workers", "1") as base,
        Load(base, threads=16) as load,
        psycopg.connect(database_url, autocommit=True) as admin,
    ):
        for _ in range(6):
            time.sleep(0.7)
            row = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s",
                (POOL_APPLICATION_NAME,),
            ).fetchone()
            killed += row[0] if row else 0
            readiness.append(httpx.get(f"{base}/readyz", timeout=10).status_code)
        time.sleep(0.7)
        metrics = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).text
    samples = load.samples
    assert killed >= 6, f"only {killed} connections were killed: the fault was not exercised"
    assert len(samples) > 500, f"only {len(samples)} requests: the load did not run"
    failed = [(s.status, s.body) for s in samples if s.status != 200]
    assert not failed, f"{len(failed)} of {len(samples)} lookups failed, e.g. {failed[:3]}"
    assert readiness == [200] * 6, f"readiness right after the kills: {readiness}"
    retries = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("overnight_db_dead_connection_retries")
    )
    assert retries > 0, "no lookup found a dead connection: the retry was not exercised"
