"""Diagnostics of calibration data for one block: gradient conflict and GAC's learned weights.

Both work on anything shaped like :class:`~ptqbench.interfaces.BlockContext` (``params``,
``forward(params, inputs)``, ``calib_inputs/calib_targets(idx)``, ``calib_t``, ``calib_step``,
and for the alignment also ``val_inputs/val_targets``), so they run on the reconstruction loop's
own contexts and on the synthetic ones of the tests.

- :func:`gradient_conflict`: for every sampler step in the calibration set, the gradient of the
  block's reconstruction MSE over that step's samples with respect to the block's quantization
  parameters, and the pairwise cosine similarity of those gradients (GAC, Fig. 1a).
- :func:`weight_alignment`: for a weight vector (e.g. GAC's learned one), each sample's gradient
  alignment (cosine) with the validation-loss gradient, its correlation with the weights, and the
  paper's Fig. 2 view (samples sorted by weight in bins: mean weight vs mean alignment).
- :class:`BlockProbe` also keeps the weighting's record of the probed block (GAC: weights per
  sampler step, the L_GM share of the meta-gradient) in ``gac_meta.json`` and its result.
- ``write_*``: CSV + JSON + PNG heatmaps/plots (matplotlib, Agg backend).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.func import grad

from .gac import loss_vector_fn

Params = dict[str, torch.Tensor]


def _flat(g: Params) -> torch.Tensor:
    return torch.cat([v.reshape(-1).float() for v in g.values()])


def loss_gradient(ctx, params: Params, idx: torch.Tensor, val: bool = False,
                  chunk: int = 64) -> torch.Tensor:
    """Flattened gradient of the mean block MSE over samples ``idx`` (calibration or validation),
    accumulated over chunks so memory stays at one chunk's activations."""
    theta = {k: v.detach() for k, v in params.items()}
    inputs, targets = (ctx.val_inputs, ctx.val_targets) if val else (ctx.calib_inputs,
                                                                     ctx.calib_targets)
    steps_all = ctx.val_step if val else ctx.calib_step
    total = None
    n = idx.shape[0]
    for start in range(0, n, chunk):
        part = idx[start:start + chunk]
        steps = None if steps_all is None else steps_all.to(part.device)[part]
        f = loss_vector_fn(ctx, inputs(part), targets(part), steps)
        g = _flat(grad(lambda p: f(p).sum())(theta))
        total = g if total is None else total + g
    return total / n


def _device_of(ctx) -> torch.device:
    return next(iter(ctx.params.values())).device


def gradient_conflict(ctx, max_per_step: Optional[int] = 64,
                      steps: Optional[Sequence[int]] = None) -> dict:
    """Cosine similarity of the per-timestep reconstruction gradients of one block.

    Returns ``steps`` (sampler steps), ``timesteps``, ``counts`` (samples used per step),
    ``grad_norm`` per step and ``cosine`` (S x S tensor).
    """
    device = _device_of(ctx)
    step_all = ctx.calib_step.cpu()
    chosen = sorted(set(step_all.tolist())) if steps is None else list(steps)
    grads, counts, timesteps = [], [], []
    for s in chosen:
        where = torch.nonzero(step_all == s).flatten()
        if len(where) == 0:
            raise ValueError(f"no calibration sample at sampler step {s}")
        if max_per_step is not None:
            where = where[:max_per_step]
        grads.append(loss_gradient(ctx, ctx.params, where.to(device)).cpu())
        counts.append(len(where))
        timesteps.append(int(ctx.calib_t.cpu()[where[0]]))
    g = torch.stack(grads).double()
    norms = g.norm(dim=1)
    unit = g / norms.clamp_min(1e-30)[:, None]
    cos = (unit @ unit.T).float()
    return {"steps": chosen, "timesteps": timesteps, "counts": counts,
            "grad_norm": norms.float().tolist(), "cosine": cos}


