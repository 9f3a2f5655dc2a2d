"""The `overnight` command as a user runs it: the whole pipeline, status, freshness and clear failures."""

import json
import re
from pathlib import Path

import httpx
import polars as pl
import psycopg
import pytest

from tests.support.commands import overnight, overnight_env, running_service
from tests.support.data import SAMPLE_DATE

pytestmark = pytest.mark.integration


@pytest.fixture
def env(database_url: str, tmp_path: Path) -> dict[str, str]:
    return overnight_env(database_url, tmp_path / "var", OVERNIGHT_API_KEYS="cli-test-key")


def test_run_publishes_a_fresh_batch_that_status_shows_and_serve_answers(
    env: dict[str, str], sample_source: Path
) -> None:
    run = overnight("run", "--source", str(sample_source), "--date", SAMPLE_DATE.isoformat(), env=env)
    steps = ["ingest", "features", "candidates", "train", "refit-candidates", "score", "monitor", "publish"]
    steps += ["check-freshness", "shadow", "refresh-canary", "online"]  # the DAG's tasks after publish, one graph
    for number, step in enumerate(steps, 1):
        assert f"[{number}/12] {step} done in" in run.stderr
    assert re.search(r"refit-candidates done in [0-9.]+s: skipped: the candidate tables fit ", run.stderr)
    assert re.search(r"shadow done in [0-9.]+s: skipped: no shadow_model param", run.stderr)
    assert "canary not refreshed" in run.stderr and "daily partitions created" in run.stderr
    assert "batch 1 is published" in run.stdout

    status = json.loads(overnight("status", "--json", env=env).stdout)
    assert status["live"]["batch_id"] == 1
    assert status["live"]["logical_date"] == SAMPLE_DATE.isoformat()
    assert status["production_model"]["metrics"]["ndcg@10"] >= 0

    fresh = json.loads(overnight("check-freshness", "--json", env=env).stdout)
    assert fresh["ok"] and fresh["coverage"] == 1.0

    with running_service(env) as base:
        user = "1"
        response = httpx.get(
            f"{base}/v1/users/{user}/recommendations",
            params={"k": 10},
            headers={"Authorization": "Bearer cli-test-key"},
        )
        assert response.status_code == 200
        body = response.json()
        assert body["source"] == "personalized"
        assert len(body["items"]) == 10
        assert response.headers["X-Batch-Id"] == "1"


def test_single_steps_run_through_the_nightly_runner_and_are_each_a_run_in_the_history(
    env: dict[str, str], database_url: str, sample_source: Path
) -> None:
    day = SAMPLE_DATE.isoformat()
    overnight("ingest", "--source", str(sample_source), "--date", day, env=env)
    for step in ("features", "candidates", "train"):
        overnight(step, "--date", day, env=env)
    again = overnight("train", "--date", day, env=env)  # by hand it trains even though the model is current
    assert "trained: true" in again.stdout and "[1/1] train done in" in again.stderr, again.stdout
    one_shard = overnight("score", "--date", day, "--shards", "2", "--shard", "1", env=env)
    assert " users in 1 shard(s)" in one_shard.stdout, one_shard.stdout
    missing = overnight("score", "--date", day, "--shard", "7", env=env, check=False)
    assert missing.returncode == 1 and "there is no shard 7" in missing.stderr.splitlines()[-1], missing.stderr
    for step in ("score", "monitor", "publish"):
        done = overnight(step, "--date", day, env=env)
        assert done.stdout.splitlines()[-1].startswith("summary: "), done.stdout
    with psycopg.connect(database_url) as conn:
        runs = conn.execute(
            "SELECT r.status, array_agg(s.step) FROM overnight.runs AS r JOIN overnight.run_steps AS s USING (run_id) "
            "GROUP BY r.run_id ORDER BY r.run_id"
        ).fetchall()
    by_hand = ["ingest", "features", "candidates", "train", "train", "score", "score", "score", "monitor", "publish"]
    assert [steps for _, steps in runs] == [[step] for step in by_hand]
    assert [status for status, _ in runs] == ["success"] * 6 + ["failed"] + ["success"] * 3


