"""Options of the reconstruction backends, validated, with the source of every default.

Defaults follow Q-Diffusion's calibration (BRECQ engine): 20k weight iterations, batch 32,
rounding-loss weight 0.01, beta 20 -> 2 after a 0.2 warm-up, Adam lr 1e-3 on AdaRound alphas
(BRECQ), activation step sizes lr 4e-4 for 5k iterations with cosine annealing. Plugins override
some of them (``fbr`` follows EDA-DM's released CIFAR-10 W4A8 script).

Data flow (which model feeds each phase's block inputs) follows the reference code, because it
decides whether reconstruction beats RTN at all: the weight phase reads the quantized model with
every activation quantizer off, the activation phase reads the FP model, and targets are always
the FP model's block outputs (Q-Diffusion's scripts/sample_diffusion_ddim.py: asym=True,
act_quant=False for weights; asym=False for activations; BRECQ's main_imagenet.py the same).
Both references also initialise activation ranges only after the weight pass, on 64
calibration samples, and train step sizes on an L_p loss with p = 2.4 (``act_reinit``,
``act_reinit_samples``, ``act_loss_p``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import PtqbenchError

SOURCES = {
    "granularity": "'block' (BRECQ units from the model adapter) or 'layer' (AdaRound)",
    "mode": "'sequential': weights (AdaRound, activations FP) then activation step sizes, as "
            "Q-Diffusion; 'joint': both at once with activations quantized (QDrop/EDA-DM)",
    "iters_w": "weight (AdaRound) iterations; joint mode: all iterations (Q-Diffusion 20000)",
    "iters_a": "activation step-size iterations in sequential mode (Q-Diffusion 5000)",
    "lr_w": "Adam lr of AdaRound alphas (BRECQ/Q-Diffusion: Adam default 1e-3)",
    "lr_a": "Adam lr of activation step sizes (Q-Diffusion --cali_lr 4e-4)",
    "lr_w_schedule": "'constant' (BRECQ) or 'cosine' (EDA-DM) for lr_w",
    "lr_a_schedule": "'cosine' (BRECQ/Q-Diffusion CosineAnnealingLR) or 'constant' for lr_a",
    "batch_size": "samples per iteration (Q-Diffusion 32)",
    "round_weight": "weight of the AdaRound rounding regulariser (Q-Diffusion 0.01)",
    "beta_start": "start of the regulariser's annealed beta (BRECQ b_range 20)",
    "beta_end": "end of beta (BRECQ b_range 2)",
    "warmup": "fraction of iterations without regulariser (BRECQ/Q-Diffusion 0.2)",
    "weight_input": "block inputs of the sequential weight (AdaRound) phase: 'weights_only' "
                    "(the quantized model with every activation quantizer off: BRECQ's and "
                    "Q-Diffusion's weight pass, set_quant_state(True, False) with asym=True), "
                    "'quantized' (weights and upstream activations quantized), 'fp' (the FP "
                    "model). AdaRound cannot undo upstream activation noise: fitted to it, it "
                    "lost to RTN at W8A8 (shared/findings/reconstruction-vs-rtn.md)",
    "act_input": "block inputs of the sequential activation (step-size) phase: 'fp' (the FP "
                 "model: Q-Diffusion's and BRECQ's activation pass, asym=False), "
                 "'weights_only', 'quantized'",
    "joint_input": "block inputs of the joint phase: 'quantized' (weights and activations "
                   "quantized, as QDrop/EDA-DM, mixed with the FP stream by qdrop), "
                   "'weights_only', 'fp'. Targets are always the FP model's block outputs on "
                   "FP inputs",
    "act_reinit": "re-initialise the unit's activation ranges (the recipe's act_init method) "
                  "in sequential mode once its weights are final, before its activation phase "
                  "(also when no step sizes are learned, iters_a = 0): 'after_weights' "
                  "(default: BRECQ's main_imagenet.py and Q-Diffusion's "
                  "sample_diffusion_ddim.py initialise activation ranges after the weight "
                  "pass, so the ranges see the final quantized weights) or 'none' (keep the "
                  "whole-model initialisation made before reconstruction). Ours: the ranges "
                  "are measured on the activation phase's own inputs (act_input), where the "
                  "references run one forward of the whole quantized model",
    "act_reinit_samples": "calibration samples the re-initialisation sees, drawn at random "
                          "from the training part (default 64: BRECQ cali_data[:64], "
                          "Q-Diffusion 64 random samples; 0 = all of them); with per-step "
                          "activation parameters, this many of every sampler step",
    "act_loss_p": "exponent p of the activation phase's per-sample loss |out - target|^p "
                  "(reduced as loss_reduction; default 2.4: BRECQ --p and Q-Diffusion "
                  "--cali_p, 'L_p norm minimization for LSQ'; the weight and joint phases "
                  "use p = 2)",
    "holdout": "fraction of the calibration samples, stratified by sampler step, kept out of "
               "the optimisation: the block's held-out MSE before/after every phase is "
               "reported, and keep_better decides on it (default 0.05)",
    "keep_better": "after the activation phase, keep the learned step sizes only if the "
                   "block's held-out MSE did not rise; else restore the initial ones "
                   "(default true)",
    "qdrop": "QDrop: each element of a block input is taken from the FP stream instead of the "
             "quantized one with this probability (QDrop/EDA-DM 0.5; 0 = off)",
    "loss": "'block': block-output loss; 'fbr': EDA-DM's block loss + fbr_beta * sum of the "
            "inner layers' output losses",
    "fbr_beta": "weight of the inner-layer losses of 'fbr' (EDA-DM CIFAR-10 --add_loss 0.8)",
    "loss_reduction": "per-sample loss: 'channel_sum' (squared error summed over channels, "
                      "averaged over positions: BRECQ/Q-Diffusion lp_loss p=2, the scale the "
                      "regulariser weight is tuned for) or 'mean' (plain MSE)",
    "learn_act": "learn activation step sizes when activations are quantized (default true)",
    "step_floor": "after every Adam step, activation step sizes are projected to >= step_floor x "
                  "their value at the start of the phase (default 0.1): Adam's fixed-size steps "
                  "(lr 4e-4) otherwise push small steps such as the softmax's (~1e-3) through "
                  "zero",
    "lsq_grad_scale": "LSQ's gradient scale 1/sqrt(numel*qmax) on step sizes (default false)",
    "cuda_graph": "replay each phase's whole step (gather, forward, loss, backward, Adam) as "
                  "one CUDA graph: 'auto' (on CUDA, when the weighting is uniform and the "
                  "caches are on the device), true, false",
    "compile": "torch.compile the block forward+loss: 'auto' (on CUDA), true, false "
               "(default false: compiling every block costs more than it saves at 20k "
               "iterations; see benchmarks/bench_reconstruction.py)",
    "compile_mode": "torch.compile mode (default 'default'; 'max-autotune-no-cudagraphs', ...)",
    "tf32": "TF32 matmuls/convolutions inside the optimisation loop on CUDA (targets and caches "
            "stay full fp32; default true)",
    "cache_on_device": "keep block caches on the accelerator: 'auto' (while under half the free "
                       "device memory), a fraction in (0, 1] of the free memory, true, false; "
                       "beyond it pinned host memory, beyond half the host's memory "
                       "memory-mapped files",
    "forward_batch_size": "batch size of cache building and block forwards (default 64)",
    "checkpoint": "save state after every block and resume from it (default true)",
    "eval_samples": "held-out samples (at most) used to report block-output MSE before/after; "
                    "with holdout 0, a step-stratified subset of the calibration set "
                    "(default 256)",
    "log_every": "iterations between recorded loss values (no host sync in the loop; "
                 "default 500)",
}


@dataclass(frozen=True)
class ReconConfig:
    granularity: str = "block"
    mode: str = "sequential"
    iters_w: int = 20000
    iters_a: int = 5000
    lr_w: float = 1e-3
    lr_a: float = 4e-4
    lr_w_schedule: str = "constant"
    lr_a_schedule: str = "cosine"
    batch_size: int = 32
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    weight_input: str = "weights_only"
    act_input: str = "fp"
    joint_input: str = "quantized"
    act_reinit: str = "after_weights"
    act_reinit_samples: int = 64
    act_loss_p: float = 2.4
    holdout: float = 0.05
    keep_better: bool = True
    qdrop: float = 0.0
    loss: str = "block"
    fbr_beta: float = 0.8
    loss_reduction: str = "channel_sum"
    learn_act: bool = True
    step_floor: float = 0.1
    lsq_grad_scale: bool = False
    cuda_graph: Any = "auto"
    compile: Any = False
    compile_mode: str = "default"
    tf32: bool = True
    cache_on_device: Any = "auto"
    forward_batch_size: int = 64
    checkpoint: bool = True
    eval_samples: int = 256
    log_every: int = 500

    @classmethod
    def from_options(cls, plugin: str, defaults: dict, options: dict,
                     fixed: tuple[str, ...] = ()) -> "ReconConfig":
        if "input_source" in options:
            raise PtqbenchError(
                f"reconstructor {plugin!r}: option input_source was split by phase: use "
                f"weight_input (default 'weights_only'), act_input (default 'fp') or "
                f"joint_input (default 'quantized')")
        names = {f.name for f in dataclasses.fields(cls)} - set(fixed)
        unknown = sorted(set(options) - names)
        if unknown:
            raise PtqbenchError(f"reconstructor {plugin!r}: unknown option(s) "
                                f"{', '.join(unknown)}; known: {', '.join(sorted(names))}")
        values = {**defaults, **options}
        for k, v in values.items():
            _check(plugin, k, v)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: the input streams a phase can read (see weight_input / act_input / joint_input)
STREAMS = ("fp", "weights_only", "quantized")


def _err(plugin, name, what, v):
    raise PtqbenchError(f"reconstructor {plugin!r}: option {name} must be {what}, got {v!r}")


def _check(plugin: str, k: str, v: Any) -> None:
    choices = {"granularity": ("block", "layer"), "mode": ("sequential", "joint"),
               "lr_w_schedule": ("constant", "cosine"), "lr_a_schedule": ("constant", "cosine"),
               "weight_input": STREAMS, "act_input": STREAMS, "joint_input": STREAMS,
               "act_reinit": ("none", "after_weights"), "loss": ("block", "fbr"),
               "loss_reduction": ("channel_sum", "mean"),
               "compile": ("auto", True, False), "cache_on_device": ("auto", True, False),
               "cuda_graph": ("auto", True, False)}
    if k == "cache_on_device" and isinstance(v, float) and 0 < v <= 1:
        return  # a budget: this fraction of the free device memory
    if k in choices:
        if v not in choices[k] or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                   and k in ("compile", "cache_on_device", "cuda_graph")):
            _err(plugin, k, "one of " + ", ".join(map(repr, choices[k])), v)
        return
    if k in ("learn_act", "lsq_grad_scale", "tf32", "checkpoint", "keep_better"):
        if not isinstance(v, bool):
            _err(plugin, k, "true or false", v)
        return
    if k in ("iters_w", "iters_a", "eval_samples", "act_reinit_samples"):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            _err(plugin, k, "an integer >= 0", v)
        return
    if k in ("batch_size", "forward_batch_size", "log_every"):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            _err(plugin, k, "an integer >= 1", v)
        return
    if k == "compile_mode":
        if not isinstance(v, str):
            _err(plugin, k, "a string", v)
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _err(plugin, k, "a number", v)
    if k in ("lr_w", "lr_a") and not v > 0:
        _err(plugin, k, "> 0", v)
    if k in ("round_weight", "fbr_beta") and v < 0:
        _err(plugin, k, ">= 0", v)
    if k in ("beta_start", "beta_end", "act_loss_p") and not v > 0:
        _err(plugin, k, "> 0", v)
    if k in ("warmup", "qdrop", "step_floor", "holdout") and not 0 <= v < 1:
        _err(plugin, k, "in [0, 1)", v)


#: Q-Diffusion's (BRECQ engine) calibration defaults, shared by the brecq and adaround plugins
QDIFFUSION_DEFAULTS = {"granularity": "block", "mode": "sequential", "iters_w": 20000,
                       "iters_a": 5000, "lr_w": 1e-3, "lr_a": 4e-4, "batch_size": 32,
                       "round_weight": 0.01, "beta_start": 20.0, "beta_end": 2.0, "warmup": 0.2,
                       "weight_input": "weights_only", "act_input": "fp"}