def sample_alignment(ctx, idx: torch.Tensor, val_grad: torch.Tensor) -> torch.Tensor:
    """cos(grad l_i, val_grad) for each calibration sample i in ``idx`` (one at a time)."""
    out = torch.empty(len(idx))
    vg = val_grad.to(_device_of(ctx))
    vn = vg.norm().clamp_min(1e-30)
    for j, i in enumerate(idx.tolist()):
        gi = loss_gradient(ctx, ctx.params, torch.tensor([i], device=vg.device))
        out[j] = float((gi @ vg) / (gi.norm().clamp_min(1e-30) * vn))
    return out


def _rank(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=x.dtype)
    # average ranks of ties so constant inputs give no spurious correlation
    for v in torch.unique(x):
        m = x == v
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r


def _pearson(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = a.norm() * b.norm()
    return None if den == 0 else float((a @ b) / den)


def weight_alignment(ctx, weights: torch.Tensor, max_samples: Optional[int] = 256,
                     bins: int = 50, seed: int = 0) -> dict:
    """Learned weights vs each sample's gradient alignment with the validation gradient.

    ``weights`` has one entry per calibration sample. Up to ``max_samples`` samples are scored
    (a random subset, seeded). Returns per-sample ``index``, ``step``, ``weight``, ``alignment``,
    their ``pearson`` and ``spearman`` correlations, and ``binned`` rows (mean weight, mean
    alignment, count) of the samples sorted by weight in ``bins`` groups (GAC, Fig. 2).
    """
    if ctx.val_inputs is None:
        raise ValueError("weight_alignment needs the block's validation set")
    n = weights.shape[0]
    device = _device_of(ctx)
    val_n = len(ctx.val_step) if ctx.val_step is not None else None
    if val_n is None:
        raise ValueError("weight_alignment needs BlockContext.val_step")
    vg = loss_gradient(ctx, ctx.params, torch.arange(val_n, device=device), val=True)
    idx = torch.arange(n)
    if max_samples is not None and n > max_samples:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples]
        idx = idx.sort().values
    align = sample_alignment(ctx, idx, vg)
    w = weights.detach().cpu().float()[idx]
    order = torch.argsort(w)
    rows = []
    for part in torch.tensor_split(order, min(bins, len(order))):
        if len(part):
            rows.append({"mean_weight": float(w[part].mean()),
                         "mean_alignment": float(align[part].mean()), "count": len(part)})
    return {"index": idx.tolist(), "step": ctx.calib_step.cpu()[idx].tolist(),
            "weight": w.tolist(), "alignment": align.tolist(),
            "pearson": _pearson(w, align), "spearman": _pearson(_rank(w), _rank(align)),
            "binned": rows}


