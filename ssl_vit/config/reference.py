"""The config reference (docs/config.md), generated from the dataclasses' own field comments and the value
checks' tables.

The comments beside each field in pretrain.py and its CHOICES / RANGES / SCALES are the single source:
`python tools/config_reference.py` rewrites the doc, and a test fails when the checked-in doc no longer matches.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from ssl_vit.config.pretrain import CHOICES, RANGES, SCALES, Config
from ssl_vit.config.schema import type_name

_FIELD = re.compile(r"^\s+(\w+):.*?#\s*(.+)$")

HEADER = """# Config reference

Every key a recipe or `--set section.key=value` can set, with its default and meaning. Defaults are the MAE
paper's ViT-B/16 pretraining values; a recipe lists only what differs. Generated from `ssl_vit/config/pretrain.py` by
`python tools/config_reference.py` — edit the comments there, not this file.

An unknown key is an error naming the closest valid one; a value of the wrong type, or outside the values the
table gives (an interval, or the choices), is an error naming the key. Values are literal: an OmegaConf
interpolation (`${...}`) is refused. `ssl-vit config RECIPE [--set ...]` prints the resolved config.
"""


def _comments(cls: type) -> dict[str, str]:
    found = {}
    for line in inspect.getsource(cls).splitlines():
        match = _FIELD.match(line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def _default(f: dataclasses.Field) -> str:
    value = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(value, tuple):
        value = list(value)
    text = repr(value) if isinstance(value, str) else str(value)
    return "null" if value is None else text.replace("True", "true").replace("False", "false")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _values(key: str) -> str:
    if key in CHOICES:
        return " \\| ".join("null" if c is None else repr(c) for c in CHOICES[key])
    return "[min, max] in (0, 1]" if key in SCALES else RANGES.get(key, "")


def _row(key: str, tp: object, f: dataclasses.Field, comment: str) -> str:
    return f"| `{key}` | {_cell(type_name(tp))} | {_values(key)} | `{_default(f)}` | {_cell(comment)} |"


def render_reference() -> str:
    """Markdown: one table per config section."""
    out = [HEADER]
    top_hints = typing.get_type_hints(Config)
    top_comments = _comments(Config)
    scalars = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(top_hints[f.name])]
    out.append("## top level\n\n| key | type | values | default | meaning |\n|---|---|---|---|---|")
    out += [_row(f.name, top_hints[f.name], f, top_comments.get(f.name, "")) for f in scalars]
    for section in dataclasses.fields(Config):
        cls = top_hints[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        hints, comments = typing.get_type_hints(cls), _comments(cls)
        out.append(f"\n## {section.name}\n\n| key | type | values | default | meaning |\n|---|---|---|---|---|")
        for f in dataclasses.fields(cls):
            out.append(_row(f"{section.name}.{f.name}", hints[f.name], f, comments.get(f.name, "")))
    return "\n".join(out) + "\n"
