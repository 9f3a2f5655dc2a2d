"""Request and response bodies of the HTTP API; the OpenAPI schema is generated from these."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class RecommendedItem(BaseModel):
    item_id: str
    score: float = Field(description="The ranker's score; higher ranks first. Comparable within one batch only.")


class Recommendations(BaseModel):
    user_id: str
    items: list[RecommendedItem] = Field(description="In rank order, at most k, excluded items left out.")
    source: Literal["personalized", "fallback"] = Field(
        description="`fallback`: the user is not in the batch and gets the batch's fallback list."
    )
    model_id: str
    batch_id: int
    generated_at: datetime = Field(description="When the batch was computed (UTC).")
    variant: str = Field(description="Which model variant answered; `production` outside a canary.")


def _integral_number(value: Any) -> Any:
    """JSON Schema's integer: 8.0 is one too (a JSON number with a fraction of zero). Text is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class BatchRecommendationsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_ids: list[str] = Field(
        min_length=1, description="Users to look up (at most OVERNIGHT_MAX_BATCH_USERS, 1000 by default)."
    )
    k: Annotated[int, BeforeValidator(_integral_number)] | None = Field(
        default=None,
        ge=1,
        strict=True,
        description="Items per user, 1..k of the live batch; default 10 (or k if smaller).",
    )
    exclude: list[str] = Field(default_factory=list, description="Items left out of every user's list.")


class BatchRecommendations(BaseModel):
    results: list[Recommendations] = Field(description="One per requested user id, in request order.")


class ErrorMessage(BaseModel):
    detail: str = Field(description="What went wrong, for people.")
    reason: str | None = Field(
        default=None,
        description="A short code for programs: not_authenticated, no_live_batch, live_pointer_unreadable, "
        "database_unavailable, database_error.",
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    batch_id: int
    model_id: str
    generated_at: datetime
    data_age_seconds: int
