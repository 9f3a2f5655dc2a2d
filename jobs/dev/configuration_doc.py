"""Write docs/configuration.md from the settings classes, one table of OVERNIGHT_* variables per class:
``python -m jobs.dev.configuration_doc``.
"""

import argparse
import importlib
import json
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode

# (module, class, heading) in the order the page shows them. Only these modules are imported (no data or web
# library) and no environment is read: a default is the field's own. A class that does not import is an error.
SETTINGS_CLASSES: tuple[tuple[str, str, str], ...] = (
    ("jobs.settings", "Settings", "Batch side: the CLI, the DAGs and every step"),
    ("serving.settings", "ServingSettings", "Lookup service"),
    ("console.settings", "ConsoleSettings", "Operator console"),
)

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
UNDOCUMENTED = "(undocumented)"
COMMAND = "python -m jobs.dev.configuration_doc"


@dataclass(frozen=True)
class SettingsClass:
    module: str
    name: str
    heading: str
    cls: type[BaseSettings]

    @property
    def env_prefix(self) -> str:
        return str(self.cls.model_config.get("env_prefix") or "OVERNIGHT_")


def settings_classes() -> list[SettingsClass]:
    """Every class of SETTINGS_CLASSES, in order; a module or class that cannot be imported raises."""
    return [
        SettingsClass(module_name, class_name, heading, getattr(importlib.import_module(module_name), class_name))
        for module_name, class_name, heading in SETTINGS_CLASSES
    ]


def undocumented_fields() -> list[str]:
    """`Class.field` for every setting without a description."""
    return [
        f"{entry.name}.{name}"
        for entry in settings_classes()
        for name, field in entry.cls.model_fields.items()
        if not (field.description or "").strip()
    ]


def render() -> str:
    lines = [
        "# Configuration",
        "",
        "Every `OVERNIGHT_*` environment variable, per settings class, with its default, type and meaning.",
        f"Generated from the settings classes by `{COMMAND}`: do not edit by hand, run it again.",
        "",
        "Each process reads its own class once, at start: a variable that two classes list (the database",
        "URL, say) is set for each process that reads it. Lists of keys and networks are comma-separated;",
        'mappings are JSON (`OVERNIGHT_FEEDBACK_WEIGHTS=\'{"click": 1, "conversion": 3}\'`).',
    ]
    for entry in settings_classes():
        lines += [
            "",
            f"## {entry.heading}",
            "",
            f"`{entry.module}.{entry.name}`" + _module_summary(entry.module),
            "",
            "| variable | default | type | what |",
            "|---|---|---|---|",
        ]
        for name, field in entry.cls.model_fields.items():
            variable = f"`{entry.env_prefix}{name.upper()}`"
            description = " ".join((field.description or UNDOCUMENTED).split())
            cells = (variable, render_default(name, field), render_type(field), description)
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _module_summary(module_name: str) -> str:
    doc = sys.modules[module_name].__doc__ or ""
    first = doc.strip().split("\n\n")[0].replace("``", "`")
    return f": {' '.join(first.split())}" if first else ""


def _is_secret(name: str, field: FieldInfo) -> bool:
    return field.repr is False or any(word in name for word in ("key", "password", "secret", "token"))


def render_default(name: str, field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    factory = field.default_factory
    if factory is not None and isinstance(factory, types.FunctionType) and factory.__name__ != "<lambda>":
        # A function may compute from the machine (cores, say): describe it rather than show one machine's value.
        doc = (factory.__doc__ or "").strip()
        return doc.splitlines()[0].rstrip(".") if doc else f"computed by `{factory.__name__}()`"
    value = field.get_default(call_default_factory=True, validated_data={})
    if _is_secret(name, field):
        return "none" if not value else "set (not shown)"
    return _render_value(value)


def _render_value(value: Any) -> str:
    if value is None or value == "" or (isinstance(value, tuple | list | set | frozenset | dict) and not value):
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict):
        return f"`{json.dumps(value)}`"
    if isinstance(value, tuple | list | set | frozenset):
        return "`" + ",".join(str(part) for part in value) + "`"
    return f"`{value}`"


_TYPE_NAMES: dict[Any, str] = {
    str: "text",
    int: "integer",
    float: "number",
    bool: "true/false",
    Path: "path",
}


def render_type(field: FieldInfo) -> str:
    # pydantic keeps Annotated's extras in field.metadata; NoDecode marks a list read as comma-separated text
    text = _type_name(field.annotation, NoDecode in field.metadata)
    bounds = _bounds(field.metadata)
    return f"{text}, {bounds}" if bounds else text


def _type_name(annotation: Any, comma_separated: bool = False) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0], comma_separated or NoDecode in args[1:])
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(arg, comma_separated) for arg in args if arg is not type(None)]
        text = " or ".join(parts)
        return f"{text} or unset" if type(None) in args else text
    if origin in (tuple, list, set, frozenset):
        item = _type_name(args[0]) if args else "text"
        return f"comma-separated list of {item}" if comma_separated else f"JSON list of {item}"
    if origin is dict or annotation is dict:
        return "comma-separated name=value pairs" if comma_separated else "JSON object"
    if annotation in _TYPE_NAMES:
        return _TYPE_NAMES[annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return " or ".join(f"`{arg}`" for arg in args)
    name = getattr(annotation, "__name__", str(annotation))
    return {"IPvAnyNetwork": "network (address or CIDR)", "UPath": "path or s3:// URL"}.get(name, name)


_BOUNDS: tuple[tuple[type, str, str], ...] = (
    (annotated_types.Gt, "gt", "> {}"),
    (annotated_types.Ge, "ge", "≥ {}"),
    (annotated_types.Lt, "lt", "< {}"),
    (annotated_types.Le, "le", "≤ {}"),
    (annotated_types.MinLen, "min_length", "at least {} characters"),
)


def _bounds(metadata: Sequence[Any]) -> str:
    parts = []
    for item in metadata:
        for kind, attribute, template in _BOUNDS:
            if isinstance(item, kind):
                bound = getattr(item, attribute)
                parts.append("not empty" if kind is annotated_types.MinLen and bound == 1 else template.format(bound))
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DOC_PATH, help=f"File to write (default {DOC_PATH}).")
    args = parser.parse_args(argv)
    text = render()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}", file=sys.stderr)
    missing = undocumented_fields()
    if missing:
        print(f"{len(missing)} settings have no description: {', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