def weights_by_step(weights: torch.Tensor, steps: torch.Tensor,
                    timesteps: Optional[torch.Tensor] = None) -> list[dict]:
    """Mean / min / max weight of the samples of each sampler step."""
    w, st = weights.detach().cpu().float(), steps.cpu().long()
    rows = []
    for s in sorted(set(st.tolist())):
        m = st == s
        row = {"step": s, "count": int(m.sum()), "mean": float(w[m].mean()),
               "min": float(w[m].min()), "max": float(w[m].max())}
        if timesteps is not None:
            row["timestep"] = int(timesteps.cpu()[m][0])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_conflict(result: dict, out_dir: Path, name: str = "gradient_conflict") -> dict:
    """``<name>.csv`` (matrix with step/timestep headers), ``<name>.json``, ``<name>.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cos = result["cosine"]
    labels = [f"t={t}" for t in result["timesteps"]]
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["step", "timestep"] + labels)
        for s, t, row in zip(result["steps"], result["timesteps"], cos.tolist()):
            wr.writerow([s, t] + [f"{v:.6f}" for v in row])
    payload = {k: v for k, v in result.items() if k != "cosine"}
    payload["cosine"] = cos.tolist()
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1))
    plt = _plt()
    k = len(labels)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * k + 2), max(3.5, 0.35 * k + 1.5)))
    im = ax.imshow(cos.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
    ax.set_title(result.get("title", "cosine similarity of reconstruction gradients"))
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=120)
    plt.close(fig)
    return {"csv": out_dir / f"{name}.csv", "json": out_dir / f"{name}.json",
            "png": out_dir / f"{name}.png"}


def write_weights(by_step: list[dict], alignment: Optional[dict], out_dir: Path,
                  name: str = "gac_weights") -> dict:
    """Weights by timestep (CSV, JSON, PNG) and, when given, the weight/alignment plot."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    with open(out_dir / f"{name}_by_step.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(by_step[0]))
        wr.writeheader()
        wr.writerows(by_step)
    paths["by_step_csv"] = out_dir / f"{name}_by_step.csv"
    (out_dir / f"{name}.json").write_text(json.dumps({"by_step": by_step,
                                                      "alignment": alignment}, indent=1))
    paths["json"] = out_dir / f"{name}.json"
    plt = _plt()
    x = [r.get("timestep", r["step"]) for r in by_step]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, [r["mean"] for r in by_step], marker="o", label="mean")
    ax.fill_between(x, [r["min"] for r in by_step], [r["max"] for r in by_step], alpha=0.2,
                    label="min-max")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("timestep" if "timestep" in by_step[0] else "sampler step")
    ax.set_ylabel("weight (mean 1 = uniform)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}_by_step.png", dpi=120)
    plt.close(fig)
    paths["by_step_png"] = out_dir / f"{name}_by_step.png"
    if alignment is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        axes[0].scatter(alignment["alignment"], alignment["weight"], s=6, alpha=0.6)
        axes[0].set_xlabel("cos(grad l_i, grad L_val)")
        axes[0].set_ylabel("learned weight")
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        axes[0].set_title(f"pearson {fmt(alignment['pearson'])}, "
                          f"spearman {fmt(alignment['spearman'])}")
        rows = alignment["binned"]
        axes[1].plot(range(len(rows)), [r["mean_alignment"] for r in rows], marker=".")
        axes[1].set_xlabel("weight bin (ascending)")
        axes[1].set_ylabel("mean alignment")
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}_alignment.png", dpi=120)
        plt.close(fig)
        paths["alignment_png"] = out_dir / f"{name}_alignment.png"
    return paths


def diagnose_block(ctx, out_dir: Path, weights: Optional[torch.Tensor] = None,
                   max_per_step: Optional[int] = 64, max_samples: Optional[int] = 256,
                   seed: int = 0) -> dict:
    """Everything for one block: the conflict matrix and, given weights, the weight analysis."""
    out_dir = Path(out_dir)
    conflict = gradient_conflict(ctx, max_per_step)
    conflict["title"] = f"gradient conflict: {getattr(ctx.block, 'name', 'block')}"
    paths = {"conflict": write_conflict(conflict, out_dir)}
    if weights is not None:
        by_step = weights_by_step(weights, ctx.calib_step, ctx.calib_t)
        align = (weight_alignment(ctx, weights, max_samples, seed=seed)
                 if ctx.val_inputs is not None else None)
        paths["weights"] = write_weights(by_step, align, out_dir)
    return {k: {kk: str(vv) for kk, vv in v.items()} for k, v in paths.items()}


# --------------------------------------------------------------------------------------------
# probing a real reconstruction run
# --------------------------------------------------------------------------------------------
class DiagnosisDone(Exception):
    """Raised by :class:`BlockProbe` once its block is diagnosed, to stop the run there."""

    def __init__(self, result: dict):
        super().__init__("diagnosis finished")
        self.result = result


