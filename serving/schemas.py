"""Request and response bodies of the HTTP API; the OpenAPI schema is generated from these."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class Reason(BaseModel):
    source: Literal["covisit", "knn", "genre", "trending", "popular"] = Field(
        description="What put the item in the list: `covisit` (often touched close in time to `item_id`, one of "
        "the user's items), `knn` (liked by the same users as `item_id`), `genre` (popular in `genre`, one of the "
        "user's favourite genres), `trending` (popular lately), `popular` (from a popular list: the user's "
        "`segment`'s, or everyone's, when the user is not in the batch or a filter left too few of theirs)."
    )
    item_id: str | None = Field(default=None, description="The user's item behind a `covisit` or `knn` reason.")
    genre: str | None = Field(default=None, description="The user's genre behind a `genre` reason.")
    segment: str | None = Field(default=None, description="The segment whose popular list an item came from.")


class RecommendedItem(BaseModel):
    item_id: str
    score: float = Field(description="The ranker's score; higher ranks first. Comparable within one batch only.")
    reason: Reason | None = Field(
        default=None,
        description="Only with `explain=true`: why the item is listed; null when the batch was published without "
        "reasons (OVERNIGHT_EXPLANATIONS=false, or before they existed).",
    )


EXPLAIN_DESCRIPTION = "Give each item the reason it is listed (`reason`)."


FILTER_DESCRIPTION = (
    "Comma-separated terms, all of which an item must meet: `name:value` (the item's attribute equals or "
    "contains the value), `name:-value` (it does not), `name` (the attribute is true), `-name` (it is false). "
    "Names are those of the batch's item attributes (another is a 422). When fewer than k items pass, the "
    "answer is filled from the filtered fallback and says how many in `X-Filled-From-Fallback`."
)
SEGMENT_DESCRIPTION = (
    "For a user the batch did not score: answer with this segment's popular list (an unknown segment: the "
    "global fallback). Without it, the segment the batch stored for the user, if any."
)
SEGMENT_FIELD_DESCRIPTION = "The segment whose popular list answered; present only when one did."


class Recommendations(BaseModel):
    user_id: str
    items: list[RecommendedItem] = Field(description="In rank order, at most k, excluded items left out.")
    source: Literal["personalized", "fallback"] = Field(
        description="`fallback`: the user is not in the batch and gets their segment's or the batch's fallback list."
    )
    segment: str | None = Field(default=None, description=SEGMENT_FIELD_DESCRIPTION)
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
    exclude: list[str] = Field(
        default_factory=list, description="Items left out of every user's list: one id an element, as given."
    )
    filter: str | None = Field(default=None, description=FILTER_DESCRIPTION)
    segment: str | None = Field(default=None, description=SEGMENT_DESCRIPTION)
    explain: bool = Field(default=False, strict=True, description=EXPLAIN_DESCRIPTION)


class BatchRecommendations(BaseModel):
    results: list[Recommendations] = Field(description="One per requested user id, in request order.")


class SimilarItems(BaseModel):
    item_id: str
    items: list[RecommendedItem] = Field(
        description="The item's neighbours, most similar first (score: the similarity), at most k, excluded "
        "items and the item itself left out."
    )
    source: Literal["similar", "fallback"] = Field(
        description="`fallback`: the batch has no neighbours for the item; the popular items of its genres "
        "when the batch's catalogue has it, else the batch's fallback list."
    )
    model_id: str
    batch_id: int
    generated_at: datetime = Field(description="When the batch was computed (UTC).")
    variant: str = Field(description="Which model variant answered; `production` outside a canary.")


class SimilarItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_ids: list[str] = Field(
        min_length=1, description="Items to look up (at most OVERNIGHT_MAX_BATCH_ITEMS, 1000 by default)."
    )
    k: Annotated[int, BeforeValidator(_integral_number)] | None = Field(
        default=None,
        ge=1,
        strict=True,
        description="Neighbours per item, 1..similar_k of the live batch; default 10 (or similar_k if smaller).",
    )
    exclude: list[str] = Field(
        default_factory=list, description="Items left out of every item's list: one id an element, as given."
    )
    filter: str | None = Field(default=None, description=FILTER_DESCRIPTION)
    user_id: str | None = Field(
        default=None, description="Whom the lists are for: a canary user's come from the canary's batch."
    )


class BatchSimilarItems(BaseModel):
    results: list[SimilarItems] = Field(description="One per requested item id, in request order.")


class SessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[str] = Field(
        description="The items the visitor just touched, most recent first (at most OVERNIGHT_MAX_SESSION_ITEMS, "
        "50 by default)."
    )
    k: Annotated[int, BeforeValidator(_integral_number)] | None = Field(
        default=None,
        ge=1,
        strict=True,
        description="Items to return, 1..k of the live batch; default 10 (or k if smaller).",
    )
    exclude: list[str] = Field(
        default_factory=list, description="Items left out besides the session's own: one id an element, as given."
    )
    user_id: str | None = Field(
        default=None,
        description="A user the batch scored has their own list blended in; it also routes the request (canary).",
    )
    filter: str | None = Field(default=None, description=FILTER_DESCRIPTION)
    segment: str | None = Field(default=None, description=SEGMENT_DESCRIPTION)


class SessionRecommendations(BaseModel):
    user_id: str | None = Field(description="The request's user_id, null without one.")
    items: list[RecommendedItem] = Field(
        description="Blended from the session's items' neighbour lists (common.session.blend_session), at most k, "
        "the session's and the excluded items left out."
    )
    source: Literal["session", "personalized", "fallback"] = Field(
        description="`session`: blended; when no session item has neighbours, what the user lookup would "
        "answer: `personalized` for a user the batch scored, else `fallback` (their segment's or the global list)."
    )
    segment: str | None = Field(default=None, description=SEGMENT_FIELD_DESCRIPTION)
    model_id: str
    batch_id: int
    generated_at: datetime = Field(description="When the batch was computed (UTC).")
    variant: str = Field(description="Which model variant answered; `production` outside a canary.")


class ErrorMessage(BaseModel):
    detail: str = Field(description="What went wrong, for people.")
    reason: str | None = Field(
        default=None,
        description="A short code for programs: not_authenticated, no_live_batch, live_pointer_unreadable, "
        "database_unavailable, database_error, feedback_queue_full, unreadable_body, body_too_large, "
        "body_timeout.",
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    batch_id: int
    model_id: str
    generated_at: datetime
    data_age_seconds: int
