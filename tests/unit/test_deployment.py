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
    assert set(SERVICES) == {"postgres", "redis", "lookup"} | AIRFLOW_SERVICES


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


def test_every_airflow_command_exists() -> None:
    invocations = [words[1:] for s in SERVICES.values() for words in commands(s) if words[0] == "airflow"]
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
    assert set(COMPOSE["volumes"]) == {"pgdata", "lake"}
