"""Diagnostics: gradient-conflict matrix, weight/alignment analysis, writers, probe and CLI."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from torch.func import functional_call

from ptqbench.commands.diagnose import diagnose
from ptqbench.calib.diagnostics import (BlockProbe, DiagnosisDone, gradient_conflict,
                                        sample_alignment, loss_gradient, weight_alignment,
                                        weights_by_step, write_conflict, write_weights)
from ptqbench.calib.testing import FakeQuantConv, block_context
from ptqbench.interfaces import Block, CalibSet, RunContext

from ptqbench_plugins.weightings.gradient_aligned import GradientAligned

PNG = b"\x89PNG\r\n\x1a\n"


def linear_ctx():
    """out = x . a at a = 0: per-step gradients -2 y x are e1, -e1 and e2 directions."""
    lin = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(lin.weight)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    y = torch.tensor([[1.0], [2.0], [-1.0], [-3.0], [1.0], [1.0]])
    step = torch.tensor([0, 0, 1, 1, 2, 2])
    vx, vy = torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([[1.0], [1.0]])
    return SimpleNamespace(
        block=Block("lin", lin, "layer"), params={"weight": lin.weight},
        forward=lambda p, inputs: functional_call(lin, p, inputs),
        calib_inputs=lambda idx: (x[idx],), calib_targets=lambda idx: y[idx],
        calib_t=(3 - step) * 100, calib_step=step,
        val_inputs=lambda idx: (vx[idx],), val_targets=lambda idx: vy[idx],
        val_t=torch.tensor([300, 100]), val_step=torch.tensor([0, 2]))


def test_gradient_conflict_known_directions():
    res = gradient_conflict(linear_ctx())
    assert res["steps"] == [0, 1, 2] and res["timesteps"] == [300, 200, 100]
    assert res["counts"] == [2, 2, 2]
    expected = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(res["cosine"], expected)
    # step 0: mean of -2*1*e1 and -2*2*e1 = -3 e1
    assert res["grad_norm"][0] == pytest.approx(3.0)
    limited = gradient_conflict(linear_ctx(), max_per_step=1, steps=[0, 2])
    assert limited["counts"] == [1, 1] and limited["cosine"].shape == (2, 2)


def test_alignment_and_its_correlation_with_weights():
    ctx = linear_ctx()
    vg = loss_gradient(ctx, ctx.params, torch.arange(2), val=True)
    torch.testing.assert_close(vg, torch.tensor([-2.0, -1.0]))  # mean of -2*(1,1) and -2*(1,0)
    align = sample_alignment(ctx, torch.arange(6), vg)
    a, b = 2 / 5 ** 0.5, 1 / 5 ** 0.5  # cos of -e1 and of -e2 with (-2, -1)
    torch.testing.assert_close(align, torch.tensor([a, a, -a, -a, b, b]))
    weights = torch.tensor([3.0, 2.9, 0.1, 0.2, 1.5, 1.4])  # ordered like the alignment
    res = weight_alignment(ctx, weights, max_samples=None, bins=3)
    assert res["spearman"] > 0.8 and res["pearson"] > 0.8
    assert [r["count"] for r in res["binned"]] == [2, 2, 2]
    assert res["binned"][0]["mean_alignment"] < res["binned"][-1]["mean_alignment"]
    flat = weight_alignment(ctx, torch.ones(6), max_samples=None)
    assert flat["pearson"] is None  # constant weights: no correlation to speak of


def test_writers_produce_csv_json_png(tmp_path):
    res = gradient_conflict(linear_ctx())
    paths = write_conflict(res, tmp_path)
    rows = list(csv.reader(open(paths["csv"])))
    assert rows[0] == ["step", "timestep", "t=300", "t=200", "t=100"]
    assert float(rows[1][3]) == pytest.approx(-1.0)
    assert json.loads(Path(paths["json"]).read_text())["cosine"][2][2] == pytest.approx(1.0)
    assert Path(paths["png"]).read_bytes()[:8] == PNG
    ctx = linear_ctx()
    w = torch.tensor([3.0, 2.9, 0.1, 0.2, 1.5, 1.4])
    by_step = weights_by_step(w, ctx.calib_step, ctx.calib_t)
    assert by_step[0] == {"step": 0, "count": 2, "mean": pytest.approx(2.95), "min": pytest.approx(2.9),
                          "max": 3.0, "timestep": 300}
    wp = write_weights(by_step, weight_alignment(ctx, w, None, bins=3), tmp_path)
    for key in ("by_step_png", "alignment_png"):
        assert Path(wp[key]).read_bytes()[:8] == PNG
    assert Path(wp["by_step_csv"]).read_text().startswith("step,count,mean,min,max,timestep")


def test_probe_diagnoses_a_gac_block_and_stops(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 5, 5, generator=g)
    step = torch.arange(24) % 6
    t = (5 - step) * 150
    vstep = torch.arange(12) % 6
    vx = torch.randn(12, 3, 5, 5, generator=g)
    ctx = block_context(FakeQuantConv(bits=3), x, t, step, vx, (5 - vstep) * 150, vstep,
                        inner_lr=0.5, iterations=4, batch_size=6, target_noise=0.3)
    run = RunContext(device=torch.device("cpu"), seed=0, work_dir=tmp_path, cache_dir=tmp_path)
    probe = BlockProbe(GradientAligned(meta_lr=0.1, meta_steps=3, groups=3), "fake", tmp_path,
                       max_per_step=4, max_samples=12)
    probe.prepare(CalibSet(x, t, step), CalibSet(vx, (5 - vstep) * 150, vstep), run)
    probe.begin_block(ctx)
    assert probe.weights(torch.arange(6)).shape == (6,)  # delegates to the GAC weighting
    probe.observe(0, torch.arange(6), torch.rand(6), ctx)
    with pytest.raises(DiagnosisDone) as done:
        probe.end_block(ctx)
    res = done.value.result
    assert res["block"] == "fake" and res["pearson"] is not None
    conflict = json.loads(Path(res["conflict"]["json"]).read_text())
    assert conflict["steps"] == list(range(6)) and conflict["counts"] == [4] * 6
    assert Path(res["weights"]["alignment_png"]).exists()
    assert probe.state()["blocks"]["fake"]["meta_steps"] == 3
    # the block's GAC record (weights per sampler step, L_GM share) is kept too
    meta = json.loads(Path(res["weights"]["meta_json"]).read_text())
    assert meta == json.loads(json.dumps(probe.state()["blocks"]["fake"]))  # JSON keys: str
    assert set(meta["weight_by_step"]) == {str(s) for s in range(6)}
    assert res["gm_share"] == meta["gm_share"] and res["gm_share"] > 0


def test_probe_ignores_other_blocks(tmp_path):
    ctx = linear_ctx()
    from ptqbench_plugins.weightings.uniform import Uniform
    probe = BlockProbe(Uniform(), "another", tmp_path)
    probe.begin_block(ctx)
    probe.end_block(ctx)  # not the target: no files, no stop
    assert probe.result == {} and not list(tmp_path.iterdir())


def test_cli_lists_blocks_and_rejects_unknown_ones(tmp_path, tiny_model_dir):
    suite = tmp_path / "s.toml"
    from ptqbench.suite.loader import default_suite_path
    suite.write_text(f'[suite]\nname = "d"\ninclude = ["{default_suite_path()}"]\n'
                     f'output = "{tmp_path / "res"}"\n')
    runner = CliRunner()
    res = runner.invoke(diagnose, ["--suite", str(suite), "--list-blocks", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "mid_block.resnets.0" in res.output and "rtn" in res.output
    res = runner.invoke(diagnose, ["--suite", str(suite), "--block", "nope", "--out",
                                   str(tmp_path / "o"), "--device", "cpu"])
    assert res.exit_code != 0 and "no block 'nope'" in res.output
    res = runner.invoke(diagnose, ["--suite", str(suite)])
    assert res.exit_code != 0 and "--block and --out" in res.output
