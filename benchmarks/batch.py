"""The nightly batch at scale, step by step (seconds, CPU, peak memory), against the ceilings of LightGBM's
bare `predict` and a bare binary COPY measured in the same run; prints JSON. Method: docs/scale.md.
The steps are `jobs.nightly.STEPS`, in its order: every one a night with a current model runs is timed.

    uv run python benchmarks/batch.py --users 1000000 --items 50000 --json batch-1m.json
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import date, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parents[1]
LOGICAL_DATE = date(2026, 11, 20)
# The step of jobs.nightly.STEPS that retrains: the measured night has a current model, so the night skips it.
RETRAINING = "train"


def load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def run_step(step: str, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one step in a child process; its wall and CPU seconds, peak RSS and what it printed last (JSON)."""
    before = load()
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, __file__, "--step", step, *args], env=env, stdout=subprocess.PIPE, stderr=sys.stderr
    )
    out_thread_output: list[bytes] = []
    reader = threading.Thread(target=lambda: out_thread_output.append(process.stdout.read()))  # type: ignore[union-attr]
    reader.start()
    _, status, usage = os.wait4(process.pid, 0)
    reader.join()
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step {step} {' '.join(args)} failed")
    reported = json.loads(out_thread_output[0].decode().strip().splitlines()[-1])
    return {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),  # all its threads: less noisy than wall time
        "peak_rss_mb": reported["peak_rss_mb"],
        "load_before": before,
        "result": reported["result"],
    }


def own_peak_rss_mb() -> float:
    """This process's peak RSS since its exec, and its children's.

    Not the parent's `wait4` figure: Linux carries the high-water RSS of the forking process
    over the exec into the child's ru_maxrss, so every step would report at least this
    benchmark's own size at the time.
    """
    status = Path("/proc/self/status").read_text()
    own_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own_kb, children_kb) / 1024, 1)


# ------------------------------------------------------------------ steps (run in child processes)


def child_step(step: str, extra: list[str]) -> Any:
    """One step as the DAG's task runs it (`jobs.nightly`), so what is measured is what a night runs.

    `extra` is the night's source, then for ``plan`` a sharded step's name, for ``shard`` its name, shard
    count and shard. A step the night skips answers ``{"skipped": reason}``.
    """
    from jobs import nightly
    from jobs.settings import get_settings

    settings = get_settings()
    night = nightly.night_of(settings, LOGICAL_DATE, extra[0])
    if step == "plan":
        return nightly.plan_shards(extra[1], night)
    if step == "shard":
        return asdict(nightly.run_shard(extra[1], night, int(extra[2]), int(extra[3])))  # type: ignore[call-overload]
    if step == "copy-ceiling":
        return copy_ceiling(settings)
    if step == "predict-ceiling":
        return predict_ceiling(settings)
    if step not in nightly.STEP_BY_NAME:
        raise SystemExit(f"unknown step {step}")
    if step == RETRAINING and nightly.STEP_BY_NAME[step].skip(night) is None:
        raise SystemExit(f"the night of {LOGICAL_DATE} would retrain: the benchmark measures one with a current model")
    result = nightly.run_step(step, night)
    if isinstance(result, nightly.Skipped):
        return {"skipped": result.reason}
    return asdict(result)  # type: ignore[call-overload]


def copy_ceiling(settings: Any) -> dict[str, Any]:
    """Bare binary COPY of the published rows: frames already in memory, same encoder and parallelism."""
    import polars as pl

    import sql
    from jobs import copy_binary, workdir
    from jobs.database import database_url
    from jobs.steps import publish

    url = database_url(settings)
    frames = [pl.read_parquet(m.path) for m in workdir.read_manifests(settings, LOGICAL_DATE)]
    rows = sum(f.height for f in frames)
    table = pgsql.Identifier("overnight", f"bench_copy_{uuid.uuid4().hex[:8]}")
    create = pgsql.SQL(sql.query("create_recs_table")).format(recs=table)
    explained = "reason_codes" in frames[0].columns  # the same columns as publish sends
    copy_query = pgsql.SQL(sql.query("copy_explained_recs" if explained else "copy_recs")).format(recs=table)
    encode = partial(copy_binary.encode_rows, reasons=explained)

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(create)
        if explained:
            conn.execute(pgsql.SQL(sql.query("add_recs_reasons")).format(recs=table))
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=settings.publish_workers) as pool:
            list(pool.map(lambda frame: publish.copy_into(url, copy_query, frame, encode), frames))
        copy_seconds = time.perf_counter() - started
        conn.execute(pgsql.SQL("TRUNCATE {}").format(table))
        columns = ["user_id", "item_ids", "scores", *(("reason_codes", "reason_refs") if explained else ())]
        sample = frames[0].head(50_000).select(columns)
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy(copy_query) as copy:
            copy.set_types(["text", "text[]", "float4[]", *(("bytea", "text[]") if explained else ())])
            for row in sample.iter_rows():
                copy.write_row(row)
        write_row_seconds = time.perf_counter() - started
        conn.execute(pgsql.SQL("DROP TABLE {}").format(table))
    return {
        "rows": rows,
        "seconds": round(copy_seconds, 3),
        "rows_per_second": round(rows / copy_seconds),
        "write_row_rows_per_second": round(sample.height / write_row_seconds),
    }


