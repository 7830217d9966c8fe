"""Block-wise reconstruction shared by the ``adaround``, ``brecq`` and ``fbr`` plugins.

For every unit (adapter block, or single layer) in forward order:
  inputs/targets from :class:`BlockCache` -> optimise AdaRound alphas and/or LSQ step sizes on
  the per-sample weighted loss -> fold weights into integer codes -> checkpoint -> forward the
  unit's cache for the next units.
The loop never synchronises the device per iteration (no ``.item()``): losses are kept as device
tensors every ``log_every`` iterations and read once per phase.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import resource
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..atomic import atomic_torch_save
from ..errors import PtqbenchError
from ..interfaces import (Block, BlockContext, CalibSet, ModelAdapter, Reconstructor, RunContext,
                          Weighting)
from ..store import json_value
from .adaround import BetaSchedule
from .block_cache import BlockCache, TensorStore, canonical_device, discover
from .checkpoint import prepare_forms, weight_forms
from .context import sampler_step
from .lsq import ActQuantizer
from .model import apply_observed_ranges, fold_weights, observe_ranges, quant_layers, quant_meta
from .modules import QuantLayer
from .recon_options import ReconConfig

CKPT_DIR = "reconstruction"

#: cache stream of each phase-input option: the FP model, the quantized model with every
#: activation quantizer off ('qw'), the fully quantized model ('q')
STREAM_OF = {"fp": "fp", "weights_only": "qw", "quantized": "q"}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def per_sample_loss(out: torch.Tensor, target: torch.Tensor, reduction: str,
                    p: float = 2.0) -> torch.Tensor:
    """(N,) loss of every sample: |error|^p summed over channels and averaged over the other
    elements ('channel_sum', BRECQ's lp_loss) or averaged over all ('mean')."""
    d = (out - target).pow(2) if p == 2 else (out - target).abs().pow(p)
    if reduction == "channel_sum" and d.dim() > 1:
        d = d.sum(1)
    return d.reshape(d.shape[0], -1).mean(1)


def weighted_loss(per_sample: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of w_i * l_i; None = uniform, a plain mean (no extra cost)."""
    return per_sample.mean() if w is None else (w * per_sample).mean()


def _units(granularity: str, qmodel: nn.Module, fp_model: nn.Module,
           adapter: ModelAdapter) -> list[tuple[str, nn.Module, nn.Module, str]]:
    if granularity == "layer":
        return [(n, m, fp_model.get_submodule(n), "layer") for n, m in quant_layers(qmodel)]
    qb = adapter.blocks(qmodel)
    fb = {b.name: b.module for b in adapter.blocks(fp_model)}
    out = []
    for b in qb:
        if b.name not in fb:
            raise PtqbenchError(f"block {b.name} of the quantized model has no FP counterpart")
        out.append((b.name, b.module, fb[b.name], b.kind))
    return out


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"device_peak_bytes": int(torch.cuda.max_memory_allocated(device))}
    return {"host_peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _tf32(enabled: bool):
    if not enabled:
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def activations_off(model: nn.Module):
    """Every activation quantizer of ``model`` passes values through (the weights-only quantized
    model of BRECQ's/Q-Diffusion's weight pass); restores each one's state on exit."""
    states = [(q, q.enabled) for q in model.modules() if isinstance(q, ActQuantizer)]
    for q, _ in states:
        q.enabled = False
    try:
        yield
    finally:
        for q, enabled in states:
            q.enabled = enabled


def phase_streams(cfg: ReconConfig) -> dict[str, str]:
    """Cache stream read by each phase ('weights', 'activations', 'joint')."""
    return {"weights": STREAM_OF[cfg.weight_input], "activations": STREAM_OF[cfg.act_input],
            "joint": STREAM_OF[cfg.joint_input]}


def needed_streams(cfg: ReconConfig) -> tuple[str, ...]:
    """'fp' (targets, QDrop) plus the streams the configured phases read."""
    ph = phase_streams(cfg)
    used = [ph["joint"]] if cfg.mode == "joint" else [ph["weights"], ph["activations"]]
    return tuple(["fp"] + sorted({s for s in used if s != "fp"}))


def holdout_split(step: torch.Tensor, fraction: float, seed: int
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(training, held-out) sample indices; the held-out part is ``fraction`` of every sampler
    step's samples (at least one per step when fraction > 0), drawn with ``seed``. Samples are
    stored step-major, so a plain prefix would hold out the noisiest step only."""
    n = step.shape[0]
    if fraction <= 0:
        return torch.arange(n), None
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    step = step.cpu()
    held = []
    for s in torch.unique(step).tolist():
        members = perm[step[perm] == s]
        k = min(len(members) - 1, max(1, round(fraction * len(members))))
        held.append(members[:k])
    hold = torch.sort(torch.cat(held)).values
    mask = torch.ones(n, dtype=torch.bool)
    mask[hold] = False
    return torch.arange(n)[mask], (hold if len(hold) else None)


def stratified_subset(step: torch.Tensor, n: int) -> torch.Tensor:
    """About ``n`` indices spread evenly over the (step-major) calibration set."""
    total = step.shape[0]
    if n >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, n).round().long().unique()


def _unit_seed(seed: int, name: str) -> int:
    # independent of which units ran before: a resumed run draws the same batches
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little")


# --------------------------------------------------------------------------------------------
# one unit
# --------------------------------------------------------------------------------------------
class UnitRunner:
    """Forward + loss of one unit, shared by the optimisation loop and ``BlockContext.forward``."""

    def __init__(self, b: int, name: str, kind: str, qunit: nn.Module, fpunit: nn.Module,
                 cache: BlockCache, cfg: ReconConfig, per_step: bool):
        self.b, self.name, self.kind = b, name, kind
        self.qunit, self.fpunit, self.cache, self.cfg = qunit, fpunit, cache, cfg
        self.per_step = per_step
        self.layers = ([qunit] if isinstance(qunit, QuantLayer)
                       else [m for m in qunit.modules() if isinstance(m, QuantLayer)])
        self.act_quantizers = [m for m in qunit.modules() if isinstance(m, ActQuantizer)]
        self.fbr_pairs: list[tuple[nn.Module, nn.Module]] = []
        if cfg.loss == "fbr" and not isinstance(qunit, QuantLayer):
            fp_mods = dict(fpunit.named_modules())
            for n, m in qunit.named_modules():
                if isinstance(m, QuantLayer) and n in fp_mods:
                    self.fbr_pairs.append((m, fp_mods[n]))
        self._outs: dict[int, torch.Tensor] = {}
        self.loss_p = 2.0  # exponent of the current phase's loss (act_loss_p in activations)

    def forward(self, params: Optional[dict], leaves, step: Optional[torch.Tensor]):
        args, kwargs = self.cache.call_args(self.b, list(leaves))
        ctx = sampler_step(step) if (self.per_step and step is not None) else contextlib.nullcontext()
        with ctx:
            if params is None:
                return self.qunit(*args, **kwargs)
            return torch.func.functional_call(self.qunit, params, (*args,), kwargs, strict=False)

    def ctx_forward(self, params: dict, inputs) -> torch.Tensor:
        return self.forward(params, inputs, getattr(inputs, "step", None))

    def _hooks(self):
        """Forward hooks capturing inner layer outputs (FBR) on both units."""
        handles, q_out, fp_out = [], {}, {}
        for i, (qm, fm) in enumerate(self.fbr_pairs):
            handles.append(qm.register_forward_hook(
                lambda m, a, o, _i=i: q_out.__setitem__(_i, o)))
            handles.append(fm.register_forward_hook(
                lambda m, a, o, _i=i: fp_out.__setitem__(_i, o)))
        return handles, q_out, fp_out

    def loss(self, leaves, step, target, w, beta_t, regw_t, wquantizers, fbr_state):
        out = self.forward(None, leaves, step)
        per = per_sample_loss(out, target, self.cfg.loss_reduction, self.loss_p)
        if self.fbr_pairs:
            _, q_out, fp_out = fbr_state
            args, kwargs = self.cache.call_args(self.b, list(leaves))
            with torch.no_grad(), sampler_step(step):
                self.fpunit(*args, **kwargs)
            inner = sum(per_sample_loss(q_out[i], fp_out[i].detach(), self.cfg.loss_reduction)
                        for i in range(len(self.fbr_pairs)))
            per = per + self.cfg.fbr_beta * inner
        total = weighted_loss(per, w)
        if wquantizers and self.cfg.round_weight > 0:
            reg = sum(wq.regularizer(beta_t) for wq in wquantizers)
            total = total + regw_t * reg
        return total, per


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
def reconstruct_blocks(fp_model: nn.Module, qmodel: nn.Module, adapter: ModelAdapter,
                       calib: CalibSet, val: Optional[CalibSet], weighting: Weighting,
                       context: RunContext, cfg: ReconConfig, name: str) -> dict:
    device = canonical_device(context.device)
    meta = quant_meta(qmodel)
    per_step = meta["recipe"].get("act_params") == "per_step"
    t_start = time.perf_counter()
    fp_model.to(device).eval()
    qmodel.to(device).eval()
    units = _units(cfg.granularity, qmodel, fp_model, adapter)
    if not units:
        raise PtqbenchError(f"reconstructor {name!r}: the model has no units to reconstruct")

    def run(model, batch: CalibSet):
        with sampler_step(batch.step):
            return adapter.denoise(model, batch.x, batch.t, batch.cond)

    fp_units = {n: f for n, _, f, _ in units}
    q_units = {n: q for n, q, _, _ in units}
    infos = discover(fp_model, fp_units, run, calib, device)
    called = {i.name for i in infos}
    by_name = {n: (q, f, k) for n, q, f, k in units}
    skipped = [n for n, *_ in units if n not in called]

    streams = needed_streams(cfg)
    quantized_streams = [st for st in streams if st != "fp"]
    store = TensorStore(device, cfg.cache_on_device)
    caches = {"calib": BlockCache(infos, calib, store, cfg.forward_batch_size, run, streams)}
    if val is not None and len(val):
        caches["val"] = BlockCache(infos, val, store, cfg.forward_batch_size, run, streams)
    train_idx, hold_idx = holdout_split(calib.step, cfg.holdout, context.seed)
    eval_idx = _eval_indices(calib.step, hold_idx, cfg.eval_samples)
    split = _Split(train_idx.to(store.device), None if eval_idx is None else eval_idx.to(store.device),
                   0 if hold_idx is None else len(hold_idx))

    ckpt = _Checkpoints(context, name, cfg, meta, [i.name for i in infos], len(calib)) \
        if cfg.checkpoint else None
    results = []
    reporter = context.progress if hasattr(context.progress, "task") else None
    bar = (reporter.task(f"{name} reconstruction", total=len(infos)) if reporter
           else contextlib.nullcontext(lambda n=1, description=None: None))
    with bar as advance:
        for info in infos:
            advance(0, description=f"{name}: {info.name}")
            qunit, fpunit, kind = by_name[info.name]
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            b = info.order
            for c in caches.values():
                c.capture_inputs(b, "fp", fp_model, fp_units)
                c.compute_outputs(b, "fp", fpunit)  # FP targets (and the FP stream's output)
                for st in quantized_streams:
                    with _stream_mode(qmodel, st):
                        c.capture_inputs(b, st, qmodel, q_units)
            runner = UnitRunner(b, info.name, kind, qunit, fpunit, caches["calib"], cfg, per_step)
            entry = {"name": info.name, "kind": kind}
            resumed = ckpt is not None and ckpt.done(info.name)
            if resumed:
                # the unit's results (losses, held-out MSE, time) as the run that made it recorded
                entry.update(ckpt.load(info.name, qunit))
                entry["resumed"] = True
            else:
                entry.update(_reconstruct_unit(runner, caches, weighting, cfg, context, device,
                                               info.name, kind, split, meta))
            for c in caches.values():
                if info.last_use > b:
                    for st in quantized_streams:
                        with _stream_mode(qmodel, st):
                            c.compute_outputs(b, st, qunit)
            for c in caches.values():
                c.drop_inputs()
                c.free_dead(b)
            _sync(device)
            if resumed:
                entry["resume_seconds"] = time.perf_counter() - t0
            else:
                entry["seconds"] = time.perf_counter() - t0
                entry.update(_peak_memory(device))
                entry["cache_bytes_device"] = store.bytes_device
                entry["cache_bytes_host"] = store.bytes_host
                if ckpt is not None:
                    ckpt.save(info.name, qunit, entry)
            results.append(entry)
            advance(1)
    folded = fold_weights(qmodel)
    return {"reconstructor": name, "options": cfg.to_dict(), "blocks": results,
            "streams": {"phases": phase_streams(cfg), "cached": list(streams)},
            "holdout_samples": split.n_holdout,
            "units_not_called": skipped, "folded_after": folded,
            "cache_peak_bytes": store.peak_bytes, "seconds": time.perf_counter() - t_start,
            "weighting": weighting.state()}


class _Split:
    """Calibration indices the optimiser draws from, and those the MSE reports (and the
    keep-better decision) use."""

    def __init__(self, train: torch.Tensor, eval: Optional[torch.Tensor], n_holdout: int):
        self.train, self.eval, self.n_holdout = train, eval, n_holdout


def _eval_indices(step: torch.Tensor, hold: Optional[torch.Tensor], n: int
                  ) -> Optional[torch.Tensor]:
    if n <= 0:
        return None
    if hold is None:
        return stratified_subset(step, n)
    if len(hold) <= n:
        return hold
    return hold[stratified_subset(step[hold], n)]


def _stream_mode(qmodel: nn.Module, stream: str):
    return activations_off(qmodel) if stream == "qw" else contextlib.nullcontext()


def _eval_mse(runner: UnitRunner, cache: BlockCache, stream: str,
              idx: Optional[torch.Tensor]) -> Optional[float]:
    """Block-output MSE against the FP targets over ``idx``, in forward-sized batches."""
    if idx is None:
        return None
    total, count = 0.0, 0
    bs = runner.cfg.forward_batch_size
    with torch.no_grad():
        for s in range(0, len(idx), bs):
            i = idx[s:s + bs]
            target = cache.gather(cache.streams["fp"].outputs[runner.b], i)
            out = runner.forward(None, cache.input_leaves(stream, i), cache.step[i])
            total += float((out - target).pow(2).sum())
            count += target.numel()
    return total / max(count, 1)


def _reinit_indices(train: torch.Tensor, n: int, seed: int,
                    step: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``n`` training indices drawn at random (all of them for n = 0 or n >= their count),
    sorted: the references initialise activation ranges on 64 calibration samples. With
    ``step`` (per-step activation parameters: one range per sampler step) ``n`` per step."""
    if n <= 0 or n >= len(train):
        return train
    gen = torch.Generator().manual_seed(seed)
    train = train.cpu()
    if step is None:
        return torch.sort(train[torch.randperm(len(train), generator=gen)[:n]]).values
    steps = step.cpu()[train]
    picked = []
    for s in torch.unique(steps).tolist():
        members = train[steps == s]
        picked.append(members[torch.randperm(len(members), generator=gen)[:n]])
    return torch.sort(torch.cat(picked)).values


@torch.no_grad()
def _reinit_act_ranges(runner: UnitRunner, cache: BlockCache, stream: str, idx: torch.Tensor,
                       recipe: dict, seed: int) -> None:
    """Re-initialise the unit's activation ranges on its ``stream`` inputs (weights final)."""
    quantizers = [(f"{runner.name}.{i}", q) for i, q in enumerate(runner.act_quantizers)]
    if not quantizers:
        return
    observe_ranges(quantizers, recipe, seed)
    try:
        bs = runner.cfg.forward_batch_size
        for s in range(0, len(idx), bs):
            i = idx[s:s + bs]
            runner.forward(None, cache.input_leaves(stream, i), cache.step[i])
        apply_observed_ranges(quantizers, recipe)
    finally:
        for _, q in quantizers:
            q.observer = None
    for layer in runner.layers:
        layer.clear_cache()


def _reconstruct_unit(runner: UnitRunner, caches: dict, weighting: Weighting, cfg: ReconConfig,
                      context: RunContext, device: torch.device, name: str, kind: str,
                      split: _Split, meta: dict) -> dict:
    calib = caches["calib"]
    streams = phase_streams(cfg)
    wqs = [wq for layer in runner.layers for wq in (layer.weight_quantizers or [])
           if wq.form == "rtn"]
    aqs = runner.act_quantizers if cfg.learn_act else []
    phases = []
    if cfg.mode == "joint":
        if (wqs or aqs) and cfg.iters_w > 0:
            phases.append(("joint", wqs, aqs, cfg.iters_w))
    else:
        if wqs and cfg.iters_w > 0:
            phases.append(("weights", wqs, [], cfg.iters_w))
        if aqs and cfg.iters_a > 0:
            phases.append(("activations", [], aqs, cfg.iters_a))
    first = streams[phases[0][0]] if phases else streams["weights"]
    entry: dict[str, Any] = {"mse_before": _eval_mse(runner, calib, first, split.eval),
                             "mse_stream": first}
    seed = _unit_seed(context.seed, name)
    entry["phases"] = []
    # The weight phase switches this unit's activation quantizers off (Q-Diffusion's weight
    # pass); whatever phases run, the unit ends exactly as quantized as it started (also with
    # no activation phase, and quantizers that a recipe left off stay off).
    act_enabled = [(q, q.enabled) for q in runner.act_quantizers]
    # Sequential mode re-initialises activation ranges once the weights are final (BRECQ /
    # Q-Diffusion), whether or not step sizes are learned afterwards.
    reinit = (cfg.mode == "sequential" and cfg.act_reinit == "after_weights"
              and bool(runner.act_quantizers))

    def finalise_weights_and_reinit(pi: int) -> None:
        for wq in wqs:  # sequential: weights are final before step sizes are learned
            wq.fold()
        for layer in runner.layers:
            layer.clear_cache()
        if reinit:
            idx = _reinit_indices(split.train, cfg.act_reinit_samples, seed + 2000 + pi,
                                  calib.step if runner.per_step else None)
            _reinit_act_ranges(runner, calib, streams["activations"],
                               idx.to(calib.step.device), meta["recipe"], seed + 1000 + pi)
            entry["act_reinit_samples"] = len(idx)

    try:
        for pi, (phase, pw, pa, iters) in enumerate(phases):
            stream = streams[phase]
            if phase == "activations":
                finalise_weights_and_reinit(pi)
            entry["phases"].append(_run_phase(runner, caches, stream, weighting, cfg, device,
                                              phase, pw, pa, iters, seed + pi, split))
        if reinit and not any(ph[0] == "activations" for ph in phases):
            finalise_weights_and_reinit(len(phases))  # no step-size phase: ranges still re-made
    finally:
        for q, enabled in act_enabled:
            q.enabled = enabled
    for layer in runner.layers:
        for wq in layer.weight_quantizers or []:
            wq.fold()
        layer.clear_cache()
    entry["mse_after"] = _eval_mse(runner, calib, first, split.eval)
    return entry


def _run_phase(runner: UnitRunner, caches: dict, stream: str, weighting: Weighting,
               cfg: ReconConfig, device: torch.device, phase: str, wqs: list, aqs: list,
               iters: int, seed: int, split: _Split) -> dict:
    """One phase with its held-out MSE before and after (the unit's activation quantizers as
    the phase uses them); an activation phase that raised it is undone (``keep_better``)."""
    calib = caches["calib"]
    act_on = phase != "weights"
    states = [(q, q.enabled) for q in runner.act_quantizers]

    def held_out_mse() -> Optional[float]:  # with the unit's quantizers as the phase uses them
        for q, enabled in states:
            q.enabled = act_on and enabled
        return _eval_mse(runner, calib, stream, split.eval)

    before = held_out_mse()
    for q, enabled in states:
        q.enabled = enabled
    initial = [(q, q.scale.detach().clone()) for q in aqs]
    result = _optimize(runner, caches, stream, weighting, cfg, device, phase, wqs, aqs, iters,
                       seed, split.train)
    if phase == "weights":  # evaluate the rounding the unit keeps, not the soft one
        for wq in wqs:
            wq.fold()
        for layer in runner.layers:
            layer.clear_cache()
    after = held_out_mse()
    result.update(stream=stream, holdout_mse_before=before, holdout_mse_after=after)
    if phase == "activations" and aqs:
        kept = "learned"
        if cfg.keep_better and before is not None and after > before:
            with torch.no_grad():
                for q, scale in initial:
                    q.scale.copy_(scale)
            kept = "initial"
            result["holdout_mse_kept"] = before
        result["kept"] = kept
    for q, enabled in states:
        q.enabled = enabled
    return result


def _optimize(runner: UnitRunner, caches: dict, in_stream: str, weighting: Weighting,
              cfg: ReconConfig, device: torch.device, phase: str, wqs: list, aqs: list,
              iters: int, seed: int, train_idx: Optional[torch.Tensor] = None) -> dict:
    calib = caches["calib"]
    val = caches.get("val")
    qunit = runner.qunit
    for wq in wqs:
        wq.to_adaround()
    # sequential weight phase: activations of this unit stay FP (Q-Diffusion's weight pass)
    act_on = phase != "weights"
    for q in runner.act_quantizers:
        q.enabled = act_on
        q.lsq_grad_scale = cfg.lsq_grad_scale
    alphas = [wq.alpha for wq in wqs]
    scales = [q.scale for q in aqs] if act_on else []
    if not alphas and not scales:
        return {"phase": phase, "iterations": 0}
    runner.loss_p = cfg.act_loss_p if phase == "activations" else 2.0
    names = {id(p): n for n, p in qunit.named_parameters()}
    params = {names[id(p)]: p for p in alphas + scales}
    target_all = calib.streams["fp"].outputs[runner.b]
    ctx = BlockContext(
        block=Block(runner.name, qunit, runner.kind),
        params=params, forward=runner.ctx_forward,
        calib_inputs=lambda idx: calib.block_inputs(in_stream, idx),
        calib_targets=lambda idx: calib.gather(target_all, idx),
        calib_t=calib.t, calib_step=calib.step,
        val_inputs=None if val is None else (lambda idx: val.block_inputs(in_stream, idx)),
        val_targets=None if val is None else
        (lambda idx: val.gather(val.streams["fp"].outputs[runner.b], idx)),
        val_t=None if val is None else val.t, val_step=None if val is None else val.step,
        inner_lr=cfg.lr_w if alphas else cfg.lr_a, iterations=iters, batch_size=cfg.batch_size)
    ctx.phase = phase  # extra attribute: 'weights', 'activations' or 'joint'
    ctx.loss_reduction = cfg.loss_reduction  # the loss a weighting may differentiate (GAC)
    ctx.loss_p = runner.loss_p
    loop = _Loop(runner, calib, in_stream, cfg, device, wqs, alphas, scales, iters, seed,
                 target_all, train_idx)
    graphed = loop.graphable(weighting)
    for p in alphas + scales:
        p.requires_grad_(True)
    # the weighting's per-block work (GAC's meta steps) runs at the loop's precision too
    with _tf32(cfg.tf32 and device.type == "cuda"):
        weighting.begin_block(ctx)
    try:
        with _tf32(cfg.tf32 and device.type == "cuda"):
            if graphed:
                try:
                    loop.run_graphed()
                except RuntimeError:
                    if loop.graph_weighting is None:
                        raise
                    # a weighting's gather that cannot be captured: redo the phase eagerly
                    graphed, loop.graph, loop.losses = False, None, []
                    loop.run_eager(weighting, ctx)
            else:
                loop.run_eager(weighting, ctx)
    finally:
        loop.close()
        for p in alphas + scales:
            p.requires_grad_(False)
        for q in runner.act_quantizers:
            q.enabled = True
            q.lsq_grad_scale = False
        runner.loss_p = 2.0
        weighting.end_block(ctx)
    return {"phase": phase, "iterations": iters, "seconds": loop.seconds,
            "iters_per_s": iters / loop.seconds if loop.seconds > 0 else None,
            "steady_iters_per_s": loop.steady_rate(),
            "loss": [[i, float(v)] for i, v in loop.losses],
            "params": {"alphas": sum(p.numel() for p in alphas),
                       "step_sizes": sum(p.numel() for p in scales)},
            "path": "cuda_graph" if graphed else ("compiled" if loop.compiled else "eager")}


class _Loop:
    """The optimisation iterations of one phase, eager or as one replayed CUDA graph.

    Both draw the same batches (per-iteration randperm from the phase's generator) and compute
    the same loss; the graph path additionally needs every cached tensor on the device and a
    weighting that either neither weights nor observes (uniform) or declares ``graph_safe``
    (its weights(idx) only gathers from device buffers it updates in place), since the whole
    step - gather, weights, forward, loss, backward, Adam, step-size projection - is replayed
    without returning to Python.
    """

    WARMUP = 3  # iterations run eagerly on a side stream before capture (CUDA graph rule)
    STEADY_FROM = 10

    def __init__(self, runner, calib, in_stream, cfg, device, wqs, alphas, scales, iters, seed,
                 target_all, train_idx=None):
        self.runner, self.calib, self.in_stream, self.cfg = runner, calib, in_stream, cfg
        self.device, self.wqs, self.alphas, self.scales = device, wqs, alphas, scales
        self.iters, self.target_all = iters, target_all
        self.n = len(calib)
        self.graph_weighting = None  # a graph-safe weighting whose weights(idx) is captured
        # batch indices live where the cache lives: a host (pinned) cache is gathered with CPU
        # indices, so no device->host copy (a sync) is needed per iteration
        needed = [t for t in calib.inputs.get(in_stream, []) if t is not None] + [target_all]
        if cfg.qdrop > 0:
            needed += [t for t in calib.inputs.get("fp", []) if t is not None]
        self.on_device = all(t.device == device for t in needed)
        self.idx_device = device if self.on_device else torch.device("cpu")
        self.seed = seed
        self.gen = torch.Generator(device=self.idx_device).manual_seed(seed)
        # batches are drawn from the training indices only (the held-out ones judge the phase)
        self.train_idx = (torch.arange(self.n) if train_idx is None else train_idx
                          ).to(self.idx_device)
        self.floors = [s.detach() * cfg.step_floor for s in scales]
        self.beta_sched = BetaSchedule(iters, cfg.beta_start, cfg.beta_end, cfg.warmup)
        self.beta_t = torch.tensor(cfg.beta_start, device=device)
        self.regw_t = torch.tensor(0.0, device=device)
        self.lambdas = []
        self.groups = []
        if alphas:
            self.groups.append({"params": alphas, "lr": cfg.lr_w})
            self.lambdas.append(_schedule(cfg.lr_w_schedule, iters))
        if scales:
            self.groups.append({"params": scales, "lr": cfg.lr_a})
            self.lambdas.append(_schedule(cfg.lr_a_schedule, iters))
        self.handles, q_out, fp_out = runner._hooks()
        self.fbr_state = (self.handles, q_out, fp_out)
        self.loss_fn = _maybe_compile(runner.loss, cfg, device, runner)
        self.compiled = self.loss_fn != runner.loss  # bound methods: compare, not identity
        self.losses: list = []
        self.seconds = 0.0
        self._steady = None
        self.graph = None

    # ---- shared pieces ------------------------------------------------------------------
    def _indices(self) -> torch.Tensor:
        pick = torch.randperm(len(self.train_idx), generator=self.gen,
                              device=self.idx_device)[:self.cfg.batch_size]
        return self.train_idx[pick]

    def _set_schedules(self, it: int, lr_tensors=None, opt=None) -> None:
        beta, reg_on = self.beta_sched(it)
        self.beta_t.fill_(beta)
        self.regw_t.fill_(self.cfg.round_weight if reg_on else 0.0)
        if lr_tensors is not None:
            for t, g, lam in zip(lr_tensors, self.groups, self.lambdas):
                t.fill_(g["lr"] * lam(it))

    def _batch(self, idx, rand=None):
        calib = self.calib
        leaves = calib.input_leaves(self.in_stream, idx)
        if self.cfg.qdrop > 0:  # QDrop: take each input element from the FP stream w.p. qdrop
            fpl = calib.input_leaves("fp", idx)
            leaves = [torch.where(rand(q) < self.cfg.qdrop, f, q) for q, f in zip(leaves, fpl)]
        return leaves, calib.gather(self.target_all, idx), calib.step[idx.to(calib.step.device)]

    def _project(self) -> None:
        if self.floors:
            with torch.no_grad():
                torch._foreach_maximum_(self.scales, self.floors)

    def steady_rate(self):
        return self._steady

    # ---- eager --------------------------------------------------------------------------
    def run_eager(self, weighting: Weighting, ctx: BlockContext) -> None:
        opt = torch.optim.Adam(self.groups, **({"fused": True} if self.device.type == "cuda"
                                               else {}))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lambdas)
        rand = (lambda q: torch.rand(q.shape, generator=self.gen,
                                     device=self.idx_device).to(q.device))
        _sync(self.device)
        t0 = time.perf_counter()
        t_mark = None
        for it in range(self.iters):
            if it == self.STEADY_FROM:
                _sync(self.device)  # one sync per phase, for the steady-state rate
                t_mark = time.perf_counter()
            idx = self._indices()
            leaves, target, step = self._batch(idx, rand)
            self._set_schedules(it)
            w = weighting.weights(idx)
            if w is not None:
                w = w.to(self.device)
            total, per = self.loss_fn(leaves, step, target, w, self.beta_t, self.regw_t,
                                      self.wqs, self.fbr_state)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            self._project()
            sched.step()
            weighting.observe(it, idx, per.detach(), ctx)
            if it % self.cfg.log_every == 0 or it == self.iters - 1:
                self.losses.append((it, per.detach().mean()))
        _sync(self.device)
        t1 = time.perf_counter()
        self.seconds = t1 - t0
        if t_mark is not None and self.iters > self.STEADY_FROM:
            self._steady = (self.iters - self.STEADY_FROM) / max(t1 - t_mark, 1e-12)

    # ---- CUDA graph ---------------------------------------------------------------------
    def graphable(self, weighting: Weighting) -> bool:
        cfg = self.cfg
        want = cfg.cuda_graph is True or (cfg.cuda_graph == "auto" and self.device.type == "cuda")
        if not want or self.device.type != "cuda" or self.iters <= self.WARMUP + 1:
            return False
        if getattr(weighting, "graph_safe", False):
            # weights(idx) gathers from device buffers updated in place: capture it too
            self.graph_weighting = weighting
            return self.on_device
        if type(weighting).observe is not Weighting.observe:
            return False
        probe = torch.arange(min(2, self.n), device=self.device)
        if weighting.weights(probe) is not None:
            return False
        return self.on_device

    def run_graphed(self) -> None:
        lr_tensors = [torch.tensor(float(g["lr"]), device=self.device) for g in self.groups]
        groups = [{"params": g["params"], "lr": t} for g, t in zip(self.groups, lr_tensors)]
        opt = torch.optim.Adam(groups, capturable=True, foreach=True)
        all_idx = torch.stack([self._indices() for _ in range(self.iters)])
        static_idx = all_idx[0].clone()
        rand = torch.rand_like  # default CUDA generator: graph-safe; seeded per phase so that
        torch.cuda.manual_seed(self.seed)  # a resumed run draws the same QDrop masks

        weighting = self.graph_weighting

        def step():
            leaves, target, stp = self._batch(static_idx, rand)
            w = None if weighting is None else weighting.weights(static_idx)
            total, per = self.loss_fn(leaves, stp, target, w, self.beta_t, self.regw_t,
                                      self.wqs, self.fbr_state)
            total.backward()
            opt.step()
            self._project()
            return per.detach().mean()

        _sync(self.device)
        t0 = time.perf_counter()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for it in range(self.WARMUP):  # real iterations, run eagerly before capture
                static_idx.copy_(all_idx[it])
                self._set_schedules(it, [t for t in lr_tensors])
                opt.zero_grad(set_to_none=True)
                mean = step()
                if it % self.cfg.log_every == 0:
                    self.losses.append((it, mean.clone()))
        torch.cuda.current_stream(self.device).wait_stream(side)
        opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            static_mean = step()
        t_mark = None
        for it in range(self.WARMUP, self.iters):
            if it == self.STEADY_FROM:
                _sync(self.device)
                t_mark = time.perf_counter()
            static_idx.copy_(all_idx[it])
            self._set_schedules(it, lr_tensors)
            self.graph.replay()
            if it % self.cfg.log_every == 0 or it == self.iters - 1:
                self.losses.append((it, static_mean.clone()))
        _sync(self.device)
        t1 = time.perf_counter()
        self.seconds = t1 - t0
        if t_mark is not None:
            self._steady = (self.iters - self.STEADY_FROM) / max(t1 - t_mark, 1e-12)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.graph = None


def _schedule(kind: str, iters: int) -> Callable[[int], float]:
    import math

    if kind == "cosine":  # CosineAnnealingLR(T_max=iters, eta_min=0)
        return lambda it: 0.5 * (1 + math.cos(math.pi * min(it, iters) / max(iters, 1)))
    return lambda it: 1.0


def _maybe_compile(fn, cfg: ReconConfig, device: torch.device, runner: UnitRunner):
    use = cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda")
    if not use or (runner.per_step and any(q.num_steps > 1 for q in runner.act_quantizers)):
        return fn
    # every block is a new module behind the same code object: allow one compilation each
    import torch._dynamo

    dcfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                "accumulated_cache_size_limit"):
        if hasattr(dcfg, key):
            setattr(dcfg, key, max(getattr(dcfg, key), 4096))
    compiled = torch.compile(fn, mode=None if cfg.compile_mode == "default" else cfg.compile_mode,
                             dynamic=False)
    state = {"ok": None}

    def call(*args):
        if state["ok"] is False:
            return fn(*args)
        try:
            out = compiled(*args)
            state["ok"] = True
            return out
        except Exception:  # a block torch.compile cannot handle still reconstructs eagerly
            if state["ok"]:
                raise
            state["ok"] = False
            return fn(*args)
    call.compiled = compiled
    return call


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
class _Checkpoints:
    """One file per finished unit under work_dir/reconstruction, plus a fingerprint of the run;
    a stale folder (other options/recipe/data) is cleared rather than resumed from."""

    def __init__(self, context: RunContext, name: str, cfg: ReconConfig, meta: dict,
                 unit_names: list[str], n_calib: int):
        self.dir = Path(context.work_dir) / CKPT_DIR
        # options that only change speed do not invalidate finished blocks
        speed_only = ("compile", "compile_mode", "cuda_graph", "tf32", "cache_on_device",
                      "forward_batch_size", "log_every", "eval_samples", "checkpoint")
        options = {k: v for k, v in cfg.to_dict().items() if k not in speed_only}
        fp = {"reconstructor": name, "options": options, "recipe": meta["recipe"],
              "units": unit_names, "n_calib": n_calib, "seed": context.seed}
        self.fingerprint = hashlib.sha256(json.dumps(fp, sort_keys=True, default=str)
                                          .encode()).hexdigest()
        self.index = {n: i for i, n in enumerate(unit_names)}
        fpfile = self.dir / "fingerprint.json"
        if self.dir.exists():
            old = json.loads(fpfile.read_text()).get("sha256") if fpfile.exists() else None
            if old != self.fingerprint:
                for f in self.dir.glob("unit_*.pt"):
                    f.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        fpfile.write_text(json.dumps({"sha256": self.fingerprint, "config": fp}, default=str))

    def _path(self, name: str) -> Path:
        return self.dir / f"unit_{self.index[name]:04d}.pt"

    def done(self, name: str) -> bool:
        return self._path(name).exists()

    def save(self, name: str, unit: nn.Module, entry: dict) -> None:
        """The unit's state and its record entry (JSON text: a resumed record is the same)."""
        # the record's own JSON conversion: a resumed entry reads back as the record stores it
        atomic_torch_save({"name": name, "forms": weight_forms_of(unit),
                           "state": {k: v.detach().cpu() for k, v in unit.state_dict().items()},
                           "entry": json.dumps(entry, allow_nan=True, default=json_value)},
                          self._path(name))

    def load(self, name: str, unit: nn.Module) -> dict:
        """Restore the unit; returns its record entry (empty for checkpoints without one)."""
        data = torch.load(self._path(name), map_location="cpu", weights_only=True)
        if data.get("name") != name:
            raise PtqbenchError(f"checkpoint {self._path(name)} belongs to {data.get('name')}")
        prepare_forms(unit, data["forms"])
        unit.load_state_dict(data["state"], strict=True)
        unit.requires_grad_(False)
        for m in unit.modules():
            if isinstance(m, QuantLayer):
                m.clear_cache()
        return json.loads(data["entry"]) if "entry" in data else {}


def weight_forms_of(unit: nn.Module) -> dict[str, str]:
    if isinstance(unit, QuantLayer):
        return {f"weight_quantizers.{i}": wq.form
                for i, wq in enumerate(unit.weight_quantizers or [])}
    return weight_forms(unit)


class ReconstructionPlugin(Reconstructor):
    """Base of the reconstructor plugins that run :func:`reconstruct_blocks`: a subclass names
    its ``defaults`` (preset values of ReconConfig) and the options a suite may not change."""

    defaults: dict = {}
    fixed: tuple = ()

    def __init__(self, **options):
        super().__init__(**options)
        self.config = ReconConfig.from_options(self.name, self.defaults, options, fixed=self.fixed)

    def reconstruct(self, fp_model, qmodel, adapter, calib, val, weighting, context) -> dict:
        return reconstruct_blocks(fp_model, qmodel, adapter, calib, val, weighting, context,
                                  self.config, self.name)
