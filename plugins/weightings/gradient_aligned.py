"""Gradient-Aligned Calibration (GAC; Hoang, Pham, Le, Cai, Do, ICLR 2026, arXiv 2602.01289).

Per-sample logits s (initialised to 1/32, so weights start uniform) give weights
w = softmax(s / tau); for every block they are re-learned on the bilevel objective of the
paper's Algorithm 2 (math, and which parts are the paper's and which are ours:
:mod:`ptqbench.calib.gac`): a one-step-unrolled weighted reconstruction step on the loop's own
per-sample loss, validated by L_GM (agreement - by default the cosine - of the validation
groups' gradients) + L_MSE (by default log L_MSE). The reconstruction loop then uses
weights(idx) = N * w[idx] (mean 1 over the set).

Options and defaults
- ``tau`` = 1.0: the paper's temperature ablation (0.2/0.5/1/2) is best at 1.
- ``groups`` = 5: the paper splits the validation timesteps into 5 groups of adjacent steps.
- ``validation_fraction`` = None: use the selector's whole validation set (GAC presets set the
  selector's fraction to the paper's 5 %); a number uses the first samples of each step so the
  set has about that fraction of the calibration size (ablations without re-selection).
- ``objective`` = "cosine": L_GM = -mean over group pairs of cos(g_a, g_b) and the MSE term
  log L_MSE: bounded and invariant to the loss scale, eta and the parameters' scale, so the
  mix of the two terms does not depend on the block's loss units (ours; see
  :mod:`ptqbench.calib.gac`). "dot": the first implementation's surrogate (dot products,
  plain L_MSE), for comparison; its L_GM share of the meta-gradient was ~0 at the loop's step
  size (issue 12).
- ``inner_step`` = "normalized", ``inner_lr`` = 1e-3: the unrolled inner step moves the
  block's parameters by inner_lr in RMS, i.e. about as far as one step of the reconstruction's
  Adam at its learning rate (1e-3 for AdaRound's alphas) moves each of them: "one step of
  the reconstruction", whatever the block's gradient scale (before issue 12, eta was that
  learning rate used as a plain SGD step size, which on real blocks, whose gradients are
  tiny, did not move the parameters). The normalisation is held constant in the
  meta-gradient. "sgd" takes inner_lr as a plain SGD step size; inner_lr = "reconstruction"
  uses the reconstruction optimiser's learning rate (ctx.inner_lr), as before.
  Measured on cifar10-ddpm-s blocks (``benchmarks/gac_share.py``): see the README.
- ``meta_optimizer`` = "sgd", ``meta_lr`` = 0.25: SGD on the logits of each meta batch only.
  A meta batch's gradient informs its samples relative to each other, so it is centred on the
  batch (the full-set softmax gradient w_i (g_i - sum_j w_j g_j) / tau with the sum estimated
  on the batch) and the logits outside the batch are left alone; with
  ``normalize_meta_grad`` each meta step's logit gradient is standardised by its own RMS over
  the batch, and clipped at ``meta_clip`` standard units, so that a logit moves by at most
  meta_lr x meta_clip per visit (one pass, tau 1: weights within exp(+-0.75), 0.47-2.1).
  Equal meta-gradients for every sample leave the weights exactly uniform, whatever the visit
  order. "adam" (meta_lr 1e-2 unless given) is the first implementation: Adam on all N logits
  with the exact softmax gradient; its per-coordinate normalisation turns the tiny coupling
  gradient of unvisited samples into full steps, so weights depended on the visit order
  (Spearman(visit step, weight) = -1 for equal meta-gradients; issue 12).
- ``normalize_meta_grad`` = True (= "step"): each meta step's gradient on the logits is divided
  by its own RMS over the batch. On a real model a block's meta gradients are ~1e-12
  (products of per-sample gradients, times weights ~1/N); with it the update size is set by
  ``meta_lr`` alone, whatever the block's loss scale. It also takes out the size of a step's
  meta-gradient, which is mostly noise: the cosine's gradient grows as 1/|p_a| when a
  validation group's projected gradient happens to be small, and each step draws its own
  validation batch. "first" divides by the RMS of the block's first step (issue 12's first
  fix): on conv_in of cifar10-ddpm-s (``benchmarks/gac_trace.py``) a batch ~100x the first
  moved logits by ~100, one sample took ~60% of the weight, the normalized inner step of
  a later batch (weights ~1e-27) overflowed, and the weights became NaN on the GPU.
  False: raw gradients.
- ``meta_clip`` = 3.0: standardised logit gradients are clipped at +-meta_clip (0: no clip);
  the record's ``meta_clipped_fraction`` says how often. Ours: the method's description has
  no step-size control for the weights.
- ``meta_steps`` = None: one pass over the calibration set per block (ceil(N / meta_batch_size)),
  so every sample's weight receives exactly one update (the last batch of a pass is filled up
  to full size with samples already visited, which are not updated again); more steps start
  further passes in new orders.
- ``meta_batch_size`` = 64: calibration samples per meta step (twice Q-Diffusion's
  reconstruction batch): 80 meta steps per block for 5120 samples. A meta step has costs that
  do not grow with its batch (the validation pass, kernel launches), so fewer, larger steps make
  the pass cheaper; a larger batch also makes the inner step a less noisy estimate of the
  full-set weighted step. ``"reconstruction"`` (or None) = the reconstruction batch size.
- ``val_batch_size`` = 64: validation samples per meta step, val_batch_size // G drawn from
  each group (12 of each of 5 groups; the cross-group products in L_GM stay unbiased: groups
  are disjoint and drawn independently); over a pass each of cifar10's 260 validation samples
  is used ~18 times.
  ``"all"`` (or None) = the whole validation set every step (the paper's Algorithm 2 as
  written).
  Measured on cifar10-ddpm-s (W4A8, 2000 + 500 iterations per block, one H200 per cell, same
  run): calibration 123.7 s with 64/64 against 96.4 s for the same reconstruction with uniform
  weights (1.28x; meta steps 22.8 s), and 160.2 s (1.66x; meta steps 56.0 s) with the whole
  validation set and batches of 32 (``benchmarks/results/gac_cost.md``).
- ``alternate`` = False: the paper's Algorithm 1 learns a block's weights before reconstructing
  it; True spreads the same meta steps over the reconstruction (every iterations/meta_steps
  iterations, on the loop's own minibatch, at the current quantization parameters).
- ``gm_weight`` = 1.0, ``gm_balance`` = True: L_VAL = L_GM + L_MSE in the paper (no
  coefficient). Even with the cosine and log L_MSE, how strongly the one-step lookahead's
  group cosines respond to the weights, relative to the loss, differs by orders of magnitude
  between blocks (measured on cifar10-ddpm-s, CPU: raw share |grad L_GM| / |grad log L_MSE|
  0.15 on conv_in, 0.002 on down_blocks.0.resnets.0, inner_lr 1e-3), so no fixed coefficient
  makes the term matter on every block. With ``gm_balance`` (ours) each block uses
  L_VAL = beta L_GM + log L_MSE with the constant beta = gm_weight |grad log L_MSE| /
  |grad L_GM| at its first meta step: the gradient-matching part then moves the weights
  gm_weight times as much as the MSE part (at that step). False: beta = gm_weight.
- ``reset_per_block`` = True: weights are re-learned from uniform for every block. A block that
  the reconstructor optimises in several phases (Q-Diffusion's weights-then-activations) learns
  its weights in the first phase and keeps them for the later ones.
- ``autodiff`` = "auto": reverse-mode derivatives, the per-group products batched by
  torch.func.vmap; each group's gradient pass is kept for its Hessian-vector product (reverse
  over reverse): those HVPs measured 2.3-2.6x faster than forward-over-reverse ones on an
  H200 (cifar10-ddpm-s blocks; ``benchmarks/results/gac_cost.md``). On an op without a vmap rule it loops
  over groups, on one without a double-backward it tries forward-over-reverse
  ("forward"/"reverse" pin the mode).
- ``jacobian`` = "auto": form U, the minibatch's per-sample gradients (|B| x P), once per meta
  step and take every product with it as a matmul, when it needs at most ``jacobian_max_mb``
  (256 MiB; P is the block's quantization parameters, at most ~0.5 M on cifar10-ddpm-s, so
  ~130 MB at |B| = 64); otherwise (or if per-sample vmapping fails on the block's code) the 2G + 2
  products are separate autodiff passes over the minibatch, as before. Same results; on
  cifar10-ddpm-s a meta step got several times cheaper (benchmarks/results/gac_cost.md).
  "materialise" / "linearise" pin the choice.
- ``cuda_graph`` = "auto": on CUDA, replay each block's meta step as a CUDA graph (the step is
  launch-bound: hundreds of small kernels); it falls back to eager if capture fails.
- ``seed`` = None: meta-batch order seed (None = the cell's seed).

The first implementation is ``objective = "dot"``, ``inner_step = "sgd"``,
``inner_lr = "reconstruction"``, ``meta_optimizer = "adam"``, ``gm_balance = false`` (its
per-sample loss was the plain mean, now the loop's). The record of each block has ``weight_by_step`` (mean learned weight per
sampler step) and the L_GM share of the meta-gradient: ``gm_share`` (median over the block's
meta steps of |d(beta L_GM)/dw| / |d(MSE term)/dw| on the meta batch, with
``gm_share_min``/``gm_share_max``), ``gm_share_raw`` (the same for beta = 1), ``gm_balance``
(beta) and ``cos_full_mse`` (median cosine of the full meta-gradient with its MSE part).
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

from ptqbench import Weighting, hookimpl
from ptqbench.calib.gac import (OBJECTIVES, GraphedMetaGradient, jacobian_bytes,
                                loss_reduction, meta_gradient, safe_divide,
                                softmax_backward, timestep_groups)
from ptqbench.calib.selection import check_float, check_int
from ptqbench.errors import PtqbenchError

S_INIT = 1.0 / 32  # the paper's initial logit
AUTODIFF = ("auto", "forward", "reverse")
JACOBIAN = ("auto", "materialise", "linearise")
OPTIMIZERS = ("sgd", "adam")
#: meta_lr when not given, per meta optimiser (see the module docstring)
META_LR = {"sgd": 0.25, "adam": 1e-2}
INNER_STEPS = ("normalized", "sgd")
INNER_LR = 1e-3  # eta of the unrolled step (see the module docstring)


class GradientAligned(Weighting):
    name = "gradient-aligned"
    description = "GAC: per-sample weights softmax(s/tau) learned per block by gradient matching"
    #: whether prepare() needs the selector's validation set (the pipeline may skip it otherwise)
    needs_validation = True

    def __init__(self, tau: float = 1.0, groups: int = 5, meta_lr: Optional[float] = None,
                 meta_steps: Optional[int] = None, meta_batch_size: Optional[int | str] = 64,
                 val_batch_size: Optional[int | str] = 64,
                 inner_lr: float | str = INNER_LR, alternate: bool = False,
                 gm_weight: float = 1.0, validation_fraction: Optional[float] = None,
                 reset_per_block: bool = True, autodiff: str = "auto",
                 cuda_graph="auto", seed: Optional[int] = None,
                 normalize_meta_grad: bool | str = True, meta_clip: float = 3.0,
                 jacobian: str = "auto",
                 jacobian_max_mb: float = 256.0, objective: str = "cosine",
                 meta_optimizer: str = "sgd", inner_step: str = "normalized",
                 gm_balance: bool = True):
        if meta_optimizer not in OPTIMIZERS:
            raise PtqbenchError(f"option 'meta_optimizer' must be one of "
                                f"{', '.join(OPTIMIZERS)}, got {meta_optimizer!r}")
        if meta_lr is None:
            meta_lr = META_LR[meta_optimizer]
        super().__init__(tau=tau, groups=groups, meta_lr=meta_lr, meta_steps=meta_steps,
                         meta_batch_size=meta_batch_size, val_batch_size=val_batch_size,
                         inner_lr=inner_lr, alternate=alternate,
                         gm_weight=gm_weight, validation_fraction=validation_fraction,
                         reset_per_block=reset_per_block, autodiff=autodiff,
                         cuda_graph=cuda_graph, seed=seed,
                         normalize_meta_grad=normalize_meta_grad, meta_clip=meta_clip,
                         jacobian=jacobian,
                         jacobian_max_mb=jacobian_max_mb, objective=objective,
                         meta_optimizer=meta_optimizer, inner_step=inner_step,
                         gm_balance=gm_balance)
        self.tau = check_float("tau", tau, 0.0, float("inf"), low_open=True)
        self.groups = check_int("groups", groups)
        self.meta_lr = check_float("meta_lr", meta_lr, 0.0, float("inf"))
        self.meta_optimizer = meta_optimizer
        if objective not in OBJECTIVES:
            raise PtqbenchError(f"option 'objective' must be one of {', '.join(OBJECTIVES)}, "
                                f"got {objective!r}")
        self.objective = objective
        if inner_step not in INNER_STEPS:
            raise PtqbenchError(f"option 'inner_step' must be one of {', '.join(INNER_STEPS)}, "
                                f"got {inner_step!r}")
        self.inner_step = inner_step
        self.meta_steps = None if meta_steps is None else check_int("meta_steps", meta_steps, 0)
        # TOML has no null: "reconstruction" / "all" spell the None of these two options
        self.meta_batch_size = _size_or_none("meta_batch_size", meta_batch_size, "reconstruction")
        self.val_batch_size = _size_or_none("val_batch_size", val_batch_size, "all")
        # "reconstruction" (or None): the reconstruction optimiser's learning rate, as before
        self.inner_lr = (None if inner_lr is None or inner_lr == "reconstruction"
                         else check_float("inner_lr", inner_lr, 0.0, float("inf"), low_open=True))
        if normalize_meta_grad not in (True, False, "step", "first"):
            raise PtqbenchError(f"option 'normalize_meta_grad' must be true, false, \"step\" "
                                f"or \"first\", got {normalize_meta_grad!r}")
        self.meta_clip = check_float("meta_clip", meta_clip, 0.0, float("inf"))
        for opt, val in (("alternate", alternate), ("reset_per_block", reset_per_block),
                         ("gm_balance", gm_balance)):
            if not isinstance(val, bool):
                raise PtqbenchError(f"option {opt!r} must be true or false, got {val!r}")
        self.alternate, self.reset_per_block = alternate, reset_per_block
        self.normalize_meta_grad = ("step" if normalize_meta_grad is True else
                                    normalize_meta_grad)
        self.gm_balance = gm_balance
        self._beta: Optional[torch.Tensor] = None  # the block's L_GM coefficient (gm_balance)
        self._grad_scale: Optional[torch.Tensor] = None  # 1 / RMS of the block's first meta grad
        self._fresh: Optional[int] = None  # entries of this meta batch to update (None: all)
        self._meta_seconds = 0.0
        self.gm_weight = check_float("gm_weight", gm_weight, 0.0, float("inf"))
        self.validation_fraction = (None if validation_fraction is None else
                                    check_float("validation_fraction", validation_fraction,
                                                0.0, 1.0, low_open=True))
        if autodiff not in AUTODIFF:
            raise PtqbenchError(f"option 'autodiff' must be one of {', '.join(AUTODIFF)}, "
                                f"got {autodiff!r}")
        self.autodiff = autodiff
        modes = {"auto": ("reverse", "forward"), "forward": ("forward",),
                 "reverse": ("reverse",)}[autodiff]
        self._configs = [(m, v) for m in modes for v in (True, False)]
        if jacobian not in JACOBIAN:
            raise PtqbenchError(f"option 'jacobian' must be one of {', '.join(JACOBIAN)}, "
                                f"got {jacobian!r}")
        self.jacobian = jacobian
        self.jacobian_max_mb = check_float("jacobian_max_mb", jacobian_max_mb, 0.0,
                                           float("inf"))
        self._jac = "linearise"  # this block's choice (begin_block)
        self._cfg = 0
        if cuda_graph not in ("auto", True, False):
            raise PtqbenchError(f"option 'cuda_graph' must be auto, true or false, "
                                f"got {cuda_graph!r}")
        self.cuda_graph = cuda_graph
        self._graphed = None
        self._graphed_cfg = -1
        self.seed = seed
        self._n = 0
        self._s: Optional[torch.Tensor] = None
        self._w: Optional[torch.Tensor] = None  # N * softmax(s / tau), detached
        self._val_idx: Optional[torch.Tensor] = None
        self._blocks: dict[str, dict] = {}
        self._block: Optional[str] = None  # the block being reconstructed
        self.block_weights: dict[str, torch.Tensor] = {}  # block -> learned w (CPU), diagnostics

    # ---- setup ----------------------------------------------------------------------------
    def prepare(self, calib, val, context) -> None:
        if val is None or len(val) == 0:
            raise PtqbenchError("weighting 'gradient-aligned' needs a validation set: give the "
                                "selector validation_fraction > 0")
        self._n = len(calib)
        self._calib_step = calib.step.clone()
        self._val_idx = self._subsample(val.step)
        seed = self.seed if self.seed is not None else (context.seed if context else 0)
        self._gen = torch.Generator().manual_seed(int(seed))

    def _subsample(self, val_step: torch.Tensor) -> torch.Tensor:
        """Indices of the validation samples GAC uses: all, or the first v of each step."""
        if self.validation_fraction is None:
            return torch.arange(len(val_step))
        distinct = torch.unique(val_step)
        v = max(1, round(self.validation_fraction * self._n / len(distinct)))
        keep = []
        for st in distinct.tolist():
            where = torch.nonzero(val_step == st).flatten()
            if len(where) < v:
                raise PtqbenchError(f"gradient-aligned validation_fraction "
                                    f"{self.validation_fraction} needs {v} validation samples "
                                    f"per step; the selector gave {len(where)}")
            keep.append(where[:v])
        return torch.cat(keep).sort().values

    def begin_block(self, ctx) -> None:
        if self._n == 0:
            raise PtqbenchError("gradient-aligned: prepare() was not called before begin_block()")
        if ctx.val_inputs is None or ctx.val_step is None:
            raise PtqbenchError("gradient-aligned needs the block's validation inputs "
                                "(BlockContext.val_inputs / val_step)")
        # A block reconstructed in several phases (Q-Diffusion: weights, then activation step
        # sizes) learns its weights in the first phase and keeps them for the later ones.
        later_phase = ctx.block.name == self._block
        self._block = ctx.block.name
        # the device of the block's parameters, where the meta step runs
        device = next(iter(ctx.params.values())).device
        self._device = device
        if later_phase:
            self._total, self._done, self._every = 0, 0, 0
            return
        if self._s is None or self.reset_per_block:
            self._s = torch.full((self._n,), S_INIT, device=device,
                                 requires_grad=self.meta_optimizer == "adam")
            self._opt = (torch.optim.Adam([self._s], lr=self.meta_lr)
                         if self.meta_optimizer == "adam" else None)
        self._refresh()
        val_idx = self._val_idx.to(ctx.val_step.device)
        self._groups = [val_idx[g] for g in timestep_groups(ctx.val_step[val_idx], self.groups)]
        self._groups = [g.to(device) for g in self._groups]
        self._calib_steps_dev = ctx.calib_step.to(device)
        self._val_steps_dev = ctx.val_step.to(device)
        self._bs = min(self.meta_batch_size or ctx.batch_size, self._n)
        self._eta = self.inner_lr if self.inner_lr is not None else ctx.inner_lr
        self._total = (self.meta_steps if self.meta_steps is not None
                       else math.ceil(self._n / self._bs))
        self._every = max(1, ctx.iterations // max(self._total, 1)) if self.alternate else 0
        self._done = 0
        self._grad_scale = None
        self._beta = None
        self._meta_seconds = 0.0
        self._trace: list[tuple[torch.Tensor, ...]] = []  # per meta step, on the device
        self._skipped = torch.zeros((), dtype=torch.long, device=device)  # non-finite steps
        # logit updates clipped at meta_clip, of all updates (device counters: no sync)
        self._clipped = torch.zeros((), dtype=torch.long, device=device)
        self._updates = torch.zeros((), dtype=torch.long, device=device)
        self._val_batches = self._draw_val_batches(device)
        self._use_graph = device.type == "cuda" and self.cuda_graph in ("auto", True)
        small = jacobian_bytes(ctx.params, self._bs) <= self.jacobian_max_mb * 2 ** 20
        self._jac = ("materialise" if self.jacobian == "materialise"
                     or (self.jacobian == "auto" and small) else "linearise")
        self._graphed = None  # one graph per block: shapes and parameter storage are per block
        if not self.alternate:
            t0 = _synced_clock(device)
            per_pass = math.ceil(self._n / self._bs)
            for k in range(self._total):
                j = k % per_pass
                if j == 0:  # a new pass over the set, in a new order
                    perm = torch.randperm(self._n, generator=self._gen).to(device)
                idx = perm[j * self._bs:(j + 1) * self._bs]
                fresh = idx.shape[0]
                if fresh < self._bs:  # last of a pass: filled up to a full, duplicate-free
                    # batch (one shape for every step), but only the fresh samples are updated
                    # so that every sample is updated once per pass
                    idx = torch.cat([idx, perm[:self._bs - fresh]])
                self._meta_step(ctx, idx, fresh)
            self._meta_seconds = _synced_clock(device) - t0  # once per block: a sync is fine

    def _draw_val_batches(self, device) -> Optional[list[list[torch.Tensor]]]:
        """Per meta step, the validation subset of each group (drawn up front: no host work
        inside the loop)."""
        if self.val_batch_size is None:
            return None
        per_group = max(1, self.val_batch_size // len(self._groups))
        out = []
        for _ in range(self._total):
            out.append([g[torch.randperm(len(g), generator=self._gen)[:per_group].to(device)]
                        for g in self._groups])
        return out

    # ---- the meta step --------------------------------------------------------------------
    def _meta_step(self, ctx, idx: torch.Tensor, fresh: Optional[int] = None) -> None:
        idx = idx.to(self._device)
        w = torch.softmax(self._s.detach() / self.tau, 0)
        groups = self._groups if self._val_batches is None else self._val_batches[self._done]
        while True:
            mode, vectorize = self._configs[self._cfg]
            # balanced: the parts come unweighted and are mixed below
            gm = (1.0 if self.gm_weight else 0.0) if self.gm_balance else self.gm_weight
            kwargs = dict(eta=self._eta, gm_weight=gm, mode=mode,
                          calib_steps=self._calib_steps_dev, val_steps=self._val_steps_dev,
                          vectorize=vectorize, jacobian=self._jac, objective=self.objective,
                          inner_step=self.inner_step)
            cfg = (self._cfg, self._jac)
            try:
                if self._use_graph:
                    if self._graphed is None or self._graphed_cfg != cfg:
                        self._graphed = GraphedMetaGradient(ctx, ctx.params, groups, kwargs)
                        self._graphed_cfg = cfg
                    res = self._graphed(w, idx, groups)
                else:
                    res = meta_gradient(ctx, ctx.params, w, idx, groups, **kwargs)
                break
            except (RuntimeError, NotImplementedError):
                # some op of the block cannot be vmapped over samples: products by autodiff for
                # this block (only pinned "materialise" is an error)
                if self._jac == "materialise" and self.jacobian == "auto":
                    self._jac = "linearise"
                    continue
                # some op lacks a vmap rule or a forward-mode derivative: fall back (loop over
                # groups, then reverse mode only) and stay there
                if self._cfg + 1 >= len(self._configs):
                    raise
                self._cfg += 1
        raw_share = res.gm_share()
        grad_w = res.grad_w
        if self.gm_balance:
            if self._beta is None:  # on the device: no host sync in the meta loop
                usable = torch.isfinite(raw_share) & (raw_share > 0)
                self._beta = torch.where(usable, self.gm_weight / raw_share,
                                         torch.zeros_like(raw_share))
            grad_w = res.grad_mse + self._beta * res.grad_gm
        # A meta-gradient that is not finite (an inner step or group loss that overflowed, seen
        # on conv_in on the GPU) must not reach the logits: one NaN there makes every weight
        # NaN. Such a step counts as an equal meta-gradient (no update) and is recorded.
        finite = torch.isfinite(grad_w).all()
        self._skipped += (~finite).long()
        grad_w = torch.where(finite, grad_w, torch.zeros_like(grad_w))
        if self.meta_optimizer == "adam":
            self._adam_step(w, idx, grad_w)
        else:
            self._sgd_step(w, idx, grad_w, fresh)
        self._refresh()
        self._done += 1
        share = raw_share if self._beta is None else self._beta * raw_share
        self._trace.append((res.l_gm, res.l_mse, share, _cosine(grad_w, res.grad_mse),
                            raw_share))

    def _sgd_step(self, w: torch.Tensor, idx: torch.Tensor, grad_w: torch.Tensor,
                  fresh: Optional[int]) -> None:
        """SGD on the logits of the meta batch only, with a per-block scale.

        The meta-gradient informs the batch's samples relative to each other: d/ds_i of the
        full-set objective is w_i (g_i - sum_j w_j g_j) / tau, whose sum_j runs over all
        samples; over the batch it is estimated by the w-weighted mean of g over the batch.
        Samples outside the batch get no update (the softmax's coupling term, tiny but
        inflated to a full step by Adam's per-coordinate normalisation, made the weights
        depend on the visit order), so equal meta-gradients leave the weights exactly as they
        were, whatever the order.
        """
        w_b = w[idx]
        g = grad_w.to(w.dtype)
        mean_g = (w_b * g).sum() / w_b.sum().clamp_min(torch.finfo(w_b.dtype).tiny)
        grad_s = w_b * (g - mean_g) / self.tau
        if self.normalize_meta_grad == "first":  # before issue 12's NaN: the first step's scale
            grad_s = self._first_step_scaled(grad_s)
        elif self.normalize_meta_grad:  # this step's own RMS: every visit moves the logits alike
            grad_s = safe_divide(grad_s, grad_s.pow(2).mean().sqrt())
        if self.normalize_meta_grad and self.meta_clip:
            self._clipped += (grad_s.abs() > self.meta_clip).sum()
            self._updates += grad_s.numel()
            grad_s = grad_s.clamp(-self.meta_clip, self.meta_clip)
        if fresh is not None and fresh < idx.shape[0]:
            idx, grad_s = idx[:fresh], grad_s[:fresh]
        with torch.no_grad():
            self._s.index_add_(0, idx, grad_s, alpha=-self.meta_lr)

    def _adam_step(self, w: torch.Tensor, idx: torch.Tensor, grad_w: torch.Tensor) -> None:
        """The first implementation's optimiser (kept for comparison): Adam on all N logits
        with the exact softmax gradient; its updates depend on the order samples are visited
        in (issue 12)."""
        grad_full = torch.zeros_like(w).index_put_((idx,), grad_w.to(w.dtype), accumulate=True)
        self._opt.zero_grad(set_to_none=False)
        grad_s = softmax_backward(w, grad_full, self.tau)
        if self.normalize_meta_grad:  # the first implementation: the block's first step's scale
            grad_s = self._first_step_scaled(grad_s)
        self._s.grad = grad_s
        self._opt.step()

    def _first_step_scaled(self, grad_s: torch.Tensor) -> torch.Tensor:
        """grad_s divided by the RMS of the block's first logit gradient."""
        if self._grad_scale is None:  # on the device: no host sync in the meta loop
            rms = grad_s.pow(2).mean().sqrt()
            self._grad_scale = torch.where(rms > 0, 1.0 / rms, torch.ones_like(rms))
        return grad_s * self._grad_scale

    def _refresh(self) -> None:
        # in place: a reconstruction step captured in a CUDA graph that gathers weights(idx)
        # keeps reading the current weights
        with torch.no_grad():
            w = self._n * torch.softmax(self._s / self.tau, 0)
            if self._w is None or self._w.shape != w.shape or self._w.device != w.device:
                self._w = w
            else:
                self._w.copy_(w)

    @property
    def graph_safe(self) -> bool:
        # weights() gathers from self._w, refreshed in place; only the alternating variant
        # does work per iteration
        return not self.alternate

    def observe(self, iteration, idx, per_sample_loss, ctx) -> None:
        if self._every and self._done < self._total and iteration % self._every == 0:
            self._meta_step(ctx, idx)

    def weights(self, idx):
        if self._w is None:
            return None
        return self._w[idx.to(self._w.device)]

    def distribution(self) -> Optional[torch.Tensor]:
        """The current simplex weights softmax(s / tau) (sums to 1)."""
        return None if self._w is None else self._w / self._n

    # ---- bookkeeping ----------------------------------------------------------------------
    def end_block(self, ctx) -> None:
        if ctx.block.name in self._blocks and self._total == 0:
            return  # a later phase of a block: its weights and record are the first phase's
        w = self._w.detach().cpu()
        self.block_weights[ctx.block.name] = w.clone()
        steps = self._calib_step.cpu().long()
        S = int(steps.max()) + 1 if len(steps) else 0
        sums = torch.zeros(S).index_add_(0, steps, w)
        counts = torch.bincount(steps, minlength=S).clamp_min(1)
        # block end: syncing is fine
        trace = [tuple(float(v) for v in step) for step in self._trace]
        shares = sorted(t[2] for t in trace)
        self._blocks[ctx.block.name] = {
            "meta_steps": self._done, "meta_batch_size": self._bs, "inner_lr": self._eta,
            "meta_steps_not_finite": int(self._skipped),
            "groups": len(self._groups),
            "cuda_graph": (None if self._graphed is None else
                           self._graphed.failed or ("replayed" if self._graphed.graph
                                                    is not None else "eager")),
            "autodiff": "{}{}".format(*self._configs[self._cfg][:1],
                                      "+vmap" if self._configs[self._cfg][1] else ""),
            "jacobian": self._jac,
            "weight_min": float(w.min()), "weight_max": float(w.max()),
            "weight_by_step": {int(s): float(sums[s] / counts[s])
                               for s in range(S) if (steps == s).any()},
            "l_gm_first": trace[0][0] if trace else None,
            "l_gm_last": trace[-1][0] if trace else None,
            "l_mse_first": trace[0][1] if trace else None,
            "l_mse_last": trace[-1][1] if trace else None,
            "meta_grad_scale": (None if self._grad_scale is None else float(self._grad_scale)),
            "normalize_meta_grad": self.normalize_meta_grad, "meta_clip": self.meta_clip,
            "meta_clipped_fraction": (float(self._clipped) / int(self._updates)
                                      if int(self._updates) else 0.0),
            "objective": self.objective, "meta_optimizer": self.meta_optimizer,
            "inner_step": self.inner_step,
            "loss_reduction": loss_reduction(ctx),
            # |d(gm_weight L_GM)/dw| / |d(MSE term)/dw| per meta step: median, min, max
            "gm_share": _median(shares), "gm_share_min": shares[0] if shares else None,
            "gm_share_max": shares[-1] if shares else None,
            # the same without gm_balance's coefficient, and that coefficient
            "gm_share_raw": _median(sorted(t[4] for t in trace)),
            "gm_balance": None if self._beta is None else float(self._beta),
            "cos_full_mse": _median(sorted(t[3] for t in trace)),
            "meta_seconds": round(self._meta_seconds, 4),
        }

    def state(self) -> dict:
        return {"kind": "gradient-aligned", "options": dict(self.options),
                "blocks": self._blocks}


def _size_or_none(name: str, value, word: str) -> Optional[int]:
    if value is None or value == word:
        return None
    if isinstance(value, str):
        raise PtqbenchError(f"option {name!r} must be an integer >= 1 or {word!r}, got {value!r}")
    return check_int(name, value)


def _cosine(a: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    if b is None:
        return torch.ones((), device=a.device)
    return (a @ b) / (a.norm() * b.norm()).clamp_min(torch.finfo(a.dtype).tiny)


def _median(sorted_values: list) -> Optional[float]:
    n = len(sorted_values)
    if n == 0:
        return None
    return (sorted_values[(n - 1) // 2] + sorted_values[n // 2]) / 2


def _synced_clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@hookimpl
def register_weightings(register):
    register(GradientAligned)
