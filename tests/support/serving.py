"""The lookup service under test: batches published as the batch side does, the app on a real socket,
and clients that check every answer."""

import hashlib
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from psycopg.types.json import Jsonb

import sql
from serving.app import create_app
from serving.live import WATCHER_APPLICATION_NAME
from serving.prediction_log import BulkWriter, EncodedBatch
from serving.settings import ServingSettings, get_serving_settings
from tests.support.polling import wait_until

API_KEY = "test-key-5b0d1c"


K = 12


DB_TIMEOUT = 0.5


SWITCH_DEADLINE = 1.0


RECS: dict[str, list[str]] = {
    "42": [f"i{n}" for n in range(1, K + 1)],
    "7": ["i5", "i3", "i9"],
    "tenant/7": ["i2", "i4"],
}


FALLBACK = ["p1", "p2", "p3", "p4", "p5"]


def scores_for(items: list[str], top: float = 3.21) -> list[float]:
    return [round(top - 0.25 * rank, 2) for rank in range(len(items))]


def similarities_for(items: list[str]) -> list[float]:
    """Neighbour scores as the batch side publishes them: best first, all above 0."""
    return [round(0.95 - 0.04 * rank, 2) for rank in range(len(items))]


@dataclass(frozen=True)
class Extras:
    """What a batch publishes besides its user lists (migration 0019): each item's neighbours, the
    catalogue's popularity and attributes, each segment's popular list and the segments of users the
    batch did not score. `similar_k` None publishes none of it, as a batch from before it."""

    similar: dict[str, list[str]]
    items: dict[str, tuple[float, dict[str, Any]]]
    segments: dict[str, list[str]] = field(default_factory=dict)
    user_segments: dict[str, str] = field(default_factory=dict)
    similar_k: int = K
    segment_attribute: str | None = "country"


# A small catalogue: the user lists' items i1..i12, the fallback's p1..p5, and two Westerns without
# neighbours. i6 is not available.
ITEMS: dict[str, tuple[float, dict[str, Any]]] = {
    "i1": (100.0, {"genre": ["Comedy"], "available": True}),
    "i2": (90.0, {"genre": ["Drama"], "available": True}),
    "i3": (80.0, {"genre": ["Comedy", "Drama"], "available": True}),
    "i4": (70.0, {"genre": ["Horror"], "available": True}),
    "i5": (60.0, {"genre": ["Comedy"], "available": True}),
    "i6": (50.0, {"genre": ["Horror"], "available": False}),
    "i7": (40.0, {"genre": ["Drama"], "available": True}),
    "i8": (30.0, {"genre": ["Comedy"], "available": True}),
    "i9": (20.0, {"genre": ["Horror"], "available": True}),
    "i10": (10.0, {"genre": ["Drama"], "available": True}),
    "i11": (5.0, {"genre": ["Comedy"], "available": True}),
    "i12": (4.0, {"genre": ["Comedy"], "available": True, "year": 1995}),
    "p1": (200.0, {"genre": ["Drama"], "available": True}),
    "p2": (190.0, {"genre": ["Horror"], "available": True}),
    "p3": (180.0, {"genre": ["Comedy"], "available": True}),
    "p4": (170.0, {"genre": ["Drama"], "available": True}),
    "p5": (160.0, {"genre": ["Horror"], "available": False}),
    "w1": (2.0, {"genre": ["Western"], "available": True}),
    "w2": (1.0, {"genre": ["Western"], "available": True}),
}
SIMILAR: dict[str, list[str]] = {
    "i1": ["i3", "i5", "i8", "i2", "i4", "i11", "i12", "i7"],
    "i2": ["i7", "i10", "i3", "i1"],
    "i3": ["i1", "i2", "i5", "i7", "i9"],
    "i5": ["i1", "i8", "i3"],
}
SEGMENTS: dict[str, list[str]] = {"FR": ["i7", "i10", "i2", "i9"], "DE": ["i4", "i9", "i1"]}
USER_SEGMENTS: dict[str, str] = {"anon-fr": "FR", "anon-de": "DE"}
EXTRAS = Extras(SIMILAR, ITEMS, SEGMENTS, USER_SEGMENTS)


