"""The multi-gpu executor's worker processes, exercised on CPU devices: the same records as a
sequential run, FP samples made once, and a worker that dies fails only its own cell."""
import numpy as np
from click.testing import CliRunner

from ptqbench.cli import cli
from ptqbench.store import Store

from test_end_to_end import records, small_tiny_suite

TWO_CPU_WORKERS = """
    [run]
    executor = "multi-gpu"
    executor_options = { devices = ["cpu", "cpu"] }
"""

DYING_PLUGIN = '''
import os
from ptqbench import hookimpl
from ptqbench_plugins.selectors.uniform_steps import UniformSteps

class Dying(UniformSteps):
    name = "dying"
    description = "kills its own process, to test that a dead worker fails only its cell"
    def select(self, trajectories, generator, context):
        os._exit(3)

@hookimpl
def register_selectors(register):
    register(Dying)
'''


def run(args):
    return CliRunner().invoke(cli, ["run", *map(str, args), "--no-progress"])


def test_worker_processes_match_a_sequential_run(tmp_path, tiny_model_dir):
    seq, par = tmp_path / "seq", tmp_path / "par"
    assert run([small_tiny_suite(tmp_path, num_samples=16), "-o", seq]).exit_code == 0
    (tmp_path / "p").mkdir()
    result = run([small_tiny_suite(tmp_path / "p", TWO_CPU_WORKERS, num_samples=16), "-o", par])
    assert result.exit_code == 0, result.output
    a = {r["key"]: r for r in records(seq)}
    b = {r["key"]: r for r in records(par)}
    assert set(a) == set(b) and len(a) == 3  # executor options do not enter the cell keys
    assert all(r["status"] == "ok" for r in b.values())
    for key, rec in b.items():
        x = Store(seq).load_samples(rec["gen_key"], 16).astype(int)
        y = Store(par).load_samples(rec["gen_key"], 16).astype(int)
        assert np.abs(x - y).max() <= 1  # same cell, same samples (up to float rounding)
        assert rec["metrics"]["paired_mse"]["value"] == \
            __import__("pytest").approx(a[key]["metrics"]["paired_mse"]["value"], rel=0.05, abs=1e-6)
    # the FP samples exist once, written by the FP cell; nobody sampled them twice
    fp = [r for r in b.values() if r["cell"]["method"] == "fp"][0]
    assert all("sample_fp" not in r["costs"]["seconds"] for r in b.values())
    assert len(list((par / "samples" / fp["gen_key"]).glob("*.npy"))) == 1
    assert "on worker 0" in result.output or "on worker 1" in result.output


def test_a_dead_worker_fails_only_its_cell(tmp_path, tiny_model_dir):
    (tmp_path / "dying.py").write_text(DYING_PLUGIN)
    suite = small_tiny_suite(tmp_path, TWO_CPU_WORKERS + """
        [grid]
        bits = ["W8A8"]
        methods = ["fp", "dies", "rtn"]
        [methods.dies]
        preset = "rtn"
        selector = "dying"
    """, num_samples=8, plugins=("dying.py",))
    out = tmp_path / "out"
    result = run([suite, "-o", out])
    assert result.exit_code == 1
    recs = {r["cell"]["method"]: r for r in records(out)}
    assert recs["dies"]["status"] == "failed"
    assert recs["dies"]["error"]["type"] == "WorkerDied"
    assert recs["rtn"]["status"] == "ok" and recs["fp"]["status"] == "ok"
