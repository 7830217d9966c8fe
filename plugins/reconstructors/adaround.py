"""``adaround``: layer-wise AdaRound (Nagel et al. 2020) + per-layer input step sizes.

Every quantized Conv2d/Linear is its own unit, in forward order; the rest of the network (norms,
attention softmax/matmuls) is the glue between units. Same options as ``brecq`` except the
granularity; defaults follow Q-Diffusion's layer reconstruction (same values as its blocks).
"""
from ptqbench import hookimpl
from ptqbench.quant.recon_options import QDIFFUSION_DEFAULTS
from ptqbench.quant.reconstruction import ReconstructionPlugin


class AdaRound(ReconstructionPlugin):
    name = "adaround"
    description = "Layer-wise AdaRound weights + LSQ input step sizes"
    defaults = {**QDIFFUSION_DEFAULTS, "granularity": "layer"}
    fixed = ("granularity", "loss", "fbr_beta")


@hookimpl
def register_reconstructors(register):
    register(AdaRound)
