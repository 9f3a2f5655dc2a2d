"""The `overnight` command's help and usage errors, in process (no database): one-line summaries, the canary
sub-commands and the old canary forms' errors naming the command to use now, text output without unset fields."""

import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer

from jobs import cli

ROOT = Path(__file__).resolve().parents[2]


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["overnight", *args])
    monkeypatch.setenv("COLUMNS", "200")  # the help's table, unwrapped
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def commands(app: typer.Typer, path: str = "overnight") -> list[tuple[str, str | None]]:
    """Every command and group under `app`, with the docstring or help text typer shows for it."""
    found: list[tuple[str, str | None]] = []
    for command in app.registered_commands:
        assert command.callback is not None
        name = command.name or command.callback.__name__.replace("_", "-")
        found.append((f"{path} {name}", command.callback.__doc__))
    for group in app.registered_groups:
        assert group.typer_instance is not None
        found.append((f"{path} {group.name}", group.typer_instance.info.help))
        found += commands(group.typer_instance, f"{path} {group.name}")
    return found


def test_every_command_has_a_one_line_summary() -> None:
    """`overnight --help` shows each command's first paragraph: one line of source, a sentence, then the details."""
    listed = commands(cli.app)
    assert {"overnight canary start batch", "overnight canary start model", "overnight canary ramp"} <= {
        name for name, _ in listed
    }
    for name, text in listed:
        assert isinstance(text, str) and text.strip(), f"{name} has no help"
        summary = inspect.cleandoc(text).split("\n\n")[0]
        assert "\n" not in summary and summary.endswith("."), f"{name}: {summary!r}"
        assert len(summary) <= 110, f"{name}: a summary of {len(summary)} characters"


def test_the_help_lists_summaries_and_points_to_the_configuration_page(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, top, _ = run_cli(monkeypatch, capsys, "--help")
    assert code == 0 and "docs/configuration.md" in top and (ROOT / "docs" / "configuration.md").is_file()
    # every summary whole, wrapped to the terminal rather than cut
    words = " ".join(top.split())
    assert "Search the settings a retrain on the date would use and print the best; nothing is trained" in words
    assert "..." not in top.replace("COMMAND [ARGS]...", "")
    code, run, _ = run_cli(monkeypatch, capsys, "run", "--help")
    assert code == 0 and "…" not in run and "OVERNIGHT_SCORE_SHARDS" in run and "interactions/items/users" in run
    code, started, _ = run_cli(monkeypatch, capsys, "canary", "start", "--help")
    assert code == 0
    assert "batch " in started and "model " in started
    for hidden in ("--batch", "--model", "--salt", "--allow-shrink"):  # the old form's, read only to name the new
        assert hidden not in started, hidden
    code, drift, _ = run_cli(monkeypatch, capsys, "drift", "--help")
    # the details are one paragraph, not the source's lines
    assert code == 0 and "Input statistics, feature drift (PSI, KS) against the model's training reference" in " ".join(
        drift.split()
    )


@pytest.mark.parametrize(
    ("args", "now"),
    [
        (["canary", "start", "--batch", "5", "--traffic", "0.1"], "`overnight canary start batch 5 --traffic 0.1`"),
        (["canary", "start", "--model", "M1", "--traffic", "0.1"], "`overnight canary start model M1 --traffic 0.1`"),
        (
            ["canary", "start", "--model", "M1", "--traffic", "0.1", "--date", "2026-11-20", "--shards", "4"],
            "`overnight canary start model M1 --traffic 0.1 --date 2026-11-20 --shards 4`",
        ),
        (
            ["canary", "start", "--batch", "5", "--traffic", "0.1", "--salt", "a b", "--json"],
            "`overnight canary start batch 5 --traffic 0.1 --salt 'a b' --json`",
        ),
        (
            ["canary", "start", "--traffic", "0.1"],
            "`overnight canary start batch B --traffic 0.1` or `overnight canary start model M --traffic 0.1`",
        ),
        (
            ["canary", "start", "--batch", "5", "--traffic", "0.2", "--allow-shrink"],
            "`overnight canary ramp --traffic 0.2 --allow-shrink`",
        ),
        (["canary", "start", "batch", "5", "--traffic", "0.2", "--allow-shrink"], "`overnight canary ramp --traffic T"),
        (
            ["canary", "start", "batch", "5", "--traffic", "0.2", "--date", "2026-11-20"],
            "`overnight canary start model",
        ),
        (["canary", "--batch", "5", "--traffic", "0.1"], "`overnight canary start batch B --traffic T`"),
        (["canary", "--model", "M1", "--traffic", "0.1"], "`overnight canary start model M --traffic T`"),
        (["canary", "--salt", "x", "--batch", "5"], "`overnight canary start batch B --traffic T --salt S` or"),
        (["canary", "--date", "2026-11-20"], "`overnight canary refresh --date X`"),
        (["canary", "--allow-shrink", "--traffic", "0.1"], "`overnight canary ramp --traffic T --allow-shrink`"),
    ],
)
def test_an_old_canary_form_is_a_usage_error_naming_the_new_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], now: str
) -> None:
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert (code, out) == (2, "")
    [line] = err.strip().splitlines()
    assert line.startswith("overnight: error: ") and now in line, line
    assert "Possible options" not in line  # click's guess among the group's own options would mislead


