"""docker-compose.yml, the Dockerfile and .env.example agree with each other and with the code.

No Docker engine runs here, so these files are checked by reading them: every command a service
runs exists in the CLI it calls, every secret comes from .env, every long-running service has a
healthcheck, the images pin the same Airflow as the lock file, and each image holds its role's code only.
"""

import importlib
import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from jobs.cli import app

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
ONE_SHOT = {"airflow-init"}
AIRFLOW_SERVICES = {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "airflow-worker"}  # fmt: skip


def commands(service: dict) -> list[list[str]]:
    """Every program invocation in a service's command, split on shell `&&`."""
    command = service.get("command")
    if command is None:
        return []
    words = shlex.split(command) if isinstance(command, str) else list(command)
    if words[:2] == ["bash", "-c"]:
        parts = [shlex.split(part) for part in words[2].split("&&")]
        return [part[1:] if part[0] == "exec" else part for part in parts]
    return [words]


def test_the_expected_services_are_there() -> None:
    assert set(SERVICES) == {"postgres", "redis", "lookup", "lookup-proxy", "console"} | AIRFLOW_SERVICES


@pytest.mark.parametrize("name", sorted(set(SERVICES) - ONE_SHOT))
def test_long_running_services_have_healthchecks_and_restart(name: str) -> None:
    service = SERVICES[name]
    assert service["healthcheck"]["test"], name
    assert service["restart"] == "unless-stopped"


# The entry points of the images that hold no `overnight` CLI: `python -m <package>` and its argparse parser.
ENTRY_POINTS = {"serving": "serving.server", "console": "console.server"}


def test_every_overnight_command_exists_with_its_options() -> None:
    cli = typer.main.get_command(app)
    seen = 0
    for service in SERVICES.values():
        for words in commands(service):
            if words[:2] == ["python", "-m"]:
                assert words[2] in ENTRY_POINTS, f"`{' '.join(words)}`: not an entry point of overnight"
                parser = importlib.import_module(ENTRY_POINTS[words[2]]).build_parser()
                parser.exit_on_error = False
                parser.parse_args(words[3:])  # an unknown option or a bad value raises
                seen += 1
                continue
            if words[0] != "overnight":
                continue
            seen += 1
            command: Any = cli
            rest = words[1:]
            while hasattr(command, "commands"):  # a group: descend into its subcommand
                assert rest and rest[0] in command.commands, f"`{' '.join(words)}` is not an overnight command"
                command, rest = command.commands[rest[0]], rest[1:]
            options = {opt for param in command.params for opt in param.opts}
            for word in rest:
                if word.startswith("--"):
                    assert word in options, f"`{' '.join(words)}`: {word} is not an option of that command"
    assert seen >= 3


