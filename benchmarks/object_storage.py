"""Which S3 client the data folder goes through, and what a night on a bucket costs against a local folder,
on moto's S3 server; prints JSON. Method: docs/scale.md.

    uv run python benchmarks/object_storage.py --shards 8 --rows 200000 --repeats 3   # or --nights 2
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import storage
from tests.support.commands import OVERNIGHT, overnight_env
from tests.support.data import SAMPLE_DATE
from tests.support.databases import DEFAULT_ADMIN_URL, create_database, drop_database
from tests.support.object_storage import S3Server, s3_server


def shard(rows: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 50_000, size=(rows, 50)).astype(str)
    return pl.DataFrame(
        {
            "user_id": [f"u{seed}-{i}" for i in range(rows)],
            "item_ids": items.tolist(),
            "scores": rng.random((rows, 50), dtype=np.float32).tolist(),
        },
        schema={"user_id": pl.String, "item_ids": pl.List(pl.String), "scores": pl.List(pl.Float32)},
    )


def put_all(put: Callable[[str, bytes], None], keys: list[str], files: list[bytes]) -> None:
    for key, data in zip(keys, files, strict=True):
        put(key, data)


def get_all(get: Callable[[str], bytes], keys: list[str]) -> list[bytes]:
    return [get(key) for key in keys]


def best_of(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def clients(endpoint: str, bucket: str) -> dict[str, tuple[Callable[[str, bytes], None], Callable[[str], bytes]]]:
    """name: (put(key, data), get(key) -> data) for each client installed."""
    import s3fs
    from pyarrow import fs as pafs

    found: dict[str, tuple[Callable[[str, bytes], None], Callable[[str], bytes]]] = {}
    s3 = s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False, skip_instance_cache=True)
    found["s3fs"] = (
        lambda key, data: s3.pipe_file(f"{bucket}/{key}", data),
        lambda key: s3.cat_file(f"{bucket}/{key}"),
    )

    arrow = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1")

    def arrow_put(key: str, data: bytes) -> None:
        with arrow.open_output_stream(f"{bucket}/{key}") as out:
            out.write(data)

    def arrow_get(key: str) -> bytes:
        with arrow.open_input_stream(f"{bucket}/{key}") as stream:
            return bytes(stream.read())

    found["pyarrow"] = (arrow_put, arrow_get)
    try:
        import obstore
        from obstore.store import S3Store
    except ImportError:
        return found
    store = S3Store(bucket, endpoint=endpoint, region="us-east-1", client_options={"allow_http": True})
    found["obstore"] = (
        lambda key, data: obstore.put(store, key, data),
        lambda key: bytes(obstore.get(store, key).bytes()),
    )
    return found


def nights(count: int, admin_url: str) -> dict[str, Any]:
    """`overnight run` on a local folder and on a bucket, alternately, `count` times each."""
    from jobs.dev.generate import generate, write_dataset

    result: dict[str, Any] = {"local_seconds": [], "bucket_seconds": [], "steps": {}}
    with tempfile.TemporaryDirectory() as scratch, s3_server() as server:
        root = Path(scratch)
        data = generate(users=300, items=120, days=45, end_date=SAMPLE_DATE, seed=11, events_per_user=25)
        source = write_dataset(data, root / "sample")
        for night in range(count):
            for kind in ("local", "bucket"):
                result["steps"][kind] = run_night(kind, server, root / f"{kind}-{night}", source, admin_url, result)
    result["load_average"] = Path("/proc/loadavg").read_text().split()[:3]
    return result


def run_night(
    kind: str, server: S3Server, root: Path, source: Path, admin_url: str, result: dict[str, Any]
) -> list[str]:
    url = create_database(admin_url)
    try:
        if kind == "local":
            env = overnight_env(url, root / "var")
        else:
            where = {"OVERNIGHT_DATA_DIR": f"s3://{server.new_bucket()}/nightly", "OVERNIGHT_LOCAL_DIR": str(root)}
            env = overnight_env(url, root, **where, **server.environment())
        command = [str(OVERNIGHT), "run", "--source", str(source), "--date", SAMPLE_DATE.isoformat()]
        started = time.perf_counter()
        run = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        result[f"{kind}_seconds"].append(round(time.perf_counter() - started, 1))
        return [line.split("] ", 1)[1] for line in run.stderr.splitlines() if " done in " in line]
    finally:
        drop_database(admin_url, url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nights", type=int, default=0, help="Time `overnight run` local vs bucket, N times each.")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, help="Postgres where --nights makes its databases.")
    args = parser.parse_args()
    if args.nights:
        print(json.dumps(nights(args.nights, args.admin_url), indent=2))
        return
    with tempfile.TemporaryDirectory() as scratch:
        files = []
        for number in range(args.shards):
            path = Path(scratch) / f"shard-{number:05d}.parquet"
            shard(args.rows, number).write_parquet(path)
            files.append(path.read_bytes())
    megabytes = sum(len(f) for f in files) / 1e6
    result: dict[str, Any] = {"shards": args.shards, "rows_per_shard": args.rows, "megabytes": round(megabytes, 1)}
    with s3_server() as server:
        os.environ.update(server.environment())
        bucket = server.new_bucket()
        for name, (put, get) in clients(server.endpoint_url, bucket).items():
            keys = [f"{name}/shard-{n:05d}.parquet" for n in range(args.shards)]
            write = best_of(args.repeats, partial(put_all, put, keys, files))
            read = best_of(args.repeats, partial(get_all, get, keys))
            assert [get(k) for k in keys] == files
            result[name] = {
                "write_seconds": round(write, 3),
                "read_seconds": round(read, 3),
                "write_mb_per_second": round(megabytes / write, 1),
                "read_mb_per_second": round(megabytes / read, 1),
            }
        uris = [f"s3://{bucket}/s3fs/shard-{n:05d}.parquet" for n in range(args.shards)]
        read = best_of(args.repeats, lambda: pl.read_parquet(uris))
        result["polars_read"] = {"read_seconds": round(read, 3), "read_mb_per_second": round(megabytes / read, 1)}
        from upath import UPath

        folder = UPath(f"s3://{bucket}/s3fs", use_listings_cache=False)
        listing = best_of(args.repeats, lambda: list(folder.glob("shard-*.parquet")))
        result["upath_glob_ms"] = round(listing * 1000, 1)
        listing = best_of(args.repeats, lambda: storage.glob(folder, "shard-*.parquet"))
        result["storage_glob_ms"] = round(listing * 1000, 1)  # jobs.storage.glob: one listing
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
