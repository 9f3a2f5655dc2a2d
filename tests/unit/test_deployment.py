"""docker-compose.yml, the Dockerfile and .env.example agree with each other and with the code.

No Docker engine runs here, so these files are checked by reading them: every command a service
runs exists in the CLI it calls, every secret comes from .env, every long-running service has a
healthcheck, and the images pin the same Airflow as the lock file.
"""

import re
import shlex
import subprocess
import sys
import tomllib
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
    assert set(SERVICES) == {"postgres", "redis", "lookup", "lookup-proxy"} | AIRFLOW_SERVICES


@pytest.mark.parametrize("name", sorted(set(SERVICES) - ONE_SHOT))
def test_long_running_services_have_healthchecks_and_restart(name: str) -> None:
    service = SERVICES[name]
    assert service["healthcheck"]["test"], name
    assert service["restart"] == "unless-stopped"


def test_every_overnight_command_exists_with_its_options() -> None:
    cli = typer.main.get_command(app)
    seen = 0
    for service in SERVICES.values():
        for words in commands(service):
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
    assert seen >= 2


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
    import json

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
    for secret in ("POSTGRES_PASSWORD", "OVERNIGHT_API_KEYS", "AIRFLOW_SECRET_KEY", "AIRFLOW_ADMIN_PASSWORD"):
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
    assert {"airflow", "lookup"} <= targets
    assert "COPY --chown=airflow:root dags /opt/airflow/dags" in dockerfile


def test_the_lookup_service_has_keys_and_the_batch_side_shares_the_lake() -> None:
    assert "OVERNIGHT_API_KEYS" in SERVICES["lookup"]["environment"]
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


def _serve_port(service: dict) -> int:
    words = next(w for w in commands(service) if w[:2] == ["overnight", "serve"])
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