def healthcheck(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", "healthchecks run a program directly, without a shell"
    return list(test[1:])


def test_every_airflow_command_exists() -> None:
    invocations = [words[1:] for s in SERVICES.values() for words in commands(s) if words[0] == "airflow"]
    invocations += [
        healthcheck(s)[1:] for s in SERVICES.values() if "healthcheck" in s and healthcheck(s)[0] == "airflow"
    ]
    assert {"scheduler", "dag-processor", "triggerer", "api-server"} <= {words[0] for words in invocations}
    script = (
        "import sys, json\n"
        "from airflow.cli.cli_parser import get_parser\n"
        "parser = get_parser()\n"
        "for words in json.loads(sys.argv[1]):\n"
        "    parser.parse_args([w for w in words if not w.startswith('--') or w in ('--local', '--job-type')])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps([w for w in invocations if w[0] != "celery"])],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def referenced_variables(text: str) -> set[str]:
    """${NAME}, ${NAME:?...} and ${NAME:-default} references; $$ escapes are not references."""
    return {m.group(1) for m in re.finditer(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)(?::[-?][^}]*)?\}", text)}


def test_every_variable_comes_from_env_example_and_no_secret_is_committed() -> None:
    example = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert referenced_variables((ROOT / "docker-compose.yml").read_text()) <= example
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    assert not (ROOT / ".env").exists() or ".env" in (ROOT / ".gitignore").read_text()


def test_secrets_are_required_not_defaulted() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in (
        "POSTGRES_PASSWORD",
        "OVERNIGHT_DB_PASSWORD",
        "OVERNIGHT_LOOKUP_DB_PASSWORD",
        "OVERNIGHT_CONSOLE_DB_PASSWORD",
        "OVERNIGHT_API_KEYS",
        "AIRFLOW_SECRET_KEY",
        "AIRFLOW_ADMIN_PASSWORD",
    ):
        assert f"${{{secret}:?" in text, f"{secret} must fail loudly when .env does not set it"


def test_images_pin_the_locked_airflow_and_build_both_targets() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    pinned = re.search(r"ARG AIRFLOW_VERSION=(\S+)", dockerfile)
    assert pinned is not None
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {p["name"]: p["version"] for p in lock["package"]}
    assert pinned.group(1) == locked["apache-airflow"]
    targets = set(re.findall(r"^FROM .* AS (\w+)$", dockerfile, flags=re.MULTILINE))
    for name in AIRFLOW_SERVICES:
        assert SERVICES[name]["build"]["target"] == "airflow"
    assert SERVICES["lookup"]["build"]["target"] == "lookup"
    assert SERVICES["console"]["build"]["target"] == "console"
    assert {"airflow", "lookup", "console"} <= targets
    assert "COPY --chown=airflow:root dags /opt/airflow/dags" in dockerfile


def test_the_lookup_service_has_keys_and_the_batch_side_shares_the_lake() -> None:
    assert "OVERNIGHT_API_KEYS" in SERVICES["lookup"]["environment"]
    assert "OVERNIGHT_API_KEYS" in SERVICES["console"]["environment"]  # the dashboard keys' fallback
    for name in AIRFLOW_SERVICES:
        assert "lake:/opt/overnight/var" in SERVICES[name]["volumes"]
        assert "airflow-logs:/opt/airflow/logs" in SERVICES[name]["volumes"]
    assert set(COMPOSE["volumes"]) == {"pgdata", "lake", "airflow-logs"}


def test_every_airflow_component_checks_its_own_job_type() -> None:
    for name, job_type in [
        ("airflow-scheduler", "SchedulerJob"),
        ("airflow-dag-processor", "DagProcessorJob"),
        ("airflow-triggerer", "TriggererJob"),
    ]:
        check = healthcheck(SERVICES[name])
        assert check[:3] == ["airflow", "jobs", "check"], name
        assert check[check.index("--job-type") + 1] == job_type, name
    apiserver = SERVICES["airflow-apiserver"]
    assert "8080:8080" in apiserver["ports"]
    assert "http://localhost:8080/api/v2/" in " ".join(healthcheck(apiserver))
    assert SERVICES["airflow-worker"]["command"] == "airflow celery worker"
    environment = SERVICES["airflow-scheduler"]["environment"]
    assert environment["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert environment["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    assert environment["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"


def _serve_port(service: dict, entry_point: str = "serving") -> int:
    words = next(w for w in commands(service) if w[:3] == ["python", "-m", entry_point])
    return int(words[words.index("--port") + 1])


def test_two_lookup_replicas_answer_behind_one_port() -> None:
    lookup, proxy = SERVICES["lookup"], SERVICES["lookup-proxy"]
    port = _serve_port(lookup)
    assert lookup["deploy"]["replicas"] >= 2
    assert "ports" not in lookup, "replicas cannot share a host port; the proxy publishes it"
    assert str(port) in lookup["expose"]
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(healthcheck(lookup))
    assert proxy["ports"] == [f"{port}:8000"]
    assert "http://127.0.0.1:8000/healthz" in healthcheck(proxy)
    assert proxy["depends_on"]["lookup"]["condition"] == "service_healthy"
    assert "./deploy/nginx-lookup.conf:/etc/nginx/conf.d/default.conf:ro" in proxy["volumes"]
    text = (ROOT / "deploy" / "nginx-lookup.conf").read_text()
    assert f"server lookup:{port} resolve;" in text  # the compose service name and the port it serves on
    assert "listen 8000;" in text
    assert "/healthz" in _lookup_routes()


def _lookup_routes() -> set[str]:
    from serving.app import ops

    return {route.path for route in ops.routes}  # type: ignore[attr-defined]


def test_a_stopping_lookup_replica_has_time_to_write_out_what_it_holds() -> None:
    from serving.app import WRITER_DRAIN_SECONDS

    grace = SERVICES["lookup"]["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) >= 2 * WRITER_DRAIN_SECONDS, "a SIGKILL during the drain loses accepted events"


def test_the_proxy_never_sends_a_feedback_post_to_a_second_replica() -> None:
    text = (ROOT / "deploy" / "nginx-lookup.conf").read_text()
    events = text.split("location = /v1/events {", 1)[1].split("}", 1)[0]
    assert "proxy_pass http://lookup;" in events
    assert "proxy_next_upstream" in events and "non_idempotent" not in events


# ------------------------------------------------------------------ database roles

INIT_DIR = ROOT / "deploy" / "postgres-init"
OWNER, LOOKUP_ROLE, SERVING_GROUP = "overnight", "overnight_lookup", "overnight_serving"
CONSOLE_ROLE, CONSOLE_GROUP = "overnight_console_login", "overnight_console"
PASSWORD_OF = {
    OWNER: "OVERNIGHT_DB_PASSWORD",
    LOOKUP_ROLE: "OVERNIGHT_LOOKUP_DB_PASSWORD",
    CONSOLE_ROLE: "OVERNIGHT_CONSOLE_DB_PASSWORD",
}
# each login role and the one group role it joins
GROUP_OF = {LOOKUP_ROLE: SERVING_GROUP, CONSOLE_ROLE: CONSOLE_GROUP}
_POSTGRES_URL = re.compile(
    r"^(?:db\+)?postgresql(?:\+\w+)?://(?P<user>[^:@/]+)(?::(?P<password>[^@]*))?@postgres:5432/(?P<db>\w+)$"
)


def _environment(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {name: str(value) for name, value in environment.items()}


def postgres_logins(service: dict) -> list[tuple[str, str, str]]:
    """(user, password, database) of every Postgres URL in a service's environment."""
    logins = []
    for name, value in _environment(service).items():
        if "postgresql" in value:
            match = _POSTGRES_URL.match(value)
            assert match, f"{name}={value} is not a postgresql://user:password@postgres:5432/db URL"
            logins.append((match["user"], match["password"] or "", match["db"]))
    return logins


def _init_sql() -> str:
    """Every init script's text, in the order the postgres image runs them, whitespace collapsed."""
    files = sorted(p for p in INIT_DIR.iterdir() if p.suffix in {".sql", ".sh"})
    return re.sub(r"\s+", " ", "\n".join(p.read_text() for p in files))


def test_each_service_connects_to_postgres_as_its_own_role_never_the_superuser() -> None:
    expected = {"lookup": {LOOKUP_ROLE}, "console": {CONSOLE_ROLE}} | {name: {OWNER} for name in AIRFLOW_SERVICES}
    for name, service in SERVICES.items():
        logins = postgres_logins(service)
        assert {user for user, _, _ in logins} == expected.get(name, set()), name
        for user, password, _ in logins:
            assert password.startswith(f"${{{PASSWORD_OF[user]}"), f"{name} logs in as {user} with {password}"
        if name != "postgres":
            # only the postgres service itself (and the init scripts it runs) knows the superuser
            text = yaml.safe_dump(service)
            assert "POSTGRES_PASSWORD" not in text, name
            assert not re.search(r"//postgres[:@]|-U\W+postgres|PGUSER", text), name
    # the batch side's OVERNIGHT_DATABASE_URL and Airflow's own database, both as the owner
    assert {db for _, _, db in postgres_logins(SERVICES["airflow-worker"])} == {"overnight", "airflow"}
    # the lookup service and the console start once the migrations (run as the owner) made the schema and grants
    for name in ("lookup", "console"):
        assert SERVICES[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    # the console reads with its own DSN, never the batch side's
    assert "OVERNIGHT_DATABASE_URL" not in _environment(SERVICES["console"])
    assert _environment(SERVICES["console"])["OVERNIGHT_CONSOLE_DATABASE_URL"].startswith(
        f"postgresql://{CONSOLE_ROLE}:"
    )
    assert ["overnight", "db", "upgrade"] in commands(SERVICES["airflow-init"])


def test_the_roles_are_created_at_database_init() -> None:
    postgres = SERVICES["postgres"]
    assert "./deploy/postgres-init:/docker-entrypoint-initdb.d:ro" in postgres["volumes"]
    # while the init scripts run, the image's server listens on its Unix socket only: a check over TCP
    # keeps every dependent waiting until the roles exist
    check = healthcheck(postgres)
    assert check[0] == "pg_isready" and "-h" in check, "a check over the Unix socket passes during init"
    assert check[check.index("-h") + 1] == "127.0.0.1"
    sql = _init_sql()
    for role, attributes in [(OWNER, "LOGIN NOSUPERUSER"), (LOOKUP_ROLE, "LOGIN NOSUPERUSER"),
                             (SERVING_GROUP, "NOLOGIN NOSUPERUSER"), (CONSOLE_ROLE, "LOGIN NOSUPERUSER"),
                             (CONSOLE_GROUP, "NOLOGIN NOSUPERUSER")]:  # fmt: skip
        assert f"'CREATE ROLE {role}' WHERE NOT EXISTS" in sql, role
        assert f"ALTER ROLE {role} WITH {attributes}" in sql, role
    for login, group in GROUP_OF.items():
        assert f"GRANT {group} TO {login};" in sql
        assert f"GRANT CONNECT ON DATABASE overnight TO {group};" in sql
    # every role-to-role grant is a login joining its own group, and the owner joins none
    grants = re.findall(r"GRANT (\w+) TO (\w+);", sql)
    assert grants and {(group, login) for group, login in grants} == {(g, lg) for lg, g in GROUP_OF.items()}
    assert not re.search(rf"GRANT \w+ TO {OWNER}\b", sql)
    # passwords: from the postgres service's environment, into psql variables quoted as literals, in a
    # session that never logs its statements
    environment = _environment(postgres)
    assert -1 < sql.find("SET log_statement = 'none';") < sql.find("SET log_min_error_statement = 'panic';")
    first_read = re.search(r"\\getenv \w+ [A-Z_]+\b", sql)
    assert first_read and sql.find("SET log_min_error_statement = 'panic';") < first_read.start()
    for role, variable in PASSWORD_OF.items():
        read = re.search(rf"\\getenv (\w+) {variable}\b", sql)
        assert read, f"{variable} is not read by the init scripts"
        assert re.search(rf"ALTER ROLE {role} WITH [A-Z ]+ PASSWORD :'{read[1]}';", sql), role
        assert environment[variable] == f"${{{variable}:?set it in .env}}"
    # the owner owns every database a service logs in to, and the lookup role may connect to its own only
    databases = {db for service in SERVICES.values() for _, _, db in postgres_logins(service)}
    assert databases == {"overnight", "airflow"}
    for db in databases:
        assert f"ALTER DATABASE {db} OWNER TO {OWNER};" in sql, db
        assert f"REVOKE ALL ON DATABASE {db} FROM PUBLIC;" in sql, db
    assert sql.index("CREATE DATABASE airflow") < sql.index("ALTER DATABASE airflow OWNER")
    # Migration 0003 creates overnight_serving only when it is missing, so the group made here is kept
    # and granted its rights by the owner, which needs no CREATEROLE.
    for migration_file, group in [("0003_serving_role.sql", SERVING_GROUP), ("0018_console_role.sql", CONSOLE_GROUP)]:
        migration = (ROOT / "sql" / "migrations" / migration_file).read_text()
        assert f"IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{group}')" in migration
    lines = (ROOT / ".env.example").read_text().splitlines()
    example = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    for variable in PASSWORD_OF.values():
        assert example[variable] == "change-me", f"{variable} in .env.example must be a placeholder"


# ------------------------------------------------------------------ nginx logs

Directive = tuple[str, list[str], list["Directive"] | None]


def parse_nginx(text: str) -> list[Directive]:
    """nginx's configuration as (name, arguments, block or None), comments dropped, quotes removed."""
    tokens = re.findall(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|#[^\n]*|[{};]|[^\s{};\"'#]+", text)
    stack: list[list[Directive]] = [[]]
    words: list[str] = []
    for token in tokens:
        if token.startswith("#"):
            continue
        if token in {";", "{"}:
            block: list[Directive] | None = [] if token == "{" else None
            stack[-1].append((words[0], words[1:], block))
            if block is not None:
                stack.append(block)
            words = []
        elif token == "}":
            assert not words, f"missing ; after {words}"
            stack.pop()
        else:
            words.append(token[1:-1] if token[0] in "\"'" else token)
    assert len(stack) == 1 and not words, "unbalanced braces"
    return stack[0]


def _walk(directives: list[Directive]) -> Iterator[Directive]:
    for directive in directives:
        yield directive
        if directive[2] is not None:
            yield from _walk(directive[2])


NGINX = parse_nginx((ROOT / "deploy" / "nginx-lookup.conf").read_text())
# variables that carry the query string, a request body or a credential header
SECRET_VARIABLES = {"request", "request_uri", "args", "query_string", "request_body", "http_authorization",
                    "http_cookie", "http_referer", "sent_http_set_cookie", "upstream_http_set_cookie"}  # fmt: skip
SECRET_PREFIXES = ("arg_", "cookie_", "upstream_cookie_")


def test_the_proxy_logs_requests_without_query_strings_or_credentials() -> None:
    formats = {args[0]: "".join(args[1:]) for name, args, _ in _walk(NGINX) if name == "log_format"}
    access_logs = [args for name, args, _ in _walk(NGINX) if name == "access_log"]
    assert access_logs, "no access_log: the image's default one logs the full request line"
    for args in access_logs:
        assert args[0] != "off" and len(args) >= 2, f"access_log {args}: give it this file's format"
        assert args[1] in formats, f"access_log {args}: format {args[1]} is not defined here ('main' logs $request)"
        variables = set(re.findall(r"\$\{?(\w+)", formats[args[1]]))
        leaking = {v for v in variables if v in SECRET_VARIABLES or v.startswith(SECRET_PREFIXES)}
        assert not leaking, f"log_format {args[1]} logs {sorted(leaking)}"
        assert {"uri", "status", "request_time", "upstream_response_time"} <= variables
    # An access_log at this file's top level (the http block) would be added to the image's own, in
    # format "main"; in each server block it replaces it.
    assert not [args for name, args, _ in NGINX if name == "access_log"], "it would add to the 'main' log"
    servers = [block for name, _, block in NGINX if name == "server"]
    assert servers
    for block in servers:
        assert block is not None
        assert [args for name, args, _ in block if name == "access_log"], "a server without access_log uses 'main'"


# nginx's error levels, least severe first; each error of a request ends with its request line, query
# string included. Upstream errors and timeouts are `error`, a response buffered to a file `warn`.
NGINX_ERROR_LEVELS = ["debug", "info", "notice", "warn", "error", "crit", "alert", "emerg"]


def test_the_proxy_error_log_never_gets_the_request_line_of_an_upstream_failure() -> None:
    error_logs = [args for name, args, _ in _walk(NGINX) if name == "error_log"]
    assert error_logs, "no error_log: the image's (level notice) logs every upstream error with its request line"
    for args in error_logs:
        # without a level nginx logs `error` and worse
        assert len(args) == 2 and args[1] in NGINX_ERROR_LEVELS, f"error_log {args}: give it a level"
        assert NGINX_ERROR_LEVELS.index(args[1]) >= NGINX_ERROR_LEVELS.index("crit"), f"error_log {args}"
    for block in [block for name, _, block in NGINX if name == "server"]:
        assert block is not None
        assert [args for name, args, _ in block if name == "error_log"], "a server without error_log uses the image's"


def _location_for(server: list[Directive], path: str) -> list[Directive]:
    """The location block nginx picks for a path: an exact `=` match, else the longest prefix."""
    locations = [(args, block) for name, args, block in server if name == "location" and block is not None]
    assert all(args[0] == "=" or not args[0].startswith(("~", "^~")) for args, _ in locations), "regex locations"
    exact = [block for args, block in locations if args[0] == "=" and args[1] == path]
    if exact:
        return exact[0]
    prefixes = [(args[0], block) for args, block in locations if args[0] != "=" and path.startswith(args[0])]
    return max(prefixes, key=lambda prefix: len(prefix[0]))[1]


def test_the_dashboard_is_the_consoles_own_service_not_behind_the_lookup_proxy() -> None:
    """The lookup proxy routes nothing of the dashboard (the lookup service answers an old bookmark 404);
    the console publishes its own port and reads the service's /metrics through the proxy."""
    from console.dashboard import router

    (server,) = [block for name, _, block in NGINX if name == "server"]
    assert server is not None
    locations = [args[-1] for name, args, block in server if name == "location"]
    assert not [path for path in locations if path.startswith(router.prefix)], locations
    console = SERVICES["console"]
    port = _serve_port(console, "console")
    assert console["ports"] == [f"{port}:{port}"]
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(healthcheck(console))
    assert _environment(console)["OVERNIGHT_CONSOLE_SERVICE_URL"] == "http://lookup-proxy:8000"


# ------------------------------------------------------------------ one role per image


def _stage(dockerfile: str, target: str) -> list[str]:
    """The instructions of one build stage, continuation lines joined."""
    text = dockerfile.replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    start = next(i for i, line in enumerate(lines) if re.fullmatch(rf"FROM .* AS {target}", line))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("FROM ")), len(lines))
    return lines[start:end]


@pytest.mark.parametrize(("target", "package", "port"), [("lookup", "serving", 8000), ("console", "console", 8001)])
def test_each_service_image_holds_its_roles_code_only(target: str, package: str, port: int) -> None:
    stage = _stage((ROOT / "Dockerfile").read_text(), target)
    copied = {word for line in stage if line.startswith("COPY ") for word in line.split()[1:-1]}
    assert copied == {"pyproject.toml", "uv.lock", "README.md", package, "sql", "common"}
    assert f'CMD ["python", "-m", "{package}", "--host", "0.0.0.0", "--port", "{port}"]' in stage
    # the project is installed from the folders copied; no entry point is left that needs another role's code
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    absent = {name for name, target_ in scripts.items() if target_.split(".")[0] != package}
    install = next(line for line in stage if line.startswith("RUN uv sync") and "--no-install-project" not in line)
    assert {f".venv/bin/{name}" for name in absent} <= set(install.split()), install


def test_the_airflow_image_holds_no_console_and_no_entry_point_to_it() -> None:
    stage = _stage((ROOT / "Dockerfile").read_text(), "airflow")
    copied = {line.split()[-2] for line in stage if line.startswith("COPY ")}
    assert {"jobs", "serving", "sql", "common", "dags"} <= copied and "console" not in copied, copied
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    absent = {name for name, target in scripts.items() if target.split(".")[0] not in copied}
    install = next(line for line in stage if line.startswith("RUN pip install") and "/opt/overnight" in line)
    assert absent == {"overnight-console"} and all(f'rm "$(command -v {name})"' in install for name in absent)


@pytest.mark.parametrize(("package", "foreign"), [("serving", {"jobs", "console"}), ("console", {"jobs", "serving"})])
def test_a_role_imports_no_other_roles_code(package: str, foreign: set[str]) -> None:
    modules = sorted(
        f"{package}.{path.stem}" for path in (ROOT / package).glob("*.py") if path.stem not in ("__init__", "__main__")
    )
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not foreign & set(json.loads(result.stdout)), f"{package} imports {foreign & set(json.loads(result.stdout))}"
