"""docs/config.md's tables, generated from the comment beside each field in pretrain.py and its CHOICES / RANGES /
SCALES (`python tools/config_reference.py`; a test fails when the checked-in doc is stale). The prose above the
first table is the doc's own and is kept as it is."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

from ssl_vit.config.pretrain import CHOICES, RANGES, SCALES, Config
from ssl_vit.config.schema import type_name

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"
_FIELD = re.compile(r"^\s+(\w+):.*?#\s*(.+)$")
_FIRST_TABLE = "\n## top level\n"


def _default(f: dataclasses.Field) -> str:
    value = list(f.default) if isinstance(f.default, tuple) else f.default
    text = repr(value) if isinstance(value, str) else str(value)
    return "null" if value is None else text.replace("True", "true").replace("False", "false")


def _values(key: str) -> str:
    if key in CHOICES:
        return " \\| ".join("null" if c is None else repr(c) for c in CHOICES[key])
    return "[min, max] in (0, 1]" if key in SCALES else RANGES.get(key, "")


def _table(title: str, cls: type, prefix: str) -> str:
    """One section's leaf keys: type, allowed values, default and the field's comment."""
    hints = typing.get_type_hints(cls)
    comments = {}  # a subclass's comments override those of the fields it inherits (DINOv2Config's of DINOConfig's)
    for part in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        comments.update(m.groups() for m in map(_FIELD.match, inspect.getsource(part).splitlines()) if m)
    def cell(text: str) -> str:
        return text.strip().replace("|", "\\|")

    rows = [f"| `{prefix}{f.name}` | {cell(type_name(hints[f.name]))} | {_values(prefix + f.name)} | `{_default(f)}` "
            f"| {cell(comments.get(f.name, ''))} |" for f in dataclasses.fields(cls)
            if not dataclasses.is_dataclass(hints[f.name])]
    return "\n".join([f"\n## {title}\n\n| key | type | values | default | meaning |\n|---|---|---|---|---|", *rows])


def render_reference() -> str:
    """The whole doc: its own prose, then one table per config section."""
    text = DOC.read_text(encoding="utf-8") if DOC.is_file() else "# Config reference\n"
    hints = typing.get_type_hints(Config)
    tables = [_table("top level", Config, "")] + [_table(f.name, hints[f.name], f"{f.name}.")
                                                  for f in dataclasses.fields(Config)
                                                  if dataclasses.is_dataclass(hints[f.name])]
    return "\n".join([text.split(_FIRST_TABLE)[0].rstrip("\n"), *tables]) + "\n"
