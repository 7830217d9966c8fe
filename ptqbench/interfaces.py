"""The contracts between the pipeline and its plugins.

Every plugin family of DESIGN.md has one base class here. A plugin is a subclass with a
``name`` (what suites write) and a one-line ``description`` (what ``ptqbench plugins`` shows);
options from the suite arrive as keyword arguments of ``__init__``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn


class Plugin:
    """Base of every plugin: a name, a description and the suite's options."""

    name: str = ""
    description: str = ""

    def __init__(self, **options: Any):
        self.options = options

    def check_inputs(self, base_dir: Path) -> None:
        """Check what this plugin's options name outside the suite (a metric's reference
        dataset, a weights file) before any work starts; raise PtqbenchError with the reason.
        Runs on every ``run``, ``run --dry-run`` and ``plugins --suite``, so it must be cheap.
        ``base_dir`` is the suite file's folder, where relative paths resolve."""


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
@dataclass
class Block:
    """One reconstruction unit, in forward order (a ResNet block, an attention block, a layer)."""

    name: str
    module: nn.Module
    kind: str  # "resnet", "attention", "layer", ...


class ModelAdapter(Plugin, ABC):
    """Wraps an FP denoiser: loading, the call convention, decoding and its quantization sites."""

    #: (channels, height, width) of one sample in the denoiser's input space
    sample_shape: tuple[int, int, int]
    #: the diffusers scheduler config (betas etc.); samplers build their schedule from it
    scheduler_config: dict

    @abstractmethod
    def load(self, device: torch.device) -> nn.Module:
        """Return a fresh FP copy of the denoiser on ``device`` in eval mode."""

    @abstractmethod
    def denoise(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predict noise for ``x`` at integer timesteps ``t`` (shape (N,))."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[Block]:
        """Reconstruction units of ``model`` in forward order."""

    @abstractmethod
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final latents/pixels -> uint8 images (N, C, H, W)."""

    def feature_site(self, model: nn.Module) -> nn.Module:
        """Module whose output summarises a step (EDA-DM uses the mid-block)."""
        raise NotImplementedError(f"{self.name} has no feature site")

    def identity(self) -> dict:
        """What identifies the weights (path/hub id, hash); goes into cache keys and records."""
        return {}

    # ---- conditioning and guidance (unconditional families keep these defaults) ---------
    #: classifier-free guidance scale; 1 = the conditional prediction alone (no second pass)
    guidance_scale: float = 1.0

    def conditioning(self, indices: torch.Tensor, seed: int) -> Optional[torch.Tensor]:
        """The conditioning of sample ``indices`` (class labels, prompt token ids), a pure
        function of (seed, index) like the starting noise; None for unconditional models."""
        return None

    def null_conditioning(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional counterpart of ``cond`` (null class, empty prompt)."""
        raise NotImplementedError(f"{self.name} has no null conditioning")

    def denoiser_passes(self, cond: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """The conditionings the denoiser is called with at one sampler step: ``[cond]``, or
        ``[cond, null]`` under guidance. Every pass is a real denoiser input, so calibration
        data holds them all (``ptqbench.calib.trajectories``)."""
        if cond is None or self.guidance_scale == 1.0:
            return [cond]
        return [cond, self.null_conditioning(cond)]

    def combine_guidance(self, cond_out: torch.Tensor, uncond_out: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance on the two passes' outputs."""
        return uncond_out + self.guidance_scale * (cond_out - uncond_out)

    def guided_denoise(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                       cond: Optional[torch.Tensor]) -> torch.Tensor:
        """One sampler step's model output: the passes of :meth:`denoiser_passes` run as one
        batch, combined by :meth:`combine_guidance`."""
        passes = self.denoiser_passes(cond)
        if len(passes) == 1:
            return self.denoise(model, x, t, passes[0])
        n = len(passes)
        out = self.denoise(model, torch.cat([x] * n), torch.cat([t] * n), torch.cat(passes))
        return self.combine_guidance(*out.chunk(n))

    # ---- the sampling loop --------------------------------------------------------------
    def make_sampler(self, spec) -> Any:
        """The sampler of ``spec`` on this model's schedule: an object with ``timesteps`` and
        ``run(denoise, shape, indices, seed, device, on_step)`` (see ptqbench.sampling)."""
        from .samplers import make_sampler

        return make_sampler(spec, self.scheduler_config)

    def sample(self, model: nn.Module, spec, indices, seed: int, device: torch.device,
               on_step: Optional[Callable] = None, sampler: Any = None) -> torch.Tensor:
        """Run the sampling loop for sample ``indices``; returns the final latents/pixels
        (decode them with :meth:`decode`). ``on_step(k, x_t, t)`` sees each step's input."""
        from .quant.context import sampler_step

        def denoise(x, t, k, cond):
            # per-timestep activation parameters (TFMQ-style) select their set by step index
            with sampler_step(k):
                return self.guided_denoise(model, x, t, cond)

        return self.run_sampler(denoise, spec, indices, seed, device, on_step, sampler)

    def run_sampler(self, denoise: Callable, spec, indices, seed: int, device: torch.device,
                    on_step: Optional[Callable] = None, sampler: Any = None) -> torch.Tensor:
        """The sampling loop of :meth:`sample` around another model call: ``denoise(x, t, k,
        cond)`` returns one sampler step's guided output (e.g. the fast sampling path's
        denoiser); the conditioning of sample ``indices`` is drawn here, as in :meth:`sample`."""
        sampler = sampler if sampler is not None else self.make_sampler(spec)
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        cond = self.conditioning(idx, seed)
        cond = None if cond is None else cond.to(device)
        return sampler.run(lambda x, t, k: denoise(x, t, k, cond), tuple(self.sample_shape),
                           list(indices), seed, device, on_step=on_step)


# --------------------------------------------------------------------------------------------
# calibration data
# --------------------------------------------------------------------------------------------
@dataclass
class CalibSet:
    """Denoiser inputs to calibrate on: x_t with the timestep it belongs to."""

    x: torch.Tensor  # (N, C, H, W) denoiser inputs
    t: torch.Tensor  # (N,) integer diffusion timesteps of each x
    step: torch.Tensor  # (N,) sampler step index (0 = first, noisiest step)
    cond: Optional[torch.Tensor] = None
    #: selector-specific information, e.g. per-step scores ("tdac_score": tensor (num_steps,))
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, idx: torch.Tensor) -> "CalibSet":
        return CalibSet(self.x[idx], self.t[idx], self.step[idx],
                        None if self.cond is None else self.cond[idx], dict(self.meta))

    def to(self, device) -> "CalibSet":
        return CalibSet(self.x.to(device), self.t.to(device), self.step.to(device),
                        None if self.cond is None else self.cond.to(device), self.meta)


class Selector(Plugin, ABC):
    """Chooses which recorded (x_t, t) pairs become the calibration and validation sets."""

    @abstractmethod
    def select(self, trajectories: "Trajectories", generator: torch.Generator,
               context: "RunContext") -> tuple[CalibSet, Optional[CalibSet]]:
        """Return (calibration set, validation set or None)."""


@dataclass
class Trajectories:
    """FP sampling trajectories: x_t at every sampler step for a fixed set of samples."""

    x: torch.Tensor  # (num_steps, num_samples, C, H, W), step 0 is x_T
    t: torch.Tensor  # (num_steps,) the timestep each row was fed to the denoiser with
    cond: Optional[torch.Tensor] = None  # (num_samples, ...) or None
    #: optional per-step features at the adapter's feature site (num_steps, num_samples, ...)
    features: Optional[torch.Tensor] = None

    @property
    def num_steps(self) -> int:
        return self.x.shape[0]

    @property
    def num_samples(self) -> int:
        return self.x.shape[1]

    def gather(self, steps: torch.Tensor, samples: torch.Tensor) -> CalibSet:
        """Calibration set of (step[i], sample[i]) pairs: x_t always with its own t."""
        steps = steps.long()
        samples = samples.long()
        cond = None if self.cond is None else self.cond[samples]
        return CalibSet(self.x[steps, samples], self.t[steps].clone(), steps.clone(), cond)


# --------------------------------------------------------------------------------------------
# sample weighting
# --------------------------------------------------------------------------------------------
@dataclass
class BlockContext:
    """What a weighting strategy can see of the block being reconstructed.

    ``forward(params, x_batch_inputs)`` runs the quantized block functionally with the given
    trainable quantization parameters (a name -> tensor dict usable with torch.func), so a
    strategy can differentiate through an unrolled inner step.
    """

    block: Block
    params: dict[str, torch.Tensor]  # trainable quantization parameters of this block
    forward: Callable[[dict[str, torch.Tensor], tuple], torch.Tensor]
    calib_inputs: Callable[[torch.Tensor], tuple]  # indices -> block inputs (tuple of tensors)
    calib_targets: Callable[[torch.Tensor], torch.Tensor]  # indices -> FP block outputs
    calib_t: torch.Tensor  # (N,) timestep of every calibration sample
    calib_step: torch.Tensor  # (N,) sampler step index of every calibration sample
    val_inputs: Optional[Callable[[torch.Tensor], tuple]] = None
    val_targets: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    val_t: Optional[torch.Tensor] = None
    val_step: Optional[torch.Tensor] = None
    inner_lr: float = 1e-3  # learning rate of the reconstruction optimiser
    iterations: int = 0
    batch_size: int = 32


class Weighting(Plugin, ABC):
    """Per-sample weights of the reconstruction loss.

    ``weights(idx)`` returns weights for calibration indices, normalised so their mean over the
    whole calibration set is 1, or ``None`` meaning uniform (the loop then takes a plain mean, at
    no extra cost). Strategies that learn override ``begin_block`` / ``observe``.
    """

    #: True when ``weights(idx)`` only gathers from device tensors that the strategy updates in
    #: place and ``observe`` does nothing per iteration: the reconstruction loop may then
    #: replay its whole step, weights included, as one CUDA graph.
    graph_safe: bool = False

    def prepare(self, calib: CalibSet, val: Optional[CalibSet], context: "RunContext") -> None:
        """Called once, before any block, with the full calibration and validation sets."""

    def begin_block(self, ctx: BlockContext) -> None:
        """A new block starts being reconstructed."""

    @abstractmethod
    def weights(self, idx: torch.Tensor) -> Optional[torch.Tensor]:
        """Weights of the calibration samples ``idx`` (mean 1 over the set), or None = uniform."""

    def observe(self, iteration: int, idx: torch.Tensor, per_sample_loss: torch.Tensor,
                ctx: BlockContext) -> None:
        """Called every reconstruction iteration with the detached per-sample losses.

        Must not synchronise the device (no ``.item()``)."""

    def end_block(self, ctx: BlockContext) -> None:
        """The block is finished."""

    def state(self) -> dict:
        """JSON-able summary for the record and diagnostics (e.g. learned weights by step)."""
        return {}


# --------------------------------------------------------------------------------------------
# reconstruction
# --------------------------------------------------------------------------------------------
class Reconstructor(Plugin, ABC):
    """Optimises the quantized model's parameters on the calibration set, block by block."""

    @abstractmethod
    def reconstruct(self, fp_model: nn.Module, qmodel: nn.Module, adapter: ModelAdapter,
                    calib: CalibSet, val: Optional[CalibSet], weighting: Weighting,
                    context: "RunContext") -> dict:
        """Reconstruct ``qmodel`` in place; return cost/diagnostic info for the record."""


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
@dataclass
class MetricContext:
    """Inputs a metric may need besides the samples it scores."""

    fp_samples: Optional[torch.Tensor]  # uint8 (N, C, H, W) FP samples with the same seeds
    is_reference_cell: bool  # True for the FP cell itself
    cache_dir: Path  # shared across cells and runs: reference statistics live here
    device: torch.device
    seed: int
    base_dir: Path = Path(".")  # the suite file's folder: relative paths in options resolve here
    #: per-cell memo shared by the metrics of one cell (e.g. Inception features computed once)
    shared: dict = field(default_factory=dict)


class Metric(Plugin, ABC):
    """Scores uint8 samples (N, C, H, W). Returns {metric_name: MetricValue-dict}.

    A value dict has ``value`` (float or None), optionally ``ci`` ([low, high], 95%), ``n``,
    ``higher_is_better`` and, when ``value`` is None, ``unavailable`` with the reason.
    """

    #: whether the metric needs the FP samples (paired metrics, FID-to-FP)
    needs_fp_samples: bool = False

    @abstractmethod
    def compute(self, samples: torch.Tensor, context: MetricContext) -> dict[str, dict]:
        ...

    def identity(self) -> dict:
        """Implementation/extractor versions to record next to the numbers."""
        return {}


# --------------------------------------------------------------------------------------------
# executors
# --------------------------------------------------------------------------------------------
class Executor(Plugin, ABC):
    """Decides where cells run: devices, and how sampling is sharded over them."""

    @abstractmethod
    def devices(self) -> list[torch.device]:
        ...

    @abstractmethod
    def run_cells(self, cells: list, run_one: Callable[[Any, torch.device], None]) -> None:
        """Run ``run_one(cell, device)`` for every cell (in this process), or run the cells in
        other processes through ``run_one.job`` and report each record back with
        ``run_one.finished`` (see :class:`ptqbench.pipeline.runner.CellDispatch`)."""


# --------------------------------------------------------------------------------------------
# what every stage receives
# --------------------------------------------------------------------------------------------
@dataclass
class RunContext:
    device: torch.device
    seed: int
    work_dir: Path  # per-cell scratch: checkpoints, caches; survives a kill
    cache_dir: Path  # shared across cells: trajectories, reference statistics
    options: dict = field(default_factory=dict)
    progress: Any = None  # ptqbench.progress.Progress-like or None
    costs: dict = field(default_factory=dict)  # stage -> seconds / bytes, filled by stages

    def log(self, msg: str) -> None:
        if self.progress is not None and hasattr(self.progress, "log"):
            self.progress.log(msg)
