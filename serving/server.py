"""Run the lookup service under granian (default; why: docs/serving.md#choosing-the-server) or uvicorn: `overnight
serve` calls `serve()`, and `main()` (``python -m serving``, ``overnight-serve``, the lookup image) runs it without
the batch side's CLI. Configuration is checked first, so a bad setup fails with one line, not a traceback per worker.
"""

import argparse
import logging
from collections.abc import Sequence
from typing import Literal

from common.server import check_listening, run_granian, run_server_main, server_parser
from serving.errors import ServingConfigError
from serving.settings import check_auth_configured, get_serving_settings

logger = logging.getLogger(__name__)

APP_FACTORY = "serving.app:create_app"
DEFAULT_PORT = 8000
# Workers learn --no-auth from the factory they are told to call: nothing in their environment can say it.
OPEN_APP_FACTORY = "serving.app:create_open_app"
Server = Literal["granian", "uvicorn"]
SERVERS: tuple[Server, ...] = ("granian", "uvicorn")
# granian's backpressure caps the connections a worker holds at once, idle keep-alive ones too; past it, new
# ones wait unaccepted, /healthz with them. Its default (1024 divided among the workers) shrinks with every
# worker added: this is per worker, whatever their number. With keys checked before a body is read, only
# clients with a key can hold body buffers, so 512 x OVERNIGHT_MAX_REQUEST_BYTES (1 MiB) bounds what a
# worker buffers at 512 MiB, and a few proxies' keep-alive pools still fit.
CONNECTIONS_PER_WORKER = 512


def serve(
    host: str = "127.0.0.1", port: int = DEFAULT_PORT, workers: int = 1, no_auth: bool = False, server: str = "granian"
) -> None:
    """Serve until interrupted. Raises `ServingConfigError` (one-line message) when it must not start."""
    check_listening(port, workers, ServingConfigError)
    if server not in SERVERS:
        raise ServingConfigError(f"server must be one of {', '.join(SERVERS)}, got {server!r}")
    settings = get_serving_settings()
    check_auth_configured(settings, auth_disabled=no_auth)
    factory = OPEN_APP_FACTORY if no_auth else APP_FACTORY
    logger.info("serving on http://%s:%d with %d %s worker(s)", host, port, workers, server)
    if server == "granian":
        run_granian(factory, host=host, port=port, workers=workers, connections_per_worker=CONNECTIONS_PER_WORKER)
    else:
        import uvicorn

        uvicorn.run(
            factory,
            factory=True,
            host=host,
            port=port,
            workers=workers,
            access_log=False,
            server_header=False,
            # X-Forwarded-* headers are believed by no one here: the lookup service logs the peer address.
            proxy_headers=False,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = server_parser(
        prog="python -m serving",
        description="The overnight lookup service, configured from OVERNIGHT_* variables "
        "(OVERNIGHT_DATABASE_URL, OVERNIGHT_API_KEYS, ...).",
        default_port=DEFAULT_PORT,
        no_auth_help="Serve without API keys: lookups and feedback writes (POST /v1/events) are open to anyone "
        "who can reach the port (local use only). The only way to turn authentication off.",
    )
    parser.add_argument(
        "--server", choices=SERVERS, default="granian", help="HTTP server: granian (default, faster) or uvicorn."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m serving``: every failure to start is one line on stderr and exit status 1."""
    args = build_parser().parse_args(argv)
    run_server_main(
        "serving",
        lambda: serve(host=args.host, port=args.port, workers=args.workers, no_auth=args.no_auth, server=args.server),
        ServingConfigError,
    )