def test_minus_h_is_help_everywhere(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(monkeypatch, capsys, "canary", "-h")
    assert code == 0 and out.startswith("Usage: overnight canary [OPTIONS] COMMAND [ARGS]...")


@dataclass(frozen=True)
class Stepped:
    summary: str
    rows_in: int | None = None
    rows_out: int | None = None
    batch_id: int | None = None


def test_text_output_leaves_out_unset_fields_and_json_keeps_them(capsys: pytest.CaptureFixture[str]) -> None:
    cli._echo(Stepped("features for 2026-11-20", rows_out=12))
    assert capsys.readouterr().out == "summary: features for 2026-11-20\nrows_out: 12\n"
    cli._echo(Stepped("features for 2026-11-20", rows_out=12), as_json=True)
    assert '"rows_in": null' in capsys.readouterr().out


def test_the_demo_prints_no_link_with_a_key() -> None:
    """A key in a URL reaches browser history and proxies' logs: the demo sends it as a header only and
    points at the dashboard's sign-in form."""
    result = SimpleNamespace(
        api_key="demo-secret",
        user_id="u1",
        newcomer_id="u9",
        run=SimpleNamespace(batch_id=3, model_id="ranker-1"),
        live=True,
    )
    shown = "\n".join(cli.demo_lines(result, 8000, 8001))  # type: ignore[arg-type]
    assert shown.startswith("batch 3 is live (model ranker-1). API key: demo-secret")
    urls = re.findall(r"https?://[^\s\"]+", shown)
    assert len(urls) == 3 and not [url for url in urls if "demo-secret" in url or "key=" in url], urls
    assert shown.count("demo-secret") == 3  # printed once, then in each curl's Authorization header
    assert 'curl -H "Authorization: Bearer demo-secret"' in shown
    assert "http://127.0.0.1:8001/dashboard  (sign in with the API key)" in shown


def test_no_doc_leads_anyone_to_a_link_with_a_key() -> None:
    """The docs lead to the console's sign-in form: a URL carrying a key (``?key=``, ``&api_key=``) in the
    README, docs/, the deployment files or the example environment would put it in browser history and logs."""
    places = [ROOT / "README.md", ROOT / ".env.example", ROOT / "docker-compose.yml"]
    places += sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "deploy").rglob("*.*"))
    linked = [
        f"{path.relative_to(ROOT)}: {url}"
        for path in places
        for url in re.findall(r"https?://\S+|/(?:dashboard|console|v1)\S*", path.read_text())
        if re.search(r"[?&;](?:api_?|x-api-)?key=(?!\.\.\.)", url, re.IGNORECASE)
    ]
    assert len(places) > 10 and not linked, linked


def test_the_demo_never_says_a_batch_is_live_that_is_not() -> None:
    """A newer date already live in the data folder keeps the demo's batch back: the demo says so and how
    to serve its batch, rather than pointing at answers from another batch."""
    summary = "batch 12, 3,000 users, not live: live batch is of a newer date (2026-12-07)"
    result = SimpleNamespace(
        api_key="k",
        user_id="u1",
        newcomer_id=None,
        run=SimpleNamespace(batch_id=12, model_id="ranker-1", logical_date="2026-12-06"),
        live=False,
        publish_summary=summary,
    )
    first = cli.demo_lines(result, 8000, 8001)[0]  # type: ignore[arg-type]
    assert "is live" not in first.split(":")[0] and first.startswith(summary)
    assert "`overnight publish --date 2026-12-06 --live`" in first


def test_the_demo_refuses_a_port_in_use_before_any_work(tmp_path: Path) -> None:
    import socket
    import subprocess

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            "PATH": "/usr/bin:/bin",
            "OVERNIGHT_DATA_DIR": str(tmp_path),
            "OVERNIGHT_DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
        }
        refused = subprocess.run(
            [sys.executable, "-m", "jobs.cli", "demo", "--port", str(port)],
            env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert f"Invalid value for --port: port {port} on 127.0.0.1 is taken" in refused.stderr
    assert not (tmp_path / "sample").exists()  # refused before generating anything
