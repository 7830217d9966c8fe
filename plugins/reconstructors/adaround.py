"""``adaround``: layer-wise AdaRound (Nagel et al. 2020) + per-layer input step sizes.

Every quantized Conv2d/Linear is its own unit, in forward order; the rest of the network (norms,
attention softmax/matmuls) is the glue between units. Same options as ``brecq`` except the
granularity; defaults follow Q-Diffusion's layer reconstruction (same values as its blocks).
"""
from __future__ import annotations

from ptqbench import Reconstructor, hookimpl
from ptqbench.quant.recon_options import ReconConfig
from ptqbench.quant.reconstruction import reconstruct_blocks

DEFAULTS = {"granularity": "layer", "mode": "sequential", "iters_w": 20000, "iters_a": 5000,
            "lr_w": 1e-3, "lr_a": 4e-4, "batch_size": 32, "round_weight": 0.01,
            "beta_start": 20.0, "beta_end": 2.0, "warmup": 0.2, "input_source": "quantized"}


class AdaRound(Reconstructor):
    name = "adaround"
    description = "Layer-wise AdaRound weights + LSQ input step sizes"

    def __init__(self, **options):
        super().__init__(**options)
        self.config = ReconConfig.from_options(self.name, DEFAULTS, options,
                                               fixed=("granularity", "loss", "fbr_beta"))

    def reconstruct(self, fp_model, qmodel, adapter, calib, val, weighting, context) -> dict:
        return reconstruct_blocks(fp_model, qmodel, adapter, calib, val, weighting, context,
                                  self.config, self.name)


@hookimpl
def register_reconstructors(register):
    register(AdaRound)
