"""A small typed-dataclass reader: TOML tables -> dataclasses, with errors that name the key path.

Every schema dataclass declares its fields with plain type hints (str, int, float, bool,
list[...], dict[str, ...], Optional[...], nested dataclasses); unknown keys and wrong types are
reported as ``SuiteError(file, "methods.gac.recipe.bits", reason)``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from ..errors import SuiteError

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false",
               list: "a list", dict: "a table"}


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is not None:
        return _TYPE_NAMES.get(origin, str(tp))
    if dataclasses.is_dataclass(tp):
        return "a table"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def convert(value: Any, tp, path: str, file) -> Any:
    """Check ``value`` against type ``tp`` and build dataclasses; raise SuiteError otherwise."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, path, file)
            except SuiteError as exc:
                errors.append(exc)
        raise SuiteError(file, path, f"expected {_describe(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise SuiteError(file, path, f"expected a list, got {value!r}")
        return [convert(v, item_tp, f"{path}[{i}]", file) for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise SuiteError(file, path, f"expected a table, got {value!r}")
        return {k: convert(v, val_tp, f"{path}.{k}" if path else k, file) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path, file)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SuiteError(file, path, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SuiteError(file, path, f"expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise SuiteError(file, path, f"expected {_describe(tp)}, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp}")


def from_dict(cls, data: Any, path: str, file):
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise SuiteError(file, path, f"expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise SuiteError(file, key, f"unknown key; allowed here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = convert(data[name], hints[name], key, file)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SuiteError(file, key, "required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(path, file)
    return obj