def predict_ceiling(settings: Any) -> dict[str, Any]:
    """LightGBM's bare predict on the feature matrix of the first chunk of shard 0 (rows scoring ranked), and
    the compiled predictor on the same matrix: all cores and one thread, the better of two runs each."""
    import numpy as np
    import tl2cgen

    from jobs import predictor, registry, workdir
    from jobs.steps import features, score

    model, booster = score.load_ranker(settings, LOGICAL_DATE)
    folder = workdir.require_tables(settings, LOGICAL_DATE)
    manifests = workdir.read_manifests(settings, LOGICAL_DATE)
    users = score.shard_users(folder, manifests[0].shards, 0)
    frame = features.candidate_features(settings, LOGICAL_DATE)(score.shard_events(settings, LOGICAL_DATE, users)[0])
    matrix = frame.select(list(model.features)).to_numpy()
    model_file = registry.artifact_file(settings, model)
    library = predictor.cached_library(model_file, model.artifact_sha256)
    if library is None:
        raise SystemExit(f"no compiled library beside {model_file}: scoring did not compile the model")
    compiled = predictor.compiled_predictor(library, booster.num_feature())
    one_thread = tl2cgen.Predictor(library, nthread=1)
    runs = {
        "lightgbm": lambda: booster.predict(matrix, num_threads=0),
        "lightgbm_1_thread": lambda: booster.predict(matrix, num_threads=1),
        "compiled": lambda: compiled.predict(matrix),
        "compiled_1_thread": lambda: one_thread.predict(tl2cgen.DMatrix(np.ascontiguousarray(matrix))).reshape(-1),
    }
    result: dict[str, Any] = {"rows": matrix.shape[0]}
    scores = {}
    for name, run in runs.items():
        seconds, cpu_seconds = float("inf"), float("inf")
        for _ in range(2):  # the better of two: a ceiling
            started, cpu_started = time.perf_counter(), time.process_time()
            scores[name] = run()
            seconds = min(seconds, time.perf_counter() - started)
            cpu_seconds = min(cpu_seconds, time.process_time() - cpu_started)
        result[f"{name}_rows_per_second"] = round(matrix.shape[0] / seconds)
        result[f"{name}_rows_per_cpu_second"] = round(matrix.shape[0] / cpu_seconds)
    result["compiled_max_abs_difference"] = float(np.abs(scores["compiled"] - scores["lightgbm"]).max())
    return result


# ------------------------------------------------------------------ the run


