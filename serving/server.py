"""Run the lookup service under uvicorn; `overnight serve` calls `serve()`.

Configuration is checked before uvicorn starts, so a bad setup fails with one line instead of a
traceback per worker.
"""

import logging
import os

import uvicorn

from serving.errors import ServingConfigError
from serving.settings import ENV_PREFIX, check_auth_configured, get_serving_settings

logger = logging.getLogger(__name__)

APP_FACTORY = "serving.app:create_app"


def serve(host: str = "127.0.0.1", port: int = 8000, workers: int = 1, no_auth: bool = False) -> None:
    """Serve until interrupted. Raises `ServingConfigError` (one-line message) when it must not start."""
    if workers < 1:
        raise ServingConfigError(f"workers must be at least 1, got {workers}")
    if not 0 <= port <= 65535:
        raise ServingConfigError(f"port must be between 0 and 65535, got {port}")
    settings = get_serving_settings(**({"auth_disabled": True} if no_auth else {}))
    check_auth_configured(settings)
    if no_auth:
        # Workers build their settings from the environment, so this is how they learn it.
        os.environ[f"{ENV_PREFIX}AUTH_DISABLED"] = "true"
    logger.info("serving on http://%s:%d with %d worker(s)", host, port, workers)
    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=settings.access_log,
        server_header=False,
    )
