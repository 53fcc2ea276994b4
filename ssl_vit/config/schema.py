"""The closed-schema machinery behind `load_config` and `load_finetune_config`, on OmegaConf structured configs:
the frozen dataclasses are the schema, a YAML recipe and `--set a.b=value` overrides merge into it (OmegaConf
refuses unknown keys and converts or refuses values by type), and `to_object` gives the dataclass back. Its errors
become one-line `ConfigError`s naming the full key and, for a misspelled one, the closest valid key.

Ours still: the YAML reading (`safe_load`, a key given twice refused), `--set` text read by its key's type, and
the values OmegaConf would take but misread (`_check_values`: interpolations above all, refused, never resolved).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


def field_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every full dotted key of a config dataclass (`optim.base_lr`, ...) with its annotation."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        out.update(field_types(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else {prefix + name: tp})
    return out


def type_name(tp: Any) -> str:
    """`int`, `str | None`, `tuple[float, float]`."""
    return str(tp).replace("typing.", "") if typing.get_args(tp) else tp.__name__


def _takes_text(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) is not tuple and str in typing.get_args(tp))


def _unknown_key(key: str, root: type) -> ConfigError:
    """`key` is the full dotted key the user wrote (`optm.base_lr`, not just the section `optm`)."""
    valid = list(field_types(root))
    if "." not in key:  # a bare word may be a misspelled section (`--set optm={...}`)
        valid += sorted({k.split(".")[0] for k in valid if "." in k})
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


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    message = f"{key}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})"
    if isinstance(value, bool) and _takes_text(tp):  # YAML 1.1 reads a bare no/yes/off/on as a bool
        message += f"; a bare yes/no/on/off is a bool in YAML: quote it ('{'no' if not value else 'yes'}')"
    return ConfigError(message)


def _reads_as_float(value: Any) -> bool:
    """A number, or text such as `1e-3` (YAML 1.1 reads an exponent without a dot as a string)."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)


def _check_values(cls: type, data: dict[str, Any], prefix: str = "") -> None:
    """What OmegaConf would take but mean something else by: `${...}` (it would resolve it: interpolations can
    read environment variables and call resolvers), `???` (missing: the default stays), a non-string in a str key
    (a YAML `no` would become 'False'), a tuple of another length (OmegaConf < 2.4 takes any; 2.4 names no key).
    Unknown keys are left to OmegaConf."""
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        key, tp = f"{prefix}{name}", hints.get(name)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
            _check_values(tp, value, key + ".")
            continue
        if tp is None:
            continue
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and ("${" in text or text == "???"):
                what = "an interpolation (it could read the environment)" if "${" in text else "'missing' to OmegaConf"
                raise ConfigError(f"{key}: {text!r} is {what}; write the value itself")
        if _takes_text(tp) and not isinstance(value, str) and not (value is None and type(None) in typing.get_args(tp)):
            raise _type_error(key, value, tp)
        if typing.get_origin(tp) is tuple:
            args = typing.get_args(tp)
            if not isinstance(value, list) or len(value) != len(args):
                raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
            for i, (item, arg) in enumerate(zip(value, args, strict=True)):
                if arg is float and not _reads_as_float(item):
                    raise _type_error(f"{key}[{i}]", item, arg)


def _parse_override(item: str, types: dict[str, Any]) -> tuple[list[str], Any]:
    """`key=value`: a str key takes the text verbatim (brace patterns stay intact; `null`, `~` or nothing mean
    None where the key takes it); any other key reads it as YAML, so numbers, bools, null and [a, b] lists mean
    what they mean in a recipe. Not OmegaConf's dotlist, which reads every value as YAML (`{a,b}.tar` a mapping,
    `no` a bool)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    tp = types.get(key)
    if tp is None:  # unknown: left as text for the merge to name it
        return key.split("."), text
    if _takes_text(tp):
        nullable = type(None) in typing.get_args(tp)
        return key.split("."), None if nullable and text.strip() in ("", "~", "null", "Null", "NULL") else text
    try:
        return key.split("."), yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{key}: cannot parse {text!r} as {type_name(tp)}") from None


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


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _first_leaf(key: str, value: Any) -> str:
    """The first full key under an unknown section (`optm` + {"base_lr": 1} → `optm.base_lr`)."""
    while isinstance(value, dict) and value:
        name, value = next(iter(value.items()))
        key = f"{key}.{name}"
    return key


def _writable(node: Any) -> None:
    """A frozen dataclass makes read-only nodes, which OmegaConf < 2.4 refuses to merge into."""
    OmegaConf.set_readonly(node, None)
    for child in node.values() if OmegaConf.is_dict(node) else ():
        if OmegaConf.is_config(child):
            _writable(child)


def _tuples(cfg: T) -> T:
    """OmegaConf < 2.4 gives a tuple field back as a list: make it the tuple the frozen dataclass declares."""
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) or isinstance(value, list):
            changes[f.name] = _tuples(value) if dataclasses.is_dataclass(value) else tuple(value)
    return dataclasses.replace(cfg, **changes)


def load_dataclass(cls: type[T], recipe: str | Path | None = None,
                   overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Defaults of the frozen dataclass `cls` ← recipe (if any) ← `key=value` overrides, type-checked.

    The overrides are merged into the recipe before anything is checked, so one can fix a recipe's bad value.
    """
    data = read_recipe(recipe) if recipe is not None else {}
    types = field_types(cls)
    for item in overrides:
        _merge(data, *_parse_override(item, types))
    _check_values(cls, data)
    schema = OmegaConf.structured(cls)
    _writable(schema)
    try:
        return _tuples(OmegaConf.to_object(OmegaConf.merge(schema, data)))
    except ConfigKeyError as err:
        raise _unknown_key(_first_leaf(err.full_key, _lookup(data, err.full_key)), cls) from None
    except OmegaConfBaseException as err:
        if err.full_key in types:
            raise _type_error(err.full_key, _lookup(data, err.full_key), types[err.full_key]) from None
        raise ConfigError(f"{err.full_key or cls.__name__}: {str(err).splitlines()[0]}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON dumps."""
    return {f.name: to_dict(v) if dataclasses.is_dataclass(v := getattr(cfg, f.name)) else
            list(v) if isinstance(v, tuple) else v for f in dataclasses.fields(cfg)}


def _flat(cfg: Any) -> dict[str, Any]:
    tree = to_dict(cfg)
    return {key: _lookup(tree, key) for key in field_types(type(cfg))}


def differences(old: Any, new: Any, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """`key: old → new` for every key starting with one of `prefixes` whose value differs between two configs."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if k.startswith(prefixes) and a.get(k) != b.get(k)]
