"""What logging a served answer costs a lookup (one `PredictionLog.record` call) and how fast the writer
drains into Postgres; prints JSON. Run it as a module: as a file, benchmarks/serving.py would shadow the
`serving` package.

    uv run python -m benchmarks.prediction_log [--rows 200000] [--admin-url postgresql://...]
"""

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

from jobs.database import upgrade
from serving.prediction_log import PredictionLog

ITEMS = [f"item-{n}" for n in range(10)]


def percentiles(samples: list[int]) -> dict[str, float]:
    ordered = sorted(samples)
    return {f"p{q}": ordered[min(len(ordered) - 1, len(ordered) * q // 100)] for q in (50, 90, 99)} | {
        "p99.9": ordered[min(len(ordered) - 1, len(ordered) * 999 // 1000)]
    }


async def time_records(log: PredictionLog, calls: int) -> dict[str, float]:
    """Record `calls` answers, yielding to the event loop every 100 calls as a busy service would."""
    samples = []
    clock = time.perf_counter_ns
    for n in range(calls):
        started = clock()
        log.record("request-id-0123456789abcdef", f"user-{n}", 17, "production", "personalized", ITEMS)
        samples.append(clock() - started)
        if n % 100 == 0:
            await asyncio.sleep(0)
    return percentiles(samples)


async def measure(url: str, rows: int) -> dict[str, Any]:
    result: dict[str, Any] = {"record_ns": {}}
    full = PredictionLog(url, queue_size=1000)  # never started: the queue fills, then every call drops
    result["record_ns"]["queue_full"] = await time_records(full, 50_000)
    sampled_out = PredictionLog(url, sample_rate=0.0)
    result["record_ns"]["sampled_out"] = await time_records(sampled_out, 50_000)

    log = PredictionLog(url, queue_size=rows, batch_size=5000)
    log.start()
    started = time.perf_counter()
    result["record_ns"]["queue_accepting"] = await time_records(log, rows)
    await log.writer.flush()
    elapsed = time.perf_counter() - started
    await log.stop()
    result["writer"] = {
        "rows": log.writer.written,
        "seconds": round(elapsed, 3),
        "rows_per_second": round(log.writer.written / elapsed),
        "dropped": log.writer.refused,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    name = f"overnight_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.admin_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    try:
        url = make_conninfo(args.admin_url, dbname=name)
        with psycopg.connect(url) as conn:
            upgrade(conn)
        report = asyncio.run(measure(url, args.rows))
    finally:
        with psycopg.connect(args.admin_url, autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
