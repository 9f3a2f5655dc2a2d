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
    batch_id: int | None = None  # the batch the step published or serves
    model_id: str | None = None  # the model the step trained, scored or served with
    # Whether batch_id and model_id are the night's production ones, which the run itself records too;
    # a shadow's or a canary's are the step's own.
    production: bool = True


class StepResult(Protocol):
    def outcome(self) -> Outcome: ...
