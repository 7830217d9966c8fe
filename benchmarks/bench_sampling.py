#!/usr/bin/env python
"""Sampling paths, real int8, calibration time and peak memory side by side, in one call.

    python benchmarks/bench_sampling.py --mode quick    # about 4 minutes on one H200
    python benchmarks/bench_sampling.py --mode full     # the issue's budgets (see FULL below)
    python benchmarks/bench_sampling.py --mode smoke --device cpu   # every code path, tiny layouts

Stages (``--stages``, default all):
  sampling     UNet with google/ddpm-cifar10-32's layout (35.7M parameters, random weights or
               ``--unet PATH``): img*steps/s at one batch size, after warm-up, for
                 fp32-eager      FP as the pipeline's reference path runs it (inference_mode)
                 fp-bf16-fast    FP bf16 + channels_last + torch.compile + CUDA graphs
                 fp-fp32-fast    FP fp32, compiled + CUDA graphs (the fp32 reference's fast path)
                 q-reference     W8A8 (RTN) through the calibration modules, eager
                 q-fast          W8A8 folded + compiled + CUDA graphs, fp32
                 q-fast-bf16     W8A8 folded, bf16 (its own numerics)
                 fp-tf32-fast, q-fast-tf32   the same with TF32 convolutions/matmuls
                 int8            W8A8 on int8 GEMMs (convs as implicit GEMM)
                 int8-linear     W8A8 int8 for linear/1x1 layers only, k x k convs simulated
                 int8-w4a8       W4A8 as 4-bit values on the int8 kernels
               plus: max |fast - reference| of one denoising step (shared and per-step activation
               parameters), and paired MSE of int8 vs simulated samples of the same seeds.
  dit          the same paths on the DiT stand-in layout (cifar10-dit-s, random weights).
  calibration  the W4A8 qdiffusion calibration end to end (trajectories, ranges, BRECQ/AdaRound
               block reconstruction) on the UNet: minutes measured, and per block type the
               activation-phase rate of attention vs ResNet blocks.
  memory       block reconstruction with a block-cache budget (``--cache-fraction`` of free GPU
               memory, then pinned host memory, then memory-mapped files) on the cifar10 layout
               and the LDM-4 256x256 layout (random weights): peak GPU / host memory per stage
               and the bytes each cache tier held.
Prints one table per stage and writes them as markdown (``--out``), with date, GPU, torch version
and the command; ``--json`` writes every measurement.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import REPO  # noqa: E402  (a bare checkout works too: see checkout.py)

from ptqbench import memory  # noqa: E402
from ptqbench.interfaces import CalibSet, ModelAdapter, RunContext  # noqa: E402
from ptqbench.quant import QuantRecipe, calibrate_activation_ranges, quantize_model  # noqa: E402
from ptqbench.quant import block_cache, reconstruction  # noqa: E402
from ptqbench.quant.fast import Execution, make_denoiser  # noqa: E402
from ptqbench.quant.model import fold_weights  # noqa: E402
from ptqbench.quant.recon_options import ReconConfig  # noqa: E402
from ptqbench.quant.testing import UNetAdapter, UniformWeights  # noqa: E402
from ptqbench.sampling import DDIMSampler, SamplerSpec  # noqa: E402

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
             "beta_end": 0.02, "prediction_type": "epsilon", "clip_sample": False}
BUDGETS = {
    "smoke": dict(unet="tiny", batch=4, timed=2, check_samples=3, check_steps=3, dit="tiny",
                  calib_traj=4, calib_steps=4, recon_iters=(4, 2), memory_layouts=("tiny",),
                  memory_inputs=16, memory_iters=(2, 1), per_step_check=True),
    "quick": dict(unet="cifar10", batch=1000, timed=20, check_samples=250, check_steps=20,
                  dit="dit-s", calib_traj=16, calib_steps=20, recon_iters=(60, 20),
                  memory_layouts=("ldm4",), memory_inputs=128, memory_iters=(2, 1),
                  # compiling dominates a short run: the paths the targets compare, once each
                  paths=("fp32-eager", "fp-bf16-fast", "q-reference", "q-fast", "q-fast-bf16",
                         "int8"),
                  dit_paths=("fp32-eager", "fp-bf16-fast", "q-fast-bf16", "int8"),
                  per_step_check=False),
    # the issue's budgets: 5120 calibration inputs (256 trajectories x 20 steps), 20k + 5k
    # iterations per block; more than one 10-minute call: run --stages one at a time
    "full": dict(unet="cifar10", batch=1000, timed=100, check_samples=1000, check_steps=100,
                 dit="dit-s", calib_traj=256, calib_steps=20, recon_iters=(20000, 5000),
                 memory_layouts=("cifar10", "ldm4"), memory_inputs=5120, memory_iters=(20, 5),
                 per_step_check=True),
}
ALL_PATHS = ("fp32-eager", "fp-bf16-fast", "fp-fp32-fast", "fp-tf32-fast", "q-reference",
             "q-fast", "q-fast-tf32", "q-fast-bf16", "int8", "int8-linear", "int8-w4a8")
FULL_W, FULL_A = 20000, 5000


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------
def unet_layout(name: str, path: str | None = None):
    from diffusers import UNet2DModel

    if path:
        return UNet2DModel.from_pretrained(path, subfolder="unet" if (Path(path) / "unet").is_dir()
                                           else None).eval().requires_grad_(False)
    torch.manual_seed(0)
    if name == "tiny":
        cfg = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                   attention_head_dim=8)
    elif name == "cifar10":  # google/ddpm-cifar10-32 (35.7M parameters)
        cfg = dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                     "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                   downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                   attention_head_dim=None)
    elif name == "ldm4":  # LDM-4 at 256x256: 64x64x3 latents, channels 224..896
        cfg = dict(sample_size=64, block_out_channels=(224, 448, 672, 896), layers_per_block=2,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                     "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                                   "UpBlock2D"), attention_head_dim=32)
    else:
        raise SystemExit(f"unknown UNet layout {name!r}")
    return UNet2DModel(in_channels=3, out_channels=3, **cfg).eval().requires_grad_(False)


class DiTAdapter(ModelAdapter):
    """Class-conditional DiT (diffusers DiTTransformer2DModel), label of sample i = i mod 10."""

    name = "bench-dit"

    def __init__(self, model):
        super().__init__()
        self.model = model
        c = model.config
        self.sample_shape = (c.in_channels, c.sample_size, c.sample_size)
        self.scheduler_config = SCHEDULER

    def load(self, device):
        return self.model.to(device)

    def denoise(self, model, x, t, cond=None):
        if cond is None:
            cond = torch.arange(x.shape[0], device=x.device) % 10
        return model(x, timestep=t, class_labels=cond).sample

    def blocks(self, model):
        return []

    def decode(self, x):
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def dit_layout(name: str):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    width = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=8) \
        if name == "tiny" else dict(num_attention_heads=4, attention_head_dim=64, num_layers=8,
                                    sample_size=32)
    return DiTTransformer2DModel(in_channels=3, out_channels=3, patch_size=2,
                                 num_embeds_ada_norm=10, norm_type="ada_norm_zero",
                                 norm_elementwise_affine=False, activation_fn="gelu-approximate",
                                 attention_bias=True, **width).eval().requires_grad_(False)


def n_params(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peaks(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    memory.reset_host_peak()


def peaks(device) -> dict:
    out = {"peak_host_gib": memory.host_peak_mb() / 1024}
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def calib_from_fp(adapter, model, device, n_traj: int, n_steps: int, seed: int = 0,
                  total_steps: int = 100) -> CalibSet:
    """FP DDIM (quad, ``total_steps``) trajectories; ``n_steps`` uniformly spaced steps kept."""
    spec = SamplerSpec(steps=total_steps, eta=0.0, spacing="quad")
    sampler = DDIMSampler(spec, adapter.scheduler_config)
    keep = set(range(0, total_steps, max(1, total_steps // n_steps)))
    xs, ts, ks = [], [], []

    def on_step(k, x, t):
        if k in keep:
            xs.append(x.detach().cpu())
            ts.append(t.detach().cpu())
            ks.append(torch.full((x.shape[0],), k, dtype=torch.long))

    with torch.no_grad():
        for start in range(0, n_traj, 256):
            idx = list(range(10**9 + start, 10**9 + min(n_traj, start + 256)))
            sampler.run(lambda x, t, k: adapter.denoise(model, x, t), adapter.sample_shape, idx,
                        seed, device, on_step=on_step)
    return CalibSet(torch.cat(xs), torch.cat(ts), torch.cat(ks))


def quantized(fp, adapter, calib, device, bits, per_step_steps=None, init="mse"):
    opts = dict(weight_init=init, act_init=init, split_shortcut=True)
    if per_step_steps:
        opts.update(act_params="per_step", sampler_steps=per_step_steps)
    recipe = QuantRecipe.from_options(bits, **opts)
    q, manifest = quantize_model(fp, recipe, adapter)
    calibrate_activation_ranges(q, adapter, calib, 256, device)
    fold_weights(q)
    return q, manifest


PATH_SPECS = {
    "fp32-eager": (False, None, "reference", {}),
    "fp-bf16-fast": (False, None, "fast", {"dtype": "bf16"}),
    "fp-fp32-fast": (False, None, "fast", {}),
    "q-reference": (True, "W8A8", "reference", {}),
    "q-fast": (True, "W8A8", "fast", {}),
    "q-fast-bf16": (True, "W8A8", "fast", {"dtype": "bf16"}),
    "fp-tf32-fast": (False, None, "fast", {"tf32": True}),
    "q-fast-tf32": (True, "W8A8", "fast", {"tf32": True}),
    "int8": (True, "W8A8", "int8", {}),
    "int8-linear": (True, "W8A8", "int8", {"int8_convs": False}),
    "int8-w4a8": (True, "W4A8", "int8", {}),
}


def time_path(denoise, adapter, device, batch: int, timed: int, steps: int = 100) -> dict:
    """img*steps/s of ``denoise`` on a batch, over ``timed`` calls after warm-up (compile and
    graph capture happen in the warm-up, timed separately)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch,) + tuple(adapter.sample_shape), generator=g).to(device)
    ts = torch.linspace(999, 0, steps).long()
    with torch.inference_mode():
        t0 = time.perf_counter()
        for k in range(2):
            denoise(x, torch.full((batch,), int(ts[k]), device=device), k)
        sync(device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(timed):
            k = (i + 2) % steps
            out = denoise(x, torch.full((batch,), int(ts[k]), device=device), k)
        sync(device)
        sec = time.perf_counter() - t0
    del out
    return {"img_steps_per_s": batch * timed / sec, "warmup_s": warm, "timed_calls": timed}


def sample_paired(denoise, adapter, device, n: int, steps: int, batch: int) -> torch.Tensor:
    sampler = DDIMSampler(SamplerSpec(steps=steps, spacing="quad"), adapter.scheduler_config)
    parts = []
    with torch.inference_mode():
        for s in range(0, n, batch):
            parts.append(sampler.run(denoise, adapter.sample_shape, range(s, min(n, s + batch)),
                                     0, device).float().cpu())
    return torch.cat(parts)


def step_difference(adapter, q, device, batch: int, ks=(0, 55), fast=None) -> float:
    """max |fast - reference| of single denoising steps at sampler steps ``ks`` (fast: compiled
    and CUDA-graphed on CUDA, as sampling runs it)."""
    ref, _ = make_denoiser(adapter, q, Execution.from_options("reference"), device, True)
    if fast is None:
        fast, _ = make_denoiser(adapter, q, Execution.from_options("fast"), device, True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((batch,) + tuple(adapter.sample_shape), generator=g).to(device)
    worst = 0.0
    with torch.inference_mode():
        for k in ks:
            t = torch.full((batch,), 999 - 10 * k, device=device)
            worst = max(worst, (fast(x, t, k) - ref(x, t, k)).abs().max().item())
    return worst


# --------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------
def stage_sampling(label, fp, adapter, device, budget, paths, log) -> dict:
    fp = fp.to(device)
    out = {"layout": label, "params_m": n_params(fp), "batch": budget["batch"], "paths": {}}
    calib = calib_from_fp(adapter, fp, device, max(8, budget["calib_traj"] // 4),
                          budget["calib_steps"])
    models = {}
    for bits in sorted({PATH_SPECS[p][1] for p in paths if PATH_SPECS[p][1]}):
        models[bits], _ = quantized(fp, adapter, calib, device, bits, init="minmax")
    n, steps = budget["check_samples"], budget["check_steps"]
    simulated: dict = {}  # bits -> samples of the simulated model (the int8 paths' reference)

    def simulated_samples(bits, denoise=None):
        if bits not in simulated:
            if denoise is None:  # folded eager: the simulated numbers, no compile needed
                denoise, _ = make_denoiser(adapter, models[bits], Execution.from_options(
                    "fast", {"compile": False, "cuda_graphs": False}), device, True)
            simulated[bits] = sample_paired(denoise, adapter, device, n, steps, budget["batch"])
        return simulated[bits]

    for p in paths:
        is_q, bits, mode, opts = PATH_SPECS[p]
        model = models[bits] if is_q else fp
        torch._dynamo.reset()
        reset_peaks(device)  # every earlier path's copies, graphs and pools are gone by now
        try:
            denoise, info = make_denoiser(adapter, model, Execution.from_options(mode, opts),
                                          device, is_q)
            res = time_path(denoise, adapter, device, budget["batch"], budget["timed"])
            res.update(peaks(device), execution=info["execution"])
            if p == "q-fast":
                simulated_samples(bits, denoise)
                # the timed denoiser at its own batch size: no recompile, no new graph
                out["max_abs_step_diff_shared"] = step_difference(
                    adapter, model, device, budget["batch"], fast=denoise)
            if mode == "int8":
                res["int8_layers"] = len(info["manifest"]["int8_layers"])
                res["simulated_layers"] = len(info["manifest"]["simulated_layers"])
                mine = sample_paired(denoise, adapter, device, n, steps, budget["batch"])
                res["paired_mse_vs_simulated"] = float(((mine - simulated_samples(bits)) ** 2)
                                                       .mean())
        except Exception as exc:  # report and go on with the other paths
            out["paths"][p] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            log(f"  {label} {p}: FAILED {out['paths'][p]['error']}")
            continue
        finally:
            denoise = None
        out["paths"][p] = res
        log(f"  {label} {p:13s} {res['img_steps_per_s']:10.0f} img*steps/s  warm-up "
            f"{res['warmup_s']:.1f}s  peak GPU {res.get('peak_gpu_gib', 0):.2f} GiB"
            + (f"  paired MSE vs simulated {res['paired_mse_vs_simulated']:.2e}"
               if "paired_mse_vs_simulated" in res else ""))
    out["check"] = {"samples": n, "steps": steps}
    base = out["paths"].get("fp32-eager", {}).get("img_steps_per_s")
    bf16 = out["paths"].get("fp-bf16-fast", {}).get("img_steps_per_s")
    for r in out["paths"].values():
        if "img_steps_per_s" in r:
            r["vs_fp32_eager"] = r["img_steps_per_s"] / base if base else None
            r["vs_fp_bf16_fast"] = r["img_steps_per_s"] / bf16 if bf16 else None
    # context for the paired MSEs: a quantized network is discontinuous, so fp32 rounding
    # differences (flipped codes) compound along trajectories. noise floor = fast vs reference
    # (both simulated fp32); quantization error = simulated vs FP.
    if "W8A8" in models:
        torch._dynamo.reset()
        reset_peaks(device)
        ref, _ = make_denoiser(adapter, models["W8A8"], Execution.from_options("reference"),
                               device, True)
        ref_samples = sample_paired(ref, adapter, device, n, steps, budget["batch"])
        fp_eager, _ = make_denoiser(adapter, fp, Execution.from_options("reference"), device,
                                    False)
        fp_samples = sample_paired(fp_eager, adapter, device, n, steps, budget["batch"])
        sim = simulated_samples("W8A8")
        out["paired_mse_fast_vs_reference"] = float(((sim - ref_samples) ** 2).mean())
        out["paired_mse_simulated_vs_fp"] = float(((sim - fp_samples) ** 2).mean())
        log(f"  {label} paired MSE W8A8: fast vs reference {out['paired_mse_fast_vs_reference']:.2e}"
            f", simulated vs FP {out['paired_mse_simulated_vs_fp']:.2e}")
        del ref, fp_eager
    # exactness of the fast path (compiled and graphed where the device allows): one
    # denoising step, shared and per-step activation parameters
    if "W8A8" in models and budget["per_step_check"]:
        qps, _ = quantized(fp, adapter, calib, device, "W8A8", per_step_steps=100, init="minmax")
        torch._dynamo.reset()
        out["max_abs_step_diff_per_step"] = step_difference(adapter, qps, device,
                                                            min(64, budget["batch"]))
        del qps
    if "max_abs_step_diff_shared" in out:
        log(f"  {label} fast vs reference, one step: max |diff| shared "
            f"{out['max_abs_step_diff_shared']:.2e}, per-step "
            f"{fmt(out.get('max_abs_step_diff_per_step'), '.2e')}")
    del models
    torch._dynamo.reset()
    return out


def stage_calibration(fp, adapter, device, budget, log, work: Optional[Path] = None) -> dict:
    """W4A8 qdiffusion calibration end to end. With ``work`` (a folder that outlives the call)
    it resumes across calls: the calibration set is kept there and every reconstructed unit is
    checkpointed with its record entry, so the total is measured, not extrapolated, even when one
    device call cannot hold it: trajectories + ranges + the sum of every unit's own seconds (units
    finished in earlier calls count with the time they took then)."""
    fp = fp.to(device)
    iw, ia = budget["recon_iters"]
    reset_peaks(device)
    calib_file = None if work is None else work / "calib.pt"
    if calib_file is not None and calib_file.exists():
        saved = torch.load(calib_file, weights_only=True)
        calib = CalibSet(saved["x"], saved["t"], saved["step"])
        t_traj = float(saved["seconds"])
    else:
        t0 = time.perf_counter()
        calib = calib_from_fp(adapter, fp, device, budget["calib_traj"], budget["calib_steps"])
        sync(device)
        t_traj = time.perf_counter() - t0
        if calib_file is not None:
            work.mkdir(parents=True, exist_ok=True)
            torch.save({"x": calib.x, "t": calib.t, "step": calib.step, "seconds": t_traj},
                       calib_file)
    t0 = time.perf_counter()
    # Q-Diffusion's recipe (the qdiffusion preset): shortcut split, quantized attention matmuls
    recipe = QuantRecipe.from_options("W4A8", split_shortcut=True, quantize_attention=True)
    q, _ = quantize_model(fp, recipe, adapter)
    calibrate_activation_ranges(q, adapter, calib, 256, device)
    sync(device)
    t_ranges = time.perf_counter() - t0
    cfg = ReconConfig.from_options("brecq", {}, {"iters_w": iw, "iters_a": ia,
                                                 "checkpoint": work is not None,
                                                 "eval_samples": 256})
    ctx = RunContext(device=device, seed=0, work_dir=work or Path(tempfile.mkdtemp()),
                     cache_dir=Path(tempfile.gettempdir()))
    t0 = time.perf_counter()
    res = reconstruction.reconstruct_blocks(fp, q, adapter, calib, None, UniformWeights(), ctx,
                                            cfg, "brecq")
    sync(device)
    t_recon = time.perf_counter() - t0
    resumed = [b for b in res["blocks"] if b.get("resumed")]
    if resumed:  # this call's reconstruction time minus reloading, plus the units' own times
        t_recon = (t_recon - sum(b.get("resume_seconds", 0.0) for b in resumed)
                   + sum(b.get("seconds", 0.0) for b in resumed))
    rates = defaultdict(lambda: defaultdict(list))
    for b in res["blocks"]:
        kind = b.get("kind") or ("attention" if "attentions" in b["name"] else
                                 "resnet" if "resnets" in b["name"] else "layer")
        for ph in b.get("phases", []):
            if ph.get("steady_iters_per_s"):
                rates[kind][ph["phase"]].append(ph["steady_iters_per_s"])
    med = {k: {ph: sorted(v)[len(v) // 2] for ph, v in d.items()} for k, d in rates.items()}
    total = t_traj + t_ranges + t_recon
    out = {"inputs": len(calib), "iters": [iw, ia], "trajectories_s": t_traj,
           "ranges_s": t_ranges, "reconstruction_s": t_recon, "total_min": total / 60,
           "units_from_earlier_calls": len(resumed),
           "median_rates": med, **peaks(device), "blocks": len(res["blocks"])}
    # the full budget from the measured rates, for a run that used fewer iterations
    if (iw, ia) != (FULL_W, FULL_A):
        est = t_traj + t_ranges
        for b in res["blocks"]:
            loop = sum(ph.get("seconds", 0.0) for ph in b.get("phases", []))
            est += b["seconds"] - loop
            for ph in b.get("phases", []):
                r = ph.get("steady_iters_per_s")
                if r:
                    est += (FULL_W if ph["phase"] == "weights" else FULL_A) / r
        out["estimated_full_min"] = est / 60
    att = med.get("attention", {}).get("activations")
    rn = med.get("resnet", {}).get("activations")
    out["attention_vs_resnet_act_rate"] = att / rn if att and rn else None
    log(f"  calibration: {len(calib)} inputs, {iw}+{ia} it/block: {total / 60:.2f} min measured"
        + (f", {out['estimated_full_min']:.1f} min estimated at 20k+5k"
           if "estimated_full_min" in out else ""))
    return out


class _CapturingStore(block_cache.TensorStore):
    """TensorStore that remembers its instances (to read the tier statistics afterwards)."""

    instances: list = []
    host_budget = None  # bytes; None: the store's default (half the available host memory)

    def __init__(self, *a, **k):
        if _CapturingStore.host_budget is not None:
            k.setdefault("host_budget", _CapturingStore.host_budget)
        super().__init__(*a, **k)
        _CapturingStore.instances.append(self)


def stage_memory(name, adapter_model, device, budget, fraction, log) -> dict:
    fp = adapter_model.to(device)
    adapter = UNetAdapter(fp)
    adapter.scheduler_config = SCHEDULER
    stages = {}
    n = budget["memory_inputs"]
    reset_peaks(device)
    g = torch.Generator().manual_seed(0)
    steps = torch.arange(n) % 20
    calib = CalibSet(torch.randn((n,) + tuple(adapter.sample_shape), generator=g),
                     (999 - steps * 50).long(), steps)
    stages["calibration data"] = peaks(device)
    reset_peaks(device)
    t0 = time.perf_counter()
    q, _ = quantize_model(fp, QuantRecipe.from_options("W4A8", split_shortcut=True,
                                                       weight_init="minmax", act_init="minmax"),
                          adapter)
    calibrate_activation_ranges(q, adapter, calib, 32, device)
    sync(device)
    stages["quantize + ranges"] = {**peaks(device), "seconds": time.perf_counter() - t0}
    iw, ia = budget["memory_iters"]
    cfg = ReconConfig.from_options("brecq", {}, {"iters_w": iw, "iters_a": ia,
                                                 "checkpoint": False, "eval_samples": 16,
                                                 "forward_batch_size": 32,
                                                 "cache_on_device": fraction})
    ctx = RunContext(device=device, seed=0, work_dir=Path(tempfile.mkdtemp()),
                     cache_dir=Path(tempfile.gettempdir()))
    reset_peaks(device)
    _CapturingStore.instances = []
    original = reconstruction.TensorStore
    reconstruction.TensorStore = _CapturingStore
    t0 = time.perf_counter()
    try:
        reconstruction.reconstruct_blocks(fp, q, adapter, calib, None, UniformWeights(), ctx,
                                          cfg, "brecq")
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        reconstruction.TensorStore = original
    sync(device)
    stages["reconstruction"] = {**peaks(device), "seconds": time.perf_counter() - t0}
    tiers = _CapturingStore.instances[0].stats()["peak_bytes"] if _CapturingStore.instances else {}
    out = {"layout": name, "params_m": n_params(fp), "inputs": n, "cache_fraction": fraction,
           "host_budget_gib": (None if _CapturingStore.host_budget is None
                               else _CapturingStore.host_budget / 2**30),
           "stages": stages, "cache_peak_gib": {k: v / 2**30 for k, v in tiers.items()},
           "error": error}
    log(f"  memory {name}: {n} inputs, cache peaks (GiB) "
        + ", ".join(f"{k} {v:.2f}" for k, v in out["cache_peak_gib"].items())
        + (f"  ERROR {error}" if error else ""))
    del q
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def fmt(v, spec=".0f"):
    return "-" if v is None else format(v, spec)


def markdown(results: dict, header: dict) -> str:
    lines = [f"# Sampling / int8 / calibration / memory benchmark ({header['mode']})", "",
             f"- date: {header['date']}", f"- device: {header['device']}",
             f"- torch {header['torch']}, python {header['python']}",
             f"- command: `{header['command']}`", ""]
    for key in ("sampling", "dit"):
        s = results.get(key)
        if not s:
            continue
        lines += [f"## Sampling: {s['layout']} ({s['params_m']:.1f}M parameters), batch "
                  f"{s['batch']}", "",
                  "| path | img·steps/s | vs FP fp32 eager | vs FP bf16 fast | warm-up s | "
                  "peak GPU GiB | peak host GiB | paired MSE vs simulated | int8 / simulated "
                  "layers |", "|---|---|---|---|---|---|---|---|---|"]
        for p, r in s["paths"].items():
            if "error" in r:
                lines.append(f"| {p} | failed: {r['error']} | | | | | | | |")
                continue
            lines.append(
                f"| {p} | {fmt(r['img_steps_per_s'])} | {fmt(r.get('vs_fp32_eager'), '.2f')} | "
                f"{fmt(r.get('vs_fp_bf16_fast'), '.2f')} | {fmt(r['warmup_s'], '.1f')} | "
                f"{fmt(r.get('peak_gpu_gib'), '.2f')} | {fmt(r.get('peak_host_gib'), '.2f')} | "
                f"{fmt(r.get('paired_mse_vs_simulated'), '.2e')} | "
                + (f"{r['int8_layers']} / {r['simulated_layers']}" if "int8_layers" in r else "-")
                + " |")
        if "max_abs_step_diff_shared" in s:
            lines += ["", f"Fast (fp32) vs reference, one denoising step, max |diff|: shared "
                          f"activation parameters {s['max_abs_step_diff_shared']:.2e}, per-step "
                          f"{fmt(s.get('max_abs_step_diff_per_step'), '.2e')}."]
        lines += ["Peak GPU memory of a path: the resident models (FP and quantized) plus what "
                  "the path adds (its inference copy, compiled graphs, CUDA-graph pools, "
                  "activations); earlier paths are freed first."]
        if "check" in s:
            lines += [f"Paired MSE over {s['check']['samples']} samples x "
                      f"{s['check']['steps']} DDIM steps (x_0 in [-1, 1])."]
        if "paired_mse_fast_vs_reference" in s:
            lines += [f"For scale (W8A8): fast vs reference path "
                      f"{s['paired_mse_fast_vs_reference']:.2e} (fp32 rounding flips quantization "
                      f"codes, and flips compound along trajectories), simulated vs FP "
                      f"{s['paired_mse_simulated_vs_fp']:.2e} (the quantization error)."]
        lines.append("")
    c = results.get("calibration")
    if c:
        lines += ["## Calibration (W4A8 qdiffusion recipe, BRECQ/AdaRound per block)", "",
                  "| inputs | iterations W+A | trajectories s | ranges s | reconstruction s | "
                  "total min | est. min at 20k+5k | attention/resnet act-phase rate | peak GPU "
                  "GiB | peak host GiB |", "|---|---|---|---|---|---|---|---|---|---|",
                  f"| {c['inputs']} | {c['iters'][0]}+{c['iters'][1]} | "
                  f"{c['trajectories_s']:.1f} | {c['ranges_s']:.1f} | "
                  f"{c['reconstruction_s']:.1f} | {c['total_min']:.2f} | "
                  f"{fmt(c.get('estimated_full_min'), '.1f')} | "
                  f"{fmt(c.get('attention_vs_resnet_act_rate'), '.2f')} | "
                  f"{fmt(c.get('peak_gpu_gib'), '.2f')} | {fmt(c.get('peak_host_gib'), '.2f')} |",
                  "", "Median steady iterations/s by block kind and phase: "
                  + "; ".join(f"{k}: " + ", ".join(f"{ph} {v:.0f}" for ph, v in d.items())
                              for k, d in c["median_rates"].items()), ""]
    for m in results.get("memory", []):
        lines += [f"## Memory: {m['layout']} ({m['params_m']:.0f}M parameters), {m['inputs']} "
                  f"calibration inputs, cache budget {m['cache_fraction']} of free GPU memory"
                  + (f", {m['host_budget_gib']:.1f} GiB pinned host" if m["host_budget_gib"]
                     else ""),
                  "", "| stage | seconds | peak GPU GiB | peak host GiB |", "|---|---|---|---|"]
        for st, r in m["stages"].items():
            lines.append(f"| {st} | {fmt(r.get('seconds'), '.1f')} | "
                         f"{fmt(r.get('peak_gpu_gib'), '.2f')} | "
                         f"{fmt(r.get('peak_host_gib'), '.2f')} |")
        lines += ["", "Block-cache peak per tier (GiB): " + ", ".join(
            f"{k} {v:.2f}" for k, v in m["cache_peak_gib"].items())
            + (f". **Error**: {m['error']}" if m["error"] else ""), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=tuple(BUDGETS), default="quick")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--stages", default="sampling,dit,calibration,memory")
    ap.add_argument("--paths", default=None, help=f"comma-separated subset of {', '.join(ALL_PATHS)}")
    ap.add_argument("--unet", default=None, help="diffusers UNet folder instead of random weights")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--memory-inputs", type=int, default=None)
    ap.add_argument("--cache-fraction", type=float, default=0.05,
                    help="block-cache budget as a fraction of free GPU memory (small: shows "
                         "the spill tiers working)")
    ap.add_argument("--host-budget-gib", type=float, default=None,
                    help="pinned-host tier of the block cache before memory-mapped files "
                         "(default: half the available host memory)")
    ap.add_argument("--out", default=None, help="markdown file (default "
                                                "benchmarks/results/sampling_<mode>.md)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--work", default=None,
                    help="calibration stage: a folder kept between calls (e.g. /tmp/bench-calib); "
                         "a killed or timed-out stage resumes from it and reports the whole time")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    budget = dict(BUDGETS[args.mode])
    if args.batch:
        budget["batch"] = args.batch
    if args.memory_inputs:
        budget["memory_inputs"] = args.memory_inputs
    paths = (args.paths.split(",") if args.paths else budget.get("paths", ALL_PATHS))
    bad = [p for p in paths if p not in PATH_SPECS]
    if bad:
        ap.error(f"unknown path(s) {bad}; known: {', '.join(ALL_PATHS)}")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    header = {"mode": args.mode, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.processor() or "cpu", "torch": torch.__version__,
              "python": platform.python_version(),
              "command": "python benchmarks/bench_sampling.py " + " ".join(argv or sys.argv[1:])}
    print(f"{header['device']}, torch {header['torch']}, mode {args.mode}", flush=True)

    def log(msg):
        print(msg, flush=True)

    results: dict = {}
    started = time.perf_counter()
    if "sampling" in stages:
        fp = unet_layout(budget["unet"], args.unet)
        ad = UNetAdapter(fp)
        ad.scheduler_config = SCHEDULER
        results["sampling"] = stage_sampling(budget["unet"] if not args.unet else args.unet, fp,
                                             ad, device, budget, paths, log)
    if "dit" in stages:
        dit = dit_layout(budget["dit"]).to(device)
        dit_paths = paths if args.paths else budget.get("dit_paths", paths)
        results["dit"] = stage_sampling(f"DiT {budget['dit']}", dit, DiTAdapter(dit), device,
                                        budget, dit_paths, log)
        del dit
    if "calibration" in stages:
        fp = unet_layout(budget["unet"], args.unet)
        ad = UNetAdapter(fp)
        ad.scheduler_config = SCHEDULER
        results["calibration"] = stage_calibration(fp, ad, device, budget, log,
                                                   Path(args.work) if args.work else None)
    if "memory" in stages:
        if args.host_budget_gib is not None:
            _CapturingStore.host_budget = int(args.host_budget_gib * 2**30)
        results["memory"] = [stage_memory(name, unet_layout(name), device, budget,
                                          args.cache_fraction, log)
                             for name in budget["memory_layouts"]]
    header["seconds"] = time.perf_counter() - started
    text = markdown(results, header)
    print("\n" + text)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"sampling_{args.mode}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + f"\n\nTotal benchmark time: {header['seconds'] / 60:.1f} min.\n")
    print(f"\nwritten: {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results}, indent=1,
                                              default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
