"""The closed schema behind `load_config` and `load_finetune_config`: OmegaConf structured configs over the frozen
dataclasses, its errors turned into one-line `ConfigError`s (docs/config.md, "How a config is loaded")."""

from __future__ import annotations

import collections
import dataclasses
import difflib
import typing
from operator import attrgetter
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
    """`key`: the full dotted key the user wrote (`optm.base_lr`, not just the section `optm`)."""
    valid = list(field_types(root))
    if "." not in key:  # a bare word may be a misspelled section (`--set optm={...}`)
        valid += sorted({k.split(".")[0] for k in valid if "." in k})
    # A known leaf under a wrong section: the key whose section is close to what was written, else every key with
    # that leaf (guessing one would quietly set the wrong thing); otherwise the closest full key. Keys are lower case.
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
    """What OmegaConf would take but mean something else by: `${...}` (resolved: it can read the environment),
    `???` (the default stays), a non-string in a str key (`no` → 'False'), a tuple of another length (< 2.4)."""
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


def _apply_override(data: dict[str, Any], item: str, types: dict[str, Any]) -> None:
    """`key=value` into the recipe's dict: a str key takes the text verbatim (`null`, `~` or nothing: None where it
    may be), any other reads it as YAML. Not OmegaConf's dotlist: it reads all as YAML (`{a,b}.tar`: a mapping)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    key = key.strip()
    tp = types.get(key)  # None: an unknown key keeps the text, for the merge to name it
    if tp is not None and _takes_text(tp):
        if type(None) in typing.get_args(tp) and value.strip() in ("", "~", "null", "Null", "NULL"):
            value = None
    elif tp is not None:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{key}: cannot parse {value!r} as {type_name(tp)}") from None
    *sections, leaf = key.split(".")
    node = data
    for part in sections:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
    node[leaf] = value


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


def _refuse_duplicate_keys(root: yaml.Node | None, path: Path, limit: int = 100_000) -> None:
    """A later `key:` silently replaces an earlier one in YAML: refuse it, as one of them is a mistake. Also refuse
    aliases that expand to more than `limit` values (a "billion laughs" file would hang this walk and the merge)."""
    todo, visited = collections.deque([(root, "")]), 0
    while todo:
        node, prefix = todo.popleft()
        visited += 1
        if visited > limit:
            raise ConfigError(f"{path}: not a recipe (its YAML aliases expand to over {limit} values)")
        if isinstance(node, yaml.SequenceNode):
            todo.extend((item, prefix) for item in node.value)
        if not isinstance(node, yaml.MappingNode):
            continue
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
            if key in seen and key_node.value != "<<":  # `<<` merge keys may repeat
                raise ConfigError(f"{path}: key {key!r} is set twice (lines {seen[key]} and {line}); remove one")
            seen[key] = line
            todo.append((value_node, f"{key}."))


def leaf_keys(data: Any, prefix: str = "") -> list[str]:
    """The full dotted keys a plain nested dict sets (`{"optm": {"base_lr": 1}}`: `optm.base_lr`)."""
    if not isinstance(data, dict):
        return [prefix[:-1]] if prefix else []
    return [key for name, value in data.items() for key in leaf_keys(value, f"{prefix}{name}.")]


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
    """Defaults of `cls` ← recipe (if any) ← `key=value` overrides (merged before any check: they may fix a
    recipe's bad value), type-checked."""
    data = read_recipe(recipe) if recipe is not None else {}
    types = field_types(cls)
    for item in overrides:
        _apply_override(data, item, types)
    _check_values(cls, data)
    schema = OmegaConf.structured(cls)
    _writable(schema)
    try:
        return _tuples(OmegaConf.to_object(OmegaConf.merge(schema, data)))
    except ConfigKeyError as err:
        written = [k for k in leaf_keys(data) if f"{k}.".startswith(f"{err.full_key}.")]  # optm → optm.base_lr
        raise _unknown_key((written or [err.full_key])[0], cls) from None
    except OmegaConfBaseException as err:
        if err.full_key in types:
            raise _type_error(err.full_key, err.value, types[err.full_key]) from None
        raise ConfigError(f"{err.full_key or cls.__name__}: {str(err).splitlines()[0]}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON dumps."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def differences(old: Any, new: Any, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """`key: old → new` for every key starting with one of `prefixes` whose value differs between two configs."""
    def shown(cfg: Any, key: str) -> str:
        value = attrgetter(key)(cfg)
        return repr(list(value) if isinstance(value, tuple) else value)

    return [f"{k}: {shown(old, k)} → {shown(new, k)}" for k in sorted(field_types(type(old)))
            if k.startswith(prefixes) and attrgetter(k)(old) != attrgetter(k)(new)]
