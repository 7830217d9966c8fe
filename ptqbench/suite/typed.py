"""A small typed-dataclass reader: TOML tables -> dataclasses, with errors that name the key path.

Every schema dataclass declares its fields with plain type hints (str, int, float, bool,
list[...], dict[str, ...], Optional[...], nested dataclasses); unknown keys and wrong types are
reported as ``SuiteError(file, "methods.gac.recipe.bits", reason)``; every problem of a table
(and of its items and sub-tables) is collected and raised together as ``SuiteErrors``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from ..errors import Problems, SuiteError

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
        raise SuiteError(file, path, f"expected {_describe(tp)}, got {_show(value)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise SuiteError(file, path, f"expected a list, got {_show(value)}")
        return _each(((f"{path}[{i}]", v) for i, v in enumerate(value)), item_tp, file)
    if origin is dict:
        _, val_tp = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            hint = ""
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                hint = f" (write one [{path}.NAME] table per entry, not [[{path}]])"
            raise SuiteError(file, path, f"expected a table, got {_show(value)}{hint}")
        items = _each(((f"{path}.{k}" if path else k, v) for k, v in value.items()), val_tp, file)
        return dict(zip(value, items))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path, file)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SuiteError(file, path, f"expected a number, got {_show(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SuiteError(file, path, f"expected an integer, got {_show(value)}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise SuiteError(file, path, f"expected {_describe(tp)}, got {_show(value)}")
        return value
    raise TypeError(f"unsupported schema type {tp}")


def _show(value: Any, limit: int = 60) -> str:
    """A value as the message shows it: its kind for tables and lists (an array of tables where
    a table belongs is a typical slip), else its repr, cut short."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        kinds = {type(v) for v in value}
        return "an array of tables" if value and kinds == {dict} else f"a list {_cut(repr(value), limit)}"
    return _cut(repr(value), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _each(items, tp, file) -> list:
    """Convert every (path, value); all items' problems are reported together."""
    problems, out = Problems(), []
    for path, v in items:
        with problems.collect():
            out.append(convert(v, tp, path, file))
    problems.raise_any()
    return out


def from_dict(cls, data: Any, path: str, file):
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys. Every problem of the
    table is collected; ``cls.check(path, file)`` runs once its fields are all valid."""
    if not isinstance(data, dict):
        raise SuiteError(file, path, f"expected a table, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems = Problems()
    for name in sorted(set(data) - set(fields)):
        problems.add(file, f"{path}.{name}" if path else name,
                     f"unknown key; allowed here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in data:
            with problems.collect():
                kwargs[name] = convert(data[name], hints[name], key, file)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.add(file, key, "required key is missing")
    problems.raise_any()
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(path, file)
    return obj
