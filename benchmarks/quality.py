"""Evaluate the whole pipeline on a dataset under the protocols of docs/evaluation.md and print JSON (what it
holds: that document's "Metrics" and "Reproducing").

    uv run python benchmarks/quality.py DATASET_DIR [--protocol user-holdout|global|both] [--blend-grid] [--backtest]
"""

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import polars as pl

import sql.contract
from jobs.evaluation import item_quality
from jobs.evaluation.backtest import DEFAULT_HORIZON_DAYS, DEFAULT_WINDOWS, run_backtest
from jobs.evaluation.evaluate import (
    PROTOCOLS,
    evaluate,
    load_source,
    session_split,
    session_visitors,
    user_holdout_split,
)
from jobs.settings import Settings
from jobs.steps import candidates, similar
from jobs.steps.ranking_metrics import ranking_metrics

COVISIT_SHARES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
RECENCY_DECAYS = (0.5, 0.7, 0.8, 0.9, 1.0)


def blend_grid(settings: Settings, dataset: Path) -> dict[str, Any]:
    """NDCG@10 of the similar-items blend for each covisit_share, and of session answers for each share and
    SESSION_RECENCY_DECAY, under the protocols of ``overnight evaluate``; and what choosing the share each
    night would cost.

    - ``next_item``: user-holdout split, the next new item among the previous one's neighbours;
    - ``session``: anonymous held-out users, answered by ``blend_session`` (its decay set for the grid);
    - ``nightly_validation``: the choice a nightly run could make, the next-item protocol on the training
      part's last ``label_days`` (neighbours from the days before), with its seconds beside those of the
      neighbour tables of the whole training part (what the candidates step builds).
    """
    with tempfile.TemporaryDirectory(dir=settings.data_dir) as scratch:
        events, catalogue = load_source(settings, dataset, "auto", Path(scratch))
    history, later = user_holdout_split(events)
    last = history["timestamp"].max()
    assert isinstance(last, datetime), f"{dataset}: no history"
    cutoff = last + timedelta(microseconds=1)

    started = time.perf_counter()
    tables = candidates.build_tables(history.lazy(), catalogue, cutoff, settings)
    table_seconds = time.perf_counter() - started
    pairs = item_quality.next_item_pairs(history.lazy(), later.lazy())

    def next_item(tables: candidates.CandidateTables, pairs: pl.DataFrame, share: float) -> float:
        neighbours = similar.similar_items(tables.neighbours, tables.similar, catalogue, settings, share)
        return item_quality.next_item_metrics(pairs, neighbours, catalogue.height)["ndcg@10"]

    sessions = session_split(events, session_visitors(events, settings))
    assert sessions is not None, f"{dataset}: no visitor to answer"
    session_tables = candidates.build_tables(sessions.training, catalogue, sessions.cutoff, settings)
    session: dict[str, dict[str, float]] = {}
    for decay in RECENCY_DECAYS:
        # blend_session reads the module's constant when called: the grid sets it, the answer is the service's
        with mock.patch.object(sql.contract, "SESSION_RECENCY_DECAY", decay):
            session[str(decay)] = {
                str(share): ranking_metrics(
                    item_quality.session_answers(
                        sessions.items,
                        similar.similar_items(
                            session_tables.neighbours, session_tables.similar, catalogue, settings, share
                        ),
                    ),
                    sessions.relevant,
                    catalogue.height,
                )["ndcg@10"]
                for share in COVISIT_SHARES
            }
    popular = item_quality.list_answers(sessions.items, session_tables.popular["item_id"].to_list())

    started = time.perf_counter()
    validation_cutoff = cutoff - timedelta(days=settings.label_days)
    before = history.lazy().filter(pl.col("timestamp") < validation_cutoff)
    validation_tables = candidates.build_tables(before, catalogue, validation_cutoff, settings)
    validation_pairs = item_quality.next_item_pairs(
        before, history.lazy().filter(pl.col("timestamp") >= validation_cutoff)
    )
    validation = {str(share): next_item(validation_tables, validation_pairs, share) for share in COVISIT_SHARES}
    validation_seconds = time.perf_counter() - started
    return {
        "next_item": {
            "pairs": pairs.height,
            "ndcg@10": {str(share): next_item(tables, pairs, share) for share in COVISIT_SHARES},
        },
        "session": {
            "visitors": sessions.relevant["user_id"].n_unique(),
            "popular_ndcg@10": ranking_metrics(popular, sessions.relevant, catalogue.height)["ndcg@10"],
            "ndcg@10_by_decay_and_share": session,
        },
        "nightly_validation": {
            "days": settings.label_days,
            "pairs": validation_pairs.height,
            "ndcg@10": validation,
            "seconds": round(validation_seconds, 2),
            "candidate_tables_seconds": round(table_seconds, 2),
        },
    }


def backtest(dataset: Path, windows: int, horizon_days: int) -> dict[str, Any]:
    """``overnight backtest`` on the dataset: the nightly run at each cutoff, each against a scratch database
    on OVERNIGHT_DATABASE_URL's server (unset: the embedded Postgres of OVERNIGHT_DATA_DIR, as ``overnight
    run`` uses it) and a scratch folder under OVERNIGHT_DATA_DIR, both removed after; the published lists
    and every baseline scored per window and pooled, with bootstrap intervals."""
    result = run_backtest(
        Settings(), dataset, windows, horizon_days, progress=lambda line: print(line, file=sys.stderr, flush=True)
    )
    print(result.table(), file=sys.stderr)
    return asdict(result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="A MovieLens folder, a Parquet/CSV file or a folder ingest reads.")
    parser.add_argument("--protocol", choices=[*PROTOCOLS, "both"], default="user-holdout")
    parser.add_argument("--cutoff", type=date.fromisoformat, help="global protocol: the cutoff day.")
    parser.add_argument("--horizon-days", type=int, default=7)
    parser.add_argument("--json", type=Path, help="Also write the result to this file.")
    parser.add_argument(
        "--blend-grid", action="store_true", help="Also measure the similar-items blend and session decay grid."
    )
    parser.add_argument("--backtest", action="store_true", help="Also run `overnight backtest` on the dataset.")
    parser.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help="backtest: cutoffs, newest first.")
    parser.add_argument(
        "--backtest-horizon-days", type=int, default=DEFAULT_HORIZON_DAYS, help="backtest: days scored."
    )
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
        if args.blend_grid:
            report["blend_grid"] = blend_grid(settings, args.dataset)
    if args.backtest:
        report["backtest"] = backtest(args.dataset, args.windows, args.backtest_horizon_days)
    text = json.dumps(report if len(report) > 1 else report[protocols[0]], indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
