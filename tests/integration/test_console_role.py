"""The console only reads, whichever role it logs in as."""

import asyncio

import psycopg
import pytest

from console.dashboard import connect_read_only, read_overview

pytestmark = pytest.mark.integration


def test_the_console_cannot_write_even_as_the_owner_role(database_url: str) -> None:
    """Without OVERNIGHT_CONSOLE_DATABASE_URL the console logs in as the batch side's owner: its connections
    are still read only, so a bug or an injected statement cannot change what it shows."""

    async def read_then_write() -> None:
        async with await connect_read_only(database_url) as conn:
            assert "runs" in await read_overview(conn, None)
            await conn.execute("CREATE TABLE overnight.console_wrote (x int)")

    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        asyncio.run(read_then_write())
