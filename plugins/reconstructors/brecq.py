"""``brecq``: block-wise AdaRound + LSQ activation step sizes (BRECQ, as Q-Diffusion runs it).

Blocks come from the model adapter. ``mode='sequential'`` (default) learns the rounding with
activations in FP - on inputs from the quantized model with every activation quantizer off -
folds it, then learns the step sizes on inputs from the FP model (Q-Diffusion's and BRECQ's data
flow: ``weight_input='weights_only'``, ``act_input='fp'``); ``mode='joint'`` learns both with
activations quantized (QDrop style; add ``qdrop=0.5`` for QDrop's input dropping).
Defaults and their sources: ptqbench.quant.recon_options.SOURCES.
"""
from ptqbench import hookimpl
from ptqbench.quant.recon_options import QDIFFUSION_DEFAULTS
from ptqbench.quant.reconstruction import ReconstructionPlugin


class BRECQ(ReconstructionPlugin):
    name = "brecq"
    description = "Block-wise AdaRound + LSQ activation step sizes (BRECQ / Q-Diffusion)"
    defaults = QDIFFUSION_DEFAULTS  # Q-Diffusion (Li et al. 2023) calibration defaults
    fixed = ("granularity",)


@hookimpl
def register_reconstructors(register):
    register(BRECQ)