class BlockProbe:
    """A weighting wrapper that diagnoses one block of a real reconstruction run.

    It forwards every call to the wrapped weighting, so the run is the real one; when the loop
    starts the block named ``block`` it writes the gradient-conflict matrix at the block's initial
    quantization parameters, and, if the weighting learns weights (GAC), the weight analysis at
    the parameters the weights were learned at (before reconstruction; after it in alternate
    mode). With ``stop`` it raises :class:`DiagnosisDone` when the block's first phase ends.
    Duck-typed as a Weighting so that wrapping any plugin needs no registration.
    """

    def __init__(self, inner, block: str, out_dir: Path, max_per_step: Optional[int] = 64,
                 max_samples: Optional[int] = 256, seed: int = 0, stop: bool = True):
        self.inner, self.block, self.out_dir = inner, block, Path(out_dir)
        self.max_per_step, self.max_samples, self.seed, self.stop = (max_per_step, max_samples,
                                                                     seed, stop)
        self.name = f"probe({getattr(inner, 'name', '?')})"
        self.result: dict = {}
        self._n = 0

    def __getattr__(self, item):  # anything else a loop may look up
        return getattr(self.inner, item)

    def prepare(self, calib, val, context) -> None:
        self._n = len(calib)
        self.inner.prepare(calib, val, context)

    def _learned(self) -> Optional[torch.Tensor]:
        if getattr(self.inner, "distribution", None) is None:
            return None
        p = self.inner.distribution()
        return None if p is None else p * self._n

    def _weights_analysis(self, ctx) -> None:
        w = self._learned()
        if w is None:
            return
        by_step = weights_by_step(w, ctx.calib_step, ctx.calib_t)
        align = (weight_alignment(ctx, w, self.max_samples, seed=self.seed)
                 if ctx.val_inputs is not None else None)
        paths = write_weights(by_step, align, self.out_dir)
        self.result["weights"] = {k: str(v) for k, v in paths.items()}
        if align is not None:
            self.result["pearson"], self.result["spearman"] = align["pearson"], align["spearman"]

    def _meta_record(self) -> None:
        """The weighting's record of the block (GAC: learned weights per sampler step, the
        L_GM share of the meta-gradient) -> ``gac_meta.json`` and the result."""
        blocks = self.inner.state().get("blocks", {}) if hasattr(self.inner, "state") else {}
        rec = blocks.get(self.block)
        if not rec:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "gac_meta.json"
        path.write_text(json.dumps(rec, indent=1))
        self.result.setdefault("weights", {})["meta_json"] = str(path)
        for key in ("gm_share", "gm_share_min", "gm_share_max", "gm_share_raw", "gm_balance",
                    "cos_full_mse", "objective"):
            if key in rec:
                self.result[key] = rec[key]

    def begin_block(self, ctx) -> None:
        target = ctx.block.name == self.block and "conflict" not in self.result
        if target:
            conflict = gradient_conflict(ctx, self.max_per_step)
            conflict["title"] = f"gradient conflict: {self.block}"
            conflict["phase"] = getattr(ctx, "phase", None)
            paths = write_conflict(conflict, self.out_dir)
            self.result["conflict"] = {k: str(v) for k, v in paths.items()}
            self.result["block"], self.result["phase"] = self.block, conflict["phase"]
        self.inner.begin_block(ctx)
        if target and not getattr(self.inner, "alternate", False):
            self._weights_analysis(ctx)

    def weights(self, idx):
        return self.inner.weights(idx)

    def observe(self, iteration, idx, per_sample_loss, ctx) -> None:
        self.inner.observe(iteration, idx, per_sample_loss, ctx)

    def end_block(self, ctx) -> None:
        self.inner.end_block(ctx)
        if ctx.block.name == self.block and "conflict" in self.result:
            if getattr(self.inner, "alternate", False) and "weights" not in self.result:
                self._weights_analysis(ctx)
            self._meta_record()
            if self.stop:
                raise DiagnosisDone(self.result)

    def state(self) -> dict:
        return self.inner.state()
