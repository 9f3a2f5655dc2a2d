"""The operator console under test: its app on a real socket with clients, `overnight console` as a user
runs it, and a database login in its read-only role."""

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

from console.app import create_app
from console.dashboard import connect_read_only, read_overview
from console.settings import ConsoleSettings, get_console_settings
from tests.support.commands import running_server, serving_app

CONSOLE_KEY = "console-key-3f9a2e"
# Nothing listens there: the service panel says it cannot read the service, and the rest still works.
NO_SERVICE_URL = "http://127.0.0.1:9"


@dataclass
class Console:
    base_url: str
    client: httpx.Client = field(init=False)
    anonymous: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {CONSOLE_KEY}"}, timeout=10
        )
        self.anonymous = httpx.Client(base_url=self.base_url, timeout=10)

    def overview(self, **params: Any) -> httpx.Response:
        return self.client.get("/dashboard/api/overview", params=params)

    def close(self) -> None:
        self.client.close()
        self.anonymous.close()


def console_settings(database_url: str, **overrides: Any) -> ConsoleSettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "api_keys": (CONSOLE_KEY,),
        "console_service_url": NO_SERVICE_URL,
        "console_service_timeout_seconds": 1.0,
    }
    return get_console_settings(**(values | overrides))


@contextmanager
def running_console(settings: ConsoleSettings, *, auth_disabled: bool = False) -> Iterator[Console]:
    """The console app under uvicorn on a free localhost port, in a thread of its own."""
    with serving_app(create_app(settings, auth_disabled=auth_disabled)) as base_url:
        console = Console(base_url)
        try:
            yield console
        finally:
            console.close()


@contextmanager
def console_process(env: dict[str, str], *args: str, ready_timeout: float = 30) -> Iterator[str]:
    """`overnight console` on a free port of 127.0.0.1; yields its base URL once /healthz answers."""
    with running_server(env, "console", "/healthz", *args, ready_timeout=ready_timeout) as base:
        yield base


@contextmanager
def console_login(database_url: str) -> Iterator[str]:
    """The database as the console logs in to it: a login role in overnight_console (made by migration
    0018), as an operator would create one."""
    role = f"overnight_dash_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE ROLE {} LOGIN IN ROLE overnight_console").format(pgsql.Identifier(role)))
    try:
        yield make_conninfo(database_url, user=role)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP ROLE IF EXISTS {}").format(pgsql.Identifier(role)))


def read_dashboard(dsn: str) -> dict[str, Any]:
    """What the dashboard shows, read as the console reads it (`console.dashboard.connect_read_only`)."""

    async def read() -> dict[str, Any]:
        async with await connect_read_only(dsn) as conn:
            return await read_overview(conn, None)

    return asyncio.run(read())
