"""The bilevel math of Gradient-Aligned Calibration (GAC; Hoang et al., ICLR 2026, Alg. 2).

Notation (one block, one meta step):
  w = softmax(s / tau) over all N calibration samples; B a minibatch of them, c = N / |B|.
  Inner step (one-step unrolled reconstruction on the minibatch, the same loss the
  reconstruction loop minimises with weights N*w):
      theta'(w) = theta - eta * grad_theta[ (1/|B|) sum_{i in B} N w_i l_i(theta) ]
                = theta - eta * c * U^T w_B,           U = (grad l_i(theta))_{i in B}  (|B| x P)
  Validation: samples split into G groups of adjacent timesteps; L_a(theta') = group mean MSE.
  Surrogate of Algorithm 2: the gradient-matching term uses the gradients of the group losses
  with respect to the weights, g_a = dL_a(theta'(w))/dw = -eta c U G_a, G_a = grad L_a(theta'):
      L_GM^(2) = -(2 / (G(G-1))) sum_{a<b} g_a . g_b ,   L_VAL^(2) = L_GM^(2) + L_MSE(theta').

Closed-form meta-gradient (what :func:`meta_gradient` evaluates). With M = U^T U,
r_a = M (sum_b G_b - G_a) and H_a the Hessian of L_a at theta':
      dL_GM^(2)/dw_B = k eta^3 c^3 U sum_a H_a r_a          (k = 2/(G(G-1)))
      dL_MSE/dw_B    = -eta c U grad L_MSE(theta')
so the whole gradient is U q with one vector q in parameter space. It needs products U v and
U^T z with the minibatch's per-sample gradients and one Hessian-vector product per group: second
derivatives at most, never the third-order terms that differentiating L_GM itself would need.
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

Params = dict[str, torch.Tensor]


def per_sample_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Block-output MSE of every sample: (n,), in at least float32."""
    dtype = torch.promote_types(out.dtype, torch.float32)
    return (out.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)


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
    """params -> per-sample MSE of the quantized block on fixed inputs."""
    def f(params: Params) -> torch.Tensor:
        with step_context(steps):
            out = ctx.forward(params, inputs)
        return per_sample_mse(out, targets)
    return f


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _axpy(alpha, x: Params, y: Params) -> Params:
    """alpha * x + y."""
    return {k: alpha * x[k] + y[k] for k in y}


def _scale(alpha, x: Params) -> Params:
    return {k: alpha * v for k, v in x.items()}


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
    grad_w: torch.Tensor  # (|B|,) dL_VAL^(2)/dw for the minibatch entries
    l_gm: torch.Tensor  # surrogate gradient-matching loss (scalar tensor)
    l_mse: torch.Tensor  # validation MSE after the inner step (scalar tensor)
    group_loss: torch.Tensor  # (G,)


def meta_gradient(ctx: BlockContext, params: Params, w: torch.Tensor, idx: torch.Tensor,
                  groups: Sequence[torch.Tensor], eta: float, gm_weight: float = 1.0,
                  mode: str = "forward", calib_steps: Optional[torch.Tensor] = None,
                  val_steps: Optional[torch.Tensor] = None,
                  vectorize: bool = True, jacobian: str = "linearise") -> MetaResult:
    """Gradient of L_VAL^(2) = gm_weight * L_GM^(2) + L_MSE with respect to w[idx].

    ``w`` is the simplex weight vector over all N calibration samples, ``idx`` the minibatch
    (distinct indices), ``groups`` the validation indices of each timestep group.
    ``calib_steps`` / ``val_steps`` are the sampler steps of all calibration / validation samples
    (for per-timestep activation quantizers). ``vectorize`` batches the per-group products with
    U through torch.func.vmap (one pass instead of one per group); False loops over the groups.
    ``jacobian``: "linearise" takes every product with U by autodiff, "materialise" forms U
    from per-sample gradients first (:class:`_Materialised`); the results are the same.
    """
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
    theta_p = _axpy(-eta * c, lin.t_apply(w_b), theta)  # theta - eta * c * U^T w_B

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
    q = _scale(-eta * c, grad_mse)

    if align:
        k = 2.0 / (G * (G - 1))
        if vectorize:  # (G, |B|): U G_a, and r_a = U^T (p_tot - p_a), each in one batched pass
            grads_st = {kk: torch.stack([g[kk] for g in grads]) for kk in grads[0]}
            p = torch.func.vmap(lin.apply)(grads_st)
            r_st = torch.func.vmap(lin.t_apply)(p.sum(0, keepdim=True) - p)
            rs = [{kk: v[a] for kk, v in r_st.items()} for a in range(G)]
        else:
            p = torch.stack([lin.apply(g) for g in grads])
            p_tot = p.sum(0)
            rs = [lin.t_apply(p_tot - p[a]) for a in range(G)]
        # g_a = -eta c p_a, so g_a . g_b = (eta c)^2 p_a . p_b
        gram = p @ p.T
        l_gm = -k * (eta * c) ** 2 * (gram.sum() - gram.diagonal().sum()) / 2
        if hvp_fns:  # H_a is symmetric: its vjp is the Hessian-vector product
            hv = _sum([hvp_fns[a](rs[a])[0] for a in range(G)])
        else:
            hv = _sum([_hvp(fa, theta_p, rs[a], mode) for a, fa in enumerate(group_fns)])
        q = _axpy(gm_weight * k * (eta * c) ** 3, hv, q)
        l_gm = gm_weight * l_gm
    else:  # one group: nothing to align
        l_gm = torch.zeros((), device=w.device, dtype=l_mse.dtype)
    return MetaResult(lin.apply(q).detach(), l_gm.detach(), l_mse.detach(),
                      group_loss.detach())


def _group_loss_fn(ctx: BlockContext, gidx: torch.Tensor, val_steps: Optional[torch.Tensor]):
    fv = loss_vector_fn(ctx, ctx.val_inputs(gidx), ctx.val_targets(gidx),
                        None if val_steps is None else val_steps[gidx])
    return lambda p: fv(p).mean()


def softmax_backward(w: torch.Tensor, grad_w_full: torch.Tensor, tau: float) -> torch.Tensor:
    """d/ds of a loss whose gradient w.r.t. w = softmax(s / tau) is ``grad_w_full``."""
    return w * (grad_w_full - (w * grad_w_full).sum()) / tau


def surrogate_value(ctx: BlockContext, params: Params, w: torch.Tensor, idx: torch.Tensor,
                    groups: Sequence[torch.Tensor], eta: float, gm_weight: float = 1.0
                    ) -> torch.Tensor:
    """L_VAL^(2)(w) evaluated directly with autograd (reference for tests; not used to train).

    Builds theta'(w) with a differentiable inner step and takes g_a = dL_a/dw by autograd.
    """
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    N, B = w.shape[0], idx.shape[0]
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
        l_gm = -k * sum(gs[a] @ gs[b] for a in range(G) for b in range(a + 1, G))
    return (gm_weight * l_gm + l_mse).detach()


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
                          out.group_loss.clone())
