"""The bilevel math of Gradient-Aligned Calibration (GAC; Hoang et al., ICLR 2026, Alg. 2).

Notation (one block, one meta step):
  w = softmax(s / tau) over all N calibration samples; B a minibatch of them, c = N / |B|.
  l_i(theta) is sample i's loss: the reconstruction loop's own per-sample loss
  (:func:`ptqbench.quant.reconstruction.per_sample_loss` with the loop's ``loss_reduction``,
  BRECQ's channel sum by default), so the inner step below is a step of the loop's objective.
  Inner step (one-step unrolled reconstruction on the minibatch, weights N*w as in the loop):
      theta'(w) = theta - eta * grad_theta[ (1/|B|) sum_{i in B} N w_i l_i(theta) ]
                = theta - eta * c * U^T w_B,           U = (grad l_i(theta))_{i in B}  (|B| x P)
  Validation: samples split into G groups of adjacent timesteps; L_a(theta') = group mean loss,
  L_MSE = their size-weighted mean. The group gradients of Algorithm 2 are taken with respect
  to the weights: g_a = dL_a(theta'(w))/dw_B = -eta c U G_a = -eta c p_a, G_a = grad L_a(theta').

Two meta-objectives (``objective``):
  "cosine" (default):  L_VAL = gm_weight * L_GM + log L_MSE,
                       L_GM = -(2 / (G(G-1))) sum_{a<b} cos(g_a, g_b)
  "dot" (the surrogate as first implemented, kept for comparison):
                       L_VAL = gm_weight * L_GM^(2) + L_MSE,
                       L_GM^(2) = -(2 / (G(G-1))) sum_{a<b} g_a . g_b

What is the paper's and what is ours:
- The paper's: weights softmax(s / tau) learned per block; the one-step unrolled inner step;
  validation split into timestep groups; L_VAL = L_GM + L_MSE with L_GM rewarding agreement of
  the groups' gradients; Algorithm 2's group gradients with respect to the weights (so that no
  third derivatives are needed).
- Ours, where the description is silent or its literal form fails in practice:
  * the similarity is the cosine, not the dot product: the dot product is unbounded below and
    rewards large validation gradients (in a toy it up-weighted conflicting samples) and, as
    g_a . g_b ~ eta^2, its meta-gradient ~ eta^3 against eta for L_MSE, so at the loop's step
    size it vanished (share 0.0 in float32 on every block of the bundled tiny model). The
    cosine is invariant to eta, c, the loss scale and the parameters' scale, and bounded.
  * log L_MSE instead of L_MSE: a bounded, dimensionless L_GM added to an L_MSE in the block's
    loss units would mix the two in a ratio set by the block's loss scale (and by
    ``loss_reduction``); d log L = dL / L is scale-free, and log has the same minimiser.
  * the inner step size eta is its own option (``inner_lr`` in the weighting), not the
    reconstruction optimiser's Adam learning rate used as an SGD step; ``inner_step=
    "normalized"`` makes eta the step's RMS size per parameter (as far as one Adam step of
    learning rate eta moves each), whatever the block's gradient scale.
  * (in the weighting) a per-block coefficient on L_GM (``gm_balance``), the logits updated
    by SGD on each meta batch only; see :mod:`ptqbench_plugins.weightings.gradient_aligned`.

Closed form of the meta-gradient (what :func:`meta_gradient` evaluates). theta' is linear in w
and U does not depend on w, so dp_a/dw_B = -eta c U H_a U^T (H_a the Hessian of L_a at theta').
With d_a = dL_GM/dp_a and r_a = U^T d_a:
      dL_GM/dw_B  = -eta c U sum_a H_a r_a
  cosine: d_a = -k (sum_{b!=a} (u_b - C_ab u_a)) / |p_a|   (u_a = p_a/|p_a|, C_ab = u_a.u_b,
          k = 2/(G(G-1)));   d log L_MSE/dw_B = -eta c U grad L_MSE(theta') / L_MSE
  dot:    d_a = -k (eta c)^2 (sum_b p_b - p_a);             dL_MSE/dw_B = -eta c U grad L_MSE
so the whole gradient is U q with one vector q in parameter space. It needs products U v and
U^T z with the minibatch's per-sample gradients and one Hessian-vector product per group: second
derivatives at most. The two parts U q_GM and U q_MSE are returned separately: their norm ratio
is the L_GM share that the records report.
U is either formed once from per-sample gradients (``jacobian="materialise"``: |B| x P floats,
then matmuls) or never formed (``"linearise"``: each product is an autodiff pass).

Derivatives use torch.func (functional_call through ``BlockContext.forward``, vjp, jvp, grad):
``mode="reverse"`` keeps each group's gradient pass and takes its vjp for the Hessian-vector
product; ``mode="forward"`` uses forward-over-reverse (jvp of the gradient) instead.
Nothing here synchronises the device.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.func import grad, grad_and_value, jvp, vjp

from ..interfaces import BlockContext
from ..quant.recon_options import ReconConfig
from ..quant.reconstruction import per_sample_loss

Params = dict[str, torch.Tensor]


OBJECTIVES = ("cosine", "dot")
#: the reconstruction loop's default reduction, for contexts that do not name theirs
DEFAULT_REDUCTION = ReconConfig.loss_reduction


def loss_reduction(ctx) -> str:
    """The per-sample loss reduction of the loop that built ``ctx`` (tests' contexts: default)."""
    return getattr(ctx, "loss_reduction", DEFAULT_REDUCTION)


def step_context(steps: Optional[torch.Tensor]):
    """Tell per-timestep activation quantizers which sampler step each sample belongs to."""
    if steps is None:
        return contextlib.nullcontext()
    try:
        from ..quant.context import sampler_step
    except ImportError:  # quantizer core absent: nothing is per-timestep
        return contextlib.nullcontext()
    return sampler_step(steps)


def loss_vector_fn(ctx: BlockContext, inputs: tuple, targets: torch.Tensor,
                   steps: Optional[torch.Tensor]) -> Callable[[Params], torch.Tensor]:
    """params -> per-sample loss of the quantized block on fixed inputs: the reconstruction
    loop's loss (its function and reduction)."""
    reduction = loss_reduction(ctx)
    p = getattr(ctx, "loss_p", 2.0)  # the phase's exponent (act_loss_p in the activation phase)

    def f(params: Params) -> torch.Tensor:
        with step_context(steps):
            out = ctx.forward(params, inputs)
        return per_sample_loss(out, targets.to(out.dtype), reduction, p)
    return f


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _axpy(alpha, x: Params, y: Params) -> Params:
    """alpha * x + y."""
    return {k: alpha * x[k] + y[k] for k in y}


def _scale(alpha, x: Params) -> Params:
    return {k: alpha * v for k, v in x.items()}


def _rms(x: Params) -> torch.Tensor:
    total = sum(v.pow(2).sum() for v in x.values())
    return (total / sum(v.numel() for v in x.values())).sqrt()


def safe_divide(num, den: torch.Tensor) -> torch.Tensor:
    """num / den where den is above the smallest normal float, else 0: a quantity normalised by
    a size that vanished (a zero step, a zero loss, a zero gradient) contributes nothing,
    instead of overflowing to inf/NaN."""
    tiny = torch.finfo(den.dtype).tiny
    q = num / den.clamp_min(tiny)
    return torch.where(den > tiny, q, torch.zeros_like(q))


def _sum(items: Sequence[Params]) -> Params:
    out = dict(items[0])
    for it in items[1:]:
        out = {k: out[k] + it[k] for k in out}
    return out


class _Linearised:
    """Products with U, the Jacobian of the minibatch loss vector at theta, by autodiff
    (U is never formed: each product is a forward- or reverse-mode pass over the minibatch)."""

    def __init__(self, f: Callable[[Params], torch.Tensor], theta: Params, mode: str):
        self.f, self.theta, self.mode = f, theta, mode
        self.value, self._vjp = vjp(f, theta)

    def t_apply(self, z: torch.Tensor) -> Params:  # U^T z
        return self._vjp(z)[0]

    def apply(self, v: Params) -> torch.Tensor:  # U v
        if self.mode == "forward":
            return jvp(self.f, (self.theta,), (v,))[1]
        # reverse only: U v = d/dz <U^T z, v>, the U^T z map being linear in z
        def ut(z):
            return vjp(self.f, self.theta)[1](z)[0]
        return vjp(ut, torch.zeros_like(self.value))[1](v)[0]


class _Materialised:
    """U formed explicitly, |B| x P, from per-sample gradients (one forward and one backward
    over the minibatch, vmapped over its samples); every later product is a matmul.

    A meta step needs U against 2G + 2 vectors (the group gradients, the r_a, w_B, q); by
    autodiff each of those is another pass over the minibatch, so forming U once is several
    times cheaper whenever |B| x P fits in memory (P: the block's quantization parameters).
    """

    def __init__(self, ctx: BlockContext, idx: torch.Tensor, theta: Params,
                 steps: Optional[torch.Tensor]):
        def one(p: Params, i: torch.Tensor) -> torch.Tensor:
            j = i.reshape(1)  # a minibatch of one: the block code sees its usual shapes
            f = loss_vector_fn(ctx, ctx.calib_inputs(j), ctx.calib_targets(j),
                               None if steps is None else steps[j])
            return f(p)[0]

        grads, self.value = torch.func.vmap(grad_and_value(one), in_dims=(None, 0))(theta, idx)
        self.keys = list(theta)
        self.shapes = [theta[k].shape for k in self.keys]
        self.sizes = [s.numel() for s in self.shapes]
        self.U = torch.cat([grads[k].reshape(idx.shape[0], -1) for k in self.keys], 1)

    def _flat(self, v: Params) -> torch.Tensor:
        return torch.cat([v[k].reshape(-1) for k in self.keys])

    def t_apply(self, z: torch.Tensor) -> Params:  # U^T z
        flat = z.to(self.U.dtype) @ self.U
        return {k: part.reshape(shape) for k, part, shape in
                zip(self.keys, flat.split(self.sizes), self.shapes)}

    def apply(self, v: Params) -> torch.Tensor:  # U v
        return self.U @ self._flat(v).to(self.U.dtype)


def jacobian_bytes(params: Params, batch: int) -> int:
    """Memory of a materialised U for a minibatch of ``batch`` samples."""
    return batch * sum(p.numel() * p.element_size() for p in params.values())


def _hvp(f: Callable[[Params], torch.Tensor], at: Params, v: Params, mode: str) -> Params:
    """H(at) v of the scalar function f."""
    if mode == "forward":
        return jvp(grad(f), (at,), (v,))[1]
    return grad(lambda p: _dot(grad(f)(p), v))(at)


@dataclass
class MetaResult:
    grad_w: torch.Tensor  # (|B|,) dL_VAL/dw for the minibatch entries: grad_mse + grad_gm
    l_gm: torch.Tensor  # gm_weight * L_GM (scalar tensor)
    l_mse: torch.Tensor  # validation loss after the inner step (scalar tensor)
    group_loss: torch.Tensor  # (G,)
    grad_mse: Optional[torch.Tensor] = None  # (|B|,) the part of grad_w from the MSE term
    grad_gm: Optional[torch.Tensor] = None  # (|B|,) the part from gm_weight * L_GM

    def gm_share(self) -> torch.Tensor:
        """|grad_gm| / |grad_mse|: how much the gradient-matching term moves the weights."""
        gm = torch.zeros_like(self.grad_w) if self.grad_gm is None else self.grad_gm
        mse = self.grad_w if self.grad_mse is None else self.grad_mse
        return gm.norm() / mse.norm().clamp_min(torch.finfo(mse.dtype).tiny)


def _gm_direction(p: torch.Tensor, objective: str, k: float, eta_c: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """L_GM and d_a = dL_GM/dp_a (G x |B|) for the group gradients p_a = U G_a."""
    if objective == "dot":  # g_a . g_b = (eta c)^2 p_a . p_b
        gram = p @ p.T
        l_gm = -k * eta_c ** 2 * (gram.sum() - gram.diagonal().sum()) / 2
        return l_gm, -k * eta_c ** 2 * (p.sum(0, keepdim=True) - p)
    # cos(g_a, g_b) = cos(p_a, p_b): the common factor -eta c cancels
    # a group whose gradient vanishes has no direction: cosine 0 with it, and no gradient
    norm = p.norm(dim=1, keepdim=True)
    u = safe_divide(p, norm)
    cos = u @ u.T
    l_gm = -k * (cos.sum() - cos.diagonal().sum()) / 2
    others = u.sum(0, keepdim=True) - u  # sum_{b != a} u_b
    c_others = (cos.sum(1, keepdim=True) - cos.diagonal()[:, None])  # sum_{b != a} C_ab
    return l_gm, safe_divide(-k * (others - c_others * u), norm)


def meta_gradient(ctx: BlockContext, params: Params, w: torch.Tensor, idx: torch.Tensor,
                  groups: Sequence[torch.Tensor], eta: float, gm_weight: float = 1.0,
                  mode: str = "forward", calib_steps: Optional[torch.Tensor] = None,
                  val_steps: Optional[torch.Tensor] = None,
                  vectorize: bool = True, jacobian: str = "linearise",
                  objective: str = "cosine", inner_step: str = "sgd") -> MetaResult:
    """Gradient of L_VAL (``objective`` "cosine" or "dot", see the module docstring) with
    respect to w[idx].

    ``w`` is the simplex weight vector over all N calibration samples, ``idx`` the minibatch
    (distinct indices), ``groups`` the validation indices of each timestep group.
    ``calib_steps`` / ``val_steps`` are the sampler steps of all calibration / validation samples
    (for per-timestep activation quantizers). ``vectorize`` batches the per-group products with
    U through torch.func.vmap (one pass instead of one per group); False loops over the groups.
    ``jacobian``: "linearise" takes every product with U by autodiff, "materialise" forms U
    from per-sample gradients first (:class:`_Materialised`); the results are the same.
    ``inner_step``: "sgd" takes eta as the SGD step size; "normalized" scales the step so that
    it moves the parameters by eta in RMS (an Adam step of learning rate eta moves each by about
    eta), the scale being held constant in the derivative (a stop-gradient).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    theta = {k: v.detach() for k, v in params.items()}
    N, B = w.shape[0], idx.shape[0]
    c = N / B
    G = len(groups)
    if jacobian == "materialise":
        lin = _Materialised(ctx, idx, theta, calib_steps)
    elif jacobian == "linearise":
        fB = loss_vector_fn(ctx, ctx.calib_inputs(idx), ctx.calib_targets(idx),
                            None if calib_steps is None else calib_steps[idx])
        lin = _Linearised(fB, theta, mode)
    else:
        raise ValueError(f"jacobian must be 'linearise' or 'materialise', got {jacobian!r}")
    w_b = w.detach()[idx]
    step = lin.t_apply(w_b)  # U^T w_B: c times it is the weighted minibatch loss's gradient
    if inner_step == "normalized":  # eta = RMS displacement per parameter (held constant)
        # a step of size 0 (no gradient, or every weight of the batch underflowed) has no
        # direction to scale: no inner step, rather than eta / tiny (an overflow)
        eta = safe_divide(eta, _rms(step).mul(c))
    elif inner_step != "sgd":
        raise ValueError(f"inner_step must be 'sgd' or 'normalized', got {inner_step!r}")
    theta_p = _axpy(-eta * c, step, theta)  # theta - eta * c * U^T w_B

    # Group gradients at theta': one forward + backward over each group's own samples (a
    # vmapped backward over the whole validation set would cost G times as much). In reverse
    # mode the same pass is kept for the Hessian-vector products below (vjp of the gradient):
    # H_a r_a then costs one more backward instead of a fresh forward + double backward.
    group_fns = [_group_loss_fn(ctx, g, val_steps) for g in groups]
    sizes = [g.shape[0] for g in groups]
    n_val = float(sum(sizes))
    align = G >= 2 and gm_weight != 0  # the gradient-matching term (and its HVPs) is needed
    grads, losses, hvp_fns = [], [], []
    for fa in group_fns:
        if mode == "reverse" and align:
            g_a, hvp_a, l_a = vjp(grad_and_value(fa), theta_p, has_aux=True)
            hvp_fns.append(hvp_a)
        else:
            g_a, l_a = grad_and_value(fa)(theta_p)
        grads.append(g_a)
        losses.append(l_a)
    group_loss = torch.stack(losses)
    frac = [n / n_val for n in sizes]
    l_mse = sum(group_loss[a] * frac[a] for a in range(G))
    grad_mse = _sum([_scale(frac[a], grads[a]) for a in range(G)])
    # log L_MSE (cosine objective): its gradient is grad L_MSE / L_MSE
    # (a validation loss of exactly 0 leaves nothing to learn)
    mse_coef = safe_divide(-eta * c, l_mse) if objective == "cosine" else -eta * c
    q_mse = _scale(mse_coef, grad_mse)

    if align:
        k = 2.0 / (G * (G - 1))
        if vectorize:  # (G, |B|): U G_a, and r_a = U^T d_a, each in one batched pass
            grads_st = {kk: torch.stack([g[kk] for g in grads]) for kk in grads[0]}
            p = torch.func.vmap(lin.apply)(grads_st)
            l_gm, d = _gm_direction(p, objective, k, eta * c)
            r_st = torch.func.vmap(lin.t_apply)(d)
            rs = [{kk: v[a] for kk, v in r_st.items()} for a in range(G)]
        else:
            p = torch.stack([lin.apply(g) for g in grads])
            l_gm, d = _gm_direction(p, objective, k, eta * c)
            rs = [lin.t_apply(d[a]) for a in range(G)]
        if hvp_fns:  # H_a is symmetric: its vjp is the Hessian-vector product
            hv = _sum([hvp_fns[a](rs[a])[0] for a in range(G)])
        else:
            hv = _sum([_hvp(fa, theta_p, rs[a], mode) for a, fa in enumerate(group_fns)])
        q_gm = _scale(-eta * c * gm_weight, hv)
        l_gm = gm_weight * l_gm
        if vectorize:  # both parts in one batched product
            both = torch.func.vmap(lin.apply)({kk: torch.stack([q_mse[kk], q_gm[kk]])
                                               for kk in q_mse})
            part_mse, part_gm = both[0], both[1]
        else:
            part_mse, part_gm = lin.apply(q_mse), lin.apply(q_gm)
    else:  # one group: nothing to align
        l_gm = torch.zeros((), device=w.device, dtype=l_mse.dtype)
        part_mse = lin.apply(q_mse)
        part_gm = torch.zeros_like(part_mse)
    part_mse, part_gm = part_mse.detach(), part_gm.detach()
    return MetaResult(part_mse + part_gm, l_gm.detach(), l_mse.detach(), group_loss.detach(),
                      part_mse, part_gm)


def _group_loss_fn(ctx: BlockContext, gidx: torch.Tensor, val_steps: Optional[torch.Tensor]):
    fv = loss_vector_fn(ctx, ctx.val_inputs(gidx), ctx.val_targets(gidx),
                        None if val_steps is None else val_steps[gidx])
    return lambda p: fv(p).mean()


def softmax_backward(w: torch.Tensor, grad_w_full: torch.Tensor, tau: float) -> torch.Tensor:
    """d/ds of a loss whose gradient w.r.t. w = softmax(s / tau) is ``grad_w_full``."""
    return w * (grad_w_full - (w * grad_w_full).sum()) / tau


def surrogate_value(ctx: BlockContext, params: Params, w: torch.Tensor, idx: torch.Tensor,
                    groups: Sequence[torch.Tensor], eta: float, gm_weight: float = 1.0,
                    objective: str = "dot") -> torch.Tensor:
    """L_VAL(w) evaluated directly with autograd (reference for tests; not used to train).

    Builds theta'(w) with a differentiable inner step and takes g_a = dL_a/dw by autograd.
    """
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    N = w.shape[0]
    w_b = w[idx].detach().requires_grad_(True)
    fB = loss_vector_fn(ctx, ctx.calib_inputs(idx), ctx.calib_targets(idx), None)
    inner = (fB(theta) * w_b * N).mean()
    g = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
    theta_p = {k: v - eta * gk for (k, v), gk in zip(theta.items(), g)}
    losses, sizes, gs = [], [], []
    for gidx in groups:
        fa = loss_vector_fn(ctx, ctx.val_inputs(gidx), ctx.val_targets(gidx), None)
        l_a = fa(theta_p).mean()
        gs.append(torch.autograd.grad(l_a, w_b, retain_graph=True)[0])
        losses.append(l_a)
        sizes.append(gidx.shape[0])
    n_val = float(sum(sizes))
    l_mse = sum(l * (n / n_val) for l, n in zip(losses, sizes))
    G = len(groups)
    l_gm = torch.zeros(())
    if G >= 2:
        k = 2.0 / (G * (G - 1))
        sim = ((lambda a, b: a @ b) if objective == "dot" else
               (lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=0)))
        l_gm = -k * sum(sim(gs[a], gs[b]) for a in range(G) for b in range(a + 1, G))
    mse_term = l_mse if objective == "dot" else torch.log(l_mse)
    return (gm_weight * l_gm + mse_term).detach()


def timestep_groups(val_step: torch.Tensor, num_groups: int) -> list[torch.Tensor]:
    """Validation indices split into ``num_groups`` groups of adjacent sampler steps, each with
    (as nearly as possible) the same number of distinct steps; fewer groups when there are fewer
    distinct steps."""
    distinct = torch.unique(val_step.cpu())
    G = max(1, min(num_groups, len(distinct)))
    chunks = torch.tensor_split(distinct, G)
    steps_cpu = val_step.cpu()
    out = []
    for chunk in chunks:
        mask = torch.isin(steps_cpu, chunk)
        out.append(torch.nonzero(mask).flatten().to(val_step.device))
    return out


class GraphedMetaGradient:
    """:func:`meta_gradient` replayed as a CUDA graph.

    A meta step launches hundreds of small kernels through several torch.func transforms, so
    eagerly it is bound by launch overhead. Within one block every meta step has the same
    shapes and reads the same parameter storage, so the first call runs eagerly on a side stream
    (the warm-up, a real step), the second captures the graph, and later calls copy the new
    minibatch indices, weights and validation indices into static buffers and replay it.
    Any failure to capture (an op that synchronises, host-resident caches) makes it eager for
    good, with identical results.
    """

    def __init__(self, ctx: BlockContext, params: Params, groups_like: Sequence[torch.Tensor],
                 kwargs: dict):
        self.ctx, self.params, self.kwargs = ctx, params, kwargs
        self.calls = 0
        self.graph = None
        self.failed: Optional[str] = None
        self._static: Optional[tuple] = None
        self._out: Optional[MetaResult] = None

    def _eager(self, w, idx, groups) -> MetaResult:
        return meta_gradient(self.ctx, self.params, w, idx, groups, **self.kwargs)

    def __call__(self, w: torch.Tensor, idx: torch.Tensor,
                 groups: Sequence[torch.Tensor]) -> MetaResult:
        self.calls += 1
        if self.failed is not None or not w.is_cuda:
            return self._eager(w, idx, groups)
        if self.calls == 1:  # warm-up on a side stream, as CUDA-graph capture requires
            side = torch.cuda.Stream(device=w.device)
            side.wait_stream(torch.cuda.current_stream(w.device))
            with torch.cuda.stream(side):
                out = self._eager(w, idx, groups)
            torch.cuda.current_stream(w.device).wait_stream(side)
            return out
        if self.graph is None:
            static = (w.clone(), idx.clone(), [g.clone() for g in groups])
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    out = self._eager(*static)
            except Exception as exc:  # noqa: BLE001 - any capture problem means: stay eager
                self.failed = f"{type(exc).__name__}: {exc}"[:200]
                torch.cuda.synchronize(w.device)
                return self._eager(w, idx, groups)
            self.graph, self._static, self._out = graph, static, out
        sw, sidx, sgroups = self._static
        if idx.shape != sidx.shape or any(g.shape != h.shape for g, h in zip(groups, sgroups)):
            return self._eager(w, idx, groups)  # a ragged last batch: not the captured shape
        sw.copy_(w)
        sidx.copy_(idx)
        for h, g in zip(sgroups, groups):
            h.copy_(g)
        self.graph.replay()
        out = self._out
        # copies: the next replay overwrites the static outputs
        return MetaResult(out.grad_w.clone(), out.l_gm.clone(), out.l_mse.clone(),
                          out.group_loss.clone(), out.grad_mse.clone(), out.grad_gm.clone())