def test_a_night_publishes_what_similar_session_segment_and_filtered_answers_are_served_from(
    database_url: str, tmp_path: Path, sample_source: Path
) -> None:
    """The lists a real night publishes beside the users' (items' neighbours, attributes, segments), served."""
    env = overnight_env(
        database_url,
        tmp_path / "var",
        OVERNIGHT_API_KEYS="cli-test-key",
        OVERNIGHT_SEGMENT_ATTRIBUTE="country",
        OVERNIGHT_SEGMENT_MIN_USERS="5",
    )
    overnight("run", "--source", str(sample_source), "--date", SAMPLE_DATE.isoformat(), env=env)
    items = pl.read_parquet(sample_source / "items.parquet")
    users = pl.read_parquet(sample_source / "users.parquet")
    active = pl.read_parquet(sample_source / "interactions.parquet")["user_id"].unique()
    signed_up = users.filter(pl.col("user_id").is_in(active.implode()).not_()).row(0, named=True)
    genres = dict(zip(items["item_id"], items["genres"].to_list(), strict=True))
    headers = {"Authorization": "Bearer cli-test-key"}
    with running_service(env) as base, httpx.Client(base_url=base, headers=headers) as client:
        listed = [i["item_id"] for i in client.get("/v1/users/1/recommendations").json()["items"]]

        similar = client.get(f"/v1/items/{listed[0]}/similar", params={"k": 5}).json()
        assert similar["source"] == "similar" and len(similar["items"]) == 5
        assert listed[0] not in [i["item_id"] for i in similar["items"]]

        session = client.post("/v1/recommendations:session", json={"items": listed[:2], "k": 5}).json()
        assert session["source"] == "session" and len(session["items"]) == 5
        assert not set(listed[:2]) & {i["item_id"] for i in session["items"]}

        newcomer = client.get(f"/v1/users/{signed_up['user_id']}/recommendations").json()
        assert newcomer["source"] == "fallback" and newcomer["segment"] == signed_up["country"]

        genre = genres[listed[0]][0]
        filtered = client.get("/v1/users/1/recommendations", params={"filter": f"genre:{genre}", "k": 5})
        assert filtered.status_code == 200
        assert all(genre in genres[i["item_id"]] for i in filtered.json()["items"])
        unknown = client.get("/v1/users/1/recommendations", params={"filter": "colour:red"})
        assert unknown.status_code == 422 and "colour" in unknown.text


def test_stale_batch_fails_freshness_with_one_line(env: dict[str, str], sample_source: Path) -> None:
    overnight("run", "--source", str(sample_source), "--date", SAMPLE_DATE.isoformat(), env=env)
    stale = overnight("check-freshness", "--max-age-hours", "0.0000001", env=env, check=False)
    assert stale.returncode == 1
    assert stale.stderr.strip().count("\n") == 0
    assert stale.stderr.startswith("overnight: error: live batch 1 (")
    assert "h old (limit 1e-07 h)" in stale.stderr
    short = overnight("check-freshness", "--min-coverage", "1.5", env=env, check=False)
    assert short.returncode == 2  # rejected as a bad option value before anything runs


