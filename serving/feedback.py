"""`POST /v1/events`: impressions, clicks and conversions from the product, validated and queued all or none (a
202), then written in bulk to ``overnight.feedback_events`` (docs/serving.md#the-prediction-log-and-feedback-writers).
"""

from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

import sql
from serving.errors import FeedbackQueueFullError
from serving.prediction_log import BulkWriter
from serving.schemas import ErrorMessage
from sql.contract import MAX_ID_LENGTH, FeedbackEventType

FeedbackRow = tuple[datetime, datetime, str, str, str, str | None]

# Ids hold no control characters, as in the ingest data contract. A user id may be as long as the lookups
# take (OVERNIGHT_MAX_USER_ID_LENGTH, checked in `FeedbackIntake.rows`): whoever can be served can send
# feedback. An item id has at most the contract's MAX_ID_LENGTH characters: every item
# a batch recommends came through ingest, so a longer one was never served.
_ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"


MAX_EVENT_AGE = timedelta(days=7)
MAX_CLOCK_SKEW = timedelta(minutes=5)
# How long after the OpenAPI document is fetched its timestamp pattern still matches only accepted timestamps.
EVENT_PATTERN_VALIDITY = timedelta(hours=1)

_ANY_HOUR = "(?:[01][0-9]|2[0-3])"


def event_timestamp_pattern(
    now: datetime, *, max_age: timedelta = MAX_EVENT_AGE, valid_for: timedelta = EVENT_PATTERN_VALIDITY
) -> str:
    """A JSON Schema pattern matching only timestamps the server accepts, from `now` (aware) until `now +
    valid_for`: RFC 3339 date-times in UTC (`Z` or `+00:00`, seconds 00-59, at most 6 decimals) in the whole
    hours from `now - max_age + valid_for`, rounded up to the hour, to the start of `now`'s hour (UTC).

    Every string it matches is inside [server time - max_age, server time + MAX_CLOCK_SKEW] for any server
    time in [now, now + valid_for], so a client that fetched the schema may send what it matches for that
    long. The window is wider (other offsets, minutes up to the limits): the pattern states part of it.
    """
    now = now.astimezone(UTC)
    end = now.replace(minute=0, second=0, microsecond=0)  # excluded
    oldest = now - max_age + valid_for
    hour = oldest.replace(minute=0, second=0, microsecond=0)
    if hour < oldest:
        hour += timedelta(hours=1)
    hours_by_day: dict[date, list[int]] = {}
    while hour < end:
        hours_by_day.setdefault(hour.date(), []).append(hour.hour)
        hour += timedelta(hours=1)
    if not hours_by_day:
        return "(?!)"  # no whole hour is certainly inside the window: matches nothing
    days = "|".join(f"{day.isoformat()}T{_hours(hours)}" for day, hours in hours_by_day.items())
    return f"^(?:{days}):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{{1,6}})?(?:Z|\\+00:00)$"


def _hours(hours: list[int]) -> str:
    """Hours of a day (ascending, no gaps) as a pattern over their two digits."""
    if len(hours) == 24:
        return _ANY_HOUR
    return f"(?:{'|'.join(f'{hour:02d}' for hour in hours)})"


class FeedbackEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(
        min_length=1,
        pattern=_ID_PATTERN,
        description=f"At most OVERNIGHT_MAX_USER_ID_LENGTH characters ({MAX_ID_LENGTH}).",
    )
    item_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=_ID_PATTERN)
    type: FeedbackEventType = Field(description="What the user did with the item.")
    timestamp: AwareDatetime = Field(
        description="When it happened, with a time zone (ISO 8601): at most 7 days before the server's clock "
        "and at most 5 minutes after it (clock skew); outside that window the request is a 422. The schema's "
        "`pattern` shows the window as of when this document was fetched, in UTC, with a margin: a timestamp it "
        "matches is accepted for an hour after the fetch. The server also accepts other offsets and the rest "
        "of the window; `x-overnight-window` gives the window in seconds.",
        json_schema_extra={
            "x-overnight-window": {
                "max_age_seconds": int(MAX_EVENT_AGE.total_seconds()),
                "max_future_seconds": int(MAX_CLOCK_SKEW.total_seconds()),
            }
        },
    )
    request_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="The `X-Request-Id` of the recommendations the item came from; "
        "without it the event still trains tomorrow's model but counts for no variant online.",
    )


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[FeedbackEvent] = Field(min_length=1, description="One or many events.")


