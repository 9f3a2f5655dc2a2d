"""The lookup service's configuration: every ``OVERNIGHT_*`` variable it reads, validated in one place."""

import os
from typing import Annotated, Any, Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.server import ENV_PREFIX, check_keys_configured
from common.text import settings_error_line
from common.web import split_keys
from serving.errors import ServingConfigError
from sql.contract import MAX_ID_LENGTH


def _default_pool_max_size() -> int:
    """Two per core."""
    # A lookup holds a connection for one short query, so a couple per core keeps Postgres busy
    # without queueing many backends behind the same cores.
    return 2 * (os.cpu_count() or 1)


class ServingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True, hide_input_in_errors=True)

    database_url: str = Field(min_length=1, repr=False, description="Postgres DSN the batches are published to.")
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), repr=False, description="Accepted bearer keys, comma-separated in OVERNIGHT_API_KEYS."
    )

    pool_min_size: int = Field(default=1, ge=1, description="Connections the lookup pool keeps open.")
    pool_max_size: int = Field(
        default_factory=_default_pool_max_size, ge=1, description="Most connections the lookup pool opens."
    )
    db_timeout_seconds: float = Field(
        default=1.5, gt=0, le=60, description="Deadline of a lookup's database work: checkout plus query."
    )
    live_poll_seconds: float = Field(
        default=5.0, gt=0, description="Re-read of the live pointer in case a NOTIFY was missed."
    )

    cache_entries: int = Field(
        default=50_000,
        ge=0,
        description="Users kept in each worker's lookup cache (about 1 KB each at k=50), and as many items' "
        "neighbour lists in another; 0 turns both off.",
    )

    max_batch_users: int = Field(default=1000, ge=1, description="Most users in one POST /v1/recommendations:batch.")
    max_batch_items: int = Field(default=1000, ge=1, description="Most item ids in one POST /v1/items:similar.")
    max_session_items: int = Field(
        default=50, ge=1, description="Most items one POST /v1/recommendations:session may give; more get 422."
    )
    max_filter_length: int = Field(
        default=512, ge=1, description="Longest `filter=` accepted (characters); longer ones get 422."
    )
    max_user_id_length: int = Field(
        default=MAX_ID_LENGTH, ge=1, description="Longest user id accepted (characters); longer ones get 422."
    )
    max_exclude_items: int = Field(default=500, ge=0, description="Most item ids one request may exclude.")
    max_request_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest request body accepted; bigger ones get 413."
    )
    body_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="Time a request's whole body has to arrive once its headers have; a slower one gets 408.",
    )
    access_log: bool = Field(default=False, description="One JSON line per request on the `overnight.access` logger.")
    access_log_sample: float = Field(
        default=1.0, ge=0, le=1, description="Share of requests the access log records (errors are always logged)."
    )

    prediction_log_sample_rate: float = Field(
        default=1.0, ge=0, le=1, description="Share of answers recorded in overnight.served_predictions (0: none)."
    )
    prediction_log_queue_size: int = Field(
        default=10_000, ge=1, description="Answers waiting to be written; past it they are dropped and counted."
    )
    feedback_queue_size: int = Field(
        default=10_000, ge=1, description="Feedback events waiting to be written; past it POST /v1/events gets 503."
    )
    feedback_max_events: int = Field(default=1000, ge=1, description="Most events in one POST /v1/events.")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        return split_keys(value)

    @model_validator(mode="after")
    def _pool_bounds(self) -> Self:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError(
                f"pool_min_size ({self.pool_min_size}) is larger than pool_max_size ({self.pool_max_size})"
            )
        if self.feedback_max_events > self.feedback_queue_size:
            raise ValueError(
                f"{ENV_PREFIX}FEEDBACK_MAX_EVENTS ({self.feedback_max_events}) is larger than "
                f"{ENV_PREFIX}FEEDBACK_QUEUE_SIZE ({self.feedback_queue_size}): a request that big could never "
                "be queued and would always get 503"
            )
        return self


def get_serving_settings(**overrides: Any) -> ServingSettings:
    """Settings from the environment (overrides win); a bad or missing value is a `ServingConfigError`."""
    try:
        return ServingSettings(**overrides)
    except ValidationError as error:
        raise ServingConfigError(settings_error_line(error, ENV_PREFIX, _MISSING)) from None


def check_auth_configured(settings: ServingSettings, auth_disabled: bool) -> None:
    """Refuse to serve an open API by accident: no key is only allowed with `overnight serve --no-auth`."""
    check_keys_configured(
        settings.api_keys, auth_disabled, what="API key", variables=f"{ENV_PREFIX}API_KEYS", error=ServingConfigError
    )


# What a required setting left unset gets said about it.
_MISSING = {"database_url": "the lookup service needs the Postgres DSN of the batches"}
