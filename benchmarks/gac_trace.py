"""Trace GAC's meta pass on real blocks, step by step: where does a weight stop being finite?

    python benchmarks/gac_trace.py MODEL_DIR [--blocks conv_in] [--bits W4A8] [--per-step 256]
        [--device cuda] [--cuda-graph auto|false] [--seed 0] [--cache DIR] [--json out.json]

Builds the gac preset's calibration set (uniform steps 20 x ``--per-step``, 5 % validation, DDIM
100 quad steps), quantizes with the gac recipe (shortcut split, quantized attention), and walks the
real BRECQ loop (1 iteration per phase) to each chosen block, where the real
``gradient-aligned`` weighting (default options) learns its weights. For every meta step it prints
the logits' and weights' range, L_MSE, the L_GM share, and which of the meta step's quantities is
not finite, so that the first step that goes wrong, and in which quantity, is on record.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkout  # noqa: E402,F401  (a bare checkout works too: see checkout.py)

import ptqbench_plugins.weightings.gradient_aligned as ga  # noqa: E402
from block_probe import StopWalk, calibrated_model, walk_blocks  # noqa: E402
from ptqbench.sampling import SamplerSpec  # noqa: E402
from ptqbench_plugins.selectors.uniform_steps import UniformSteps  # noqa: E402


def _finite(x) -> bool:
    return x is None or bool(torch.isfinite(x).all())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--blocks", default="conv_in", help="comma-separated block names")
    ap.add_argument("--bits", default="W4A8")
    ap.add_argument("--per-step", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cuda-graph", default="auto", choices=["auto", "false"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    targets = args.blocks.split(",")
    sel = UniformSteps(steps=20, per_step=args.per_step, validation_fraction=0.05)
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp())
    cache.mkdir(parents=True, exist_ok=True)
    adapter, fp, qmodel, calib, val = calibrated_model(
        args.model, dev, SamplerSpec(steps=100, spacing="quad"), sel, args.bits, cache,
        args.seed, 256, split_shortcut=True, quantize_attention=True)
    print(f"calib {len(calib)}  val {len(val)}  device {dev}  blocks {', '.join(targets)}",
          flush=True)

    rows: list[dict] = []
    last: dict = {}
    plain, graphed_call = ga.meta_gradient, ga.GraphedMetaGradient.__call__

    def keep(res):
        last["res"] = res
        return res

    ga.meta_gradient = lambda *a, **k: keep(plain(*a, **k))
    ga.GraphedMetaGradient.__call__ = lambda self, *a, **k: keep(graphed_call(self, *a, **k))

    class Traced(ga.GradientAligned):
        def begin_block(self, ctx):
            if ctx.block.name not in targets:
                return super().begin_block(ctx)
            super().begin_block(ctx)
            if getattr(ctx, "phase", "weights") == "weights" and ctx.block.name == targets[-1]:
                raise StopWalk

        def _meta_step(self, ctx, idx, fresh=None):
            w_before = torch.softmax(self._s.detach() / self.tau, 0) * self._n
            super()._meta_step(ctx, idx, fresh)
            res = last.get("res")
            s = self._s.detach()
            row = {"block": ctx.block.name, "step": self._done - 1,
                   "w_min_before": float(w_before.min()), "w_b_min": float(w_before[idx].min()),
                   "s_min": float(s.min()), "s_max": float(s.max()),
                   "l_mse": float(res.l_mse), "l_gm": float(res.l_gm),
                   "share_raw": float(res.gm_share()),
                   "beta": None if self._beta is None else float(self._beta),
                   "grad_scale": None if self._grad_scale is None else float(self._grad_scale),
                   "finite": {k: _finite(getattr(res, k)) for k in
                              ("grad_w", "grad_mse", "grad_gm", "l_mse", "l_gm",
                               "group_loss")},
                   "graph": None if self._graphed is None else
                   ("failed" if self._graphed.failed else
                    "replayed" if self._graphed.graph is not None else "eager"),
                   "skipped": int(self._skipped)}
            rows.append(row)
            bad = [k for k, ok in row["finite"].items() if not ok]
            print(f"{row['block']} step {row['step']:3d}  s [{row['s_min']:+.3e}, "
                  f"{row['s_max']:+.3e}]  w_b_min {row['w_b_min']:.3e}  L_MSE {row['l_mse']:.3e}"
                  f"  share {row['share_raw']:.3e}  graph {row['graph']}"
                  f"  not finite: {','.join(bad) or '-'}", flush=True)

    weighting = Traced(cuda_graph="auto" if args.cuda_graph == "auto" else False)
    walk_blocks(adapter, fp, qmodel, calib, val, weighting, dev, cache, args.seed)
    w = torch.softmax(weighting._s.detach() / weighting.tau, 0) * weighting._n
    print(f"final weights: finite {bool(torch.isfinite(w).all())}  range "
          f"[{float(w.min()):.3e}, {float(w.max()):.3e}]  skipped steps {int(weighting._skipped)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
