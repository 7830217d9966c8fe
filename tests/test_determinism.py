"""Deterministic mode: the same cell run twice gives the same record, timings aside."""
import json
import textwrap
from pathlib import Path

import pytest
import torch

from ptqbench import numerics
from ptqbench.pipeline.runner import run_suite
from ptqbench.reproducible import comparable, differences
from ptqbench.suite.loader import default_suite_path


@pytest.fixture(autouse=True)
def restore_flags():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic = before[1]


def _suite(tmp_path: Path) -> Path:
    suite = tmp_path / "det.toml"
    suite.write_text(textwrap.dedent(f"""
        [suite]
        name = "det"
        include = ["{default_suite_path()}"]
        [grid]
        bits = ["W4A8"]
        methods = ["fp", "qd"]
        [methods.qd]
        preset = "qdiffusion"
        selector_options = {{ steps = 4, per_step = 8 }}
        reconstructor_options = {{ iters_w = 12, iters_a = 6, batch_size = 8, log_every = 4 }}
        [evaluation]
        num_samples = 16
        batch_size = 16
        [run]
        deterministic = true
    """))
    return suite


def _records(out: Path) -> dict:
    return {p.name: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}


def test_a_deterministic_cell_run_twice_gives_identical_records(tmp_path):
    suite = _suite(tmp_path)
    first = run_suite(suite, output=tmp_path / "a")
    second = run_suite(suite, output=tmp_path / "b")
    assert len(first.ok) == len(second.ok) == 2 and not first.failed
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name]["numerics"]["deterministic"] is True
        assert differences(a[name], b[name], limit=50) == []
    qd = next(r for r in a.values() if r["cell"]["method"] == "qd")
    assert qd["reconstruction"]["blocks"] and qd["metrics"]["paired_mse"]["value"] > 0
    # the comparison is not vacuous: results and learned state are part of it
    kept = comparable(qd)
    assert kept["metrics"] and kept["reconstruction"]["blocks"][0]["phases"]
    assert "seconds" not in kept["reconstruction"]["blocks"][0]


def test_numerics_state_records_the_flags_and_configure_turns_them_on_and_off():
    on = numerics.configure(True, seed=5)
    assert on["deterministic"] and on["cudnn_deterministic"] and not on["cudnn_benchmark"]
    assert on["cublas_workspace_config"]
    x = torch.rand(3)
    numerics.configure(True, seed=5)
    assert torch.equal(torch.rand(3), x)  # every default generator is seeded from the cell
    off = numerics.configure(False, seed=5)
    assert not off["deterministic"] and set(on) == set(off)


def test_differences_names_the_path_and_ignores_run_measurements():
    a = {"metrics": {"m": {"value": 1.0}}, "costs": {"seconds": {"x": 1}},
         "reconstruction": {"blocks": [{"seconds": 2, "v": 1}]}}
    b = {"metrics": {"m": {"value": 2.0}}, "costs": {"seconds": {"x": 9}},
         "reconstruction": {"blocks": [{"seconds": 5, "v": 1}]}}
    assert differences(a, b) == ["metrics.m.value"]
    assert differences({"metrics": {"x": float("nan")}}, {"metrics": {"x": float("nan")}}) == []
