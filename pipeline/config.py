"""Typed configuration: nested dataclasses filled from YAML and ``key.sub=value`` overrides.

Unknown keys and values of the wrong type are rejected before any work starts, with
the full dotted key in the message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, TypeVar

import yaml

from pipeline import storage

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(prefix + k for k in unknown)}; "
            f"valid keys here: {', '.join(prefix + k for k in fields)}"
        )
    kwargs = {name: _convert(value, hints[name], prefix + name) for name, value in data.items()}
    missing = [
        prefix + f.name
        for f in fields.values()
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err


def require(obj, rule: str, *keys: str) -> None:
    """Range checks of a config dataclass's fields, for its ``__post_init__``; None passes.
    ``rule``: ``positive`` (> 0), ``non_negative`` (>= 0), ``fraction`` (in (0, 1]),
    ``probability`` (in [0, 1])."""
    tests = {
        "positive": (lambda v: v > 0, "> 0"),
        "non_negative": (lambda v: v >= 0, ">= 0"),
        "fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "probability": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    }
    ok, text = tests[rule]
    for key in keys:
        value = getattr(obj, key)
        values = value if isinstance(value, (tuple, list)) else [value]
        if value is not None and not all(ok(v) for v in values):
            raise ValueError(f"{key} must be {text}, got {value!r}")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["train.lr=3e-5", "rounds=2"]`` applied onto a nested dict (values parsed as YAML)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:  # the job reports ConfigErrors; a YAML traceback helps no one
            problem = str(getattr(err, "problem", None) or err).splitlines()[0]
            raise ConfigError(
                f"override {item!r}: the value of {key.strip()} is not valid YAML ({problem}); "
                f"quote it: {key.strip()}='\"...\"'"
            ) from None
    return data


def merge(base: dict, over: dict) -> dict:
    """``over``'s keys onto ``base``, section by section (a later config file's settings
    over an earlier one's; lists and values are replaced whole)."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: str) -> dict:
    try:
        with storage.open_file(path, "rb") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return data


def load(cls: type[T], path: str | list[str] | None = None, overrides: list[str] = ()) -> T:
    """Load ``cls`` from a YAML file (local or URI), or several merged in order, plus overrides."""
    data: dict = {}
    for one in [path] if isinstance(path, str) else (path or []):
        data = merge(data, _read_yaml(one))
    return from_dict(cls, apply_overrides(data, list(overrides)))


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """Flat ``{"a.b": "value"}`` with short string values, e.g. for MLflow params."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat
