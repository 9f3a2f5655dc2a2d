"""Load the lookup service near the machine's limit with wrk and compare it with its ceilings (pgbench on the
same table, a hello-world app of the same stack) measured in the same run; prints JSON. Needs `wrk` and
`pgbench` on PATH. Method, and `--pool`: docs/performance.md.

    python benchmarks/serving.py [--users 1000000] [--prediction-log-sample-rate 0 1 1 0 ...] [--keep]
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

import sql
from jobs.batches import switch_live
from jobs.database import upgrade

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
API_KEY = "bench-key"
MODEL_ID = "bench-model"
CATALOGUE = 20_000
SIMILAR_K = 50
SEGMENTS = 10
PACED_CONNECTIONS_FACTOR = 4
TAIL_LEVELS = np.concatenate([50 + np.arange(400) / 10, 90 + np.arange(1000) / 100])  # of a phase's `tail_ms`
BOOTSTRAP_DRAWS = 2000

# wrk runs this per connection: pick a user by the configured mix and ask for their default list, or
# another endpoint's request (ENDPOINT_REQUESTS).
WRK_SCRIPT = """
local users, hot_users = {users}, {hot_users}
local hot_share, unknown_share, delay_ms = {hot_share}, {unknown_share}, {delay_ms}
local catalogue = {catalogue}
local counter = 0
wrk.headers["Authorization"] = "Bearer {api_key}"

setup = function(thread)
  counter = counter + 1
  thread:set("seed", counter)
end

init = function(args)
  math.randomseed(os.time() * 1000 + seed)
end

pick_user = function()
  local draw = math.random()
  if draw < unknown_share then
    return "x" .. math.random(1, 1000000000)
  elseif draw < unknown_share + hot_share then
    return "u" .. math.random(0, hot_users - 1)
  end
  return "u" .. math.random(0, users - 1)
end

pick_item = function()
  return "i" .. math.random(0, catalogue - 1)
end

{request}

if delay_ms > 0 then
  -- wrk waits whole milliseconds: a fractional delay is its floor or ceiling at random, in proportion.
  local whole = math.floor(delay_ms)
  local fraction = delay_ms - whole
  delay = function()
    if math.random() < fraction then return whole + 1 end
    return whole
  end
end

