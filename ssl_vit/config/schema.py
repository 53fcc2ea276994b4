"""The closed-schema machinery behind `config` and `finetune_config`: YAML recipes and `--set a.b=value`
overrides → frozen dataclasses, type-checked, with unknown keys named against the closest valid one; and back
to plain dicts for dumps and diffs.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every full dotted key of a config dataclass (`optim.base_lr`, ...)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], key + ".")
        else:
            keys.append(key)
    return keys


def _unknown_key(key: str, root: type) -> ConfigError:
    """`key` is the full dotted key the user wrote (`optm.base_lr`, not just the section `optm`)."""
    valid = all_keys(root)
    if "." not in key:  # a bare word may be a misspelled section (`--set optm={...}`)
        valid += [name for name, tp in typing.get_type_hints(root).items() if dataclasses.is_dataclass(tp)]
    # A known leaf name under a wrong or misspelled section: the one whose section is close to what was written
    # (`evl.batch_size` → eval's, `dat.batch_size` → data's); when none is (`train.batch_size`, a bare
    # `batch_size`), every key with that leaf, as guessing one would quietly set the wrong thing. Otherwise the
    # closest full key.
    # Schema keys are lower case: match on the lower-cased key (`model.IMG_SIZE` → `model.img_size`).
    section, _, leaf = key.lower().rpartition(".")
    leaf_matches = [k for k in valid if k.rpartition(".")[2] == leaf]
    if leaf_matches:
        near = [k for k in leaf_matches if difflib.SequenceMatcher(None, section, k.rpartition(".")[0]).ratio() >= 0.6]
        close = difflib.get_close_matches(key.lower(), near, n=1, cutoff=0.0) if near else leaf_matches
    else:
        close = difflib.get_close_matches(key.lower(), valid, n=1, cutoff=0.5)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _first_leaf(key: str, value: Any) -> str:
    """The first full key under an unknown section (`optm` + {"base_lr": 1} → `optm.base_lr`)."""
    while isinstance(value, dict) and value:
        name, value = next(iter(value.items()))
        key = f"{key}.{name}"
    return key


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int → float, list → tuple)."""
    if isinstance(value, _Raw):
        # Command-line text: a str field takes it verbatim (brace patterns stay intact); any other field
        # reads it as YAML, so ints, floats, bools, null and [a, b] lists mean what they mean in a recipe.
        if tp is str:
            return str(value)
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp):
            # `str | None`: `null` (or `~`, or nothing) on the command line means None, as in a recipe
            nullable = type(None) in typing.get_args(tp)
            return None if nullable and value.strip() in ("", "~", "null", "Null", "NULL") else str(value)
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{key}: cannot parse {str(value)!r} as {type_name(tp)}") from None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise _type_error(key, value, tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as a string; accept what any user means by it.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and type(value) is tp:
        return value
    raise _type_error(key, value, tp)


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    message = f"{key}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})"
    takes_text = tp is str or str in typing.get_args(tp)
    if isinstance(value, bool) and takes_text:  # YAML 1.1 reads a bare no/yes/off/on as a bool
        message += f"; a bare yes/no/on/off is a bool in YAML: quote it ('{'no' if not value else 'yes'}')"
    return ConfigError(message)


def _build(cls: type, data: dict[str, Any], prefix: str = "", root: type | None = None) -> Any:
    root = root or cls  # the top-level dataclass, whose keys the closest-key suggestions search
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in names:
            raise _unknown_key(_first_leaf(key, value), root)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
            kwargs[name] = _build(tp, value, key + ".", root)
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


class _Raw(str):
    """An override's text, parsed only once the target field's type is known."""


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), _Raw(raw)


def _merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path)}: {part!r} is not a section")
    node[path[-1]] = value


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Parse a YAML recipe with `safe_load` (no Python object tags) into a plain nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text YAML recipe (byte {err.object[err.start]:#04x} at offset "
                          f"{err.start} is not UTF-8)") from None
    try:
        _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not a valid YAML recipe ({str(err).splitlines()[0]})") from None
    if data is None:  # empty or only comments: most likely a truncated or wrong file, not "all defaults"
        raise ConfigError(f"{path}: the recipe is empty; it must set at least one key (docs/config.md lists them)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _refuse_duplicate_keys(node: yaml.Node | None, path: Path, prefix: str = "") -> None:
    """YAML lets a later `key:` silently replace an earlier one in the same mapping (`objective: mae` ...
    `objective: dino`): refuse it, naming the full key and both lines, as one of them is a mistake."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path, prefix)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}"
        line = key_node.start_mark.line + 1
        if key in seen and key_node.value != "<<":  # `<<` merge keys may repeat
            raise ConfigError(f"{path}: key {key!r} is set twice (lines {seen[key]} and {line}); remove one")
        seen[key] = line
        _refuse_duplicate_keys(value_node, path, f"{key}.")


def load_dataclass(cls: type[T], recipe: str | Path | None = None,
                   overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Defaults of the frozen dataclass `cls` ← recipe (if any) ← `key=value` overrides, type-checked.

    The closed-schema machinery of `load_config`, for any root dataclass (e.g. the fine-tune config).
    """
    data = read_recipe(recipe) if recipe is not None else {}
    for item in overrides:
        path, value = _parse_override(item)
        _merge(data, path, value)
    return _build(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON dumps."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def differences(old: Any, new: Any, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """`key: old → new` for every key starting with one of `prefixes` whose value differs between two configs."""
    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    a, b = flat(to_dict(old)), flat(to_dict(new))
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if k.startswith(prefixes) and a.get(k) != b.get(k)]
