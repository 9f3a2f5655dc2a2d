"""Domain errors of the lookup service; `serving.app` maps each to an HTTP status in one place. A client sees an
error's message and its short `reason` code, never a driver's text, a host or a port: those go to the service's log.
"""

from typing import Any


class ServingError(Exception):
    """Base of the errors a client or an operator can act on; the message is the whole reason."""

    reason = "error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ServingConfigError(ServingError):
    """The service cannot start with this configuration (missing DSN, no API key, bad value)."""

    reason = "bad_configuration"


class NotAuthenticatedError(ServingError):
    """The request carries no API key or one that is not configured."""

    reason = "not_authenticated"


class InvalidRequestError(ServingError):
    """Input that passed parsing but breaks a limit only known at run time (the live batch's k, ...)."""

    reason = "invalid_request"

    def __init__(self, loc: tuple[str | int, ...], message: str, value: Any = None) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message
        self.value = value


class UnreadableBodyError(ServingError):
    """A request body whose bytes are not text in an encoding JSON allows (UTF-8, UTF-16, UTF-32)."""

    reason = "unreadable_body"


class BodyTooLargeError(ServingError):
    """A request body over OVERNIGHT_MAX_REQUEST_BYTES."""

    reason = "body_too_large"


class NoLiveBatchError(ServingError):
    """Nothing is live yet, or the live pointer could not be read."""

    reason = "no_live_batch"


class FeedbackQueueFullError(ServingError):
    """The feedback writer's queue cannot take the request's events: nothing was kept (503, Retry-After)."""

    reason = "feedback_queue_full"


class DatabaseUnavailableError(ServingError):
    """Postgres did not answer in time, refused the connection or lost it."""

    reason = "database_unavailable"
