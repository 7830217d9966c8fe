"""Methods are compositions: a named preset of plugins plus a quantization recipe.

A suite names a preset directly (``methods = ["rtn", "gac"]``) or declares its own method with
``[methods.NAME] preset = "..."`` and overrides any part. Adding a method means adding a preset
here or a plugin, never an ``if`` in the pipeline.

Sources of the defaults:
- Q-Diffusion (Li et al. 2023, github.com/Xiuyu-Li/q-diffusion): 20 uniformly spaced sampler steps
  x 256 samples = 5120 calibration inputs, BRECQ + AdaRound, shortcut split, quantized attention,
  and the range initialisation of its README's CIFAR-10 calibration command and
  scripts/sample_diffusion_ddim.py: weights per-channel min-max (``wq_params scale_method
  'max'``), activations min-max (``aq_params scale_method 'max'``) on 64 random calibration
  samples after the weight pass (``act_reinit``), step sizes trained on an L_2.4 loss
  (``--cali_p``).
- What every preset shares, because it is the benchmark's setting and not a method: the
  quantized format and coverage. Activations asymmetric (Q-Diffusion's CIFAR-10 and LSUN-Bedroom
  commands use signed symmetric ones, ``--a_sym``: ``recipe = { act_symmetric = true }``), the
  first and last layer at 8 bits (BRECQ's convention; Q-Diffusion's code quantizes them at the
  model's bit-width: ``first_last_bits = "same"``). A method compared under another format or
  coverage than its rivals would be credited with the format's gain.
- BRECQ (Li et al. 2021, github.com/yhhhli/BRECQ main_imagenet.py): weights and activations from
  the L_2.4 range search (``scale_method 'mse'``), activations asymmetric and initialised on 64
  calibration samples after the weight pass, step sizes trained on an L_2.4 loss (``--p``).
- PTQ4DM (Shang et al. 2023): 1024 inputs, timesteps ~ N(0.4T, 0.4T), then BRECQ (ours: BRECQ's
  sequential recipe; PTQ4DM's released code runs QDrop's reconstruction framework).
- EDA-DM (Liu et al. 2024): TDAC selection of 1024 inputs (CIFAR-10 script: radius 3.0,
  lambda 1.2) + fine-grained block reconstruction (FBR, joint weights/activations, QDrop).
- GAC (ICLR 2026): uniform-steps calibration + a validation split + learned gradient-aligned
  per-sample weights during BRECQ reconstruction, on the qdiffusion recipe.
- rtn: ranges from the L_2.4 search on the calibration set, no reconstruction (the naive
  baseline); rtn-minmax: the same with per-channel min-max weight ranges. Which is stronger
  depends on the model at 4 bits (results/reference/rtn-ranges-tiny-cpu/: min-max 4.6x lower
  error on the tiny model at W4A8, the search lower on the CIFAR-10 stand-in's one-step error):
  reference suites run both, and a reconstruction gain is read against the better one.

Reconstruction data flow (ptqbench.quant.recon_options): the sequential presets (brecq,
qdiffusion, ptq4dm, gac) follow BRECQ's and Q-Diffusion's code - the weight (AdaRound) phase
reads block inputs from the quantized model with every activation quantizer off
(``weight_input = "weights_only"``; Q-Diffusion's sample_diffusion_ddim.py: asym=True,
act_quant=False), the activation phase reads them from the FP model (``act_input = "fp"``;
asym=False), targets are the FP model's block outputs, activation ranges are initialised again
after the unit's weights are final on 64 calibration samples (``act_reinit = "after_weights"``,
``act_reinit_samples = 64``), step sizes are trained on an L_2.4 loss (``act_loss_p``), and an
activation phase that raises the block's held-out error is undone (``keep_better``; ours).
eda-dm follows QDrop/EDA-DM: one joint phase on the fully quantized stream mixed with the FP
stream (``joint_input = "quantized"``, ``qdrop = 0.5``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

FP = "fp"

#: Q-Diffusion's range initialisation (README CIFAR-10 calibration command,
#: scripts/sample_diffusion_ddim.py: wq_params / aq_params scale_method 'max'): weights
#: per-channel min-max, activations min-max (on 64 samples after the weight pass: act_reinit)
QDIFFUSION_RANGES = {"weight_init": "minmax", "act_init": "minmax"}

#: Every preset sets all parts; ``None`` reconstructor means "no quantization at all" (fp).
PRESETS: dict[str, dict[str, Any]] = {
    "fp": {
        "description": "full-precision reference (no quantization)",
        "selector": None, "weighting": None, "reconstructor": None, "recipe": {},
    },
    "rtn": {
        "description": "round-to-nearest: MSE-searched ranges, no reconstruction",
        "selector": "uniform-steps", "selector_options": {"steps": 20, "per_step": 32},
        "weighting": "uniform", "reconstructor": "none",
        "recipe": {"weight_init": "mse", "act_init": "mse"},
    },
    "rtn-minmax": {
        "description": "round-to-nearest with per-channel min-max weight ranges (no clipping) "
                       "and MSE-searched activation ranges, no reconstruction",
        "selector": "uniform-steps", "selector_options": {"steps": 20, "per_step": 32},
        "weighting": "uniform", "reconstructor": "none",
        "recipe": {"weight_init": "minmax", "act_init": "mse"},
    },
    "brecq": {
        "description": "BRECQ: block-wise AdaRound + LSQ activations on uniform-steps calibration",
        "selector": "uniform-steps", "selector_options": {"steps": 20, "per_step": 256},
        "weighting": "uniform", "reconstructor": "brecq", "recipe": {},
    },
    "qdiffusion": {
        "description": "Q-Diffusion: uniform steps 20x256, BRECQ/AdaRound, shortcut split, "
                       "quantized attention matmuls, min-max ranges",
        "selector": "uniform-steps", "selector_options": {"steps": 20, "per_step": 256},
        "weighting": "uniform", "reconstructor": "brecq",
        "recipe": {"split_shortcut": True, "quantize_attention": True, **QDIFFUSION_RANGES},
    },
    "ptq4dm": {
        "description": "PTQ4DM: timesteps ~ N(0.4T, 0.4T) + BRECQ reconstruction",
        "selector": "normal-steps", "selector_options": {"num_samples": 1024},
        "weighting": "uniform", "reconstructor": "brecq", "recipe": {},
    },
    "eda-dm": {
        "description": "EDA-DM: TDAC calibration selection + fine-grained block reconstruction",
        "selector": "tdac", "selector_options": {"num_samples": 1024, "radius": 3.0, "lam": 1.2},
        "weighting": "uniform", "reconstructor": "fbr", "recipe": {"split_shortcut": True},
    },
    "gac": {
        "description": "Gradient-aligned calibration: learned per-sample weights (bilevel, "
                       "cosine gradient matching across timestep groups) during BRECQ",
        "selector": "uniform-steps",
        "selector_options": {"steps": 20, "per_step": 256, "validation_fraction": 0.05},
        # the qdiffusion recipe, so that gac and qdiffusion differ only in the weighting
        "weighting": "gradient-aligned", "reconstructor": "brecq",
        "recipe": {"split_shortcut": True, "quantize_attention": True, **QDIFFUSION_RANGES},
    },
}


@dataclass
class ResolvedMethod:
    name: str
    preset: str
    selector: Optional[str]
    weighting: Optional[str]
    reconstructor: Optional[str]
    selector_options: dict = field(default_factory=dict)
    weighting_options: dict = field(default_factory=dict)
    reconstructor_options: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    calibration_trajectories: Optional[int] = None
    calibration_batch_size: Optional[int] = None

    @property
    def is_fp(self) -> bool:
        return self.reconstructor is None

    def as_dict(self) -> dict:
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items()}


def resolve(name: str, entry=None) -> ResolvedMethod:
    """Preset ``entry.preset`` (or ``name``) with the suite entry's overrides applied."""
    preset_name = (entry.preset if entry is not None and entry.preset else name)
    base = copy.deepcopy(PRESETS[preset_name])
    m = ResolvedMethod(
        name=name, preset=preset_name, selector=base["selector"], weighting=base["weighting"],
        reconstructor=base["reconstructor"],
        selector_options=base.get("selector_options", {}),
        weighting_options=base.get("weighting_options", {}),
        reconstructor_options=base.get("reconstructor_options", {}),
        recipe=base.get("recipe", {}))
    if entry is None:
        return m
    for part in ("selector", "weighting", "reconstructor"):
        if getattr(entry, part) is not None:
            setattr(m, part, getattr(entry, part))
        getattr(m, f"{part}_options").update(copy.deepcopy(getattr(entry, f"{part}_options")))
    m.recipe.update(copy.deepcopy(entry.recipe))
    m.calibration_trajectories = entry.calibration_trajectories
    m.calibration_batch_size = entry.calibration_batch_size
    return m
