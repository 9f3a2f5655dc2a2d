"""Time `overnight run` on MovieLens 100K step by step and print JSON with the registry's metrics.

    uv run python benchmarks/movielens_run.py [--source ../shared/data/ml-100k] [--date 1998-04-22]

Runs against a new database on the Postgres at --admin-url (created and dropped) and a temporary
data dir, so nothing from an earlier run is reused: every step, training included, runs cold.
"""

import argparse
import json
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

from jobs.nightly import run
from jobs.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "ml-100k")
    parser.add_argument("--date", type=date.fromisoformat, default=date(1998, 4, 22))
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--json", type=Path, help="Also write the result to this file.")
    args = parser.parse_args()
    if not args.source.exists():
        print(f"no data at {args.source}", file=sys.stderr)
        return 2

    name = f"overnight_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.admin_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            settings = Settings(data_dir=Path(data_dir), database_url=make_conninfo(args.admin_url, dbname=name))
            started = time.perf_counter()
            result = run(settings, args.source, args.date, progress=lambda line: print(line, file=sys.stderr))
            wall = time.perf_counter() - started
    finally:
        with psycopg.connect(args.admin_url, autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))

    metrics = result.results["train"]["metrics"]
    report = {
        "source": str(args.source),
        "logical_date": args.date.isoformat(),
        "wall_seconds": round(wall, 2),
        "steps": {step.step: step.seconds for step in result.steps},
        "users_published": result.results["publish"]["users"],
        "model_id": result.model_id,
        "registry_metrics": {k: v for k, v in metrics.items() if "@" in k or k in ("users", "candidate_recall")},
        "baselines": metrics.get("baselines", {}),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