@dataclass
class Publisher:
    """Publishes batches exactly as the batch side does, through the named queries of sql/queries/."""

    url: str
    logical_date: date = date(2026, 11, 20)

    def publish(
        self,
        recs: dict[str, list[str]],
        *,
        fallback: list[str] = FALLBACK,
        k: int = K,
        generated_at: datetime | None = None,
        model_id: str = "ranker-2026-11-20",
        switch: bool = True,
        notify: bool = True,
        extras: Extras | None = None,
    ) -> int:
        generated_at = generated_at or datetime.now(UTC) - timedelta(hours=2)
        with psycopg.connect(self.url) as conn:
            conn.execute(
                sql.query("upsert_model_version"),
                {
                    "model_id": model_id,
                    "logical_date": self.logical_date,
                    "status": "production",
                    "status_reason": None,
                    "data_window": Jsonb({"features_before": "2026-11-06", "label_end": "2026-11-20"}),
                    "params": Jsonb({"num_leaves": 31}),
                    "features": ["recent_popularity", "covisit_score"],
                    "metrics": Jsonb({"ndcg@10": 0.31}),
                    "artifact_path": f"models/{model_id}.txt",
                    "artifact_sha256": hashlib.sha256(model_id.encode()).hexdigest(),
                },
            )
            row = conn.execute(
                sql.query("insert_batch"),
                {
                    "logical_date": self.logical_date,
                    "model_id": model_id,
                    "k": k,
                    "users_scored": len(recs),
                    "active_users": len(recs),
                    "fallback_item_ids": fallback,
                    "fallback_scores": scores_for(fallback, top=1.0),
                    "generated_at": generated_at,
                },
            ).fetchone()
            assert row is not None
            batch_id = int(row[0])
            conn.execute(sql.batch_query("create_recs_table", batch_id))
            with conn.cursor() as cur, cur.copy(sql.batch_query("copy_recs", batch_id)) as copy:
                copy.set_types(["text", "text[]", "float4[]"])
                for user_id, items in recs.items():
                    copy.write_row((user_id, items, scores_for(items)))
            conn.execute(sql.batch_query("add_recs_primary_key", batch_id))
            if extras is not None:
                self._publish_extras(conn, batch_id, extras)
            conn.execute(sql.query("mark_batch_ready"), (Jsonb({"rows": len(recs)}), batch_id))
        if switch:
            self.switch(batch_id, notify=notify)
        return batch_id

    @staticmethod
    def _publish_extras(conn: psycopg.Connection[Any], batch_id: int, extras: Extras) -> None:
        """The extra tables of migration 0019, by the batch side's named queries and binary COPY."""
        ranked = ["text", "text[]", "float4[]"]
        conn.execute(sql.batch_query("create_similar_table", batch_id))
        with conn.cursor() as cur, cur.copy(sql.batch_query("copy_similar", batch_id)) as copy:
            copy.set_types(ranked)
            for item_id, neighbours in extras.similar.items():
                copy.write_row((item_id, neighbours, similarities_for(neighbours)))
        conn.execute(sql.batch_query("add_similar_primary_key", batch_id))
        conn.execute(sql.batch_query("create_items_table", batch_id))
        with conn.cursor() as cur, cur.copy(sql.batch_query("copy_items", batch_id)) as copy:
            copy.set_types(["text", "float4", "jsonb"])
            for item_id, (popularity, attributes) in extras.items.items():
                copy.write_row((item_id, popularity, Jsonb(attributes)))
        conn.execute(sql.batch_query("create_segments_table", batch_id))
        with conn.cursor() as cur, cur.copy(sql.batch_query("copy_segments", batch_id)) as copy:
            copy.set_types(ranked)
            for segment, items in extras.segments.items():
                copy.write_row((segment, items, scores_for(items, top=1.0)))
        conn.execute(sql.batch_query("create_user_segments_table", batch_id))
        with conn.cursor() as cur, cur.copy(sql.batch_query("copy_user_segments", batch_id)) as copy:
            copy.set_types(["text", "text"])
            for user_id, segment in extras.user_segments.items():
                copy.write_row((user_id, segment))
        conn.execute(sql.batch_query("add_user_segments_primary_key", batch_id))
        conn.execute(sql.query("set_batch_extras"), (extras.similar_k, extras.segment_attribute, batch_id))

    def switch(self, batch_id: int, *, notify: bool = True) -> None:
        """Point `live` at a batch in one transaction, as publish and rollback do."""
        with psycopg.connect(self.url) as conn, conn.transaction():
            conn.execute(sql.query("lock_live"))
            conn.execute(sql.query("set_live"), (batch_id,))
            conn.execute(sql.query("mark_batch_live"), (batch_id,))
            if notify:
                conn.execute(sql.query("notify_live"), (sql.LIVE_CHANNEL, str(batch_id)))

    def drop(self, batch_id: int) -> None:
        with psycopg.connect(self.url) as conn:
            conn.execute(sql.batch_query("drop_recs_table", batch_id))
            conn.execute(sql.query("mark_batch_dropped"), (batch_id,))