class FeedbackAccepted(BaseModel):
    accepted: int = Field(description="Events queued; each is written to Postgres shortly after.")


class FeedbackIntake:
    """What the events route needs: the writer and the limits. Lives on ``app.state.feedback``."""

    def __init__(
        self,
        database_url: str,
        *,
        max_events_per_request: int = 1000,
        max_user_id_length: int = MAX_ID_LENGTH,
        max_age: timedelta = MAX_EVENT_AGE,
        max_clock_skew: timedelta = MAX_CLOCK_SKEW,
        **writer_options: object,
    ) -> None:
        self.max_events_per_request = max_events_per_request
        self.max_user_id_length = max_user_id_length
        self.max_age = max_age
        self.max_clock_skew = max_clock_skew
        self.writer: BulkWriter[FeedbackRow] = BulkWriter(
            "feedback_events",
            database_url,
            sql.query("insert_feedback_events"),
            **writer_options,  # type: ignore[arg-type]
        )

    def start(self) -> None:
        self.writer.start()

    async def stop(self, timeout: float = 10.0) -> None:
        await self.writer.stop(timeout)

    def rows(self, events: list[FeedbackEvent], now: datetime) -> list[FeedbackRow]:
        """The events as rows, or a `RequestValidationError` naming every event out of the limits (user id
        length, time)."""
        problems = []
        if len(events) > self.max_events_per_request:
            problems.append(
                _problem(("body", "events"), f"at most {self.max_events_per_request} events per request", len(events))
            )
        oldest, newest = now - self.max_age, now + self.max_clock_skew
        for index, event in enumerate(events):
            if len(event.user_id) > self.max_user_id_length:
                problems.append(
                    _problem(
                        ("body", "events", index, "user_id"),
                        f"user id is longer than {self.max_user_id_length} characters",
                        event.user_id,
                    )
                )
            if not oldest <= event.timestamp <= newest:
                when = (
                    f"more than {_span(self.max_clock_skew)} in the future"
                    if event.timestamp > newest
                    else f"older than {_span(self.max_age)}"
                )
                problems.append(
                    _problem(
                        ("body", "events", index, "timestamp"),
                        f"timestamp is {when} (server time {now.isoformat()})",
                        event.timestamp.isoformat(),
                    )
                )
        if problems:
            raise RequestValidationError(problems)
        return [(e.timestamp.astimezone(UTC), now, e.user_id, e.item_id, e.type, e.request_id) for e in events]


def _span(span: timedelta) -> str:
    """A limit as people write it: "7 days", "5 minutes"."""
    seconds = round(span.total_seconds())
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}{'s' if seconds != size else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def _problem(loc: tuple[str | int, ...], message: str, value: object) -> dict[str, object]:
    return {"type": "value_error", "loc": loc, "msg": message, "input": value}


async def _intake(request: Request) -> FeedbackIntake:
    intake: FeedbackIntake = request.app.state.feedback
    return intake


router = APIRouter(prefix="/v1", tags=["feedback"])


@router.post(
    "/events",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Report impressions, clicks and conversions",
    responses={
        422: {"description": "An event is malformed or out of the time limits; nothing was kept."},
        503: {
            "model": ErrorMessage,
            "description": "The queue is full (reason feedback_queue_full); nothing was kept, retry the whole "
            "request later.",
        },
    },
)
async def post_events(body: FeedbackRequest, intake: Annotated[FeedbackIntake, Depends(_intake)]) -> FeedbackAccepted:
    rows = intake.rows(body.events, datetime.now(UTC))
    if not intake.writer.offer_all(rows):
        raise FeedbackQueueFullError(
            f"feedback queue is full ({intake.writer.queued} of {intake.writer.capacity} waiting); "
            "nothing was kept, retry the request"
        )
    return FeedbackAccepted(accepted=len(rows))
