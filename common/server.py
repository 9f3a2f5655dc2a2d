"""What the lookup service and the console do alike to start (each role's server.py keeps only its app, port and
settings): refuse to run without keys unless told ``--no-auth``, the checks of where to listen, granian with its
limits, and the ``python -m <role>`` command line. Standard library only at import: granian is imported at start.
"""

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

ENV_PREFIX = "OVERNIGHT_"
# Older releases turned auth off from this variable; now only the --no-auth flag does (see open_app_factory).
IGNORED_AUTH_VARIABLE = f"{ENV_PREFIX}AUTH_DISABLED"
# How long a connection may take to send a request's headers, and stay idle between requests (granian
# applies it to both); a slot held by a silent client is freed after this (granian's default: 30 s).
HEADER_READ_TIMEOUT_MS = 10_000

_App = TypeVar("_App")


def open_app_factory(create_app: Callable[..., _App]) -> Callable[[], _App]:
    """`create_app` with authentication off, as a factory called with no argument: what a role's
    ``create_open_app`` is, the factory ``--no-auth`` names to the server's workers. Workers learn --no-auth
    from the factory they are told to call: nothing in their environment can say it."""

    def create_open_app() -> _App:
        return create_app(auth_disabled=True)

    create_open_app.__doc__ = f"`{create_app.__module__}.create_app` without authentication: what --no-auth serves."
    return create_open_app


def check_keys_configured(
    keys: Sequence[str], auth_disabled: bool, *, what: str, variables: str, error: Callable[[str], Exception]
) -> None:
    """Refuse to open a role to anyone by accident: no key (`what`, set in `variables`) is allowed only when
    auth is disabled explicitly, which only the ``--no-auth`` flag does, never the environment: a stray
    variable left in a deployment must not open a role that has keys configured. Raises `error`."""
    if keys or auth_disabled:
        return
    message = f"no {what} configured: set {variables} (comma-separated) or start with --no-auth"
    if os.environ.get(IGNORED_AUTH_VARIABLE):
        # Said here, in the one line a refused start prints: a warning logged before it may not be shown.
        message += f" ({IGNORED_AUTH_VARIABLE} is ignored: only --no-auth turns authentication off)"
    raise error(message)


def check_listening(port: int, workers: int, error: Callable[[str], Exception]) -> None:
    """Refuse (`error`, one line) a worker count or a port a server cannot start with."""
    if workers < 1:
        raise error(f"workers must be at least 1, got {workers}")
    if not 0 <= port <= 65535:
        raise error(f"port must be between 0 and 65535, got {port}")


def run_granian(factory: str, *, host: str, port: int, workers: int, connections_per_worker: int) -> None:
    """Serve the ASGI app `factory` (``module:function``, called once per worker) under granian until
    interrupted. `connections_per_worker` is granian's backpressure: the connections a worker holds at once,
    idle keep-alive ones too, past which new ones wait unaccepted (its default shrinks with every worker)."""
    from granian import Granian
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings

    Granian(
        factory,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=workers,
        factory=True,
        websockets=False,
        log_access=False,  # each role's own access log knows its routes and redacts keys from query strings
        respawn_failed_workers=True,
        backpressure=connections_per_worker,
        http1_settings=HTTP1Settings(header_read_timeout=HEADER_READ_TIMEOUT_MS),
    ).serve()


def server_parser(*, prog: str, description: str, default_port: int, no_auth_help: str) -> argparse.ArgumentParser:
    """The options every role's ``python -m <role>`` takes: --host, --port, --workers and --no-auth."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=default_port, help=f"Port (default {default_port}).")
    parser.add_argument("--workers", type=int, default=1, help="Worker processes (default 1).")
    parser.add_argument("--no-auth", action="store_true", help=no_auth_help)
    return parser


def run_server_main(role: str, serve: Callable[[], None], error: type[Exception]) -> None:
    """A role's ``python -m <role>`` once its options are read: `serve` with logging set up; every failure
    to start (`error`) is one line on stderr and exit status 1, an interrupt exit status 130."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve()
    except error as refused:
        print(f"{role}: error: {refused}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
