"""Domain errors of the batch side. The CLI turns each into a one-line message and exit code 1."""

from datetime import date


class OvernightError(Exception):
    """Base of every error a user can act on; its message is the whole explanation."""


class BadInputError(OvernightError):
    """Input data that breaks the data contract (missing column, too many bad rows, unreadable file)."""


class MissingDataError(OvernightError):
    """A step needs lake data, a model or a batch that does not exist yet."""


class FutureModelError(MissingDataError):
    """A model trained after the date was asked to score it: that would use the future."""

    def __init__(self, message: str, trained_for: date | None = None) -> None:
        super().__init__(message)
        self.trained_for = trained_for


class UnfitCandidatesError(MissingDataError):
    """A chosen model (a shadow's, a canary's) was tuned with other candidate settings than the date's
    candidate tables were built with: it cannot score that date."""


class BatchValidationError(OvernightError):
    """A batch failed publish validation; production was left untouched."""


class PublishBlockedError(BatchValidationError):
    """Monitoring held a batch back: the run ends 'blocked' rather than 'failed'."""


class StaleBatchError(OvernightError):
    """The live batch is too old or covers too few users."""


class DatabaseError(OvernightError):
    """Postgres could not be reached or the schema is not what this version expects."""


class RolloutError(OvernightError):
    """A canary, promote or shadow request that the current state of the batches does not allow."""


def worth_retrying(error: BaseException) -> bool:
    """Whether running the same step again may cure ``error``: yes when Postgres was out of reach or for
    anything no code foresaw (a lost file system, a killed process); no for an error that names what a
    person must fix (bad input, a step to run first, a batch monitoring held back)."""
    return isinstance(error, DatabaseError) or not isinstance(error, OvernightError)
