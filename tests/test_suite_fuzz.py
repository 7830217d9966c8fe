"""Property-based: whatever a suite file holds, loading and pre-flight either succeed or raise
the project's user-facing error (one line per problem), never anything else.

Suites are a valid suite with random mutations at the schema's own key paths (wrong shapes,
types and values), random bytes, and valid text with random text inserted. A fixed example
budget keeps the test at a few seconds.
"""
import json
import math
import os
import tomllib
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptqbench.errors import PtqbenchError, SuiteError
from ptqbench.pipeline.runner import prepare
from ptqbench.registry import default_registry
from ptqbench.suite import schema
from ptqbench.suite.loader import load_suite

GOOD = {
    "suite": {"name": "fuzz", "output": "out"},
    "models": {"m": {"path": "builtin:tiny-mnist"}},
    "samplers": {"s": {"steps": 5}},
    "methods": {"x": {"preset": "brecq", "reconstructor_options": {"iters_w": 1}}},
    "grid": {"models": ["m"], "samplers": ["s"], "bits": ["W8A8"], "methods": ["fp", "rtn", "x"]},
    "evaluation": {"num_samples": 8, "batch_size": 4, "metrics": ["paired"]},
}
#: entries of the tables of tables, so that mutations reach their fields
ENTRY = {"models": "m", "samplers": "s", "methods": "x"}
#: plugin options worth hitting (options are free-form in the schema)
OPTION_PATHS = [
    ("methods", "x", "selector_options", "per_step"), ("methods", "x", "selector_options", "steps"),
    ("methods", "x", "reconstructor_options", "iters_w"), ("methods", "x", "recipe", "weight_init"),
    ("methods", "x", "recipe", "act_params"), ("methods", "x", "weighting_options", "tau"),
    ("evaluation", "metric_options", "fid", "reference"), ("evaluation", "metric_options", "paired"),
    ("run", "executor_options", "device"), ("models", "m", "options", "revision"),
]


def schema_paths(cls=schema.Suite, prefix=()) -> list[tuple]:
    """Every key path the schema declares (tables of tables through their ENTRY)."""
    out = []
    for f in fields(cls):
        path = (*prefix, f.name)
        out.append(path)
        tp = cls.__annotations__[f.name]
        sub = getattr(schema, tp, None) if isinstance(tp, str) else tp
        if isinstance(sub, type) and is_dataclass(sub):
            out += schema_paths(sub, path)
        elif not prefix and f.name in ENTRY:
            entry_cls = {"models": schema.ModelEntry, "samplers": schema.SamplerEntry,
                         "methods": schema.MethodEntry}[f.name]
            out.append((*path, ENTRY[f.name]))
            out += schema_paths(entry_cls, (*path, ENTRY[f.name]))
    return out


PATHS = schema_paths() + OPTION_PATHS
WORDS = ["", "fp", "rtn", "gac", "brecq", "x", "m", "s", "W8A8", "W4A8", "W3A99", "W0A8", "8bit",
         "builtin:tiny-mnist", "builtin:", "builtin:nope", "./missing", "/", "..", "a/b",
         "~nosuchuser/x", "paired", "fid", "local", "multi-gpu", "uniform", "ddim", "quad",
         "per_step", "mse", "minmax", "/dev/null/x", "/proc/ptq", "suite.toml", "\x00", "\n",
         "é", "a" * 300]
scalars = st.one_of(
    st.sampled_from(WORDS), st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, -1, 2**62]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans())
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(WORDS[:12] + ["path", "preset", "steps"]), inner, max_size=3)),
    max_leaves=6)


def quote(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    return '"' + "".join(
        "\\" + c if c in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c
        for c in text) + '"'


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return quote(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{quote(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def to_toml(doc: dict) -> str:
    """Tables as [headers] (arrays of tables as [[headers]]), everything below inline."""
    lines = []
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{quote(k)}]")
            lines += [f"{json.dumps(kk)} = {toml_value(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for item in v:
                lines.append(f"[[{quote(k)}]]")
                lines += [f"{json.dumps(kk)} = {toml_value(vv)}" for kk, vv in item.items()]
        else:
            lines.insert(0, f"{quote(k)} = {toml_value(v)}")  # before any table header
    return "\n".join(lines) + "\n"


def same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # nan == nan here


def mutate(doc: dict, path: tuple, value, delete: bool) -> dict:
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if delete:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return doc


mutations = st.lists(st.tuples(st.sampled_from(PATHS + [("unknown",), ("grid", "extra")]),
                               values, st.booleans()), min_size=1, max_size=3)


@pytest.fixture(scope="module")
def registry():
    return default_registry()


def check(path: Path, registry) -> None:
    """The property: success, or PtqbenchError whose problems are one line each."""
    for run in (lambda: load_suite(path), lambda: prepare(path, registry)):
        try:
            run()
        except SuiteError as exc:
            for p in exc.problems:
                assert "\n" not in str(p) and (p.file or str(p).startswith("--"))
        except PtqbenchError as exc:
            assert str(exc)


FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(mutations)
def test_mutated_suites_load_or_fail_cleanly(tmp_path, registry, monkeypatch, muts):
    monkeypatch.chdir(tmp_path)  # relative output folders are probed here
    doc = GOOD
    for path, value, delete in muts:
        doc = mutate(doc, path, value, delete)
    file = tmp_path / "suite.toml"
    text = to_toml(doc)
    file.write_text(text, encoding="utf-8")
    assert same(tomllib.loads(text), doc)  # the writer is faithful
    check(file, registry)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_fail_cleanly(tmp_path, registry, data):
    file = tmp_path / "suite.toml"
    file.write_bytes(data)
    check(file, registry)


@FUZZ
@given(st.integers(0, len(to_toml(GOOD))), st.text(max_size=8))
def test_text_inserted_into_a_suite_fails_cleanly(tmp_path, registry, monkeypatch, at, junk):
    monkeypatch.chdir(tmp_path)
    text = to_toml(GOOD)
    file = tmp_path / "suite.toml"
    file.write_bytes((text[:at] + junk + text[at:]).encode("utf-8", "surrogatepass"))
    check(file, registry)


def test_the_unmutated_suite_is_valid(tmp_path, registry, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "suite.toml").write_text(to_toml(GOOD))
    _, _, cells = prepare(tmp_path / "suite.toml", registry)
    assert len(cells) == 3  # fp, rtn and x at W8A8
    assert os.listdir(tmp_path) == ["suite.toml"]  # the output probe left nothing behind
