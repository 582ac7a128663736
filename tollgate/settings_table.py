"""`python -m tollgate.settings_table`: the README's table of every setting, written from the settings
classes between the `<!-- settings:start -->` and `<!-- settings:end -->` markers of README.md
(`--check` exits 1, writing nothing, when the README differs; tests/settings/test_settings_table.py).

Each row: the environment variable, the default, the bound (numeric limits, lengths, choices) and what it
does: the field's `description`, else the comment on its line or the comment lines just above it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- settings:start -->", "<!-- settings:end -->"

# (heading, "module:Class"), in the order a reader meets them; a class's rows are the fields it defines
# itself (a component's shared fields are the first section's).
SECTIONS = (
    ("Shared by every component", "tollgate.common_settings:CommonSettings"),
    ("Gateway", "gateway.settings:GatewaySettings"),
    ("Admission", "gateway.admission.settings:AdmissionSettings"),
    ("Admin API", "gateway.admin.settings:AdminSettings"),
    ("Console and tenant portal", "gateway.console.settings:ConsoleSettings"),
    ("Inference worker", "inference.settings:WorkerSettings"),
    ("Gateway <-> worker secret", "inference.internal_auth:InternalAuthSettings"),
    ("Event log (Kafka, spool)", "streams.settings:StreamSettings"),
    ("Stream processor", "streams.processor_settings:ProcessorSettings"),
    ("Audit (hash chain, checkpoints)", "streams.audit_checkpoints:AuditSettings"),
    ("Projector", "streams.projector:ProjectorSettings"),
    ("Webhook dispatcher", "streams.webhooks.settings:WebhookSettings"),
    ("Database", "storage.database:DatabaseSettings"),
    ("Logging", "tollgate.logging_setup:LoggingSettings"),
)


def load(reference: str) -> type[BaseModel]:
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


def own_fields(cls: type[BaseModel]) -> list[str]:
    inherited = {
        name
        for base in cls.__mro__[1:]
        if isinstance(base, type) and issubclass(base, BaseModel)
        for name in base.model_fields
    }
    return [name for name in cls.model_fields if name not in inherited]


def environment_variable(cls: type[BaseModel], name: str, field: FieldInfo, prefix: str) -> str:
    alias = field.validation_alias
    if isinstance(alias, str):
        return alias
    if alias is not None:  # AliasChoices: every name it reads
        return " or ".join(str(choice) for choice in alias.choices)
    return f"{prefix}{name}".upper()


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None or isinstance(value, SecretStr):
        return "unset"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        value = {
            key: item.model_dump(mode="json") if isinstance(item, BaseModel) else item
            for key, item in value.items()
        }
    if isinstance(value, dict | list | tuple):
        return f"`{json.dumps(value, separators=(',', ':'))}`"
    return f"`{value}`"


BOUNDS = (
    ("ge", ">="),
    ("gt", ">"),
    ("le", "<="),
    ("lt", "<"),
    ("min_length", "length >="),
    ("max_length", "length <="),
)


def bound_text(field: FieldInfo) -> str:
    parts = []
    for item in field.metadata:
        for attribute, symbol in BOUNDS:
            value = getattr(item, attribute, None) if isinstance(item, annotated_types.BaseMetadata) else None
            if value is not None:
                parts.append(f"{symbol} {value:_}" if isinstance(value, int) else f"{symbol} {value}")
    choices = literal_choices(field.annotation)
    if choices:
        parts.append(" / ".join(f"`{choice}`" for choice in choices))
    return ", ".join(parts)


def literal_choices(annotation: Any) -> tuple:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    for argument in get_args(annotation):
        if get_origin(argument) is Literal:
            return get_args(argument)
    return ()


def comments_of(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line, else the contiguous comment lines above it."""
    lines = inspect.getsource(cls).splitlines()
    found: dict[str, str] = {}
    for index, line in enumerate(lines):
        match = re.match(r"    (\w+): [^#]*?(?:#\s*(.*))?$", line)
        if not match:
            continue
        trailing = match.group(2)
        if trailing:
            found[match.group(1)] = trailing.strip()
            continue
        above = []
        for previous in reversed(lines[:index]):
            if not previous.strip().startswith("#"):
                break
            above.insert(0, previous.strip().lstrip("#").strip())
        if above:
            found[match.group(1)] = " ".join(above)
    return found


def rows_of(cls: type[BaseModel], names: list[str], prefix: str) -> list[str]:
    comments = comments_of(cls)
    rows = []
    for name in names:
        field = cls.model_fields[name]
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):  # nested: PREFIX_NAME__FIELD
            rows += rows_of(annotation, list(annotation.model_fields), f"{prefix}{name}__")
            continue
        what = field.description or comments.get(name, "")
        cells = (
            f"`{environment_variable(cls, name, field, prefix)}`",
            default_text(field),
            bound_text(field),
            what,
        )
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return rows


def render() -> str:
    out = [
        "Generated by `python -m tollgate.settings_table` from the settings classes (do not edit by hand; a "
        "test fails when it is stale). A component's own settings are `TOLLGATE_<COMPONENT>_<NAME>`; shared "
        "facts `TOLLGATE_<NAME>`. Lists and dicts are JSON.",
    ]
    for heading, reference in SECTIONS:
        cls = load(reference)
        prefix = cls.model_config.get("env_prefix", "")
        out += [
            "",
            f"**{heading}** (`{reference.replace(':', '.')}`)",
            "",
            "| Variable | Default | Bound | What it does |",
            "|---|---|---|---|",
        ]
        out += rows_of(cls, own_fields(cls), prefix)
    return "\n".join(out)


def with_table(readme: str) -> str:
    assert readme.count(START) == 1 and readme.count(END) == 1, "README.md has one pair of settings markers"
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{render()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    current = README.read_text()
    updated = with_table(current)
    if "--check" in argv:
        if updated != current:
            print(
                "README.md's settings table is stale: run python -m tollgate.settings_table", file=sys.stderr
            )
            return 1
        return 0
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
