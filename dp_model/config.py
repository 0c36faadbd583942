"""Typed configuration: YAML files read into dataclasses, validated once, at load time.

A config class is a (frozen) dataclass whose fields carry their types and defaults; the
defaults are the embedded default configuration, and the YAML files in ``configs/`` only
override them. Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` with the file and the dotted key, for example
``configs/synth.yaml: difficulty.lesion_contrast: expected a number, got 'high'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``overrides``.

    ``overrides`` uses dotted keys (``{"difficulty.label_noise": 0.05}``), as command-line
    options do; values that are None are ignored.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        data = loaded or {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for dotted, value in given.items():
        _set_dotted(data, dotted, value)
    if given:
        source = "command line" if path is None else f"{path} with command-line options"
    return from_mapping(cls, data, source)


def load_arguments(cls: type[T], args: argparse.Namespace, options: Mapping[str, str]) -> T:
    """:func:`load_config` of a command line: the file of ``args.config`` (None: defaults),
    then each option of ``options`` (argparse destination -> dotted key) that the parser
    defines and that was given, so that every command reads its options one way."""
    given = vars(args)
    return load_config(
        cls,
        given.get("config"),
        {key: given[option] for option, key in options.items() if option in given},
    )


def from_mapping(
    cls: type[T], data: Mapping[str, Any], source: str = "config", prefix: str = ""
) -> T:
    """Build dataclass ``cls`` from ``data``, checking every key and type."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {data!r}"
        )
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: {prefix}{unknown[0]}: unknown key; known keys are {sorted(fields)}"
        )
    values = {
        name: _convert(hints[name], data[name], source, prefix + name)
        for name in fields
        if name in data
    }
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        where = f"{prefix.rstrip('.')}: " if prefix else ""
        raise ConfigError(f"{source}: {where}{exc}") from None


def to_mapping(obj: Any) -> Any:
    """A dataclass (nested) as plain YAML/JSON-ready data; inverse of :func:`from_mapping`."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_mapping(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def require(ok: bool, name: str, value: object, expected: str) -> None:
    """For a config class's ``__post_init__``: raise ``ValueError`` naming the value when ``ok`` is false."""
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _convert(hint: Any, value: Any, source: str, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = _fitting([a for a in args if a is not type(None)], value)
        if len(options) == 1:  # its own error, naming the key inside (and no value beside it)
            return _convert(options[0], value, source, key)
        errors = []
        for option in options:
            try:
                return _convert(option, value, source, key)
            except ConfigError as exc:
                errors.append(str(exc).split(": ", 2)[-1])
        raise ConfigError(f"{source}: {key}: {' or '.join(errors)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        return _convert_sequence(hint, value, source, key)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        return (
            {str(k): _convert(args[1], v, source, f"{key}.{k}") for k, v in value.items()}
            if args
            else dict(value)
        )
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, source, key + ".")
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(
                f"{source}: {key}: expected one of {[e.value for e in hint]}, got {value!r}"
            ) from None
    return _convert_scalar(hint, value, source, key)


def _fitting(options: list[Any], value: Any) -> list[Any]:
    """The options of a union that can take ``value``: a mapping only a dataclass or a dict, anything else only the others."""
    takes_mapping = [
        dataclasses.is_dataclass(a) or get_origin(a) in (dict, Mapping) for a in options
    ]
    fitting = [
        a for a, mapping in zip(options, takes_mapping) if mapping == isinstance(value, Mapping)
    ]
    return fitting or options


def _convert_sequence(hint: Any, value: Any, source: str, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _convert(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))
        )
    item = args[0] if args else Any
    items = [_convert(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _convert_scalar(hint: Any, value: Any, source: str, key: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected text, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{source}: {key}: expected a path, got {value!r}")
        return Path(value)
    raise ConfigError(f"{source}: {key}: unsupported type {hint!r}")
