"""The small protocol every step's result follows, so the runner, the DAG and the run history treat
all steps alike and guess nothing from field names."""

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Outcome:
    """What run history records of a step, and what a DAG task returns."""

    summary: str
    rows_in: int | None = None
    rows_out: int | None = None
    batch_id: int | None = None  # the batch the night published (a shadow's or a canary's is not)
    model_id: str | None = None  # the model the night scores with


class StepResult(Protocol):
    def outcome(self) -> Outcome: ...
