"""``overnight airflow``: a local Airflow 3 for this project, one process per component (LocalExecutor), with
the project's ``dags/`` and a metadata database of its own on overnight's Postgres (docs/airflow.md).
"""

import configparser
import importlib.util
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict

from jobs.database import database_url
from jobs.errors import OvernightError
from jobs.settings import Settings

logger = logging.getLogger(__name__)

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
ADMIN_USER = "admin"
PASSWORDS_FILE = "simple_auth_manager_passwords.json"
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
PROJECT_DAGS = Path(__file__).resolve().parents[2] / "dags"


class AirflowLaunchError(OvernightError):
    """The local Airflow could not be set up or one of its components stopped."""


@dataclass(frozen=True)
class LocalAirflow:
    home: Path
    url: str
    port: int
    metadata_url: str
    dags_folder: Path
    username: str
    password: str
    env: dict[str, str] = field(repr=False)

    def log_path(self, component: str) -> Path:
        return self.home / "logs" / f"{component}.out"

    def airflow(self, *args: str) -> list[str]:
        """The command line of an ``airflow`` subcommand in this environment."""
        return [sys.executable, "-m", "airflow", *args]


def metadata_database_name(overnight_url: str) -> str:
    """Airflow's metadata lives next to overnight's database, on the same server: ``<dbname>_airflow``."""
    return f"{conninfo_to_dict(overnight_url).get('dbname') or 'postgres'}_airflow"


def sqlalchemy_url(conninfo: str, dbname: str) -> str:
    """A libpq URL or conninfo (also the embedded server's unix-socket one) as a SQLAlchemy psycopg 3 URL."""
    from sqlalchemy.engine import URL

    params = {k: str(v) for k, v in conninfo_to_dict(conninfo).items() if v is not None}
    host = params.pop("host", None)
    port = params.pop("port", None)
    socket_dir = host is not None and host.startswith("/")
    query = {k: v for k, v in params.items() if k not in ("user", "password", "dbname")}
    if socket_dir:
        query["host"] = host  # type: ignore[assignment]
    url = URL.create(
        "postgresql+psycopg",
        username=params.get("user"),
        password=params.get("password") or None,
        host=None if socket_dir else host,
        port=int(port) if port and not socket_dir else None,
        database=dbname,
        query=query,
    )
    return url.render_as_string(hide_password=False)


def ensure_database(overnight_url: str, dbname: str) -> None:
    with psycopg.connect(overnight_url, autocommit=True, connect_timeout=10) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
            return
        try:
            conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(dbname)))
        except psycopg.errors.InsufficientPrivilege:
            raise AirflowLaunchError(
                f"cannot create the Airflow metadata database {dbname!r}: the overnight role may not create "
                "databases; create it, or set AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"
            ) from None
        except psycopg.errors.DuplicateDatabase:
            pass  # created by a concurrent start


def _existing_config(path: Path) -> configparser.ConfigParser:
    config = configparser.ConfigParser(interpolation=None)
    if path.exists():
        config.read(path)
    return config


def _admin_password(home: Path, wanted: str | None) -> str:
    """The admin password: OVERNIGHT_AIRFLOW_ADMIN_PASSWORD, else the one kept from an earlier start, else new."""
    path = home / PASSWORDS_FILE
    kept = json.loads(path.read_text()).get(ADMIN_USER) if path.exists() else None
    password = wanted or kept or secrets.token_urlsafe(12)
    if password != kept:
        path.write_text(json.dumps({ADMIN_USER: password}) + "\n")
        path.chmod(0o600)
    return str(password)


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def prepare(
    settings: Settings,
    *,
    home: Path,
    host: str,
    port: int,
    dags_folder: Path | None = None,
    progress: Callable[[str], None] = logger.info,
) -> LocalAirflow:
    """Write AIRFLOW_HOME/airflow.cfg and the admin password, create the metadata database; start nothing."""
    if importlib.util.find_spec("airflow") is None:
        raise AirflowLaunchError(
            "Airflow is not installed here: install overnight[airflow] (`uv sync --extra airflow`)"
        )
    dags = (dags_folder or PROJECT_DAGS).resolve()
    if not (dags / "overnight_nightly.py").exists():
        raise AirflowLaunchError(f"{dags} holds no overnight DAGs; pass --dags-folder with the project's dags/ folder")
    home = home.resolve()
    (home / "logs").mkdir(parents=True, exist_ok=True)

    overnight_url = database_url(settings)  # starts the embedded Postgres when no server is configured
    metadata_url = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    if not metadata_url:
        dbname = metadata_database_name(overnight_url)
        progress(f"Airflow metadata database: {dbname} on the overnight Postgres server")
        ensure_database(overnight_url, dbname)
        metadata_url = sqlalchemy_url(overnight_url, dbname)

    cfg_path = home / "airflow.cfg"
    previous = _existing_config(cfg_path)
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    values: dict[str, dict[str, str]] = {
        "core": {
            "dags_folder": str(dags),
            "executor": "LocalExecutor",
            "load_examples": "False",
            "auth_manager": SIMPLE_AUTH_MANAGER,
            "simple_auth_manager_users": f"{ADMIN_USER}:admin",
            "simple_auth_manager_passwords_file": str(home / PASSWORDS_FILE),
            "execution_api_server_url": f"{base_url}/execution/",
            "fernet_key": previous.get("core", "fernet_key", fallback="") or _fernet_key(),
        },
        # psycopg 3 serves both the sync and the async engine (Airflow would otherwise want asyncpg)
        "database": {"sql_alchemy_conn": metadata_url, "sql_alchemy_conn_async": metadata_url},
        "api": {
            "host": host,
            "port": str(port),
            "base_url": base_url,
            "secret_key": previous.get("api", "secret_key", fallback="") or secrets.token_urlsafe(32),
        },
        # every component signs and checks task tokens with the same secret
        "api_auth": {"jwt_secret": previous.get("api_auth", "jwt_secret", fallback="") or secrets.token_urlsafe(32)},
    }
    config = configparser.ConfigParser(interpolation=None)
    # Airflow interpolates its configuration: a literal % (URL-encoded socket paths, passwords) is written %%
    config.read_dict({section: {k: v.replace("%", "%%") for k, v in keys.items()} for section, keys in values.items()})
    with cfg_path.open("w") as out:
        out.write(
            "# Written by `overnight airflow` at every start: change its options, or override a key with an\n"
            "# AIRFLOW__SECTION__KEY environment variable, rather than editing this file.\n"
        )
        config.write(out)
    cfg_path.chmod(0o600)

    env = {**os.environ, "AIRFLOW_HOME": str(home), "OVERNIGHT_DATABASE_URL": overnight_url}
    env.setdefault("OVERNIGHT_DATA_DIR", str(settings.data_dir.resolve()))
    env.setdefault("OVERNIGHT_LOCAL_DIR", str(settings.local_dir.resolve()))
    return LocalAirflow(
        home=home,
        url=base_url,
        port=port,
        metadata_url=metadata_url,
        dags_folder=dags,
        username=ADMIN_USER,
        password=_admin_password(home, settings.airflow_admin_password),
        env=env,
    )


