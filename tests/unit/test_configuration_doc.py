"""docs/configuration.md is what the settings classes say, and every setting says what it is for."""

import pytest

from jobs.dev.configuration_doc import (
    COMMAND,
    DOC_PATH,
    SETTINGS_CLASSES,
    UNDOCUMENTED,
    render,
    settings_classes,
    undocumented_fields,
)


def test_the_configuration_page_is_generated_from_the_settings_classes() -> None:
    written = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
    if written != render():
        pytest.fail(f"{DOC_PATH.name} differs from the settings classes: run `{COMMAND}` and commit the page")


def test_the_three_settings_classes_are_on_the_page() -> None:
    expected = [
        ("jobs.settings", "Settings"),
        ("serving.settings", "ServingSettings"),
        ("console.settings", "ConsoleSettings"),
    ]
    assert [(module, name) for module, name, _ in SETTINGS_CLASSES] == expected
    # none is skipped: each imports, and its section is on the page
    assert [(entry.module, entry.name) for entry in settings_classes()] == expected
    page = render()
    for module, name in expected:
        assert f"`{module}.{name}`" in page


@pytest.mark.parametrize("class_name", ["Settings", "ServingSettings", "ConsoleSettings"])
def test_every_setting_has_a_description(class_name: str) -> None:
    entry = next(entry for entry in settings_classes() if entry.name == class_name)
    assert entry.cls.model_fields, f"{class_name} has no settings"
    missing = [field for field in undocumented_fields() if field.startswith(f"{class_name}.")]
    assert not missing, (
        f"{len(missing)} settings have no description= (the generated page shows them as {UNDOCUMENTED}): "
        + ", ".join(missing)
    )
