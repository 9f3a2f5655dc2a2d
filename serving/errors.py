"""Domain errors of the lookup service; `serving.app` maps each to an HTTP status in one place."""

from typing import Any


class ServingError(Exception):
    """Base of the errors a client or an operator can act on; the message is the whole reason."""


class ServingConfigError(ServingError):
    """The service cannot start with this configuration (missing DSN, no API key, bad value)."""


class NotAuthenticatedError(ServingError):
    """The request carries no API key or one that is not configured."""


class InvalidRequestError(ServingError):
    """Input that passed parsing but breaks a limit only known at run time (the live batch's k, ...)."""

    def __init__(self, loc: tuple[str | int, ...], message: str, value: Any = None) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message
        self.value = value


class NoLiveBatchError(ServingError):
    """Nothing is live yet, or the live pointer could not be read."""


class DatabaseUnavailableError(ServingError):
    """Postgres did not answer in time, refused the connection or lost it."""
