"""The multi-gpu executor's worker processes, exercised on CPU devices: the same records as a
sequential run, FP samples made once, a worker that dies fails only its own cell, sharded cells;
and many worker processes writing one output folder at once."""
import multiprocessing
import os

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
        import ctypes
        ctypes.string_at(0)  # a segfault, as a broken native kernel would cause

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
    # what killed it is on record: the signal, and the Python stack from the fault log
    message = recs["dies"]["error"]["message"]
    assert "exit code -11 (SIGSEGV)" in message, message
    assert "Segmentation fault" in message and "in select" in message, message
    assert recs["rtn"]["status"] == "ok" and recs["fp"]["status"] == "ok"


W8_SMALL_CALIBRATION = """
    [grid]
    bits = ["W8A8"]
    [methods.rtn]
    preset = "rtn"
    selector_options = { steps = 2, per_step = 8 }
"""

SHARDED_WORKERS = """
    [run]
    executor = "multi-gpu"
    executor_options = { devices = ["cpu", "cpu"], sample_shards = 2 }
"""


def test_sharded_cells_on_worker_processes_give_the_unsharded_samples(tmp_path, tiny_model_dir):
    (tmp_path / "p").mkdir()
    local = small_tiny_suite(tmp_path, W8_SMALL_CALIBRATION, num_samples=32)
    sharded = small_tiny_suite(tmp_path / "p", SHARDED_WORKERS + W8_SMALL_CALIBRATION,
                               num_samples=32)
    assert run([local, "-o", tmp_path / "seq"]).exit_code == 0
    result = run([sharded, "-o", tmp_path / "par"])
    assert result.exit_code == 0, result.output
    recs = records(tmp_path / "par")
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs)
    for rec in recs:
        # batch 16: two shards of one batch each, sampled by the shard tasks (the finish task
        # found both), on either worker
        assert [(s["start"], s["stop"]) for s in rec["sample_shards"]] == [(0, 16), (16, 32)]
        x = Store(tmp_path / "seq").load_samples(rec["gen_key"], 32)
        y = Store(tmp_path / "par").load_samples(rec["gen_key"], 32)
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1  # worker threads: float rounding
    assert "shard 0-16 of" in result.output and "shard 16-32 of" in result.output


# ---- many worker processes on one output folder ----------------------------------------------
def _run_cells_in_order(suite, out, order, log_dir):
    """A forked worker: runs the suite's cells in ``order`` into ``out``, logging every shard
    and record it writes (the test counts them)."""
    import torch

    from ptqbench.pipeline.runner import make_runner, prepare

    loaded, registry, cells = prepare(suite)
    runner = make_runner(loaded, registry, out)
    log = open(log_dir / f"{os.getpid()}.log", "a")
    write_shard, write_record = Store.write_shard, Store.write_record

    def logged_shard(self, gen_key, start, images):
        log.write(f"shard {gen_key} {start}\n")
        log.flush()
        return write_shard(self, gen_key, start, images)

    def logged_record(self, key, record):
        log.write(f"record {key}\n")
        log.flush()
        return write_record(self, key, record)

    Store.write_shard, Store.write_record = logged_shard, logged_record
    for i in order:
        runner.run(cells[i], torch.device("cpu"))


def test_many_workers_on_one_folder_do_every_piece_of_work_once(tmp_path, tiny_model_dir):
    """Three processes run the whole suite into one folder at once, each in another order:
    every cell is run once (the others wait for it) and every sample shard written once."""
    suite = small_tiny_suite(tmp_path, """
        [methods.rtn]
        preset = "rtn"
        selector_options = { steps = 2, per_step = 8 }
    """, num_samples=16)
    text = suite.read_text().replace("batch_size = 16", "batch_size = 8")
    suite.write_text(text)
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    ctx = multiprocessing.get_context("fork")  # forked: no second torch import per worker
    procs = [ctx.Process(target=_run_cells_in_order, args=(suite, out, order, logs))
             for order in ([0, 1, 2], [1, 2, 0], [2, 0, 1])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    recs = records(out)
    assert len(recs) == 3 and all(r["status"] == "ok" for r in recs)
    lines = [line for f in logs.iterdir() for line in f.read_text().splitlines()]
    assert sorted(l for l in lines if l.startswith("record")) == sorted(f"record {r['key']}" for r in recs)
    shards = [l for l in lines if l.startswith("shard")]
    # FP + two quantized cells, 16 samples in batches of 8: six chunks, each written once
    assert len(shards) == 6 and len(set(shards)) == 6
    for rec in recs:
        assert Store(out).load_samples(rec["gen_key"], 16) is not None
