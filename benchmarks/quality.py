"""Evaluate the whole pipeline on a dataset under DESIGN §4's protocols and print JSON.

    uv run python benchmarks/quality.py DATASET_DIR [--protocol user-holdout|global|both]
                                         [--cutoff YYYY-MM-DD] [--horizon-days 7]

The JSON has, per protocol, the metrics of every model (ranker, most-popular, recent-popular,
co-visitation, item-knn, genre-popular): ndcg@10, recall@10, map@10, hit_rate@10, coverage@10,
users and candidate_recall, plus the wall seconds of loading, training and evaluating. Under the
global protocol, ``horizon_days`` is the horizon used and ``requested_horizon_days`` the one asked
for: with fewer than 100 users in it the horizon is widened; ``warning`` then says so, and stays
set when too few users were evaluated even so.
Nothing touches a database; work files go to a temporary directory.
"""

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import asdict
from datetime import date
from pathlib import Path

from jobs.settings import Settings
from jobs.steps.evaluate import PROTOCOLS, evaluate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="A MovieLens folder, a Parquet/CSV file or a folder ingest reads.")
    parser.add_argument("--protocol", choices=[*PROTOCOLS, "both"], default="user-holdout")
    parser.add_argument("--cutoff", type=date.fromisoformat, help="global protocol: the cutoff day.")
    parser.add_argument("--horizon-days", type=int, default=7)
    parser.add_argument("--json", type=Path, help="Also write the result to this file.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if not args.dataset.exists():
        print(f"no data at {args.dataset}", file=sys.stderr)
        return 2
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    report = {}
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(data_dir=Path(data_dir))
        for protocol in protocols:
            result = evaluate(settings, args.dataset, protocol, args.cutoff, args.horizon_days)
            print(result.table(), file=sys.stderr)
            report[protocol] = asdict(result)
    text = json.dumps(report if len(report) > 1 else report[protocols[0]], indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
