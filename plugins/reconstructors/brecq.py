"""``brecq``: block-wise AdaRound + LSQ activation step sizes (BRECQ, as Q-Diffusion runs it).

Blocks come from the model adapter. ``mode='sequential'`` (default) learns the rounding with
activations in FP, folds it, then learns the step sizes (Q-Diffusion); ``mode='joint'`` learns
both with activations quantized (QDrop style; add ``qdrop=0.5`` for QDrop's input dropping).
Defaults and their sources: ptqbench.quant.recon_options.SOURCES.
"""
from __future__ import annotations

from ptqbench import Reconstructor, hookimpl
from ptqbench.quant.recon_options import ReconConfig
from ptqbench.quant.reconstruction import reconstruct_blocks

# Q-Diffusion (Li et al. 2023) calibration defaults; the ReconConfig defaults are these.
DEFAULTS = {"granularity": "block", "mode": "sequential", "iters_w": 20000, "iters_a": 5000,
            "lr_w": 1e-3, "lr_a": 4e-4, "batch_size": 32, "round_weight": 0.01,
            "beta_start": 20.0, "beta_end": 2.0, "warmup": 0.2, "input_source": "quantized"}


class BRECQ(Reconstructor):
    name = "brecq"
    description = "Block-wise AdaRound + LSQ activation step sizes (BRECQ / Q-Diffusion)"

    def __init__(self, **options):
        super().__init__(**options)
        self.config = ReconConfig.from_options(self.name, DEFAULTS, options,
                                               fixed=("granularity",))

    def reconstruct(self, fp_model, qmodel, adapter, calib, val, weighting, context) -> dict:
        return reconstruct_blocks(fp_model, qmodel, adapter, calib, val, weighting, context,
                                  self.config, self.name)


@hookimpl
def register_reconstructors(register):
    register(BRECQ)
