"""Where a GAC meta step's time goes, per component, on chosen blocks of a real model.

    python benchmarks/gac_meta_profile.py MODEL_DIR BLOCK[,BLOCK...] [DEVICE] [PER_STEP]

Builds the uniform-steps calibration set (PER_STEP samples per step, 5 % validation; 100 DDIM
steps when PER_STEP > 100, as cifar10-s), quantizes W4A8, walks BRECQ (5 iterations per block)
to each named block and, at its weight phase, times: a reconstruction iteration, forming U
(per-sample gradients), the products with U by autodiff, the group gradients, the
Hessian-vector products (forward-over-reverse and reverse-over-reverse), and a whole
``meta_gradient`` for each jacobian x autodiff choice; last, the relative difference of the
meta-gradients that U by autodiff and materialised U give (same math: ~1e-7 in float32).
"""
import sys
import tempfile
import time
from pathlib import Path

import torch
from ptqbench.calib import gac
from ptqbench.interfaces import RunContext
from ptqbench.sampling import SamplerSpec
from ptqbench.quant import QuantRecipe, calibrate_activation_ranges, quantize_model
from ptqbench_plugins.models.diffusers_unet import DiffusersUNet
from ptqbench_plugins.reconstructors.brecq import BRECQ
from ptqbench_plugins.selectors.uniform_steps import UniformSteps
from ptqbench_plugins.weightings.gradient_aligned import GradientAligned
from ptqbench.calib.trajectories import get_trajectories
from torch.func import grad_and_value

model = sys.argv[1]
targets = sys.argv[2].split(",")
dev = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cpu")
per_step = int(sys.argv[4]) if len(sys.argv) > 4 else 32
if dev.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
adapter = DiffusersUNet(path=model)
fp = adapter.load(dev)
spec = SamplerSpec(steps=100 if per_step > 100 else 20, spacing="quad")
sel = UniformSteps(per_step=per_step, validation_fraction=0.05)
cache = Path(tempfile.mkdtemp())
traj = get_trajectories(adapter, fp, spec, sel.num_trajectories(spec.steps), 0, cache, dev, 512)
calib, val = sel.select(traj, torch.Generator().manual_seed(0), None)
qmodel, _ = quantize_model(fp, QuantRecipe.from_options(bits="W4A8"), adapter)
calibrate_activation_ranges(qmodel, adapter, calib, 256, dev)
print("calib", len(calib), "val", len(val))


class Stop(Exception):
    pass


class W(GradientAligned):
    def begin_block(self, ctx):
        if ctx.block.name not in targets or getattr(ctx, "phase", "") != "weights":
            return
        print("==", ctx.block.name)
        theta = {k: v.detach() for k, v in ctx.params.items()}
        idx = torch.arange(32, device=dev)
        groups = gac.timestep_groups(ctx.val_step, 5)
        w = torch.full((len(calib),), 1.0 / len(calib), device=dev)

        def timeit(name, fn, n=3):
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            print(f"  {name:30s} {(time.perf_counter() - t) / n * 1000:8.2f} ms")

        fB = gac.loss_vector_fn(ctx, ctx.calib_inputs(idx), ctx.calib_targets(idx), None)
        timeit("batch fwd", lambda: fB(theta))
        timeit("batch fwd+bwd (iteration)", lambda: grad_and_value(lambda p: fB(p).mean())(theta))
        timeit("linearised init + U^T w", lambda: gac._Linearised(fB, theta, "forward").t_apply(w[idx]))
        lin = gac._Linearised(fB, theta, "forward")
        timeit("materialise U", lambda: gac._Materialised(ctx, idx, theta, None))
        fns = [gac._group_loss_fn(ctx, g, None) for g in groups]
        timeit("group grads (loop)", lambda: [grad_and_value(f)(theta) for f in fns])
        gr = [grad_and_value(f)(theta)[0] for f in fns]
        st = {k: torch.stack([g[k] for g in gr]) for k in gr[0]}
        timeit("lin: vmap U G_a", lambda: torch.func.vmap(lin.apply)(st))
        p = torch.func.vmap(lin.apply)(st)
        timeit("lin: vmap U^T d_a", lambda: torch.func.vmap(lin.t_apply)(p))
        timeit("hvps fwd-over-rev (loop)", lambda: [gac._hvp(f, theta, g, "forward") for f, g in zip(fns, gr)])
        timeit("hvps reverse (loop)", lambda: [gac._hvp(f, theta, g, "reverse") for f, g in zip(fns, gr)])
        for jac in ("linearise", "materialise"):
            for mode in ("forward", "reverse"):
                timeit(f"meta_gradient {jac} {mode}",
                       lambda: gac.meta_gradient(ctx, ctx.params, w, idx, groups, eta=1e-3,
                                                 jacobian=jac, mode=mode))
        a = gac.meta_gradient(ctx, ctx.params, w, idx, groups, eta=1e-3, jacobian="linearise")
        b = gac.meta_gradient(ctx, ctx.params, w, idx, groups, eta=1e-3, jacobian="materialise")
        rel = float((a.grad_w - b.grad_w).norm() / a.grad_w.norm())
        print("  rel diff grad_w", rel, "P", sum(v.numel() for v in theta.values()))
        if ctx.block.name == targets[-1]:
            raise Stop

    def end_block(self, ctx):
        pass

    def weights(self, idx):
        return None

    def observe(self, *a):
        pass


ctx = RunContext(device=dev, seed=0, work_dir=Path(tempfile.mkdtemp()), cache_dir=cache)
wt = W()
wt.prepare(calib, val, ctx)
try:
    BRECQ(iters_w=5, iters_a=5, checkpoint=False).reconstruct(fp, qmodel, adapter, calib, val, wt, ctx)
except Stop:
    pass
