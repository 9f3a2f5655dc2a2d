"""Run the operator console under granian: `overnight console`, ``python -m console`` and the console image call
`serve()`; `main()` is the entry point without the batch side's CLI. Configuration is checked before the server
starts, so a bad setup fails with one line instead of a traceback per worker.
"""

import argparse
import logging
from collections.abc import Sequence

from common.server import check_listening, run_granian, run_server_main, server_parser
from console.settings import ConsoleConfigError, check_auth_configured, get_console_settings

logger = logging.getLogger(__name__)

APP_FACTORY = "console.app:create_app"
# Workers learn --no-auth from the factory they are told to call: nothing in their environment can say it.
OPEN_APP_FACTORY = "console.app:create_open_app"
DEFAULT_PORT = 8001
# granian's backpressure caps the connections a worker holds at once, idle keep-alive ones too; past it, new
# ones wait unaccepted, /healthz with them. Its default (1024 divided among the workers) shrinks with every
# worker added: this is per worker, whatever their number. Anyone may post the sign-in form, so the cap is
# high, to make holding every slot costly: a form is at most 16 KiB (LOGIN_FORM_BYTES) and is cut off after
# OVERNIGHT_BODY_TIMEOUT_SECONDS, so a full worker buffers at most 16 MiB of them.
CONNECTIONS_PER_WORKER = 1024


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, workers: int = 1, no_auth: bool = False) -> None:
    """Serve until interrupted. Raises `ConsoleConfigError` (one-line message) when it must not start."""
    check_listening(port, workers, ConsoleConfigError)
    settings = get_console_settings()
    check_auth_configured(settings, auth_disabled=no_auth)
    logger.info("the console's dashboard is on http://%s:%d/dashboard (%d worker(s))", host, port, workers)
    run_granian(
        OPEN_APP_FACTORY if no_auth else APP_FACTORY,
        host=host,
        port=port,
        workers=workers,
        connections_per_worker=CONNECTIONS_PER_WORKER,
    )


def build_parser() -> argparse.ArgumentParser:
    return server_parser(
        prog="python -m console",
        description="The operator dashboard of overnight, configured from OVERNIGHT_* variables "
        "(OVERNIGHT_CONSOLE_DATABASE_URL or OVERNIGHT_DATABASE_URL, OVERNIGHT_DASHBOARD_KEYS or OVERNIGHT_API_KEYS, "
        "OVERNIGHT_CONSOLE_SERVICE_URL).",
        default_port=DEFAULT_PORT,
        no_auth_help="Open the dashboard without a key to anyone who can reach the port (local use only). "
        "The only way to turn sign-in off.",
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m console``: every failure to start is one line on stderr and exit status 1."""
    args = build_parser().parse_args(argv)
    run_server_main(
        "console",
        lambda: serve(host=args.host, port=args.port, workers=args.workers, no_auth=args.no_auth),
        ConsoleConfigError,
    )
