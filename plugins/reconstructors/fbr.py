"""``fbr``: EDA-DM's fine-grained block reconstruction.

Loss = block-output loss + fbr_beta * sum of the inner quantized layers' output losses (inner
targets: the FP block on the same inputs, as EDA-DM's hooks do). Defaults follow EDA-DM's
released CIFAR-10 W4A8 script (scripts/for_cifar.sh + sample_diffusion_ddim.py): joint weight and
activation learning for 5000 iterations, lr_w 0.5 and lr_a 5e-4 both cosine-annealed, batch 32,
add_loss (fbr_beta) 0.8, QDrop input mixing with probability 0.5 on the fully quantized
stream (weights and activations quantized, QDrop's setting), and no rounding regulariser
(its LossFunction is built with round_loss='none'; rounding is hardened at alpha >= 0).
"""
from ptqbench import hookimpl
from ptqbench.quant.reconstruction import ReconstructionPlugin


class FBR(ReconstructionPlugin):
    name = "fbr"
    description = "EDA-DM fine-grained block reconstruction (block + inner-layer losses)"
    defaults = {"granularity": "block", "loss": "fbr", "mode": "joint", "iters_w": 5000,
                "lr_w": 0.5, "lr_a": 5e-4, "lr_w_schedule": "cosine", "lr_a_schedule": "cosine",
                "batch_size": 32, "round_weight": 0.0, "beta_start": 20.0, "beta_end": 2.0,
                "warmup": 0.2, "qdrop": 0.5, "fbr_beta": 0.8, "joint_input": "quantized"}
    fixed = ("granularity", "loss")


@hookimpl
def register_reconstructors(register):
    register(FBR)
