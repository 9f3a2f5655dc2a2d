"""docs/configuration.md is what the settings classes say, and every setting says what it is for."""

import pytest

from jobs.dev.configuration_doc import COMMAND, DOC_PATH, render, settings_classes, undocumented_fields


def test_the_configuration_page_is_generated_from_the_settings_classes() -> None:
    written = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
    if written != render():
        pytest.fail(f"{DOC_PATH.name} differs from the settings classes: run `{COMMAND}` and commit the page")


def test_the_batch_and_serving_settings_are_on_the_page() -> None:
    names = {entry.name for entry in settings_classes()}
    assert {"Settings", "ServingSettings"} <= names


def test_every_setting_has_a_description() -> None:
    missing = undocumented_fields()
    assert not missing, (
        f"{len(missing)} settings have no description= (the generated page shows them as undocumented): "
        + ", ".join(missing)
    )
