"""How much GAC's gradient-matching term moves the weights, on real blocks, per inner step size.

    python benchmarks/gac_share.py MODEL_DIR [--blocks B1,B2,...|--first K] [--per-step 16]
        [--etas 1e-4,1e-3,1e-2] [--inner-step normalized|sgd] [--objectives cosine,dot]
        [--batch 64] [--device cpu] [--time 3] [--baseline OLD_GAC.py] [--cache DIR]
        [--json out.json]

Builds the uniform-steps calibration set (``--per-step`` samples at each of 20 steps, 5 %
validation), quantizes W4A8 and walks the real BRECQ loop (1 iteration per block: the blocks'
inputs are those of a quick run) to each chosen block; at its weight phase, with uniform weights
and one meta batch, it prints for every inner step size eta and both meta-objectives the L_GM
share of the meta-gradient, |grad_GM| / |grad_MSE| (norm ratio of the two parts on the weights),
and cos(full, MSE-only). With ``--time N`` it also times a meta step of each objective (mean of N,
interleaved), and of ``--baseline``'s meta_gradient (e.g. the version before issue 12:
``git show 3416047~1:ptqbench/calib/gac.py > /tmp/gac_old.py``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkout  # noqa: E402,F401  (a bare checkout works too: see checkout.py)

from block_probe import StopWalk, calibrated_model, walk_blocks  # noqa: E402
from ptqbench.calib import gac  # noqa: E402
from ptqbench.sampling import SamplerSpec  # noqa: E402
from ptqbench_plugins.selectors.uniform_steps import UniformSteps  # noqa: E402
from ptqbench_plugins.weightings.gradient_aligned import GradientAligned  # noqa: E402


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--blocks", default=None, help="comma-separated block names")
    ap.add_argument("--first", type=int, default=3, help="else: the first K blocks")
    ap.add_argument("--per-step", type=int, default=16)
    ap.add_argument("--etas", default="1e-4,1e-3,1e-2")
    ap.add_argument("--inner-step", default="normalized", choices=["normalized", "sgd"])
    ap.add_argument("--objectives", default="cosine,dot")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--time", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cache", default=None, help="trajectory cache folder (reused if given)")
    ap.add_argument("--baseline", default=None,
                    help="a gac.py of another version (e.g. from git show): its meta_gradient "
                         "is timed too (signature: as before issue 12)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    etas = [float(e) for e in args.etas.split(",")]
    torch.manual_seed(0)
    spec = SamplerSpec(steps=20, spacing="quad")
    sel = UniformSteps(per_step=args.per_step, validation_fraction=0.05)
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp())
    cache.mkdir(parents=True, exist_ok=True)
    baseline = None
    if args.baseline:
        import importlib.util
        spec_b = importlib.util.spec_from_file_location("ptqbench.calib._gac_baseline",
                                                        args.baseline)
        baseline = importlib.util.module_from_spec(spec_b)
        spec_b.loader.exec_module(baseline)
    adapter, fp, qmodel, calib, val = calibrated_model(args.model, dev, spec, sel, "W4A8", cache)
    names = [b.name for b in adapter.blocks(fp)]
    targets = args.blocks.split(",") if args.blocks else names[:args.first]
    print(f"calib {len(calib)}  val {len(val)}  blocks {', '.join(targets)}")
    rows: list[dict] = []

    class Probe(GradientAligned):
        def begin_block(self, ctx):
            if ctx.block.name not in targets or getattr(ctx, "phase", "") != "weights":
                return
            groups = [g.to(dev) for g in gac.timestep_groups(ctx.val_step, 5)]
            n = len(calib)
            w = torch.full((n,), 1.0 / n, device=dev)
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:args.batch]
            idx = idx.to(dev)
            P = sum(v.numel() for v in ctx.params.values())
            for objective in args.objectives.split(","):
                for eta in etas:
                    res = gac.meta_gradient(ctx, ctx.params, w, idx, groups, eta=eta,
                                            mode="reverse", jacobian="materialise",
                                            calib_steps=ctx.calib_step.to(dev),
                                            val_steps=ctx.val_step.to(dev),
                                            objective=objective,
                                            inner_step=args.inner_step)
                    row = {"block": ctx.block.name, "params": P, "objective": objective,
                           "eta": eta, "gm_share": float(res.gm_share()),
                           "cos_full_mse": _cos(res.grad_w.double(), res.grad_mse.double()),
                           "l_gm": float(res.l_gm), "l_mse": float(res.l_mse)}
                    rows.append(row)
                    print(f"{row['block']:28s} {objective:6s} eta {eta:8.0e}  share "
                          f"{row['gm_share']:10.3e}  cos(full,mse) {row['cos_full_mse']:+.4f}"
                          f"  L_GM {row['l_gm']:+.3e}  L_MSE {row['l_mse']:.3e}")
            if args.time:
                common = dict(eta=etas[0], mode="reverse", jacobian="materialise",
                              calib_steps=ctx.calib_step.to(dev), val_steps=ctx.val_step.to(dev))
                timed = [(f"{o}/{args.inner_step}", gac.meta_gradient,
                          dict(common, objective=o, inner_step=args.inner_step))
                         for o in args.objectives.split(",")]
                if baseline is not None:
                    timed.append(("baseline", baseline.meta_gradient, common))
                # interleaved repetitions: a shared machine's load affects all alike
                total = {name: 0.0 for name, _, _ in timed}
                for name, fn, kw in timed:
                    fn(ctx, ctx.params, w, idx, groups, **kw)  # warm-up
                for _ in range(args.time):
                    for name, fn, kw in timed:
                        t0 = time.perf_counter()
                        fn(ctx, ctx.params, w, idx, groups, **kw)
                        total[name] += time.perf_counter() - t0
                for name, sec in total.items():
                    ms = sec / args.time * 1000
                    rows.append({"block": ctx.block.name, "variant": name, "meta_step_ms": ms})
                    print(f"{ctx.block.name:28s} {name:18s} meta step {ms:9.1f} ms "
                          f"(|B| {args.batch}, P {P})")
            if ctx.block.name == targets[-1]:
                raise StopWalk

        def end_block(self, ctx):
            pass

        def weights(self, idx):
            return None

        def observe(self, *a):
            pass

    walk_blocks(adapter, fp, qmodel, calib, val, Probe(), dev, cache)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