@pytest.fixture(name="publisher")
def publisher_fixture(database_url: str) -> Publisher:
    """A `Publisher` on the test's database; a test module gets it by importing
    ``publisher_fixture as publisher_fixture`` (the redundant alias tells ruff the import is meant)."""
    return Publisher(database_url)


def _no_server_errors(response: httpx.Response) -> None:
    response.read()
    assert response.status_code < 500 or response.status_code == 503, (
        f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text}"
    )


@dataclass
class Service:
    base_url: str
    client: httpx.Client = field(init=False)
    anonymous: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        hooks: dict[str, list[Callable[..., Any]]] = {"response": [_no_server_errors]}
        self.client = httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, event_hooks=hooks, timeout=5
        )
        self.anonymous = httpx.Client(base_url=self.base_url, event_hooks=hooks, timeout=5)

    def recs(self, user_id: str, **params: Any) -> httpx.Response:
        return self.client.get(f"/v1/users/{user_id}/recommendations", params=params)

    def similar(self, item_id: str, **params: Any) -> httpx.Response:
        return self.client.get(f"/v1/items/{item_id}/similar", params=params)

    def session(self, **body: Any) -> httpx.Response:
        return self.client.post("/v1/recommendations:session", json=body)

    def wait_for(self, condition: Callable[[], bool], within: float) -> float:
        return wait_until(condition, within)

    def close(self) -> None:
        self.client.close()
        self.anonymous.close()


def service_settings(database_url: str, **overrides: Any) -> ServingSettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "api_keys": (API_KEY,),
        "auth_disabled": False,
        "db_timeout_seconds": DB_TIMEOUT,
        # Long, so switches seen within a second can only have come through NOTIFY.
        "live_poll_seconds": 60,
        "pool_min_size": 1,
        "pool_max_size": 4,
        "max_batch_users": 50,
    }
    return get_serving_settings(**(values | overrides))


@contextmanager
def running(settings: ServingSettings) -> Iterator[Service]:
    """The app under uvicorn on a free localhost port, in a thread with its own event loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), log_level="warning", lifespan="on", proxy_headers=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    service = Service(f"http://127.0.0.1:{port}")
    try:
        service.wait_for(lambda: server.started or not thread.is_alive(), within=10)
        assert server.started, "uvicorn did not start"
        yield service
    finally:
        service.close()
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def lookup_service(
    database_url: str, publish: Callable[[], object] | None = None, **overrides: Any
) -> Iterator[Service]:
    """The app on `service_settings(database_url, **overrides)`. With `publish`, that is called first
    (publishing what the tests look up) and the service is waited for until /readyz answers 200."""
    if publish is not None:
        publish()
    with running(service_settings(database_url, **overrides)) as service:
        if publish is not None:
            service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        yield service


def batch_of(response: httpx.Response) -> int:
    return int(response.headers["X-Batch-Id"])


def item_ids(response: httpx.Response) -> list[str]:
    return item_ids_of(response.json())


def item_ids_of(result: dict[str, Any]) -> list[str]:
    return [item["item_id"] for item in result["items"]]


def detail_text(response: httpx.Response) -> str:
    detail = response.json()["detail"]
    return detail if isinstance(detail, str) else " ".join(str(problem["msg"]) for problem in detail)


def losing_the_first_reply(writer: BulkWriter[Any]) -> None:
    """The writer's first write is committed, then fails as a reply lost on the way back would."""
    write = writer._write

    async def write_then_fail_once(batch: EncodedBatch) -> bool:
        stored = await write(batch)
        if writer.write_failures == 0:
            raise OSError("reply lost")
        return stored

    writer._write = write_then_fail_once  # type: ignore[method-assign]


def kill_live_watcher(admin: psycopg.Connection[Any]) -> int:
    """Terminate the live watcher's connection(s) to `admin`'s database; how many were terminated."""
    killed = admin.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = %s",
        (WATCHER_APPLICATION_NAME,),
    ).fetchone()
    assert killed is not None
    return int(killed[0])
