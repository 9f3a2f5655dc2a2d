"""The ``overnight`` command: one front for every batch step, the lookup service and operations.

Heavy modules (polars, lightgbm, the service) are imported inside the commands that use them,
so ``overnight --help`` and ``overnight serve`` start quickly.
"""

import json
import logging
import sys
from dataclasses import asdict, is_dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer

from jobs.errors import OvernightError
from jobs.settings import Settings, get_settings

logger = logging.getLogger("overnight")

app = typer.Typer(
    name="overnight",
    help="Recommendations computed overnight, served in a millisecond.\n\n"
    "Configuration comes from OVERNIGHT_* environment variables (see the README); "
    "with OVERNIGHT_DATABASE_URL unset an embedded Postgres is started under OVERNIGHT_DATA_DIR.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _parse_date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date like 2026-11-22") from None


DateOption = Annotated[
    date,
    typer.Option(
        "--date",
        parser=_parse_date,
        metavar="YYYY-MM-DD",
        help="Logical date: the run uses events before the end of this day (UTC).",
    ),
]
SourceOption = Annotated[
    Path,
    typer.Option(
        "--source",
        help="A Parquet or CSV file, a folder with interactions/items/users files, "
        "or a MovieLens folder (ml-100k, ml-1m, ml-latest).",
    ),
]
FormatOption = Annotated[
    str, typer.Option("--format", help="auto, movielens, parquet or csv (auto detects from the path).")
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _settings(**overrides: Any) -> Settings:
    return get_settings(**{k: v for k, v in overrides.items() if v is not None})


def _echo(result: Any, as_json: bool = False) -> None:
    data = asdict(result) if is_dataclass(result) and not isinstance(result, type) else result
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    if isinstance(data, dict):
        for key, value in data.items():
            shown = json.dumps(value, default=str) if isinstance(value, dict | list) else value
            typer.echo(f"{key}: {shown}")
    else:
        typer.echo(str(data))


def _progress(message: str) -> None:
    typer.echo(message, err=True)


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Show warnings and errors only.")] = False,
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "pgserver", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@app.command()
def ingest(
    source: SourceOption,
    logical_date: DateOption,
    fmt: FormatOption = "auto",
    max_bad_fraction: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Fail when more than this share of rows is bad (default 0.05)."),
    ] = None,
) -> None:
    """Validate a source against the data contract and write it to the lake; bad rows are quarantined."""
    from jobs.ingest import ingest as run_ingest

    _echo(run_ingest(_settings(max_bad_fraction=max_bad_fraction), source, logical_date, fmt))


@app.command()
def train(logical_date: DateOption) -> None:
    """Train the ranker point in time for a date, evaluate it and register it."""
    from jobs.train import train as run_train

    _echo(run_train(_settings(), logical_date))


@app.command()
def score(
    logical_date: DateOption,
    shards: Annotated[
        int | None, typer.Option(min=1, help="Number of shards (default OVERNIGHT_SCORE_SHARDS).")
    ] = None,
    shard: Annotated[int | None, typer.Option(min=0, help="Score only this shard (0-based); default all.")] = None,
) -> None:
    """Score every user with history (or one shard of them) with the model the date may use."""
    from jobs.score import score as run_score

    if shard is not None and shards is not None and shard >= shards:
        raise typer.BadParameter(f"--shard must be below --shards ({shards})")
    for result in run_score(_settings(), logical_date, shards, shard):
        _echo(result)


@app.command()
def publish(
    logical_date: DateOption,
    live: Annotated[
        bool | None,
        typer.Option(
            "--live/--no-live",
            help="Force making the batch live, or keep it from going live. "
            "Default: live unless the live batch is of a newer date (a backfill).",
        ),
    ] = None,
) -> None:
    """Load a date's scores into a new batch table, validate it and switch the live pointer to it."""
    from jobs.publish import publish as run_publish

    _echo(run_publish(_settings(), logical_date, make_live=live))


@app.command()
def run(source: SourceOption, logical_date: DateOption, fmt: FormatOption = "auto") -> None:
    """The whole nightly pipeline without Airflow: ingest → train when due → score → publish → check."""
    from jobs.pipeline import run as run_pipeline

    result = run_pipeline(_settings(), source, logical_date, fmt, progress=_progress)
    typer.echo(f"batch {result.batch_id} is published from model {result.model_id} in {result.total_seconds:.1f}s:")
    for step in result.steps:
        typer.echo(f"  {step.step:<16} {step.seconds:7.1f}s  {step.summary}")


