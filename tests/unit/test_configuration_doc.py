"""docs/configuration.md is what the settings classes say, and every setting says what it is for."""

import ast
import importlib

import pytest
from pydantic_settings import BaseSettings

from jobs.dev.configuration_doc import (
    COMMAND,
    DOC_PATH,
    SETTINGS_CLASSES,
    UNDOCUMENTED,
    render,
    settings_classes,
)

ROOT = DOC_PATH.parents[1]
# Where a process reads its settings: the batch side, the lookup service and the console.
PACKAGES = ("jobs", "serving", "console")


def _base_name(base: ast.expr, aliases: dict[str, str]) -> str:
    """The name a base class goes by where it is defined: `BaseSettings`, `pydantic_settings.BaseSettings`,
    `Settings[...]` and `S` after `from jobs.settings import Settings as S` all name `...Settings`."""
    if isinstance(base, ast.Subscript):
        base = base.value
    if isinstance(base, ast.Attribute):
        return base.attr
    return aliases.get(base.id, base.id) if isinstance(base, ast.Name) else ""


def settings_classes_in_source() -> list[tuple[str, str]]:
    """(module, class) of every class under PACKAGES whose base is a settings class: one whose name ends in
    Settings (pydantic_settings.BaseSettings, the batch side's Settings, ...), or a class found so, to any
    depth. Read from the source, so nothing has to remember to list a new one."""
    classes: list[tuple[str, str, set[str]]] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            tree = ast.parse(path.read_text(encoding="utf-8"))
            aliases = {
                alias.asname: alias.name
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom)
                for alias in node.names
                if alias.asname
            }
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    classes.append((module, node.name, {_base_name(base, aliases) for base in node.bases}))
    found: set[tuple[str, str]] = set()
    settings_names: set[str] = set()
    while True:
        more = {
            (module, name)
            for module, name, bases in classes
            if any(base.endswith("Settings") or base in settings_names for base in bases)
        } - found
        if not more:
            return sorted(found)
        found |= more
        settings_names |= {name for _, name in more}


def pydantic_settings_class(module: str, name: str) -> type[BaseSettings] | None:
    cls = getattr(importlib.import_module(module), name, None)
    assert cls is not None, f"{module}.{name} is not a module-level class: the configuration page cannot list it"
    return cls if isinstance(cls, type) and issubclass(cls, BaseSettings) else None


DISCOVERED = settings_classes_in_source()


def test_the_configuration_page_is_generated_from_the_settings_classes() -> None:
    written = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
    if written != render():
        pytest.fail(f"{DOC_PATH.name} differs from the settings classes: run `{COMMAND}` and commit the page")


def test_every_settings_class_in_the_project_is_on_the_page() -> None:
    """A new pydantic-settings class anywhere in jobs/, serving/ or console/ is on the page, and the page
    lists no class the source does not define."""
    in_source = {(module, name): cls for module, name in DISCOVERED if (cls := pydantic_settings_class(module, name))}
    listed = [(module, name) for module, name, _ in SETTINGS_CLASSES]
    unlisted = sorted(in_source.keys() - set(listed))
    assert not unlisted, (
        "settings classes missing from SETTINGS_CLASSES in jobs/dev/configuration_doc.py, so from "
        f"{DOC_PATH.name}: " + ", ".join(f"{module}.{name}" for module, name in unlisted)
    )
    assert sorted(in_source) == sorted(listed), "SETTINGS_CLASSES lists a class the source does not define"
    # each imports as the very class the source defines, and its section and every variable are on the page
    generated = {(entry.module, entry.name): entry for entry in settings_classes()}
    page = render()
    for key, cls in in_source.items():
        entry = generated[key]
        assert entry.cls is cls, f"{key}: the page documents another class"
        assert f"`{entry.module}.{entry.name}`" in page
        assert entry.cls.model_fields, f"{entry.name} has no settings"
        for field in entry.cls.model_fields:
            assert f"`{entry.env_prefix}{field.upper()}`" in page, f"{entry.name}.{field}"


@pytest.mark.parametrize(("module", "class_name"), DISCOVERED, ids=[f"{m}.{n}" for m, n in DISCOVERED])
def test_every_setting_has_a_description(module: str, class_name: str) -> None:
    cls = pydantic_settings_class(module, class_name)
    if cls is None:
        pytest.skip(f"{module}.{class_name} is not a pydantic-settings class")
    assert cls.model_fields, f"{class_name} has no settings"
    missing = [
        f"{class_name}.{name}" for name, field in cls.model_fields.items() if not (field.description or "").strip()
    ]
    assert not missing, (
        f"{len(missing)} settings have no description= (the generated page shows them as {UNDOCUMENTED}): "
        + ", ".join(missing)
    )
