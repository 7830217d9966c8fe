"""One cell's sampling split over several workers: ranges of whole batches, tasks in waves, and
samples bit-identical to an unsharded run (slurm executor on submitit's in-process cluster)."""
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from ptqbench.cli import cli
from ptqbench.errors import PtqbenchError
from ptqbench.pipeline.tasks import Task, parse_shards, plan, shard_ranges
from ptqbench.store import Store

from test_end_to_end import records, small_tiny_suite

pytest.importorskip("submitit")

FP_AND_W8 = """
    [grid]
    bits = ["W8A8"]
    [methods.rtn]
    preset = "rtn"
    selector_options = { steps = 2, per_step = 8 }
"""


def test_shard_ranges_cut_whole_batches_as_evenly_as_possible():
    assert shard_ranges(100, 16, 3) == [range(0, 48), range(48, 80), range(80, 100)]
    assert shard_ranges(64, 16, 2) == [range(0, 32), range(32, 64)]
    assert shard_ranges(10, 16, 4) == [range(0, 10)]  # one batch: nothing to split
    assert shard_ranges(40, 8, 8) == [range(i, i + 8) for i in range(0, 40, 8)]  # 5 batches
    with pytest.raises(PtqbenchError, match="sample_shards"):
        parse_shards(0, "multi-gpu")


def test_plan_puts_fp_first_and_shards_between_prepare_and_finish():
    fp = SimpleNamespace(key="f", is_fp=True, resolved=None)
    rtn = SimpleNamespace(key="r", is_fp=False, resolved=SimpleNamespace(reconstructor="none"))
    brecq = SimpleNamespace(key="b", is_fp=False, resolved=SimpleNamespace(reconstructor="brecq"))
    assert plan([rtn, fp, brecq], 32, 16, 1) == [[Task("cell", "f")],
                                                  [Task("cell", "b"), Task("cell", "r")]]
    waves = plan([rtn, fp], 32, 16, 2)
    assert waves == [[Task("prepare", "r"), Task("shard", "f", 0, 16), Task("shard", "f", 16, 32)],
                     [Task("shard", "r", 0, 16), Task("shard", "r", 16, 32)],
                     [Task("finish", "f"), Task("finish", "r")]]
    assert Task("shard", "r", 0, 16).waits_for(Task("prepare", "r"))
    assert Task("finish", "f").waits_for(Task("shard", "f", 16, 32))
    assert not Task("finish", "f").waits_for(Task("shard", "r", 0, 16))  # other cells: free
    assert not Task("shard", "f", 0, 16).waits_for(Task("shard", "f", 16, 32))


def test_sharded_sampling_gives_the_unsharded_samples(tmp_path, tiny_model_dir):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    local = small_tiny_suite(tmp_path / "a", FP_AND_W8, num_samples=24)
    sharded = small_tiny_suite(tmp_path / "b", FP_AND_W8 + """
        [run]
        executor = "slurm"
        executor_options = { cluster = "debug", cpus_per_task = 1, sample_shards = 2 }
    """, num_samples=24)
    # batch_size 16: 24 samples are two batches, one per shard: [0, 16) and [16, 24)
    for suite, out in ((local, tmp_path / "local"), (sharded, tmp_path / "sharded")):
        result = CliRunner().invoke(cli, ["run", str(suite), "-o", str(out), "--no-progress"])
        assert result.exit_code == 0, result.output
    a = {r["key"]: r for r in records(tmp_path / "local")}
    b = {r["key"]: r for r in records(tmp_path / "sharded")}
    assert set(a) == set(b) and len(b) == 2
    for key, rec in b.items():
        assert rec["status"] == "ok"
        x = Store(tmp_path / "local").load_samples(rec["gen_key"], 24)
        y = Store(tmp_path / "sharded").load_samples(rec["gen_key"], 24)
        assert np.array_equal(x, y)  # same batches, same seeds: the same bytes
        assert [(s["start"], s["stop"]) for s in rec["sample_shards"]] == [(0, 16), (16, 24)]
        assert rec["metrics"] == a[key]["metrics"]
        assert "sample_shards" not in a[key]
    # the finish task found every shard: it sampled nothing itself
    assert sorted(p.name for p in (tmp_path / "sharded" / "samples" / rec["gen_key"]).iterdir()) \
        == ["000000000.npy", "000000016.npy"]
    subs = list((tmp_path / "sharded" / "slurm" / "submissions").glob("*.json"))
    assert len(subs) == 3  # one job array per wave: prepare + FP shards, shards, finish
