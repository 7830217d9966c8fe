"""The CUDA fast path (whole step replayed as a CUDA graph) against the eager loop (GPU only)."""
from pathlib import Path

import pytest
import torch

from ptqbench.interfaces import RunContext
from ptqbench.quant import QuantRecipe, calibrate_activation_ranges, quantize_model
from ptqbench.quant.model import quant_layers
from ptqbench.quant.testing import UNetAdapter, UniformWeights, random_calib, tiny_unet
from ptqbench_plugins.reconstructors.brecq import BRECQ

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ONLY = ["conv_in", "down_blocks.0.resnets.0", "down_blocks.1.attentions.0", "mid_block.resnets.0"]


def _run(tmp_path, cuda_graph, qdrop=0.0, cache_on_device="auto"):
    dev = torch.device("cuda")
    unet = tiny_unet().to(dev)
    adapter = UNetAdapter(unet, only=ONLY)
    recipe = QuantRecipe.from_options(bits="W4A8", weight_init="minmax", act_init="minmax",
                                      split_shortcut=True)
    q, _ = quantize_model(unet, recipe, adapter)
    calib = random_calib(64)
    calibrate_activation_ranges(q, adapter, calib, 32, dev)
    ctx = RunContext(device=dev, seed=0, work_dir=Path(tmp_path), cache_dir=Path(tmp_path))
    res = BRECQ(iters_w=200, iters_a=100, batch_size=16, tf32=False, cuda_graph=cuda_graph,
                qdrop=qdrop, checkpoint=False, cache_on_device=cache_on_device).reconstruct(unet, q, adapter, calib, None,
                                                           UniformWeights(), ctx)
    return q, res


def test_cuda_graph_path_matches_eager(tmp_path):
    q_e, r_e = _run(tmp_path / "e", False)
    q_g, r_g = _run(tmp_path / "g", True)
    assert all(p["path"] == "cuda_graph" for b in r_g["blocks"] for p in b["phases"])
    assert all(p["path"] == "eager" for b in r_e["blocks"] for p in b["phases"])
    for be, bg in zip(r_e["blocks"], r_g["blocks"]):
        assert bg["mse_after"] < bg["mse_before"]
        # same batches, same loss; only Adam's implementation (fused vs capturable) differs
        assert bg["mse_after"] == pytest.approx(be["mse_after"], rel=0.1)
    for (n, le), (_, lg) in zip(quant_layers(q_e), quant_layers(q_g)):
        for a, b in zip(le.weight_quantizers, lg.weight_quantizers):
            agree = (a.w_int == b.w_int).float().mean().item()
            assert agree > 0.97, n


def test_cuda_graph_with_qdrop_runs(tmp_path):
    _, res = _run(tmp_path, True, qdrop=0.5)
    assert all(p["path"] == "cuda_graph" for b in res["blocks"] for p in b["phases"])
    assert all(b["mse_after"] < b["mse_before"] * 1.5 for b in res["blocks"])


def test_host_cache_falls_back_to_eager_and_matches(tmp_path):
    q_d, r_d = _run(tmp_path / "d", False)
    q_h, r_h = _run(tmp_path / "h", "auto", cache_on_device=False)
    assert r_h["blocks"][-1]["cache_bytes_device"] == 0
    assert all(p["path"] == "eager" for b in r_h["blocks"] for p in b["phases"])
    for bd, bh in zip(r_d["blocks"], r_h["blocks"]):
        assert bh["mse_after"] == pytest.approx(bd["mse_after"], rel=0.1)
