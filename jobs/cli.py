"""The ``overnight`` command: one front for every batch step, the lookup service and operations.

Heavy modules (polars, lightgbm, the service) are imported inside the commands that use them,
so ``overnight --help`` and ``overnight serve`` start quickly.
"""

import inspect
import json
import logging
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, is_dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import pydantic
import typer
from typer.core import TyperGroup

from common.text import first_line, jsonable, printable, settings_error_line
from jobs.errors import OvernightError
from jobs.settings import Settings, get_settings

if TYPE_CHECKING:
    from jobs.dev.demo import Demo
    from jobs.nightly import Night

logger = logging.getLogger("overnight")


class _PlainHelp(TyperGroup):
    """Click's plain help (rich's option tables cut long words short in an 80-column terminal), listing
    each command's whole summary, wrapped, where click would cut it at the terminal's width."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        commands = ((name, self.get_command(ctx, name)) for name in self.list_commands(ctx))
        rows = [
            (name, command.get_short_help_str(limit=1_000))
            for name, command in commands
            if command and not command.hidden
        ]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _typer(**options: Any) -> typer.Typer:
    return typer.Typer(
        cls=_PlainHelp, rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]}, **options
    )


app = _typer(
    name="overnight",
    help="Recommendations computed overnight, served in a millisecond.\n\n"
    "Configuration comes from OVERNIGHT_* environment variables (see docs/configuration.md); "
    "with OVERNIGHT_DATABASE_URL unset an embedded Postgres is started under OVERNIGHT_DATA_DIR.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
db_app = _typer(help="Database schema management.", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _parse_date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date like 2026-11-22") from None


def _parse_logical_date(value: str) -> date:
    """A night's date: never after today (UTC), a usage error here rather than the night's refusal."""
    from jobs.nightly import after_today

    day = _parse_date(value)
    if (late := after_today(day)) is not None:
        raise typer.BadParameter(late)
    return day


DateOption = Annotated[
    date,
    typer.Option(
        "--date",
        parser=_parse_logical_date,
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


def _one_of(*choices: str) -> Callable[[str], str]:
    """An option's callback: a value not among `choices` is a usage error (exit 2) naming them."""

    def check(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


FormatOption = Annotated[
    str,
    typer.Option(
        "--format",
        callback=_one_of("auto", "movielens", "parquet", "csv"),
        help="auto, movielens, parquet or csv (auto detects from the path).",
    ),
]
ShardsOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Number of score shards (default: at least OVERNIGHT_SCORE_SHARDS, "
        "and at most OVERNIGHT_SHARD_USERS users in each).",
    ),
]
LiveOption = Annotated[
    bool | None,
    typer.Option(
        "--live/--no-live",
        help="Force making the batch live, or keep it from going live. "
        "Default: live unless the live batch is of a newer date (a backfill).",
    ),
]
AcceptChecksOption = Annotated[
    str | None,
    typer.Option(
        "--accept-checks",
        metavar="WHY",
        help="Publish the batch even though monitoring fails it (see `overnight drift --date D` first), "
        "accepting its failing checks for this reason; who, why, when and which checks are recorded in "
        "the run history, the alert log and the dashboard.",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _settings(**overrides: Any) -> Settings:
    return get_settings(**{k: v for k, v in overrides.items() if v is not None})


def _echo(result: Any, as_json: bool = False) -> None:
    data = asdict(result) if is_dataclass(result) and not isinstance(result, type) else result
    if as_json:
        typer.echo(json.dumps(jsonable(data), indent=2, default=str))
        return
    if isinstance(data, dict):
        for key, value in data.items():
            if value is None:  # a field this result does not have (rows_in of a step that reads no rows, ...)
                continue
            # text as it is; numbers, true/false, lists and mappings as JSON writes them
            shown = value if isinstance(value, str) else json.dumps(jsonable(value), default=str)
            typer.echo(f"{key}: {shown}")
    else:
        typer.echo(str(data))


def _echo_lines(lines: Iterable[str]) -> None:
    for line in lines:
        typer.echo(line)


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
    _run_step("ingest", _night(logical_date, source, max_bad_fraction=max_bad_fraction, source_format=fmt))


@app.command()
def train(logical_date: DateOption) -> None:
    """Train the ranker point in time for a date, evaluate it and register it, even if the model is current.

    The nightly run trains only when a retrain is due; this command trains whenever it is run.
    """
    _run_step("train", _night(logical_date, retrain=True))


@app.command()
def tune(
    logical_date: DateOption,
    budget_minutes: Annotated[
        float | None,
        typer.Option(help="Minutes to search (default: OVERNIGHT_TUNE_BUDGET_MINUTES)."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Search the settings a retrain on the date would use and print the best; nothing is trained or registered.

    The ranker's and the candidate generators' settings, searched as the retrain would (training users only,
    the production model's parameters first); every trial is recorded.
    """
    from jobs.steps.train import tune as run_tune

    settings = _settings()
    budget = budget_minutes or settings.tune_budget_minutes
    if budget is None or budget <= 0:
        raise typer.BadParameter("give --budget-minutes above 0 or set OVERNIGHT_TUNE_BUDGET_MINUTES")
    searched = run_tune(settings, logical_date, budget)
    if as_json:  # every trial, with what was chosen
        _echo({**asdict(searched), "summary": searched.summary(), "best_settings": searched.best.params}, True)
    else:
        _echo({**searched.summary(), "best_settings": searched.best.params})


@app.command()
def score(
    logical_date: DateOption,
    shards: ShardsOption = None,
    shard: Annotated[int | None, typer.Option(min=0, help="Score only this shard (0-based); default all.")] = None,
) -> None:
    """Score every user with history (or one shard of them) with the model the date may use."""
    if shard is not None and shards is not None and shard >= shards:
        raise typer.BadParameter(f"--shard must be below --shards ({shards})")
    _run_step("score", _night(logical_date, shards=shards, shard=shard))


@app.command()
def publish(logical_date: DateOption, live: LiveOption = None, accept_checks: AcceptChecksOption = None) -> None:
    """Load a date's scores into a new batch table, validate it and switch the live pointer to it.

    Monitoring's gate needs the date's input and drift checks: run `overnight monitor --date D` first
    (`overnight run` does).
    """
    _require_reason(accept_checks)
    _run_step("publish", _night(logical_date, publish_live=live, accept_checks=accept_checks))


def _require_reason(accept_checks: str | None) -> None:
    if accept_checks is not None and not accept_checks.strip():
        raise typer.BadParameter("say why the failing checks may be published", param_hint="'--accept-checks'")


@app.command()
def run(
    source: SourceOption,
    logical_date: DateOption,
    fmt: FormatOption = "auto",
    shards: ShardsOption = None,
    live: LiveOption = None,
    shadow_model: Annotated[
        str | None,
        typer.Option(help="Registered model to score into a shadow batch too (default OVERNIGHT_SHADOW_MODEL)."),
    ] = None,
    accept_checks: AcceptChecksOption = None,
) -> None:
    """Run the whole nightly pipeline without Airflow: the DAG's steps, in order, in this process.

    The same steps as the DAG (`jobs.nightly.STEPS`): ingest → features, candidates → train when due →
    refit-candidates (when tonight's model needs them) → score → monitor → publish → check-freshness →
    shadow, refresh-canary, online upkeep. The options are the DAG's params.
    """
    from jobs import nightly

    _require_reason(accept_checks)
    night = _night(
        logical_date,
        source,
        source_format=fmt,
        shards=shards,
        publish_live=live,
        shadow_model=shadow_model,
        accept_checks=accept_checks,
    )
    result = nightly.run(night, progress=_progress)
    typer.echo(f"batch {result.batch_id} is published from model {result.model_id} in {result.total_seconds:.1f}s:")
    for step in result.steps:
        typer.echo(f"  {step.step:<16} {step.seconds:7.1f}s  {step.summary}")


def _night(
    logical_date: date, source: Path | None = None, max_bad_fraction: float | None = None, **params: Any
) -> "Night":
    from jobs import nightly

    given = {name: value for name, value in params.items() if value is not None}
    return nightly.night_of(_settings(max_bad_fraction=max_bad_fraction), logical_date, source, **given)


def _run_step(name: str, night: "Night") -> None:
    """One step of the nightly graph, as `overnight run` runs it: a run of its own in the run history (so a
    step run by hand, and an accepted publish, show beside the night it completes); prints its result."""
    from jobs import nightly

    result = nightly.run(night, _progress, only=(name,)).results[name]
    _echo(result)
    typer.echo(f"summary: {result.outcome().summary}")


@app.command()
def features(logical_date: DateOption) -> None:
    """Build the date's item feature tables, which scoring and training read (after ingest)."""
    _run_step("features", _night(logical_date))


@app.command()
def candidates(logical_date: DateOption) -> None:
    """Build the date's candidate tables and user list, which scoring and training read (after ingest)."""
    _run_step("candidates", _night(logical_date))


@app.command()
def monitor(logical_date: DateOption) -> None:
    """Measure the date's input and the ranker's feature drift (after score); publish's gate reads them."""
    _run_step("monitor", _night(logical_date))


@app.command()
def evaluate(
    source: SourceOption,
    protocol: Annotated[
        str,
        typer.Option(
            callback=_one_of("user-holdout", "global"),
            help="user-holdout: the literature's protocol, each user's last 20% of interactions held out "
            "(`overnight backtest` measures what the nightly run publishes); "
            "global: train before --cutoff, test on the next --horizon-days.",
        ),
    ] = "user-holdout",
    cutoff: Annotated[
        date | None,
        typer.Option(
            parser=_parse_date,
            metavar="YYYY-MM-DD",
            help="global protocol: train on events before this day (default: the last --horizon-days of the data).",
        ),
    ] = None,
    horizon_days: Annotated[int, typer.Option(min=1, help="global protocol: days after the cutoff to test on.")] = 7,
    json_file: Annotated[
        Path | None,
        typer.Option("--json", metavar="FILE", help="Also write the result as JSON to FILE (- for stdout)."),
    ] = None,
    fmt: FormatOption = "auto",
) -> None:
    """Train the whole pipeline on the training part of a source and compare the ranker with every baseline.

    Prints NDCG@10, Recall@10, MAP@10, HitRate@10, catalogue coverage@10, candidate recall and the
    number of evaluated users for the ranker, most-popular, recent-popular, co-visitation, item-knn
    and genre-popular (docs/evaluation.md); then the similar items' NDCG@10 and HitRate@10 at the next item
    (against item-knn and co-visitation alone) and session answers for anonymous held-out users
    (against the popular and segment popular lists).
    """
    from jobs.evaluation.evaluate import evaluate as run_evaluate

    if protocol != "global" and cutoff is not None:
        raise typer.BadParameter("--cutoff belongs to --protocol global", param_hint="'--cutoff'")
    result = run_evaluate(_settings(), source, protocol, cutoff, horizon_days, fmt)
    window = f", cutoff {result.cutoff}, horizon {result.horizon_days} days" if result.cutoff else ""
    _progress(
        f"{result.protocol}{window}: {result.events:,} events, {result.users:,} users, {result.items:,} items; "
        f"seconds {result.seconds}"
    )
    if json_file is not None and str(json_file) == "-":
        _echo(result, as_json=True)
        return
    typer.echo(result.table())
    if json_file is not None:
        json_file.write_text(json.dumps(jsonable(result), indent=2) + "\n")


@app.command()
def backtest(
    source: SourceOption,
    windows: Annotated[
        int, typer.Option(min=1, help="Cutoffs, newest first, each --horizon-days before the next.")
    ] = 6,
    horizon_days: Annotated[int, typer.Option(min=1, help="Days after each cutoff to score the lists on.")] = 28,
    json_file: Annotated[
        Path | None,
        typer.Option("--json", metavar="FILE", help="Also write the whole result as JSON to FILE (- for stdout)."),
    ] = None,
    fmt: FormatOption = "auto",
) -> None:
    """Backtest what the nightly run publishes at rolling cutoffs, beside every baseline.

    At each cutoff C, run its steps (as `overnight run --date C-1`) on the events before C against a
    scratch database and work folder, read the published lists back from Postgres and score them, and
    every baseline on the same users, against the new items each user touched in the next --horizon-days.
    NDCG@10, Recall@10, MAP@10 and coverage per window and pooled, with bootstrap intervals, and the
    ratio of the published lists to the best baseline.
    """
    from jobs.evaluation.backtest import run_backtest

    result = run_backtest(_settings(), source, windows, horizon_days, fmt, progress=_progress)
    if json_file is not None and str(json_file) == "-":
        _echo(result, as_json=True)
        return
    typer.echo(result.table())
    if json_file is not None:
        json_file.write_text(json.dumps(jsonable(result), indent=2) + "\n")


@app.command()
def models(
    limit: Annotated[int, typer.Option(min=1, help="How many models to list, newest first.")] = 20,
    online_days: Annotated[
        int,
        typer.Option(
            min=0,
            help="Beside the held-out metrics, each model's online CTR and IPS click rate over the last N days "
            "(UTC, today included) of logged answers and feedback; 0 skips reading them (about 10 s a million "
            "logged answers).",
        ),
    ] = 2,
    as_json: JsonFlag = False,
) -> None:
    """List the model registry: status, held-out and online metrics, why a model was kept out.

    The held-out metrics are shown beside the best baseline's, the online numbers beside them (--online-days).
    """
    from jobs.database import connect, upgrade
    from jobs.registry import describe, list_models, render_models
    from jobs.rollouts.online import online_by_model

    settings = _settings()
    with connect(settings) as conn:
        upgrade(conn)
        listed = list_models(conn, limit)
    online = online_by_model(settings, online_days) if online_days and listed else {}
    rows = [{**describe(m), "online": online.get(m.model_id)} for m in listed]
    if as_json:
        _echo(rows, as_json=True)
        return
    _echo_lines(render_models(rows, online_days))


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
    from jobs.monitoring.freshness import as_dict
    from jobs.monitoring.freshness import check_freshness as run_check

    _echo(as_dict(run_check(_settings(), max_age_hours, min_coverage)), as_json)


@app.command()
def drift(
    logical_date: DateOption,
    as_json: JsonFlag = False,
    recompute: Annotated[
        bool,
        typer.Option(
            "--recompute", help="Run the monitor step again (input and feature drift) before showing the report."
        ),
    ] = False,
) -> None:
    """Show a date's monitoring report: input, feature drift and output checks, each with its level.

    Input statistics, feature drift (PSI, KS) against the model's training reference, output statistics,
    and each check's level against its warn/fail thresholds. The monitor step measures them
    (`overnight monitor --date D`, or `overnight run`); a date it has not measured is an error saying so.
    Exit 0 whatever the verdict.
    """
    from jobs import nightly
    from jobs.monitoring.drift import render_report, report

    settings = _settings()
    if recompute:
        nightly.run(nightly.night_of(settings, logical_date), _progress, only=("monitor",))
    found = report(settings, logical_date)
    if as_json:
        _echo(found, as_json=True)
        return
    _echo_lines(render_report(found))


@app.command()
def rollback(
    to: Annotated[int | None, typer.Option("--to", help="Batch id to make live (default: the one before).")] = None,
) -> None:
    """Switch the live pointer back to the previous kept batch, instantly.

    The previous kept batch is one that was live (or a nightly backfill), never a canary's batch that
    was not promoted. Its model becomes the registry's production model again, so the next night scores
    with it rather than with the model rolled back from.
    """
    from jobs.batches import rollback as run_rollback

    typer.echo(run_rollback(_settings(), to).summary())


canary_app = _typer(
    help="Canary rollouts: serve a batch or a model to a stable share of users beside production.\n\n"
    "Start one, ramp it, stop it; `overnight promote` ends one by making it production. With no command: "
    "the running canary and its history.\n\n"
    "A user's arm comes from a hash of the canary's salt and their user id, so it stays the same across "
    "requests, service restarts and days.",
    invoke_without_command=True,
)
app.add_typer(canary_app, name="canary")
canary_start_app = _typer(
    help="Start a canary: a published batch (`start batch B`) or a registered model (`start model M`).\n\n"
    "One canary runs at a time: change its share with `overnight canary ramp --traffic T`, or end it with "
    "`overnight canary stop` before starting another.",
    no_args_is_help=True,
    invoke_without_command=True,  # so that the old form's options reach the callback, which names the new form
)
canary_app.add_typer(canary_start_app, name="start")
TrafficOption = Annotated[
    float, typer.Option("--traffic", help="Share of users in the canary, between 0 and 1 (0.05 = 5%).")
]
SaltOption = Annotated[
    str | None, typer.Option("--salt", help="Chooses which users are in the share (default: a new random salt).")
]
CanaryDateOption = Annotated[
    date | None,
    typer.Option(
        "--date",
        parser=_parse_logical_date,
        metavar="YYYY-MM-DD",
        help="The date to score with the model (default: the live batch's date).",
    ),
]
CanaryShardsOption = Annotated[int | None, typer.Option(min=1, help="Number of score shards.")]
_RAMP_SHRINK = "overnight canary ramp --traffic T --allow-shrink"
# Options of earlier forms of the canary commands, and the command to use now: (command, option) -> hint.
_MOVED_OPTIONS = {
    # the single `overnight canary` command that the group replaced
    ("canary", "--batch"): "the canary's options became sub-commands: `overnight canary start batch B --traffic T`",
    ("canary", "--model"): "the canary's options became sub-commands: `overnight canary start model M --traffic T`",
    ("canary", "--stop"): "the canary's options became sub-commands: `overnight canary stop`",
    ("canary", "--refresh"): "the canary's options became sub-commands: `overnight canary refresh`",
    ("canary", "--traffic"): "the canary's options became sub-commands: `overnight canary ramp --traffic T`",
    ("canary", "--salt"): "--salt is an option of a sub-command now: `overnight canary start batch B --traffic T"
    " --salt S` or `overnight canary start model M --traffic T --salt S` (see `overnight canary -h`)",
    **{
        ("canary", option): f"{option} is an option of a sub-command now: `overnight canary start model M --traffic T"
        f" {option} X` or `overnight canary refresh {option} X` (see `overnight canary -h`)"
        for option in ("--date", "--shards")
    },
    ("canary", "--allow-shrink"): f"only a ramp can lower a running canary's share: `{_RAMP_SHRINK}`",
    # options of one kind of start, or of a ramp
    ("canary start batch", "--date"): "--date goes with a model: `overnight canary start model M --traffic T --date D`",
    (
        "canary start batch",
        "--shards",
    ): "--shards goes with a model: `overnight canary start model M --traffic T --shards N`",
    ("canary start batch", "--allow-shrink"): f"only a ramp can lower a running canary's share: `{_RAMP_SHRINK}`",
    ("canary start model", "--allow-shrink"): f"only a ramp can lower a running canary's share: `{_RAMP_SHRINK}`",
}


@canary_app.callback()
def canary(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    if ctx.invoked_subcommand is None:
        _canary_status(as_json)


@canary_app.command("status")
def canary_status(as_json: JsonFlag = False) -> None:
    """Show the running canary (batch, share of users, salt, since when) and its latest history."""
    _canary_status(as_json)


def _canary_status(as_json: bool) -> None:
    from jobs.batches import CanaryState
    from jobs.batches import canary_status as read_status

    def when(iso: str) -> str:
        return datetime.fromisoformat(iso).isoformat(sep=" ", timespec="seconds")

    status = read_status(_settings())
    if as_json:
        _echo(status, as_json=True)
        return
    running = status["canary"]
    if running is None:
        typer.echo("no canary is running")
    else:
        typer.echo(f"{CanaryState(**running).summary()}; since {when(running['started_at'])}")
    if status["history"]:
        typer.echo("history, newest first:")
    for event in status["history"]:
        typer.echo(
            f"  {when(event['happened_at'])}  {event['action']:<7}  batch {event['batch_id']} at "
            f"{event['traffic']:.2%} (salt {event['salt']!r}), production batch {event['production_batch_id']}"
        )


@canary_start_app.callback()
def canary_start(
    ctx: typer.Context,
    # The options of `overnight canary start` before `batch` and `model` became sub-commands, hidden: they are
    # read only to say which command to use now.
    batch: Annotated[str | None, typer.Option("--batch", hidden=True)] = None,
    model: Annotated[str | None, typer.Option("--model", hidden=True)] = None,
    traffic: Annotated[str | None, typer.Option("--traffic", hidden=True)] = None,
    logical_date: Annotated[str | None, typer.Option("--date", hidden=True)] = None,
    shards: Annotated[str | None, typer.Option("--shards", hidden=True)] = None,
    salt: Annotated[str | None, typer.Option("--salt", hidden=True)] = None,
    allow_shrink: Annotated[bool, typer.Option("--allow-shrink", hidden=True)] = False,
    as_json: Annotated[bool, typer.Option("--json", hidden=True)] = False,
) -> None:
    from typer._click.exceptions import UsageError  # typer vendors click

    given = (batch, model, traffic, logical_date, shards, salt)
    if allow_shrink or as_json or any(value is not None for value in given):
        now = _start_now(batch, model, traffic, logical_date, shards, salt, allow_shrink, as_json)
        raise UsageError(f"`overnight canary start` takes what to start as a sub-command now: {now}", ctx)
    if ctx.invoked_subcommand is None:
        raise UsageError(f"Missing command: {_start_now(None, None, None, None, None, None, False, False)}", ctx)


def _start_now(
    batch: str | None,
    model: str | None,
    traffic: str | None,
    logical_date: str | None,
    shards: str | None,
    salt: str | None,
    allow_shrink: bool,
    as_json: bool,
) -> str:
    """The commands to use now for the options of the old `overnight canary start` (B, M, T: not given)."""
    share = ["--traffic", traffic or "T"]
    output = ["--json"] if as_json else []
    if allow_shrink:  # starting the running canary's batch again was a ramp
        forms = [["ramp", *share, "--allow-shrink", *output]]
    else:
        rest = [*(["--salt", salt] if salt else []), *output]
        scored = [*(["--date", logical_date] if logical_date else []), *(["--shards", shards] if shards else [])]
        as_batch = ["start", "batch", batch or "B", *share, *rest]
        as_model = ["start", "model", model or "M", *share, *scored, *rest]
        wanted = [(as_batch, batch is not None), (as_model, model is not None or bool(scored))]
        forms = [form for form, chosen in wanted if chosen] or [as_batch, as_model]
    return " or ".join(f"`overnight canary {shlex.join(form)}`" for form in forms)


@canary_start_app.command("batch")
def canary_start_batch(
    batch_id: Annotated[
        int, typer.Argument(metavar="B", help="A published batch (ready or retired), not the live one.")
    ],
    traffic: TrafficOption,
    salt: SaltOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Serve a published batch to a --traffic share of users beside production.

    Refused while a canary runs: `overnight canary ramp --traffic T` changes its share. A stopped canary's
    batch can be started again.
    """
    from jobs.rollouts.canary import start_canary

    _echo(start_canary(_settings(), batch_id, traffic, salt), as_json)


@canary_start_app.command("model")
def canary_start_model(
    model_id: Annotated[str, typer.Argument(metavar="M", help="A registered model (`overnight models` lists them).")],
    traffic: TrafficOption,
    logical_date: CanaryDateOption = None,
    shards: CanaryShardsOption = None,
    salt: SaltOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Score a date with a registered model into a new batch (not live) and serve it to a --traffic share.

    Refused while a canary runs: `overnight canary ramp --traffic T` changes its share. Each night the DAG
    renews a model canary's lists with the night's date (`overnight canary refresh` by hand).
    """
    from jobs.rollouts.model_canary import start_model_canary

    _echo(start_model_canary(_settings(), model_id, traffic, logical_date, salt, shards), as_json)


@canary_app.command("ramp")
def canary_ramp(
    traffic: TrafficOption,
    allow_shrink: Annotated[
        bool,
        typer.Option(
            "--allow-shrink",
            help="Allow lowering the share, which moves the users between the two shares back to production.",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Change the running canary's share of users, whatever batch it serves.

    The salt stays: a ramp up keeps every canary user in the canary; a ramp down moves some back to
    production mid-experiment, so it needs --allow-shrink.
    """
    from jobs.rollouts.canary import ramp_canary

    _echo(ramp_canary(_settings(), traffic, allow_shrink), as_json)


@canary_app.command("stop")
def canary_stop(as_json: JsonFlag = False) -> None:
    """End the canary: every user gets production again; its batch stays kept."""
    from jobs.rollouts.canary import stop_canary

    stopped = stop_canary(_settings())
    if as_json:
        _echo(stopped, as_json=True)
        return
    typer.echo(
        f"canary batch {stopped.batch_id} stopped; every user gets production batch {stopped.production_batch_id}"
    )


@canary_app.command("refresh")
def canary_refresh(
    logical_date: CanaryDateOption = None, shards: CanaryShardsOption = None, as_json: JsonFlag = False
) -> None:
    """Score a newer date with the running canary's model and serve that batch to the same users.

    The nightly DAG does it after each publish. Exit 1 when there was nothing to refresh, with the reason.
    """
    from jobs.rollouts.model_canary import refresh_canary

    refreshed = refresh_canary(_settings(), logical_date, shards)
    if as_json:
        _echo(refreshed, as_json=True)
    if not refreshed.refreshed:  # the CLI's failure line, as any command's
        typer.echo(f"overnight: error: {refreshed.summary()}", err=True)
        raise typer.Exit(1)
    if not as_json:
        typer.echo(refreshed.summary())


@app.command()
def promote(as_json: JsonFlag = False) -> None:
    """Make the running canary production for every user, and its model the production model.

    One transaction, instant; the next nights score with that model.
    """
    from jobs.rollouts.canary import promote_canary

    result = promote_canary(_settings())
    if as_json:
        _echo(result, as_json=True)
        return
    typer.echo(result.summary())


@app.command()
def shadow(
    logical_date: DateOption,
    model: Annotated[str, typer.Option("--model", help="Registered model id to score with (any status).")],
    shards: Annotated[
        int | None, typer.Option(min=1, help="Number of shards (default OVERNIGHT_SCORE_SHARDS).")
    ] = None,
) -> None:
    """Score a date with another registered model into a shadow batch, which is never served."""
    from jobs.rollouts.shadow import run_shadow

    _echo(run_shadow(_settings(), logical_date, model, shards))


@app.command("shadow-report")
def shadow_report(
    logical_date: DateOption,
    horizon_days: Annotated[
        int, typer.Option(min=1, help="Days after the date whose events are the evaluation window.")
    ] = 7,
    as_json: JsonFlag = False,
) -> None:
    """Compare a date's shadow batch with its production batch.

    Both models on the latest label window, then overlap@10, offline metrics after the date and scores
    while retention keeps both batches.
    """
    from jobs.rollouts.shadow import shadow_report as make_report

    report = make_report(_settings(), logical_date, horizon_days)
    if as_json:
        _echo(report.as_dict(), as_json=True)
        return
    _echo_lines(report.lines())


@app.command("online-report")
def online_report(
    start: Annotated[
        date, typer.Option("--from", parser=_parse_date, metavar="YYYY-MM-DD", help="First day (UTC), included.")
    ],
    end: Annotated[
        date, typer.Option("--to", parser=_parse_date, metavar="YYYY-MM-DD", help="Last day (UTC), included.")
    ],
    propensity: Annotated[
        str,
        typer.Option(help="Examination model for the IPS estimate: power (theta_p = p^-eta) or estimated."),
    ] = "power",
    eta: Annotated[float, typer.Option(min=0.0, help="Exponent of the power propensity model.")] = 1.0,
    record: Annotated[
        bool,
        typer.Option(
            "--record",
            help="Also store each day's numbers per model in overnight.online_daily (shown on the dashboard), "
            "as the nightly DAG does for the day before its date.",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Served predictions joined to feedback, per variant and batch: CTR, conversion, IPS click rate."""
    from jobs.rollouts.online import online_report as make_report
    from jobs.rollouts.online import record_day, render, store_day

    settings = _settings()
    report = make_report(settings, start, end, propensity, eta)
    if record:
        for offset in range((end - start).days + 1):
            day = start + timedelta(days=offset)
            # A one-day period's report is the day's: reading the log once is enough.
            recorded = store_day(settings, report) if start == end else record_day(settings, day, propensity, eta)
            _progress(f"recorded {recorded['day']}: {len(recorded['models'])} models, complete: {recorded['complete']}")
    if as_json:
        _echo(report, as_json=True)
        return
    _echo_lines(render(report))


@app.command()
def status(as_json: JsonFlag = False) -> None:
    """Show the live batch, its age and coverage, the production model and the latest batches."""
    from jobs.monitoring.status import render_status
    from jobs.monitoring.status import status as read_status

    report = read_status(_settings())
    if as_json:
        _echo(report, as_json=True)
        return
    _echo_lines(render_status(report))


HostOption = Annotated[str, typer.Option(help="Address to listen on.")]
PortOption = Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")]
WorkersOption = Annotated[int, typer.Option(min=1, help="Worker processes.")]


@app.command()
def serve(
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    workers: WorkersOption = 1,
    no_auth: Annotated[
        bool,
        typer.Option(
            "--no-auth",
            help="Serve without API keys: lookups and feedback writes (POST /v1/events) are open "
            "to anyone who can reach the port (local use only). The only way to turn authentication off.",
        ),
    ] = False,
    server: Annotated[
        str,
        typer.Option(
            callback=_one_of("granian", "uvicorn"),
            help="HTTP server: granian (faster here, see docs/serving.md) or uvicorn.",
        ),
    ] = "granian",
) -> None:
    """Run the lookup service (needs OVERNIGHT_API_KEYS unless --no-auth)."""
    from jobs.database import database_url

    database_url(_settings())  # starts the embedded Postgres when no server is configured
    _serve(host, port, workers, no_auth, server)


def _serve(host: str, port: int, workers: int, no_auth: bool, server: str = "granian") -> None:
    from serving.errors import ServingConfigError
    from serving.server import serve as run_server

    try:
        run_server(host=host, port=port, workers=workers, no_auth=no_auth, server=server)
    except ServingConfigError as error:
        raise OvernightError(str(error)) from error


@app.command()
def console(
    host: HostOption = "127.0.0.1",
    port: PortOption = 8001,
    workers: WorkersOption = 1,
    no_auth: Annotated[
        bool,
        typer.Option(
            "--no-auth",
            help="Open the dashboard without a key to anyone who can reach the port (local use only). "
            "The only way to turn sign-in off.",
        ),
    ] = False,
) -> None:
    """Run the operator console: the monitoring dashboard at /dashboard.

    Its own process and database role; needs OVERNIGHT_DASHBOARD_KEYS or OVERNIGHT_API_KEYS unless
    --no-auth. The service panel reads OVERNIGHT_CONSOLE_SERVICE_URL's /metrics.
    """
    import os

    from jobs.database import database_url

    if not os.environ.get("OVERNIGHT_CONSOLE_DATABASE_URL"):
        database_url(_settings())  # starts the embedded Postgres when no server is configured
    from console.server import serve as run_console
    from console.settings import ConsoleConfigError

    try:
        run_console(host=host, port=port, workers=workers, no_auth=no_auth)
    except ConsoleConfigError as error:
        raise OvernightError(str(error)) from error


@app.command("airflow")
def airflow_local(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the api-server (REST API and UI).")] = 8080,
    host: Annotated[str, typer.Option(help="Address the api-server listens on.")] = "127.0.0.1",
    airflow_home: Annotated[
        Path | None, typer.Option("--airflow-home", help="AIRFLOW_HOME to use (default OVERNIGHT_DATA_DIR/airflow).")
    ] = None,
    dags_folder: Annotated[
        Path | None, typer.Option("--dags-folder", help="DAGs folder (default the project's dags/).")
    ] = None,
) -> None:
    """Run a local Airflow 3 for this project: api-server with the UI, scheduler, dag-processor, triggerer.

    It uses the LocalExecutor and a metadata database <dbname>_airflow on the overnight Postgres server.

    The admin login is printed once every component is healthy. Ctrl-C stops them all.
    """
    from jobs.dev.airflow_local import prepare
    from jobs.dev.airflow_local import run as run_airflow

    settings = _settings()
    local = prepare(
        settings,
        home=airflow_home or settings.machine_dir / "airflow",
        host=host,
        port=port,
        dags_folder=dags_folder,
        progress=_progress,
    )
    run_airflow(local, progress=_progress)


@app.command()
def demo(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the lookup service.")] = 8000,
    console_port: Annotated[
        int, typer.Option("--console-port", min=1, max=65535, help="Port of the console (the dashboard).")
    ] = 8001,
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve", help="Start the service afterwards.")] = True,
    nights: Annotated[
        int, typer.Option(min=1, max=60, help="Nights to run, ending yesterday (more fill the dashboard's history).")
    ] = 1,
) -> None:
    """Generate sample data, run the whole pipeline on it and serve the result, with the dashboard beside it."""
    import os

    from jobs.dev.demo import prepare_demo

    settings = _settings()
    if serve_after:  # before minutes of work, not after
        if port == console_port:
            raise typer.BadParameter("the service and the console need a port each", param_hint="--console-port")
        for option, chosen in (("--port", port), ("--console-port", console_port)):
            _refuse_a_port_in_use(option, chosen)
    result = prepare_demo(settings, progress=_progress, nights=nights)
    typer.echo("\n" + "\n".join(demo_lines(result, port, console_port)))
    if serve_after:
        os.environ["OVERNIGHT_API_KEYS"] = result.api_key
        console_process = _start_console(console_port, service_url=f"http://127.0.0.1:{port}")
        try:
            typer.echo(f"Serving on http://127.0.0.1:{port} (Ctrl-C to stop)")
            _serve("127.0.0.1", port, 1, no_auth=False)
        finally:
            _stop_console(console_process)


def _refuse_a_port_in_use(option: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise typer.BadParameter(
                f"port {port} on 127.0.0.1 is taken ({error.strerror}): choose another", param_hint=option
            ) from None


def demo_lines(result: "Demo", port: int, console_port: int) -> list[str]:
    """What the demo prints: the key once, in curl's header, never in a URL (a key in a URL reaches
    browser history and proxies' logs); the dashboard is signed in to through its form."""
    if result.live:
        state = f"batch {result.run.batch_id} is live (model {result.run.model_id})"
    else:  # a newer date was live already (another run on this data folder): the service serves that one
        state = (
            f"{result.publish_summary}: the service answers from the live batch; `overnight publish --date "
            f"{result.run.logical_date} --live` serves the demo's"
        )
    lines = [
        f"{state}. API key: {result.api_key}",
        f'Try:  curl -H "Authorization: Bearer {result.api_key}" '
        f'"http://127.0.0.1:{port}/v1/users/{result.user_id}/recommendations?k=5"',
    ]
    if result.newcomer_id:  # signed up, no history yet: their country's popular list
        lines.append(
            f'A new user (segment fallback):  curl -H "Authorization: Bearer {result.api_key}" '
            f'"http://127.0.0.1:{port}/v1/users/{result.newcomer_id}/recommendations?k=5"'
        )
    lines.append(f"Dashboard:  http://127.0.0.1:{console_port}/dashboard  (sign in with the API key)")
    return lines


def _start_console(port: int, service_url: str) -> subprocess.Popen[bytes]:
    """The console in a process of its own beside the demo's service, reading the same database (the
    embedded one's URL is in the environment by now) and the service's /metrics."""
    import os

    env = {**os.environ, "OVERNIGHT_CONSOLE_SERVICE_URL": os.environ.get("OVERNIGHT_CONSOLE_SERVICE_URL", service_url)}
    return subprocess.Popen([sys.executable, "-m", "console", "--port", str(port)], env=env)


def _stop_console(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@app.command()
def generate(
    out: Annotated[
        Path, typer.Option(help="Folder to write interactions/ (one part per 50,000 users), items and users into.")
    ],
    users: Annotated[int, typer.Option(min=1)] = 10_000,
    items: Annotated[int, typer.Option(min=1)] = 2_000,
    days: Annotated[int, typer.Option(min=1)] = 60,
    end_date: Annotated[
        date | None,
        typer.Option("--end-date", parser=_parse_date, metavar="YYYY-MM-DD", help="Last day (default yesterday)."),
    ] = None,
    events_per_user: Annotated[float, typer.Option(min=2.0, help="Mean interactions per user.")] = 50.0,
    drift_from: Annotated[
        date | None,
        typer.Option(
            "--drift-from", parser=_parse_date, metavar="YYYY-MM-DD", help="From this day on, users' tastes move."
        ),
    ] = None,
    seed: int = 42,
    event_types: Annotated[
        bool,
        typer.Option(
            "--event-types",
            help="A shop's funnel instead of ratings: view, cart and purchase events (event_type), the rarer "
            "ones far more likely for items of the user's taste.",
        ),
    ] = False,
    fmt: Annotated[str, typer.Option("--format", help="parquet or csv")] = "parquet",
) -> None:
    """Write a synthetic dataset that ingest reads; the same arguments give the same data.

    Power-law popularity, taste clusters, sessions, repeats, daily and weekly rhythm, items appearing and
    fading, users with a country (which tilts their taste) and a platform.
    """
    from datetime import datetime, timedelta

    from jobs.dev.generate import write_generated

    if fmt not in ("parquet", "csv"):
        raise typer.BadParameter(f"{fmt!r} is not parquet or csv", param_hint="--format")
    last = end_date or datetime.now(UTC).date() - timedelta(days=1)
    result = write_generated(
        out,
        users,
        items,
        days,
        end_date=last,
        seed=seed,
        events_per_user=events_per_user,
        drift_from=drift_from,
        event_types=event_types,
        fmt=fmt,
        progress=_progress,
    )
    typer.echo(f"wrote {result.summary()}")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the overnight schema to this version; make the coming days' log partitions."""
    from jobs.database import connect, upgrade
    from jobs.rollouts.online import maintain_tables

    settings = _settings()
    with connect(settings) as conn:
        applied = upgrade(conn)
    typer.echo(f"applied migrations {applied}" if applied else "schema is up to date")
    upkeep = maintain_tables(settings)
    typer.echo(f"online tables: {json.dumps(upkeep)}")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded Postgres started for OVERNIGHT_DATA_DIR (when no server is configured)."""
    from jobs.database import stop_embedded

    typer.echo(stop_embedded(_settings().machine_dir))


def _unwrap_help(typer_app: typer.Typer) -> None:
    """Give each command its docstring with every paragraph on one line: typer keeps the line breaks of
    the paragraphs after the first, which then break mid-sentence in a terminal of another width. (The
    first paragraph, the summary in `overnight --help`, is one line of its own.)"""
    for command in typer_app.registered_commands:
        if command.help is None and command.callback is not None and command.callback.__doc__:
            paragraphs = inspect.cleandoc(command.callback.__doc__).split("\n\n")
            command.help = "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _unwrap_help(group.typer_instance)


_unwrap_help(app)


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _printable_lines(text: str) -> str:
    return "\n".join(printable(line) for line in text.split("\n"))


def main() -> None:
    """Run the CLI; every failure is one line on stderr: exit 1 for an OvernightError, 2 for a usage
    error (the CLI contract, which typer's boxed usage messages would break), 130 for Ctrl-C."""
    from typer._click import exceptions as click_errors  # typer vendors click: these are what it raises

    try:
        code = app(standalone_mode=False)  # errors come here instead of typer's rich boxes
    except click_errors.NoArgsIsHelpError as error:
        error.show()  # no arguments at all: the help is the answer
        raise SystemExit(error.exit_code) from None
    except click_errors.ClickException as error:  # UsageError, BadParameter, MissingParameter, NoSuchOption, ...
        message = _one_line(error.format_message())
        if isinstance(error, click_errors.NoSuchOption) and error.ctx:
            command = " ".join(error.ctx.command_path.split()[1:])  # without the program's name
            moved = _MOVED_OPTIONS.get((command, error.option_name))
            if moved:  # click's guess among this command's options would mislead: say where it went
                message = f"No such option: {error.option_name}; {moved}"
        typer.echo(f"overnight: error: {printable(message)}", err=True)
        raise SystemExit(error.exit_code) from None
    except OvernightError as error:  # its text may name a file or hold a value from a source: escaped
        typer.echo(f"overnight: error: {_printable_lines(str(error))}", err=True)
        raise SystemExit(1) from None
    except pydantic.ValidationError as error:  # a bad OVERNIGHT_* setting
        prefix = Settings.model_config.get("env_prefix", "")
        typer.echo(f"overnight: error: {settings_error_line(error, prefix)}", err=True)
        raise SystemExit(1) from None
    except (KeyboardInterrupt, typer.Abort):
        raise SystemExit(130) from None
    except Exception as error:  # not one the code foresaw (a file where a folder should be, say): still one line
        logging.getLogger("jobs.cli").debug("the unforeseen error's traceback", exc_info=True)
        typer.echo(
            f"overnight: error: {type(error).__name__}: {printable(first_line(error))} (run with -v for the traceback)",
            err=True,
        )
        raise SystemExit(1) from None
    # without standalone mode, an explicit exit (--help: 0, Ctrl-C inside a command: 130) is returned
    if isinstance(code, int) and not isinstance(code, bool):
        raise SystemExit(code)


if __name__ == "__main__":
    main()