def migrate(local: LocalAirflow) -> None:
    """Create or upgrade Airflow's metadata schema (``airflow db migrate``)."""
    log = local.log_path("db-migrate")
    with log.open("w") as out:
        result = subprocess.run(local.airflow("db", "migrate"), env=local.env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise AirflowLaunchError(f"`airflow db migrate` failed:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the api-server binds
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def health(url: str) -> dict[str, Any] | None:
    """The api-server's /api/v2/monitor/health answer, or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=3) as response:
            return dict(json.load(response))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _all_healthy(report: dict[str, Any] | None) -> bool:
    if not report:
        return False
    parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
    return all((report.get(part) or {}).get("status") == "healthy" for part in parts)


class Supervisor:
    """The component processes: each in a process group of its own, so stopping one stops its workers too."""

    def __init__(self, local: LocalAirflow) -> None:
        self.local = local
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for component in COMPONENTS:
            with self.local.log_path(component).open("ab") as out:
                self.processes[component] = subprocess.Popen(
                    self.local.airflow(component),
                    env=self.local.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

    def exited(self) -> str | None:
        for component, process in self.processes.items():
            if process.poll() is not None:
                return component
        return None

    def stop(self, timeout: float = 30) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def fail(self, component: str) -> AirflowLaunchError:
        code = self.processes[component].returncode
        log = self.local.log_path(component)
        return AirflowLaunchError(f"airflow {component} exited with code {code}; the end of {log}:\n{_tail(log)}")


def run(local: LocalAirflow, *, ready_timeout: float = 180, progress: Callable[[str], None] = logger.info) -> None:
    """Start every component, report the login once all are healthy, and run until interrupted."""
    if _port_in_use(local.port):
        raise AirflowLaunchError(f"{local.url} is already in use: stop what listens there or pass --port")
    progress("Preparing the Airflow metadata database (airflow db migrate; the first start takes a minute)")
    migrate(local)
    supervisor = Supervisor(local)

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        supervisor.start()
        progress(f"Starting {', '.join(COMPONENTS)}; logs in {local.home / 'logs'}")
        deadline = time.monotonic() + ready_timeout
        while not _all_healthy(health(local.url)):
            if (component := supervisor.exited()) is not None:
                raise supervisor.fail(component)
            if time.monotonic() > deadline:
                raise AirflowLaunchError(
                    f"Airflow was not healthy within {ready_timeout:.0f}s: {health(local.url)}; "
                    f"see the logs in {local.home / 'logs'}"
                )
            time.sleep(0.5)
        print(ready_message(local), flush=True)
        while (component := supervisor.exited()) is None:
            time.sleep(1)
        raise supervisor.fail(component)
    except KeyboardInterrupt:
        progress("Stopping Airflow")
    finally:
        supervisor.stop()
        signal.signal(signal.SIGTERM, previous)


def ready_message(local: LocalAirflow) -> str:
    return "\n".join(
        [
            f"Airflow is ready: {local.url}",
            f"  login:    {local.username} / {local.password}",
            f"  DAGs:     {local.dags_folder} (new DAGs start paused: switch them on in the UI)",
            f"  home:     {local.home} (component logs in logs/*.out)",
            f"  CLI:      AIRFLOW_HOME={local.home} airflow backfill create --dag-id overnight_nightly "
            "--from-date YYYY-MM-DD --to-date YYYY-MM-DD --max-active-runs 2",
            "Ctrl-C stops every component.",
        ]
    )