@app.command("check-freshness")
def check_freshness(
    max_age_hours: Annotated[
        float | None, typer.Option(min=0.0, help="Oldest acceptable batch age in hours (default 26).")
    ] = None,
    min_coverage: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Smallest acceptable share of active users covered (default 0.95)."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Exit 1 with the reason when the live batch is stale or covers too few users."""
    from jobs.freshness import as_dict
    from jobs.freshness import check_freshness as run_check

    _echo(as_dict(run_check(_settings(), max_age_hours, min_coverage)), as_json)


@app.command()
def rollback(
    to: Annotated[int | None, typer.Option("--to", help="Batch id to make live (default: the one before).")] = None,
) -> None:
    """Switch the live pointer back to the previous kept batch, instantly."""
    from jobs.publish import rollback as run_rollback

    result = run_rollback(_settings(), to)
    typer.echo(f"live batch is now {result.batch_id} (was {result.previous_batch_id})")


@app.command()
def status(as_json: JsonFlag = False) -> None:
    """Show the live batch, its age and coverage, the production model and the latest batches."""
    from jobs.freshness import status as read_status

    report = read_status(_settings())
    if as_json:
        _echo(report, as_json=True)
        return
    live = report["live"]
    if live is None:
        typer.echo("live: nothing published yet")
    else:
        typer.echo(
            f"live: batch {live['batch_id']} for {live['logical_date']}, model {live['model_id']}, "
            f"{live['users_scored']:,} users of {live['active_users']:,} active, "
            f"{float(live['age_seconds']) / 3600:.1f} h old"
        )
    model = report["production_model"]
    if model:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in model["metrics"].items() if "@" in k)
        typer.echo(f"production model: {model['model_id']} ({model['logical_date']}): {shown}")
    typer.echo("recent batches:")
    for batch in report["recent_batches"]:
        reason = f"  ({batch['failure_reason']})" if batch["failure_reason"] else ""
        typer.echo(
            f"  {batch['batch_id']:>5}  {batch['logical_date']}  {batch['status']:<8} "
            f"{batch['users_scored']:>9,} users{reason}"
        )


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve without API keys (local use only).")] = False,
) -> None:
    """Run the lookup service (needs OVERNIGHT_API_KEYS unless --no-auth)."""
    from jobs.database import database_url

    database_url(_settings())  # starts the embedded Postgres when no server is configured
    _serve(host, port, workers, no_auth)


def _serve(host: str, port: int, workers: int, no_auth: bool) -> None:
    from serving.errors import ServingConfigError
    from serving.server import serve as run_server

    try:
        run_server(host=host, port=port, workers=workers, no_auth=no_auth)
    except ServingConfigError as error:
        raise OvernightError(str(error)) from error


@app.command()
def demo(
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve", help="Start the service afterwards.")] = True,
) -> None:
    """Generate sample data, run the whole pipeline on it and serve the result."""
    import os

    from jobs.pipeline import prepare_demo

    settings = _settings()
    result = prepare_demo(settings, progress=_progress)
    typer.echo(f"\nbatch {result.run.batch_id} is live (model {result.run.model_id}). API key: {result.api_key}")
    typer.echo(
        f'Try:  curl -H "Authorization: Bearer {result.api_key}" '
        f'"http://127.0.0.1:{port}/v1/users/{result.user_id}/recommendations?k=5"'
    )
    if serve_after:
        os.environ["OVERNIGHT_API_KEYS"] = result.api_key
        typer.echo(f"Serving on http://127.0.0.1:{port} (Ctrl-C to stop)")
        _serve("127.0.0.1", port, 1, no_auth=False)


@app.command()
def generate(
    out: Annotated[Path, typer.Option(help="Folder to write interactions and items into.")],
    users: Annotated[int, typer.Option(min=1)] = 10_000,
    items: Annotated[int, typer.Option(min=1)] = 2_000,
    days: Annotated[int, typer.Option(min=1)] = 60,
    end_date: Annotated[
        date | None,
        typer.Option("--end-date", parser=_parse_date, metavar="YYYY-MM-DD", help="Last day (default yesterday)."),
    ] = None,
    seed: int = 42,
    fmt: Annotated[str, typer.Option("--format", help="parquet or csv")] = "parquet",
) -> None:
    """Write a synthetic dataset (taste clusters, power-law popularity) that ingest reads."""
    from datetime import UTC, datetime, timedelta

    from jobs.generate import generate as make
    from jobs.generate import write_dataset

    last = end_date or datetime.now(UTC).date() - timedelta(days=1)
    data = make(users, items, days, end_date=last, seed=seed)
    write_dataset(data, out, fmt)
    typer.echo(f"wrote {data.interactions.height:,} interactions of {users:,} users over {items:,} items to {out}")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the overnight schema to this version."""
    from jobs.database import connect, upgrade

    with connect(_settings()) as conn:
        applied = upgrade(conn)
    typer.echo(f"applied migrations {applied}" if applied else "schema is up to date")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded Postgres started for OVERNIGHT_DATA_DIR (when no server is configured)."""
    from jobs.database import stop_embedded

    stopped = stop_embedded(_settings().data_dir)
    typer.echo("stopped the embedded Postgres" if stopped else "no embedded Postgres in this data dir")


def main() -> None:
    try:
        app()
    except OvernightError as error:
        typer.echo(f"overnight: error: {error}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
