"""The operator console's configuration: every ``OVERNIGHT_*`` variable the dashboard process reads.

It reads the batch side's records with its own read-only role, signs operators in with the dashboard keys, and
reads the lookup service's figures from its ``/metrics``."""

import logging
from typing import Annotated, Any, Self

from pydantic import Field, IPvAnyNetwork, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.server import ENV_PREFIX, check_keys_configured
from common.text import settings_error_line
from common.web import split_keys

logger = logging.getLogger(__name__)

DEFAULT_SERVICE_URL = "http://127.0.0.1:8000"


class ConsoleConfigError(Exception):
    """The console cannot start with this configuration (no DSN, no key, a bad value); one line."""


class ConsoleSettings(BaseSettings):
    # Empty variables count as unset, so compose's `${VAR:-}` falls back as an absent one does.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, env_ignore_empty=True, hide_input_in_errors=True
    )

    console_database_url: str | None = Field(
        default=None,
        repr=False,
        description="Postgres DSN the console reads with: a login role in overnight_console (migration 0018), "
        "which can read the run history, monitoring and the registry and write nothing. "
        "Unset: OVERNIGHT_DATABASE_URL.",
    )
    database_url: str | None = Field(
        default=None,
        repr=False,
        description="The batch side's Postgres DSN; the console uses it when OVERNIGHT_CONSOLE_DATABASE_URL is unset.",
    )
    dashboard_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), repr=False, description="Keys that open /dashboard (comma-separated); unset: OVERNIGHT_API_KEYS."
    )
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        repr=False,
        description="The lookup service's bearer keys (comma-separated): they open /dashboard when "
        "OVERNIGHT_DASHBOARD_KEYS is unset.",
    )
    trusted_proxies: Annotated[tuple[IPvAnyNetwork, ...], NoDecode] = Field(
        default=(),
        description="Addresses or networks (comma-separated, e.g. 10.0.0.0/8) of the reverse proxies whose "
        "X-Forwarded-Proto and X-Forwarded-For the console believes; unset: it believes no one.",
    )
    console_service_url: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(DEFAULT_SERVICE_URL,),
        description="Base URL of the lookup service (its proxy, or each replica, comma-separated) whose /metrics "
        "the dashboard's service panel reads: traffic, latency, errors.",
    )
    console_service_timeout_seconds: float = Field(
        default=2.0, gt=0, le=30, description="How long the service panel waits for each /metrics answer."
    )
    body_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="Time a sign-in form's whole body has to arrive once its headers have; a slower one gets 408.",
    )
    console_access_log: bool = Field(
        default=True,
        description="One JSON line per request on the `overnight.console.access` logger (secrets in query "
        "strings redacted): who signed in from where.",
    )

    @property
    def dsn(self) -> str:
        """The DSN to read with: the console's own, else the batch side's."""
        dsn = self.console_database_url or self.database_url
        assert dsn is not None  # the model validator made sure
        return dsn

    @property
    def keys(self) -> tuple[str, ...]:
        """Keys that open the dashboard: the dashboard keys, else the API keys."""
        return self.dashboard_keys or self.api_keys

    @field_validator("dashboard_keys", "api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        return split_keys(value)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("console_service_url", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            urls = tuple(dict.fromkeys(str(url).strip().rstrip("/") for url in value if str(url).strip()))
            for url in urls:
                # urllib would also open file:// and ftp:// URLs: only the service's HTTP is read.
                if not url.startswith(("http://", "https://")):
                    raise ValueError(f"{url!r} is not an http:// or https:// URL")
            return urls
        return value

    @model_validator(mode="after")
    def _has_a_database(self) -> Self:
        if not (self.console_database_url or self.database_url):
            raise ValueError(
                f"neither {ENV_PREFIX}CONSOLE_DATABASE_URL nor {ENV_PREFIX}DATABASE_URL is set: the console needs "
                "the Postgres DSN of the batch side's records"
            )
        return self


def get_console_settings(**overrides: Any) -> ConsoleSettings:
    """Settings from the environment (overrides win); a bad or missing value is a `ConsoleConfigError`."""
    try:
        return ConsoleSettings(**overrides)
    except ValidationError as error:
        raise ConsoleConfigError(settings_error_line(error, ENV_PREFIX)) from None


def check_auth_configured(settings: ConsoleSettings, auth_disabled: bool) -> None:
    """Refuse to open the dashboard to anyone by accident: no key is allowed only with ``--no-auth``."""
    check_keys_configured(
        settings.keys,
        auth_disabled,
        what="key",
        variables=f"{ENV_PREFIX}DASHBOARD_KEYS or {ENV_PREFIX}API_KEYS",
        error=ConsoleConfigError,
    )