def prepare_data(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    from jobs.dev.generate import write_generated

    folder = args.data / f"users{args.users}-items{args.items}-days{args.days}-seed{args.seed}"
    marker = folder / "generated.json"
    if marker.exists():
        return folder, {**json.loads(marker.read_text()), "reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    result = write_generated(
        folder, args.users, args.items, args.days, end_date=LOGICAL_DATE, seed=args.seed, progress=log
    )
    info = {**asdict(result), "seconds": round(time.perf_counter() - started, 2)}
    marker.write_text(json.dumps(info) + "\n")
    return folder, {**info, "reused": False}


def upstream_of(name: str) -> list[str]:
    """`name` and every step of jobs.nightly.STEPS it waits on, directly or not, in the night's order."""
    from jobs import nightly

    needed = {name}
    for step in reversed(nightly.STEPS):
        if step.name in needed:
            needed.update(step.upstream)
    return [step.name for step in nightly.STEPS if step.name in needed]


def train_model(args: argparse.Namespace, work: Path, database_url: str) -> dict[str, Any]:
    """A ranker trained on a sample of users of the same world, copied into the run's data dir: the night
    before's steps up to training (`jobs.nightly.run`, retraining), as `overnight train` runs them."""
    from jobs import nightly
    from jobs.dev.generate import write_generated
    from jobs.settings import Settings
    from jobs.steps.train import TrainResult

    source = work / "train-source"
    write_generated(
        source, args.train_users, args.items, args.days, end_date=LOGICAL_DATE, seed=args.seed + 1, progress=log
    )
    settings = Settings(data_dir=work / "train", database_url=database_url, num_boost_round=args.trees)
    night = nightly.night_of(settings, LOGICAL_DATE - timedelta(days=1), source, retrain=True)
    trained = nightly.run(night, progress=log, only=upstream_of(RETRAINING)).results[RETRAINING]
    assert isinstance(trained, TrainResult)
    shutil.copytree(settings.models_dir, work / "var" / "models")
    return {
        "model_id": trained.model_id,
        "trees": args.trees,
        "rounds_kept": trained.metrics["training"]["rounds"],  # after early stopping
        "train_users": args.train_users,
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--shard-users", type=int, default=100_000, help="OVERNIGHT_SHARD_USERS for the run.")
    parser.add_argument("--trees", type=int, default=100, help="Boosting rounds of the ranker (31 leaves each).")
    parser.add_argument("--train-users", type=int, default=10_000)
    parser.add_argument(
        "--popular", type=int, default=145, help="OVERNIGHT_POPULAR_CANDIDATES: with co-visitation, ~200 per user."
    )
    parser.add_argument(
        "--lightgbm-predict",
        action="store_true",
        help="Score with LightGBM's predict (OVERNIGHT_COMPILE_RANKER=false), as before the ranker was compiled.",
    )
    parser.add_argument("--keep", action="store_true", help="Keep the run's database and data dir (to profile).")
    parser.add_argument("--data", type=Path, default=ROOT / "var" / "bench", help="Where datasets are kept for reuse.")
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("OVERNIGHT_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--json", type=Path, help="Also write the result to this file.")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.step:
        result = child_step(args.step, extra)
        print(json.dumps({"result": result, "peak_rss_mb": own_peak_rss_mb()}, default=str))
        return 0

    args.data.mkdir(parents=True, exist_ok=True)
    source, generated = prepare_data(args)
    log(f"data: {generated}")
    name = f"overnight_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.admin_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    database_url = make_conninfo(args.admin_url, dbname=name)
    work = args.data / f"run-{name}"
    try:
        model = train_model(args, work, database_url)
        log(f"model: {model}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("OVERNIGHT_")}
        env |= {
            "OVERNIGHT_DATA_DIR": str(work / "var"),
            "OVERNIGHT_DATABASE_URL": database_url,
            "OVERNIGHT_SHARD_USERS": str(args.shard_users),
            "OVERNIGHT_SCORE_SHARDS": "1",
            "OVERNIGHT_NUM_BOOST_ROUND": str(args.trees),
            "OVERNIGHT_POPULAR_CANDIDATES": str(args.popular),
            "OVERNIGHT_COMPILE_RANKER": str(not args.lightgbm_predict).lower(),
            # a night without retraining: the model trained the day before is current (by default, 1 day is due)
            "OVERNIGHT_RETRAIN_DAYS": "7",
        }
        report = measure(source, env)
    finally:
        if args.keep:
            log(f"kept: OVERNIGHT_DATA_DIR={work / 'var'} OVERNIGHT_DATABASE_URL='{database_url}'")
        else:
            with psycopg.connect(args.admin_url, autocommit=True) as conn:
                conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "users": args.users,
        "items": args.items,
        "days": args.days,
        "shard_users": args.shard_users,
        "popular_candidates": args.popular,
        "generated": generated,
        "model": model,
    } | report
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


def run_sharded(name: str, source: Path, env: dict[str, str]) -> dict[str, Any]:
    """A sharded step as the DAG maps it: its plan, then each shard in a child process of its own."""
    shards = len(run_step("plan", [str(source), name], env)["result"])
    shard_runs = []
    for shard in range(shards):
        log(f"{name} shard {shard + 1}/{shards} ... (load {load()})")
        shard_runs.append(run_step("shard", [str(source), name, str(shards), str(shard)], env))
        log(
            f"{name} shard {shard + 1}/{shards}: {shard_runs[-1]['seconds']} s, peak {shard_runs[-1]['peak_rss_mb']} MB"
        )
    return {
        "seconds": round(sum(r["seconds"] for r in shard_runs), 2),
        "cpu_seconds": round(sum(r["cpu_seconds"] for r in shard_runs), 2),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in shard_runs),
        "shards": shards,
        "load_before": shard_runs[0]["load_before"],
        "per_shard": [{k: r[k] for k in ("seconds", "cpu_seconds", "peak_rss_mb", "load_before")} for r in shard_runs],
        "result": [r["result"] for r in shard_runs],
    }


def measure(source: Path, env: dict[str, str]) -> dict[str, Any]:
    """Every step of jobs.nightly.STEPS in its order, each in a child process (a sharded one shard by shard):
    those the night runs are timed, those it skips listed with the night's reason."""
    from jobs import nightly  # loads no data library

    steps: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for step in nightly.STEPS:
        log(f"{step.name} ... (load {load()})")
        measured = run_sharded(step.name, source, env) if step.sharded else run_step(step.name, [str(source)], env)
        if isinstance(measured["result"], dict) and "skipped" in measured["result"]:
            skipped[step.name] = measured["result"]["skipped"]
            log(f"{step.name}: skipped, {skipped[step.name]}")
            continue
        steps[step.name] = measured
        log(f"{step.name}: {measured['seconds']} s, peak {measured['peak_rss_mb']} MB")
    copy = run_step("copy-ceiling", [str(source)], env)
    predict = run_step("predict-ceiling", [str(source)], env)

    scored = steps["score"]["result"]
    users = sum(r["users"] for r in scored)
    rows = sum(r["candidate_rows"] for r in scored)
    score_seconds = steps["score"]["seconds"]
    predict_seconds = sum(r["predict_seconds"] for r in scored)
    publish_rate = users / steps["publish"]["seconds"]
    lightgbm = predict["result"]["lightgbm_rows_per_second"]  # the ceiling: LightGBM's bare predict
    steps["publish"]["phases"] = steps["publish"]["result"].get("seconds", {})
    for measured in steps.values():
        measured.pop("result", None)
    return {
        "users_scored": users,
        "candidate_rows": rows,
        "candidates_per_user": round(rows / users, 1),
        "steps": steps,
        "skipped_steps": skipped,
        "night_seconds": round(sum(s["seconds"] for s in steps.values()), 2),
        "night_cpu_seconds": round(sum(s["cpu_seconds"] for s in steps.values()), 2),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in steps.values()),
        "users_scored_per_second": round(users / score_seconds),
        "rows_per_second": round(rows / score_seconds),
        "publish_rows_per_second": round(publish_rate),
        "predictors": sorted({r["predictor"] for r in scored}),
        "ceilings": {
            "lightgbm_predict_rows_per_second": lightgbm,
            "lightgbm_predict_1_thread_rows_per_second": predict["result"]["lightgbm_1_thread_rows_per_second"],
            "compiled_predict_rows_per_second": predict["result"]["compiled_rows_per_second"],
            "compiled_predict_1_thread_rows_per_second": predict["result"]["compiled_1_thread_rows_per_second"],
            "compiled_max_abs_difference": predict["result"]["compiled_max_abs_difference"],
            "ceiling_rows": predict["result"]["rows"],
            "predict_rows_per_second_in_scoring": round(rows / predict_seconds),
            "predict_seconds_in_scoring": round(predict_seconds, 2),
            "copy_rows_per_second": copy["result"]["rows_per_second"],
            "copy_write_row_rows_per_second": copy["result"]["write_row_rows_per_second"],
        },
        "ratios": {
            "scoring_vs_predict": round(rows / score_seconds / lightgbm, 3),
            "predict_in_scoring_vs_lightgbm": round(rows / predict_seconds / lightgbm, 3),
            "compiled_vs_lightgbm": round(predict["result"]["compiled_rows_per_second"] / lightgbm, 3),
            # the same in CPU seconds (all threads), which other work on a shared machine disturbs less
            "scoring_vs_predict_cpu": round(
                rows / steps["score"]["cpu_seconds"] / predict["result"]["lightgbm_rows_per_cpu_second"], 3
            ),
            "publish_vs_copy": round(publish_rate / copy["result"]["rows_per_second"], 3),
        },
        "load_end": load(),
    }


if __name__ == "__main__":
    sys.exit(main())