def test_nothing_live_is_a_freshness_failure(env: dict[str, str]) -> None:
    overnight("db", "upgrade", env=env)
    result = overnight("check-freshness", env=env, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "overnight: error: nothing is live: no batch has been published yet"


def test_bad_input_fails_with_a_one_line_reason(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "events.csv"
    bad.write_text("user,item_id,timestamp\n1,2,2026-11-01\n")
    result = overnight("ingest", "--source", str(bad), "--date", "2026-11-20", env=env, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "overnight: error: events.csv: missing required column user_id (found: user, item_id, timestamp)"
    )
    wrong_date = overnight("ingest", "--source", str(bad), "--date", "2026-13-01", env=env, check=False)
    assert wrong_date.returncode == 2
    assert "is not a date like 2026-11-22" in wrong_date.stderr


def test_control_characters_in_a_source_name_never_reach_the_terminal_or_the_run_history(
    env: dict[str, str], tmp_path: Path, database_url: str
) -> None:
    hostile = tmp_path / "e\x1b[2Jvil.csv"
    hostile.write_text("user_id,item_id,timestamp\nu1,,2026-11-10\nu2,i2,2026-11-10\n")
    result = overnight("ingest", "--source", str(hostile), "--date", "2026-11-20", env=env, check=False)
    assert result.returncode == 1
    assert "\x1b" not in result.stderr
    assert r"e\x1b[2Jvil.csv: 50.0% of 2 rows are bad" in result.stderr
    with psycopg.connect(database_url) as conn:
        recorded = conn.execute(
            "SELECT r.error, s.error FROM overnight.runs r JOIN overnight.run_steps s USING (run_id)"
        ).fetchall()
    assert recorded
    for run_error, step_error in recorded:
        assert "\x1b" not in run_error + step_error
        assert run_error.count(r"e\x1b[2Jvil.csv") == step_error.count(r"e\x1b[2Jvil.csv") == 2  # source, quarantine


def test_steps_that_need_earlier_steps_say_which(env: dict[str, str]) -> None:
    no_model = overnight("score", "--date", "2026-11-20", env=env, check=False)
    assert no_model.returncode == 1
    assert (
        "no promoted model trained on or before 2026-11-20; run `overnight train --date 2026-11-20`" in no_model.stderr
    )
    no_scores = overnight("publish", "--date", "2026-11-20", env=env, check=False)
    assert no_scores.returncode == 1
    assert "no scores for 2026-11-20" in no_scores.stderr
    no_batch = overnight("rollback", env=env, check=False)
    assert no_batch.returncode == 1
    assert "nothing is live" in no_batch.stderr


def test_serve_refuses_to_start_without_keys(env: dict[str, str]) -> None:
    keyless = {k: v for k, v in env.items() if k != "OVERNIGHT_API_KEYS"}
    result = overnight("serve", "--port", "1", env=keyless, check=False, timeout=60)
    assert result.returncode == 1
    assert "--no-auth" in result.stderr


def test_help_explains_every_command(env: dict[str, str]) -> None:
    top = overnight("--help", env=env).stdout
    for command in [
        "ingest",
        "train",
        "score",
        "publish",
        "run",
        "check-freshness",
        "rollback",
        "status",
        "serve",
        "db",
        "demo",
    ]:
        assert command in top
    assert "--source" in overnight("run", "--help", env=env).stdout


def test_a_bad_setting_is_a_one_line_reason(env: dict[str, str]) -> None:
    for weights, message in (
        ("view=1,cart", "OVERNIGHT_EVENT_WEIGHTS: 'cart' is not type=weight"),
        ("view=1,purchase=-8", "OVERNIGHT_EVENT_WEIGHTS: 'purchase=-8' is not type=weight"),
        ("view=1,view=2", "OVERNIGHT_EVENT_WEIGHTS: event type 'view' is given twice"),
    ):
        result = overnight(
            "train", "--date", "2026-11-20", env={**env, "OVERNIGHT_EVENT_WEIGHTS": weights}, check=False
        )
        assert result.returncode == 1, (weights, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"overnight: error: {message}"), (weights, lines)
        assert "e.g. view=1,cart=3,purchase=8" in lines[0]


def test_generate_writes_what_ingest_reads_and_refuses_bad_options(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "generated"
    made = overnight(
        "generate", "--out", str(out), "--users", "300", "--items", "80", "--days", "20",
        "--end-date", SAMPLE_DATE.isoformat(), "--drift-from", "2026-11-15", env=env,
    )  # fmt: skip
    assert made.stdout.startswith("wrote ") and "of 300 users over 80 items" in made.stdout
    assert "generate: 300 of 300 users" in made.stderr  # progress
    assert sorted(p.name for p in out.iterdir()) == ["interactions", "items.parquet", "users.parquet"]
    ingested = overnight("ingest", "--source", str(out), "--date", SAMPLE_DATE.isoformat(), env=env)
    assert "rows_quarantined: 0" in ingested.stdout
    bad = overnight("generate", "--out", str(out), "--format", "json", env=env, check=False)
    assert bad.returncode != 0 and "is not parquet or csv" in bad.stderr


def test_usage_errors_are_one_line_with_exit_2(env: dict[str, str]) -> None:
    """The CLI contract (`overnight: error: ...`) holds for usage errors too, not only for failed steps."""
    for args, message in (
        (["canary", "start", "batch", "1"], "Missing option '--traffic'"),
        (["canary", "start", "model"], "Missing argument 'M'"),
        (["canary", "start", "batch", "1", "--traffic", "5%"], "Invalid value for '--traffic'"),
        # a night's date a typo puts in the future would go live and hold every real night back
        (["run", "--source", "x", "--date", "2999-01-01"], "Invalid value for '--date': 2999-01-01 is after today"),
        (["publish", "--date", "2999-01-01"], "is after today"),
        (["ingest", "--source", "x", "--date", "2026-11-20", "--format", "bogus"], "is not one of auto, movielens"),
        (["evaluate", "--source", "x", "--protocol", "bogus"], "is not one of user-holdout, global"),
        (["evaluate", "--source", "x", "--cutoff", "2026-11-01"], "--cutoff belongs to --protocol global"),
        (["serve", "--server", "bogus"], "is not one of granian, uvicorn"),
        (["canary", "stop", "--batch", "3"], "No such option: --batch"),
        # the single command's options became sub-commands: the error says which
        (["canary", "--batch", "1", "--traffic", "0.1"], "`overnight canary start batch B --traffic T`"),
        (["canary", "--stop"], "`overnight canary stop`"),
        # so did `canary start`'s --batch and --model
        (["canary", "start", "--batch", "1", "--traffic", "0.1"], "`overnight canary start batch 1 --traffic 0.1`"),
        (["canary", "start", "--traffic", "0.1"], "`overnight canary start model M --traffic 0.1`"),
        (["online-report", "--from", "2026-13-01", "--to", "2026-11-02"], "'2026-13-01' is not a date like"),
        (["online-report", "--from", "2026-11-01", "--to", "2026-11-02", "--eta", "-1"], "Invalid value for '--eta'"),
        (["score"], "Missing option '--date'"),
        (["score", "--date", "2026-11-20", "--bogus"], "No such option: --bogus"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ):
        result = overnight(*args, env=env, check=False)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("overnight: error: ") and message in lines[0], (args, lines)
        assert result.stdout == ""
    helped = overnight("canary", "start", "batch", "--help", env=env)
    assert "--traffic" in helped.stdout and helped.stderr == ""


def test_an_error_no_code_foresaw_is_still_one_line_with_exit_1(
    env: dict[str, str], sample_source: Path, tmp_path: Path
) -> None:
    """A file where the data folder should be, say: one line naming the error, no traceback (-v shows it)."""
    not_a_folder = tmp_path / "afile"
    not_a_folder.write_text("")
    failed = overnight(
        "ingest",
        "--source",
        str(sample_source),
        "--date",
        str(SAMPLE_DATE),
        env={**env, "OVERNIGHT_DATA_DIR": str(not_a_folder)},
        check=False,
    )
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    (line,) = failed.stderr.strip().splitlines()[-1:]
    assert re.match(
        r"overnight: error: (NotADirectoryError|FileExistsError): .* \(run with -v for the traceback\)$", line
    )


def test_db_stop_says_what_it_did_to_the_embedded_postgres(tmp_path: Path) -> None:
    """Without OVERNIGHT_DATABASE_URL a command starts an embedded Postgres under the data dir, which keeps
    running; `db stop` stops it, and says so only when it did."""
    env = {k: v for k, v in overnight_env("", tmp_path / "var").items() if k != "OVERNIGHT_DATABASE_URL"}
    assert overnight("db", "stop", env=env).stdout.startswith("no embedded Postgres in ")
    try:
        assert json.loads(overnight("status", "--json", env=env).stdout)["live"] is None  # starts it
    finally:
        stopped = overnight("db", "stop", env=env).stdout
    assert stopped.startswith("stopped the embedded Postgres in "), stopped
    assert "is not running" in overnight("db", "stop", env=env).stdout
