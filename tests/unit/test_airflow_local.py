"""`overnight airflow`'s configuration, without starting Airflow: the metadata URL, airflow.cfg, the login."""

import configparser
import json
import socket
import subprocess
from pathlib import Path

import pytest

from jobs.dev.airflow_local import PASSWORDS_FILE, metadata_database_name, prepare, sqlalchemy_url
from jobs.settings import get_settings
from tests.support.commands import OVERNIGHT

METADATA = "postgresql+psycopg://airflow@db.example:5432/airflow"


def test_the_metadata_database_sits_next_to_overnights() -> None:
    assert metadata_database_name("postgresql://u:p@db:5432/recs") == "recs_airflow"
    assert metadata_database_name("host=/tmp/pg user=postgres dbname=postgres") == "postgres_airflow"


def test_sqlalchemy_urls_for_tcp_and_for_the_embedded_servers_socket() -> None:
    assert (
        sqlalchemy_url("postgresql://u:s%40cret@db:6543/recs?sslmode=require", "recs_airflow")
        == "postgresql+psycopg://u:s%40cret@db:6543/recs_airflow?sslmode=require"
    )
    assert (
        sqlalchemy_url("postgresql://postgres:@/postgres?host=/var/pg%20data", "postgres_airflow")
        == "postgresql+psycopg://postgres@/postgres_airflow?host=%2Fvar%2Fpg+data"
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # a metadata URL of its own: prepare() then needs no database
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", METADATA.replace("airflow@", "air%flow@"))
    monkeypatch.delenv("OVERNIGHT_AIRFLOW_ADMIN_PASSWORD", raising=False)
    return tmp_path / "airflow"


def _prepare(home: Path, **settings: str) -> object:
    return prepare(
        get_settings(database_url="postgresql://u@db/recs", data_dir=home.parent, **settings),
        home=home,
        host="127.0.0.1",
        port=18123,
    )


def test_airflow_cfg_configures_this_project_and_survives_airflows_interpolation(home: Path) -> None:
    _prepare(home)
    config = configparser.ConfigParser()  # interpolating, as Airflow reads it
    config.read(home / "airflow.cfg")
    assert config["core"]["executor"] == "LocalExecutor"
    assert config["core"]["dags_folder"] == str(Path(__file__).resolve().parents[2] / "dags")
    assert config["core"]["load_examples"] == "False"
    assert config["core"]["execution_api_server_url"] == "http://127.0.0.1:18123/execution/"
    assert config["database"]["sql_alchemy_conn"] == "postgresql+psycopg://air%flow@db.example:5432/airflow"
    assert config["database"]["sql_alchemy_conn_async"] == config["database"]["sql_alchemy_conn"]
    assert config["api"]["port"] == "18123"
    assert (home / "airflow.cfg").stat().st_mode & 0o077 == 0  # it holds secrets


def test_the_login_and_secrets_are_kept_across_starts_unless_a_password_is_given(home: Path) -> None:
    first = _prepare(home)
    secrets = configparser.ConfigParser(interpolation=None)
    secrets.read(home / "airflow.cfg")
    second = _prepare(home)
    again = configparser.ConfigParser(interpolation=None)
    again.read(home / "airflow.cfg")
    assert first.password == second.password and len(first.password) >= 16  # type: ignore[attr-defined]
    for section, key in [("api_auth", "jwt_secret"), ("api", "secret_key"), ("core", "fernet_key")]:
        assert secrets[section][key] == again[section][key]
    chosen = _prepare(home, airflow_admin_password="chosen")
    assert chosen.password == "chosen"  # type: ignore[attr-defined]
    assert json.loads((home / PASSWORDS_FILE).read_text()) == {"admin": "chosen"}


def test_a_busy_port_is_a_one_line_error(home: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "OVERNIGHT_DATABASE_URL": "postgresql://u@db.invalid/recs",
        "OVERNIGHT_DATA_DIR": str(home.parent),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": METADATA,
    }
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [str(OVERNIGHT), "airflow", "--port", str(port)], env=env, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"overnight: error: http://127.0.0.1:{port} is already in use: stop what listens there or pass --port"
    )
