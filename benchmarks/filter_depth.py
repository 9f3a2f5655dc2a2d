"""How deep user lists must be published for request-time filters to still leave 10 items, and what each
depth costs publish and the table; prints JSON. Method: docs/scale.md.

    uv run python benchmarks/filter_depth.py --users 100000 --items 50000 --json filter-depth.json
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS_DATE = date(1998, 4, 22)
PASSING = 10  # items a filtered answer of k=10 needs from the list before any fill
SCALE_TO_USERS = 1_000_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def new_database(admin_url: str) -> Iterator[str]:
    name = f"overnight_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    try:
        yield make_conninfo(admin_url, dbname=name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))


def published_lists(settings: Any, logical_date: date) -> pl.DataFrame:
    """(user_id, item_ids) of every scored user, as publish loads them."""
    from jobs import workdir

    return pl.concat(
        pl.read_parquet(m.path, columns=["user_id", "item_ids"]) for m in workdir.read_manifests(settings, logical_date)
    )


def depth_shares(lists: pl.DataFrame, catalogue: pl.DataFrame, depths: list[int]) -> dict[str, Any]:
    """For every genre filter and its negation, the share of users with at least PASSING passing items in
    their first K, per K; and a summary over the filters."""
    genres = catalogue.select("item_id", pl.col("genres").alias("genre")).explode("genre").drop_nulls()
    names = genres["genre"].unique().sort().to_list()
    numbered = lists.select(pl.col("item_ids").list.head(max(depths))).with_row_index("user")
    lengths = numbered.select("user", length=pl.col("item_ids").list.len())
    in_genre = (
        numbered.with_columns(position=pl.int_ranges(pl.col("item_ids").list.len()))
        .explode("item_ids", "position")
        .join(genres, left_on="item_ids", right_on="item_id")
        .group_by("user", "genre")
        .agg(*((pl.col("position") < depth).sum().alias(str(depth)) for depth in depths))
    )
    users = lists.height
    filters: dict[str, dict[str, float]] = {}
    for genre in names:
        counts = lengths.join(in_genre.filter(pl.col("genre") == genre), on="user", how="left").fill_null(0)
        for name, passing in (
            (f"genre:{genre}", lambda depth: pl.col(str(depth))),
            (f"genre:-{genre}", lambda depth: pl.min_horizontal(pl.col("length"), depth) - pl.col(str(depth))),
        ):
            filters[name] = {
                str(depth): round(counts.filter(passing(depth) >= PASSING).height / users, 4) for depth in depths
            }
    summary = {}
    for depth in map(str, depths):
        positive = [filters[f"genre:{g}"][depth] for g in names]
        negated = [filters[f"genre:-{g}"][depth] for g in names]
        summary[depth] = {
            "median_share_genre_filters": round(statistics.median(positive), 4),
            "median_share_negated_filters": round(statistics.median(negated), 4),
            "genre_filters_with_share_at_least_0.9": sum(s >= 0.9 for s in positive),
            "genre_filters_with_share_at_least_0.5": sum(s >= 0.5 for s in positive),
        }
    length = lengths["length"]
    return {
        "users": users,
        "genres": len(names),
        "list_length": {"mean": round(float(length.mean() or 0), 1), "min": int(length.min() or 0)},  # type: ignore[arg-type]
        "genre_share_of_catalogue": {
            g: round(genres.filter(pl.col("genre") == g).height / catalogue.height, 4) for g in names
        },
        "summary": summary,
        "filters": filters,
    }


def movielens_depth(source: Path, admin_url: str, depths: list[int]) -> dict[str, Any]:
    from jobs import lake, nightly
    from jobs.settings import Settings

    with new_database(admin_url) as url, tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(data_dir=Path(data_dir), database_url=url, top_k=max(depths))
        nightly.run(nightly.night_of(settings, MOVIELENS_DATE, source), progress=log)
        catalogue = lake.read_catalogue(settings.lake_dir, MOVIELENS_DATE)
        return {"source": str(source), **depth_shares(published_lists(settings, MOVIELENS_DATE), catalogue, depths)}


def relation_size(url: str, batch_id: int, table: str) -> int:
    import sql

    with psycopg.connect(url) as conn:
        name = f"{sql.SCHEMA}.{sql.batch_table_name(batch_id, table)}"
        return int(conn.execute("SELECT pg_total_relation_size(to_regclass(%s))", (name,)).fetchone()[0])  # type: ignore[index]


def synthetic_depth_and_cost(args: argparse.Namespace, depths: list[int]) -> dict[str, Any]:
    from benchmarks import batch
    from jobs import lake, workdir
    from jobs.monitoring import drift
    from jobs.settings import Settings
    from jobs.steps import candidates, features, ingest, publish, score

    batch_args = argparse.Namespace(
        users=args.users, items=args.items, days=args.days, seed=args.seed, data=args.data,
        train_users=args.train_users, trees=args.trees,
    )  # fmt: skip
    source, generated = batch.prepare_data(batch_args)
    day = batch.LOGICAL_DATE
    with new_database(args.admin_url) as url, tempfile.TemporaryDirectory(dir=args.data) as work:
        model = batch.train_model(batch_args, Path(work), url)
        settings = Settings(
            data_dir=Path(work) / "var", database_url=url, top_k=max(depths), score_shards=1, shard_users=args.users
        )
        timings: dict[str, float] = {}
        for step, run in (
            ("ingest", lambda: ingest.ingest(settings, source, day)),
            ("candidates", lambda: candidates.prepare(settings, day)),
            ("features", lambda: features.prepare(settings, day)),
            ("score", lambda: score.score(settings, day)),
            ("monitor_input", lambda: drift.monitor_input(settings, day)),
        ):
            log(f"{step} ...")
            started = time.perf_counter()
            run()
            timings[step] = round(time.perf_counter() - started, 2)
        lists = published_lists(settings, day)
        shares = depth_shares(lists, lake.read_catalogue(settings.lake_dir, day), depths)
        users = lists.height
        del lists
        costs: dict[str, Any] = {}
        shards = [m.path for m in workdir.read_manifests(settings, day)]
        for depth in sorted(depths, reverse=True):  # each cut from the deeper lists before it
            for path in shards:
                pl.read_parquet(path).with_columns(pl.col("item_ids", "scores").list.head(depth)).write_parquet(path)
            log(f"publish at K={depth} ...")
            started = time.perf_counter()
            result = publish.publish_nightly(settings.model_copy(update={"top_k": depth}), day)
            seconds = time.perf_counter() - started
            recs_bytes = relation_size(url, result.batch_id, "recs")
            costs[str(depth)] = {
                "publish_seconds": round(seconds, 2),
                "publish_phases": result.seconds,
                "recs_table_bytes": recs_bytes,
                "recs_bytes_per_user": round(recs_bytes / users, 1),
                "similar_table_bytes": relation_size(url, result.batch_id, "similar"),
                f"publish_seconds_at_{SCALE_TO_USERS:,}_users": round(seconds * SCALE_TO_USERS / users, 1),
                f"recs_table_gib_at_{SCALE_TO_USERS:,}_users": round(recs_bytes * SCALE_TO_USERS / users / 2**30, 2),
            }
    return {
        "generated": generated,
        "model": model,
        "steps_seconds": timings,
        "depth": shares,
        "cost": costs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train-users", type=int, default=10_000)
    parser.add_argument("--trees", type=int, default=100, help="Boosting rounds of the synthetic world's ranker.")
    parser.add_argument("--depths", default="50,100,200", help="The depths K to compare, comma-separated.")
    parser.add_argument("--movielens", type=Path, default=ROOT.parent / "shared" / "data" / "ml-100k")
    parser.add_argument("--data", type=Path, default=ROOT / "var" / "bench", help="Where datasets are kept for reuse.")
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--json", type=Path, help="Also write the result to this file.")
    args = parser.parse_args()
    depths = sorted({int(d) for d in args.depths.split(",")})
    args.data.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"passing_items_needed": PASSING, "depths": depths}
    if args.movielens.exists():
        report["movielens_100k"] = movielens_depth(args.movielens, args.admin_url, depths)
    else:
        log(f"no MovieLens 100K at {args.movielens}: skipped")
    report["synthetic"] = {"users": args.users, "items": args.items} | synthetic_depth_and_cost(args, depths)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
