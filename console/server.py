"""Run the operator console under granian: `overnight console`, ``python -m console`` and the console
image call `serve()`; `main()` is the entry point without the batch side's CLI.

Configuration is checked before the server starts, so a bad setup fails with one line instead of a
traceback per worker.
"""

import argparse
import logging
import sys
from collections.abc import Sequence

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
# How long a connection may take to send a request's headers, and stay idle between requests (granian
# applies it to both); a slot held by a silent client is freed after this (granian's default: 30 s).
HEADER_READ_TIMEOUT_MS = 10_000


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, workers: int = 1, no_auth: bool = False) -> None:
    """Serve until interrupted. Raises `ConsoleConfigError` (one-line message) when it must not start."""
    if workers < 1:
        raise ConsoleConfigError(f"workers must be at least 1, got {workers}")
    if not 0 <= port <= 65535:
        raise ConsoleConfigError(f"port must be between 0 and 65535, got {port}")
    settings = get_console_settings()
    check_auth_configured(settings, auth_disabled=no_auth)
    from granian import Granian
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings

    logger.info("the console's dashboard is on http://%s:%d/dashboard (%d worker(s))", host, port, workers)
    Granian(
        OPEN_APP_FACTORY if no_auth else APP_FACTORY,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=workers,
        factory=True,
        websockets=False,
        log_access=False,  # the console's own access log redacts keys from query strings
        respawn_failed_workers=True,
        backpressure=CONNECTIONS_PER_WORKER,
        http1_settings=HTTP1Settings(header_read_timeout=HEADER_READ_TIMEOUT_MS),
    ).serve()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m console",
        description="The operator dashboard of overnight, configured from OVERNIGHT_* variables "
        "(OVERNIGHT_CONSOLE_DATABASE_URL or OVERNIGHT_DATABASE_URL, OVERNIGHT_DASHBOARD_KEYS or OVERNIGHT_API_KEYS, "
        "OVERNIGHT_CONSOLE_SERVICE_URL).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Port (default {DEFAULT_PORT}).")
    parser.add_argument("--workers", type=int, default=1, help="Worker processes (default 1).")
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="Open the dashboard without a key to anyone who can reach the port (local use only). "
        "The only way to turn sign-in off.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m console``: every failure to start is one line on stderr and exit status 1."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(host=args.host, port=args.port, workers=args.workers, no_auth=args.no_auth)
    except ConsoleConfigError as error:
        print(f"console: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