done = function(summary, latency, requests)
  local errors = summary.errors
  -- The upper half's quantile function (p50 to p90 in steps of 0.1, then to p99.99 in steps of 0.01):
  -- enough to merge phases' tails.
  local tail = {{}}
  for step = 0, 399 do
    tail[#tail + 1] = string.format("%.3f", latency:percentile(50 + step / 10) / 1000)
  end
  for step = 0, 999 do
    tail[#tail + 1] = string.format("%.3f", latency:percentile(90 + step / 100) / 1000)
  end
  io.write("WRK_JSON ", string.format(
    '{{"requests": %d, "seconds": %.3f, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "p999_ms": %.3f, ' ..
    '"max_ms": %.3f, "errors": %d, "error_statuses": %d, "tail_ms": [%s]}}\\n',
    summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, latency.max / 1000,
    errors.connect + errors.read + errors.write + errors.timeout + errors.status, errors.status,
    table.concat(tail, ", ")))
end
"""

# The request each measured endpoint sends (a Lua `request` function for WRK_SCRIPT).
ENDPOINT_REQUESTS = {
    "user_lookup": """
request = function()
  return wrk.format(nil, "/v1/users/" .. pick_user() .. "/recommendations")
end
""",
    # A typical storefront filter: one broad genre (about 40% of the catalogue) among available items.
    "filtered_user_lookup": """
request = function()
  return wrk.format(nil, "/v1/users/" .. pick_user() .. "/recommendations?filter=genre:g0,available")
end
""",
    "similar": """
request = function()
  return wrk.format(nil, "/v1/items/" .. pick_item() .. "/similar")
end
""",
    # A visitor's session of three items, most recent first.
    "session": """
wrk.headers["Content-Type"] = "application/json"
request = function()
  local body = '{"items": ["' .. pick_item() .. '", "' .. pick_item() .. '", "' .. pick_item() .. '"]}'
  return wrk.format("POST", "/v1/recommendations:session", nil, body)
end
""",
}
NEW_ENDPOINTS = ("similar", "session", "filtered_user_lookup")
THROUGHPUT_TARGET = 0.8  # of the user lookup's requests/s
HALF_RATE_P99_TARGET_MS = 5.0


# ---------------------------------------------------------------------------- the hello-world ceilings


def hello_app() -> Any:
    """FastAPI hello-world shaped like our lookup route: a path parameter, an orjson body."""
    import orjson
    from fastapi import FastAPI, Response

    body = orjson.dumps({"hello": "world"})
    app = FastAPI()

    @app.get("/v1/users/{user_id:path}/recommendations")
    async def hello(user_id: str) -> Response:
        return Response(content=body, media_type="application/json")

    return app


def raw_hello_app() -> Any:
    """The same answer from a bare ASGI callable: what the server alone can do."""
    body = b'{"hello":"world"}'
    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send(start)
        await send({"type": "http.response.body", "body": body})

    return app


# ---------------------------------------------------------------------------- publishing


def bench_database(admin_url: str, users: int, k: int) -> str:
    name = f"overnight_bench_{users}u_{k}k"
    return make_conninfo(admin_url, dbname=name)


def ensure_batch(admin_url: str, url: str, users: int, k: int, fresh: bool) -> tuple[int, float]:
    """The live batch of `users` users in the bench database, publishing it unless a kept one is there."""
    name = str(conninfo_to_dict(url)["dbname"])
    with psycopg.connect(admin_url, autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists and fresh:
            admin.execute(pgsql.SQL("DROP DATABASE {} WITH (FORCE)").format(pgsql.Identifier(name)))
            exists = None
        if not exists:
            admin.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    with psycopg.connect(url) as conn:
        upgrade(conn)
        row = conn.execute(
            "SELECT b.batch_id, b.users_scored, b.similar_k FROM overnight.live"
            " JOIN overnight.batches AS b USING (batch_id)"
        ).fetchone()
    if row is not None and row[1] == users and row[2] is not None:
        return int(row[0]), 0.0
    start = time.monotonic()
    batch_id = publish_synthetic(url, users, k)
    return batch_id, time.monotonic() - start


def publish_synthetic(url: str, users: int, k: int) -> int:
    """Users u0..u{N-1}, each with k distinct items of a 20,000-item catalogue, scores descending."""
    rng = np.random.default_rng(7)
    fallback = [f"i{n}" for n in range(k)]
    with psycopg.connect(url) as conn:
        conn.execute(
            sql.query("upsert_model_version"),
            {
                "model_id": MODEL_ID,
                "logical_date": date.today(),
                "status": "production",
                "status_reason": None,
                "data_window": Jsonb({}),
                "params": Jsonb({}),
                "features": [],
                "metrics": Jsonb({}),
                "artifact_path": "bench",
                "artifact_sha256": "0" * 64,
            },
        )
        batch_id = conn.execute(
            sql.query("insert_batch"),
            {
                "logical_date": date.today(),
                "model_id": MODEL_ID,
                "k": k,
                "users_scored": users,
                "active_users": users,
                "fallback_item_ids": fallback,
                "fallback_scores": [float(k - n) for n in range(k)],
                "generated_at": datetime.now(UTC) - timedelta(hours=1),
            },
        ).fetchone()[0]  # type: ignore[index]
        conn.execute(sql.batch_query("create_recs_table", batch_id))
        scores = [(k - n) / k for n in range(k)]
        names = [f"i{n}" for n in range(CATALOGUE)]
        # Distinct items per user: a random start and a stride coprime with the catalogue size.
        steps = np.arange(k) * 7919
        chunk = 50_000
        with conn.cursor() as cur, cur.copy(sql.batch_query("copy_recs", batch_id)) as copy:
            copy.set_types(["text", "text[]", "float4[]"])
            for first in range(0, users, chunk):
                count = min(chunk, users - first)
                items = (rng.integers(0, CATALOGUE, size=count)[:, None] + steps[None, :]) % CATALOGUE
                for n, row in enumerate(items.tolist()):
                    copy.write_row((f"u{first + n}", [names[i] for i in row], scores))
                print(f"published {first + count:,} / {users:,} users", file=sys.stderr, end="\r")
        print(file=sys.stderr)
        conn.execute(sql.batch_query("add_recs_primary_key", batch_id))
        conn.execute(sql.batch_query("analyze_recs", batch_id))
        publish_extras(conn, batch_id, rng, k)
        conn.execute(sql.query("mark_batch_ready"), (Jsonb({"rows": users}), batch_id))
        conn.commit()
        switch_live(conn, batch_id, "publish")
    return int(batch_id)


def publish_extras(conn: psycopg.Connection[Any], batch_id: int, rng: np.random.Generator, k: int) -> None:
    """The batch's extra tables, as the batch side publishes them by the named queries: each catalogue item's
    `similar_k` neighbours; its popularity (i0 most popular) and attributes (genres g0..g19, g0 on about 40%
    of the items; 95% available); SEGMENTS segments' popular lists; the segments of 10,000 users not scored."""
    names = [f"i{n}" for n in range(CATALOGUE)]
    ranked = ["text", "text[]", "float4[]"]
    similarities = [round(0.95 * (SIMILAR_K - n) / SIMILAR_K, 4) for n in range(SIMILAR_K)]
    steps = 1 + np.arange(SIMILAR_K) * 104_729 % (CATALOGUE - 1)
    conn.execute(sql.batch_query("create_similar_table", batch_id))
    with conn.cursor() as cur, cur.copy(sql.batch_query("copy_similar", batch_id)) as copy:
        copy.set_types(ranked)
        for n in range(CATALOGUE):
            copy.write_row((names[n], [names[(n + step) % CATALOGUE] for step in steps.tolist()], similarities))
    conn.execute(sql.batch_query("add_similar_primary_key", batch_id))
    conn.execute(sql.batch_query("create_items_table", batch_id))
    with conn.cursor() as cur, cur.copy(sql.batch_query("copy_items", batch_id)) as copy:
        copy.set_types(["text", "float4", "jsonb"])
        for n in range(CATALOGUE):
            genres = sorted({f"g{n % 20}", *(["g0"] if n % 5 < 2 else [])})
            copy.write_row((names[n], float(CATALOGUE - n), Jsonb({"genre": genres, "available": n % 20 != 19})))
    conn.execute(sql.batch_query("create_segments_table", batch_id))
    with conn.cursor() as cur, cur.copy(sql.batch_query("copy_segments", batch_id)) as copy:
        copy.set_types(ranked)
        for segment in range(SEGMENTS):
            items = rng.choice(CATALOGUE, size=k, replace=False).tolist()
            copy.write_row((f"s{segment}", [names[i] for i in items], [float(k - n) for n in range(k)]))
    conn.execute(sql.batch_query("create_user_segments_table", batch_id))
    with conn.cursor() as cur, cur.copy(sql.batch_query("copy_user_segments", batch_id)) as copy:
        copy.set_types(["text", "text"])
        for n in range(10_000):
            copy.write_row((f"a{n}", f"s{n % SEGMENTS}"))
    conn.execute(sql.batch_query("add_user_segments_primary_key", batch_id))
    conn.execute(sql.query("set_batch_extras"), (SIMILAR_K, "country", batch_id))


# ---------------------------------------------------------------------------- load


def pgbench(url: str, batch_id: int, users: int, seconds: int, clients: int) -> float:
    script = (
        f"\\set n random(0, {users - 1})\n"
        f"SELECT item_ids, scores FROM overnight.{sql.recs_table_name(batch_id)} WHERE user_id = 'u' || :n;\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as file:
        file.write(script)
    params = conninfo_to_dict(url)
    args = ["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", "2", "-T", str(seconds), "-f", file.name]
    for flag, key in (("-h", "host"), ("-p", "port"), ("-U", "user")):
        if params.get(key):
            args += [flag, str(params[key])]
    args.append(str(params["dbname"]))
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    Path(file.name).unlink()
    line = next(line for line in out.splitlines() if line.startswith("tps ="))
    return float(line.split()[2])


def wrk(
    base: str, args: argparse.Namespace, seconds: float, delay_ms: float = 0, endpoint: str = "user_lookup"
) -> dict[str, Any]:
    script = WRK_SCRIPT.format(
        users=args.users,
        hot_users=max(1, round(args.users * args.hot_users)),
        hot_share=args.hot_share,
        unknown_share=args.unknown_share,
        delay_ms=f"{delay_ms:.3f}",
        catalogue=CATALOGUE,
        api_key=API_KEY,
        request=ENDPOINT_REQUESTS[endpoint],
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as file:
        file.write(script)
    command = ["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{seconds:g}s", "-s", file.name]
    out = subprocess.run([*command, base], capture_output=True, text=True, check=True).stdout
    Path(file.name).unlink()
    result: dict[str, Any] = json.loads(next(line for line in out.splitlines() if line.startswith("WRK_JSON "))[9:])
    result["rps"] = round(result["requests"] / result["seconds"], 1)
    return result


@contextmanager
def running(command: list[str], env: dict[str, str], base: str, ready_path: str) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{' '.join(command)} exited {process.returncode}: {process.stderr.read().decode()}")  # type: ignore[union-attr]
            try:
                if httpx.get(base + ready_path, timeout=1, headers={"Authorization": f"Bearer {API_KEY}"}).is_success:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{' '.join(command)} was not ready within 60 s")
            time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def server_command(server: str, target: str, port: int, workers: int) -> list[str]:
    if server == "granian":
        return [
            str(BIN / "granian"),
            "--interface",
            "asgi",
            "--factory",
            "--no-ws",
            "--log-level",
            "warning",
            "--workers",
            str(workers),
            "--port",
            str(port),
            target,
        ]
    return [
        str(BIN / "uvicorn"),
        "--factory",
        "--log-level",
        "warning",
        "--no-access-log",
        "--workers",
        str(workers),
        "--port",
        str(port),
        target,
    ]


def process_cpu_seconds(name: str | None = None, root: int | None = None) -> dict[int, float]:
    """CPU seconds (user + system) so far of each process named `name`, or of `root` and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[str, int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            text = (entry / "stat").read_text()
            comm = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()
            stats[int(entry.name)] = (comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    if name is not None:
        return {pid: cpu for pid, (comm, _, cpu) in stats.items() if comm == name}
    tree = {root}
    while grown := {pid for pid, (_, parent, _) in stats.items() if parent in tree and pid not in tree}:
        tree |= grown
    return {pid: stats[pid][2] for pid in tree if pid in stats}


def with_cpu_per_request(service_pid: int, phase: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs a wrk `phase` and adds to its result the CPU microseconds per request that the service's
    processes, and all of Postgres's, spent meanwhile: far steadier than latency on a shared machine,
    it shows what a feature costs and where."""

    def spent() -> dict[str, dict[int, float]]:
        return {"service": process_cpu_seconds(root=service_pid), "postgres": process_cpu_seconds(name="postgres")}

    before = spent()
    result = phase()
    after = spent()
    result["cpu_us_per_request"] = {
        part: round(1e6 * sum(cpu - before[part].get(pid, 0.0) for pid, cpu in pids.items()) / result["requests"], 1)
        for part, pids in after.items()
    }
    return result


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_metrics(base: str) -> dict[str, float]:
    """A few of one worker's counters, to explain the numbers (cache hit ratio, users per database trip)."""
    text = httpx.get(base + "/metrics", timeout=5).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(
            (
                "overnight_cache_lookups_total",
                "overnight_db_trips_total",
                "overnight_db_trip_users_total",
                "overnight_bulk_rows_",
            )
        ):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    hits = values.get('overnight_cache_lookups_total{result="hit"}', 0.0)
    misses = values.get('overnight_cache_lookups_total{result="miss"}', 0.0)
    trips = values.get("overnight_db_trips_total", 0.0)
    return {
        "cache_hit_ratio": round(hits / (hits + misses), 3) if hits + misses else 0.0,
        "users_per_db_trip": round(values.get("overnight_db_trip_users_total", 0.0) / trips, 2) if trips else 0.0,
        "logged_rows_written": values.get('overnight_bulk_rows_written_total{writer="served_predictions"}', 0.0),
        "logged_rows_dropped": values.get('overnight_bulk_rows_dropped_total{writer="served_predictions"}', 0.0),
    }


def load_services(
    args: argparse.Namespace, env: dict[str, str]
) -> tuple[list[tuple[float, dict[str, Any]]], dict[str, Any]]:
    """`overnight serve`'s app under wrk, once per --prediction-log-sample-rate: each rate's phase flat out,
    then each rate's phase at half the first phase's maximum (the same load for all).

    One service per distinct rate runs throughout, and the phases alternate between them in the order
    given: the machine's speed drifts over minutes (other tenants), so runs compared with each other
    should be close in time rather than one configuration after the other. Then the other endpoints
    (`load_endpoints`) on the first rate's service.
    """
    rates = list(dict.fromkeys(args.prediction_log_sample_rate))
    bases: dict[float, str] = {}
    pids: dict[float, int] = {}
    with contextlib.ExitStack() as stack:
        for rate in rates:
            port = free_port()
            bases[rate] = f"http://127.0.0.1:{port}"
            command = server_command(args.server, "serving.app:create_app", port, args.workers)
            rate_env = env | {"OVERNIGHT_PREDICTION_LOG_SAMPLE_RATE": str(rate)}
            pids[rate] = stack.enter_context(running(command, rate_env, bases[rate], "/readyz")).pid
        for rate in rates:
            wrk(bases[rate], args, 10)  # warm-up: connections, prepared statements, the hot users' cache entries
        fulls = [
            with_cpu_per_request(pids[rate], lambda rate=rate: wrk(bases[rate], args, args.seconds))
            for rate in args.prediction_log_sample_rate
        ]
        target_rps = fulls[0]["rps"] / 2
        # Paced connections: their rate is 1 / (wait + latency), so the wait should dwarf the latency,
        # which moves with the machine's speed between the probes and the phase. Four times as many
        # connections, each waiting about four times as long, make the load four times less sensitive.
        paced = argparse.Namespace(**(vars(args) | {"connections": args.connections * PACED_CONNECTIONS_FACTOR}))
        delays = {rate: delay_for(bases[rate], paced, target_rps) for rate in rates}
        runs = []
        for rate, full in zip(args.prediction_log_sample_rate, fulls, strict=True):
            half = with_cpu_per_request(
                pids[rate], lambda rate=rate: wrk(bases[rate], paced, args.seconds, delay_ms=delays[rate])
            )
            half["target_rps"] = round(target_rps, 1)
            runs.append((rate, {"full": full, "half": half, "service": service_metrics(bases[rate])}))
        first = args.prediction_log_sample_rate[0]
        return runs, load_endpoints(args, bases[first], pids[first], paced)


def load_endpoints(args: argparse.Namespace, base: str, service_pid: int, paced: argparse.Namespace) -> dict[str, Any]:
    """Each new endpoint flat out and at half its own maximum, and the user lookup flat out between them
    (its rate next to theirs in time: the machine's speed drifts); each one's requests/s and service CPU
    per request over the user lookup's measured just before it, and its p99 at half load, against the
    targets."""
    endpoints: dict[str, Any] = {}
    for endpoint in NEW_ENDPOINTS:
        wrk(base, args, 5, endpoint=endpoint)  # warm-up: its prepared statements and cache entries
        lookup = with_cpu_per_request(service_pid, partial(wrk, base, args, args.seconds))
        full = with_cpu_per_request(service_pid, partial(wrk, base, args, args.seconds, endpoint=endpoint))
        target_rps = full["rps"] / 2
        delay = delay_for(base, paced, target_rps, endpoint)
        half = wrk(base, paced, args.seconds, delay_ms=delay, endpoint=endpoint)
        ratio = full["rps"] / lookup["rps"]
        endpoints[endpoint] = {
            "rps": full["rps"],
            "user_lookup_rps": lookup["rps"],
            "ratio_to_user_lookup": round(ratio, 3),
            "latency_ms": {key: full[f"{key}_ms"] for key in ("p50", "p90", "p99", "p999", "max")},
            "errors": full["errors"],
            "cpu_us_per_request": full["cpu_us_per_request"],
            "user_lookup_cpu_us_per_request": lookup["cpu_us_per_request"],
            # The service's CPU per request is far steadier than requests/s on a shared machine.
            "cpu_ratio_to_user_lookup": round(
                full["cpu_us_per_request"]["service"] / lookup["cpu_us_per_request"]["service"], 3
            ),
            "half_rate": {
                "target_rps": round(target_rps, 1),
                "rps": half["rps"],
                "latency_ms": {key: half[f"{key}_ms"] for key in ("p50", "p90", "p99", "p999", "max")},
                "errors": half["errors"],
            },
            "meets_throughput_target": ratio >= THROUGHPUT_TARGET,
            "meets_half_rate_p99_target": half["p99_ms"] < HALF_RATE_P99_TARGET_MS,
        }
    return endpoints


def delay_for(base: str, args: argparse.Namespace, target_rps: float, endpoint: str = "user_lookup") -> float:
    """The wait between a connection's requests that makes wrk send `target_rps`.

    A connection's rate is 1 / (wait + latency + wrk's own time), and the latency depends on the rate:
    two short probes, each correcting the wait by the time per request the one before measured.
    """
    period_ms = 1000 * args.connections / target_rps
    delay_ms = period_ms
    for _ in range(2):
        probe = wrk(base, args, 3, delay_ms=delay_ms, endpoint=endpoint)
        overhead_ms = 1000 * args.connections / probe["rps"] - delay_ms
        delay_ms = max(0.05, period_ms - overhead_ms)
    return delay_ms


def merged_percentile(phases: list[dict[str, Any]], level: float) -> float:
    """The `level` percentile (50 or above) of the latencies of all `phases`' requests together.

    Each phase brings its tail's quantile function (`tail_ms`, from wrk's histogram) and its count;
    the share of all requests at or below a latency is the phases' shares, weighted by their counts.
    """
    tails = [np.append(phase["tail_ms"], phase["max_ms"]) for phase in phases]
    levels = np.append(TAIL_LEVELS, 100.0)
    grid = np.unique(np.concatenate(tails))
    weights = np.array([phase["requests"] for phase in phases], dtype=float)
    at_or_below = sum(
        weight * levels[np.maximum(np.searchsorted(tail, grid, side="right") - 1, 0)]
        for weight, tail in zip(weights, tails, strict=True)
    )
    cdf = np.asarray(at_or_below) / weights.sum()
    return float(grid[min(int(np.searchsorted(cdf, level)), len(grid) - 1)])


def logging_cost(runs: list[tuple[float, dict[str, Any]]]) -> dict[str, Any] | None:
    """With phases at rate 0 and at a higher rate: for each rate, the p99 of every request of its
    half-rate phases together, and the highest rate's over rate 0's with a 95% bootstrap interval
    (resampling neighbouring pairs of phases, a rate-0 phase and the highest-rate phase next to it,
    which the machine's drift moves least); each pair's own ratio; the medians of each rate's CPU
    per request at half load and of its requests/s flat out."""
    rates = sorted({rate for rate, _ in runs})
    if 0.0 not in rates or len(rates) < 2:
        return None
    top = rates[-1]
    halves = {rate: [run["half"] for r, run in runs if r == rate] for rate in rates}
    in_order = [(rate, run["half"]) for rate, run in runs if rate in (0.0, top)]
    pairs = [
        (a, b) if rate_a == 0.0 else (b, a)
        for (rate_a, a), (rate_b, b) in zip(in_order[::2], in_order[1::2], strict=False)
        if {rate_a, rate_b} == {0.0, top}
    ]
    p99 = {rate: merged_percentile(phases, 99) for rate, phases in halves.items()}
    report: dict[str, Any] = {
        "half_rate_phases": {str(rate): len(phases) for rate, phases in halves.items()},
        "half_rate_p99_ms": {str(rate): value for rate, value in p99.items()},
        # Where in the distribution a cost shows: a slower request throughout moves every level,
        # an occasional stall only the top ones.
        "half_rate_latency_ms": {
            str(rate): {f"p{level:g}": merged_percentile(phases, level) for level in (50, 75, 90, 95, 99, 99.9)}
            for rate, phases in halves.items()
        },
        f"p99_ratio_{top:g}_to_0": round(p99[top] / p99[0.0], 3),
    }
    if len(pairs) >= 3:
        draws = np.random.default_rng(0).integers(0, len(pairs), size=(BOOTSTRAP_DRAWS, len(pairs)))
        ratios = [
            merged_percentile([pairs[i][1] for i in draw], 99) / merged_percentile([pairs[i][0] for i in draw], 99)
            for draw in draws
        ]
        report[f"p99_ratio_{top:g}_to_0_95ci"] = [round(float(q), 3) for q in np.percentile(ratios, [2.5, 97.5])]
    report[f"p99_ratio_{top:g}_to_0_by_pair"] = [round(on["p99_ms"] / off["p99_ms"], 3) for off, on in pairs]
    report["half_rate_cpu_us_per_request_median"] = {
        str(rate): {
            part: statistics.median(phase["cpu_us_per_request"][part] for phase in phases)
            for part in ("service", "postgres")
        }
        for rate, phases in halves.items()
    }
    report["rps_flat_out_median"] = {
        str(rate): statistics.median(run["full"]["rps"] for r, run in runs if r == rate) for rate in rates
    }
    return report


def pooled_logging_cost(paths: list[str]) -> dict[str, Any]:
    """Earlier runs' `prediction_log_cost` together: every pair's p99 ratio, their geometric mean with a
    95% bootstrap interval (resampling pairs). One run's interval shows the noise within it, not the
    run-to-run drift of a shared machine, which pooling several runs takes in."""
    ratios: list[float] = []
    for path in paths:
        cost = json.loads(Path(path).read_text()).get("prediction_log_cost") or {}
        by_pair = next((value for key, value in cost.items() if key.endswith("_by_pair")), None)
        if not by_pair:
            raise SystemExit(f"serving.py: error: {path} has no prediction_log_cost pairs (run with rates 0 1 1 0 ...)")
        ratios += by_pair
    logs = np.log(ratios)
    draws = np.random.default_rng(0).integers(0, len(logs), size=(BOOTSTRAP_DRAWS, len(logs)))
    means = np.exp(logs[draws].mean(axis=1))
    return {
        "benchmark": "serving-pooled",
        "runs": len(paths),
        "pairs": len(ratios),
        "p99_ratio_geometric_mean": round(float(np.exp(logs.mean())), 3),
        "p99_ratio_geometric_mean_95ci": [round(float(q), 3) for q in np.percentile(means, [2.5, 97.5])],
        "p99_ratio_median": round(float(np.median(ratios)), 3),
        "p99_ratio_range": [min(ratios), max(ratios)],
    }


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--hot-users", type=float, default=0.01, help="share of users that are hot")
    parser.add_argument("--hot-share", type=float, default=0.5, help="share of requests that go to hot users")
    parser.add_argument("--unknown-share", type=float, default=0.1, help="share of requests for unknown users")
    parser.add_argument("--server", choices=("granian", "uvicorn"), default="granian")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-cache", action="store_true", help="OVERNIGHT_CACHE_ENTRIES=0")
    parser.add_argument("--seconds", type=float, default=15, help="each measured load phase")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--pgbench-clients", type=int, default=8)
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("OVERNIGHT_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument(
        "--prediction-log-sample-rate",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="RATE",
        help="OVERNIGHT_PREDICTION_LOG_SAMPLE_RATE; several values: one service per value, their phases alternating "
        "in the order given (e.g. 0 1 1 0 0 1 1 0)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the bench database for the next run")
    parser.add_argument("--fresh", action="store_true", help="publish again even if a kept batch fits")
    parser.add_argument(
        "--pool",
        nargs="+",
        metavar="JSON",
        help="load nothing: pool the logging pairs of earlier runs' output (geometric mean of their p99 ratios)",
    )
    args = parser.parse_args()
    if args.pool:
        print(json.dumps(pooled_logging_cost(args.pool), indent=2))
        return
    for tool in ("wrk", "pgbench"):
        if shutil.which(tool) is None:
            raise SystemExit(f"serving.py: error: {tool} is not on PATH (apt-get install wrk postgresql-client)")

    url = bench_database(args.admin_url, args.users, args.k)
    try:
        batch_id, publish_seconds = ensure_batch(args.admin_url, url, args.users, args.k, args.fresh)
        pg_tps = pgbench(url, batch_id, args.users, round(args.seconds), args.pgbench_clients)

        port = free_port()
        base = f"http://127.0.0.1:{port}"  # the ceilings' apps
        env = {k: v for k, v in os.environ.items() if not k.startswith("OVERNIGHT_")}
        ceilings = {}
        for name, target in (
            ("fastapi", "benchmarks.serving:hello_app"),
            ("raw_asgi", "benchmarks.serving:raw_hello_app"),
        ):
            command = server_command(args.server, target, port, args.workers)
            with running(command, env, base, "/v1/users/u1/recommendations"):
                wrk(base, args, 2)
                ceilings[name] = wrk(base, args, args.seconds)

        env |= {
            "OVERNIGHT_DATABASE_URL": url,
            "OVERNIGHT_API_KEYS": API_KEY,
            "OVERNIGHT_CACHE_ENTRIES": "0" if args.no_cache else os.environ.get("OVERNIGHT_CACHE_ENTRIES", "50000"),
        }
        runs, endpoints = load_services(args, env)
        full, half, explained = runs[0][1]["full"], runs[0][1]["half"], runs[0][1]["service"]
    finally:
        if not args.keep:
            name = str(conninfo_to_dict(url)["dbname"])
            with psycopg.connect(args.admin_url, autocommit=True) as admin:
                admin.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))

    hello = ceilings["fastapi"]
    report = {
        "benchmark": "serving",
        "users": args.users,
        "k": args.k,
        "mix": {"hot_users": args.hot_users, "hot_share": args.hot_share, "unknown_share": args.unknown_share},
        "server": args.server,
        "framework": "fastapi",
        "workers": args.workers,
        "cache": not args.no_cache,
        "wrk": {
            "threads": args.threads,
            "connections": args.connections,
            "half_rate_connections": args.connections * PACED_CONNECTIONS_FACTOR,
            "seconds": args.seconds,
        },
        "rps": full["rps"],
        "latency_ms": {key: full[f"{key}_ms"] for key in ("p50", "p90", "p99", "p999", "max")},
        "errors": full["errors"],
        "half_rate": {
            "rps": half["rps"],
            "share_of_max": round(half["rps"] / full["rps"], 3),
            "latency_ms": {key: half[f"{key}_ms"] for key in ("p50", "p90", "p99", "p999", "max")},
            "errors": half["errors"],
        },
        "service": explained,
        "ceilings": {
            "hello_world_rps": hello["rps"],
            "hello_world_p99_ms": hello["p99_ms"],
            "raw_asgi_hello_world_rps": ceilings["raw_asgi"]["rps"],
            "pgbench_select_tps": round(pg_tps, 1),
            "pgbench_clients": args.pgbench_clients,
        },
        "ratios": {
            "to_hello_world": round(full["rps"] / hello["rps"], 3),
            "to_raw_asgi_hello_world": round(full["rps"] / ceilings["raw_asgi"]["rps"], 3),
            "to_pgbench": round(full["rps"] / pg_tps, 3),
        },
        "prediction_log_sample_rate": args.prediction_log_sample_rate[0],
        "by_prediction_log_sample_rate": [
            {
                "sample_rate": rate,
                "rps": run["full"]["rps"],
                "p99_ms": run["full"]["p99_ms"],
                "p50_ms": run["full"]["p50_ms"],
                "errors": run["full"]["errors"],
                "half_rate_target_rps": run["half"]["target_rps"],
                "half_rate_rps": run["half"]["rps"],
                "half_rate_p99_ms": run["half"]["p99_ms"],
                "half_rate_p50_ms": run["half"]["p50_ms"],
                "cpu_us_per_request": run["full"]["cpu_us_per_request"],
                "half_rate_cpu_us_per_request": run["half"]["cpu_us_per_request"],
                # that rate's service so far (it runs through every phase)
                "logged_rows_written_total": run["service"]["logged_rows_written"],
                "logged_rows_dropped_total": run["service"]["logged_rows_dropped"],
            }
            for rate, run in runs
        ],
        "prediction_log_cost": logging_cost(runs),
        # Similar items, sessions and filters against the user lookup, in the same run (issue 29): targets
        # requests/s >= 0.8 of the user lookup's and p99 at half load < 5 ms.
        "endpoints": endpoints,
        "endpoint_targets": {"ratio_to_user_lookup": THROUGHPUT_TARGET, "half_rate_p99_ms": HALF_RATE_P99_TARGET_MS},
        "publish_seconds": round(publish_seconds, 1),
        "load_average": [round(load, 2) for load in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
