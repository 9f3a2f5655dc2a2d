"""Run the lookup service under granian (default) or uvicorn; `overnight serve` calls `serve()`.

Configuration is checked before the server starts, so a bad setup fails with one line instead of a
traceback per worker. granian is the default because it measured faster on the same app and the same
machine (README, "Serving performance"); uvicorn stays available for platforms granian does not cover.
"""

import logging
import os
from typing import Literal

from serving.errors import ServingConfigError
from serving.settings import ENV_PREFIX, check_auth_configured, get_serving_settings

logger = logging.getLogger(__name__)

APP_FACTORY = "serving.app:create_app"
Server = Literal["granian", "uvicorn"]
SERVERS: tuple[Server, ...] = ("granian", "uvicorn")


def serve(
    host: str = "127.0.0.1", port: int = 8000, workers: int = 1, no_auth: bool = False, server: str = "granian"
) -> None:
    """Serve until interrupted. Raises `ServingConfigError` (one-line message) when it must not start."""
    if workers < 1:
        raise ServingConfigError(f"workers must be at least 1, got {workers}")
    if not 0 <= port <= 65535:
        raise ServingConfigError(f"port must be between 0 and 65535, got {port}")
    if server not in SERVERS:
        raise ServingConfigError(f"server must be one of {', '.join(SERVERS)}, got {server!r}")
    settings = get_serving_settings(**({"auth_disabled": True} if no_auth else {}))
    check_auth_configured(settings)
    if no_auth:
        # Workers build their settings from the environment, so this is how they learn it.
        os.environ[f"{ENV_PREFIX}AUTH_DISABLED"] = "true"
    logger.info("serving on http://%s:%d with %d %s worker(s)", host, port, workers, server)
    if server == "granian":
        from granian import Granian
        from granian.constants import Interfaces

        Granian(
            APP_FACTORY,
            address=host,
            port=port,
            interface=Interfaces.ASGI,
            workers=workers,
            factory=True,
            websockets=False,
            log_access=False,  # our own access log (OVERNIGHT_ACCESS_LOG) knows routes and batches
            respawn_failed_workers=True,
        ).serve()
    else:
        import uvicorn

        uvicorn.run(
            APP_FACTORY,
            factory=True,
            host=host,
            port=port,
            workers=workers,
            access_log=False,
            server_header=False,
        )
