"""The helpers in common/text.py that the batch side, the lookup service and the console share."""

import pytest
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.text import first_line, settings_error_line


def test_first_line_is_the_first_line_or_the_type_name_cut_at_the_limit() -> None:
    assert first_line(ValueError("  bad value\nDETAIL: more  ")) == "bad value"
    assert first_line(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert first_line(OSError("x" * 3000)) == "x" * 2000
    assert first_line("one\ntwo", limit=2) == "on"


def test_first_line_escapes_control_characters_from_names_in_the_message() -> None:
    """A source named with an escape sequence must not reach a terminal, a log or the run history raw."""
    assert (
        first_line(ValueError("e\x1b[2Jvil.csv: no valid interactions\x07"))
        == "e\\x1b[2Jvil.csv: no valid interactions\\x07"
    )


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRE_")

    url: str
    port: int = Field(default=1, gt=0)
    weights: dict[str, float] = {}

    @model_validator(mode="after")
    def _both(self) -> "_Settings":
        if self.port == 13:
            raise ValueError("PRE_PORT 13 with\n PRE_URL is unlucky")
        return self


def test_a_settings_error_is_one_line_naming_each_variable() -> None:
    with pytest.raises(ValidationError) as missing:
        _Settings(port=0, weights={"click": "x"})  # type: ignore[arg-type]
    assert settings_error_line(missing.value, "PRE_") == (
        "PRE_URL: Field required; PRE_PORT: Input should be greater than 0; "
        "PRE_WEIGHTS.click: Input should be a valid number, unable to parse string as a number"
    )
    assert settings_error_line(missing.value, "PRE_", {"url": "the DSN"}).startswith("PRE_URL is not set: the DSN; ")
    with pytest.raises(ValidationError) as across:
        _Settings(url="u", port=13)
    assert settings_error_line(across.value, "PRE_") == "PRE_PORT 13 with PRE_URL is unlucky"
