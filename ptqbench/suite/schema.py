"""The suite schema: what a TOML suite may say, with defaults. See suites/tiny.toml for an example."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import Problems, PtqbenchError
from ..quant.bits import parse_bits
from ..sampling import KINDS, SPACINGS


#: sampler steps above this are a typo (schedulers are trained with 1000 timesteps)
MAX_STEPS = 10_000


@dataclass
class SuiteInfo:
    name: str = "suite"
    description: str = ""
    #: where records, samples and checkpoints go (relative to the current directory)
    output: str = "results/suite"
    #: local .py files registered as plugins (relative to the suite file)
    plugins: list[str] = field(default_factory=list)
    #: other suites this one extends; their tables are merged under this one's
    include: list[str] = field(default_factory=list)


@dataclass
class EvaluationOverride:
    """[models.X.evaluation]: what differs from [evaluation] for this model's cells."""

    num_samples: Optional[int] = None
    batch_size: Optional[int] = None
    metrics: Optional[list[str]] = None
    #: merged per metric over [evaluation.metric_options] (e.g. this setting's reference)
    metric_options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class MethodOverride:
    """[models.X.methods.M]: option overrides of method M for this model's cells (e.g. the
    calibration size its paper used for this setting)."""

    selector_options: dict[str, Any] = field(default_factory=dict)
    weighting_options: dict[str, Any] = field(default_factory=dict)
    reconstructor_options: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    calibration_trajectories: Optional[int] = None
    calibration_batch_size: Optional[int] = None


@dataclass
class ModelEntry:
    path: str
    plugin: str = "diffusers-unet"
    options: dict[str, Any] = field(default_factory=dict)
    #: the samplers of grid.samplers this model runs with (empty: all of them), so that one
    #: suite holds settings with different samplers (suites/paper.toml)
    samplers: list[str] = field(default_factory=list)
    evaluation: EvaluationOverride = field(default_factory=EvaluationOverride)
    methods: dict[str, MethodOverride] = field(default_factory=dict)
    #: where to get the model when ``path`` is not present locally (URL, conversion command);
    #: a missing local path is then reported by --dry-run instead of rejected
    download: str = ""


@dataclass
class SamplerEntry:
    kind: str = "ddim"
    steps: int = 100
    eta: float = 0.0
    spacing: str = "uniform"

    def check(self, path, file):
        problems = Problems()
        if self.kind not in KINDS:
            problems.add(file, f"{path}.kind",
                         f"unknown sampler {self.kind!r}; known: {', '.join(KINDS)}")
        if self.spacing not in SPACINGS:
            problems.add(file, f"{path}.spacing",
                         f"unknown spacing {self.spacing!r}; known: {', '.join(SPACINGS)}")
        if not 1 <= self.steps <= MAX_STEPS:
            problems.add(file, f"{path}.steps", f"must be in [1, {MAX_STEPS}], got {self.steps}")
        if not 0.0 <= self.eta <= 1.0:  # also rejects nan
            problems.add(file, f"{path}.eta", f"must be in [0, 1], got {self.eta}")
        problems.raise_any()


@dataclass
class MethodEntry:
    """A method: a preset, with any of its parts overridden."""

    preset: Optional[str] = None
    selector: Optional[str] = None
    selector_options: dict[str, Any] = field(default_factory=dict)
    weighting: Optional[str] = None
    weighting_options: dict[str, Any] = field(default_factory=dict)
    reconstructor: Optional[str] = None
    reconstructor_options: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    #: FP trajectories recorded for calibration (None: what the selector needs)
    calibration_trajectories: Optional[int] = None
    calibration_batch_size: Optional[int] = None

    def check(self, path, file):
        problems = Problems()
        for name in ("calibration_trajectories", "calibration_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.add(file, f"{path}.{name}", f"must be >= 1, got {value}")
        problems.raise_any()


@dataclass
class Grid:
    models: list[str] = field(default_factory=list)
    samplers: list[str] = field(default_factory=list)
    bits: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])

    def check(self, path, file):
        # empty axes are checked by Suite.check: a suite without any [grid] has none either
        problems = Problems()
        for i, label in enumerate(self.bits):
            try:
                parse_bits(label)
            except PtqbenchError as exc:
                problems.add(file, f"{path}.bits[{i}]", str(exc))
        for i, seed in enumerate(self.seeds):
            if not 0 <= seed < 2**63:
                problems.add(file, f"{path}.seeds[{i}]", f"must be in [0, 2**63), got {seed}")
        problems.raise_any()


@dataclass
class Evaluation:
    #: generated samples per cell (DESIGN default for dataset FID is 50k; small suites say less)
    num_samples: int = 50_000
    batch_size: int = 256
    metrics: list[str] = field(default_factory=lambda: ["paired"])
    #: per-metric plugin options, e.g. [evaluation.metric_options.fid] reference = "..."
    metric_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: how sampling runs the denoiser: "auto" (fast path: folded weights, compiled + CUDA graphs
    #: on CUDA), "reference" (the calibration modules, eager), "fast", "int8" (real int8 kernels
    #: for quantized layers); numerics in execution_options (ptqbench.quant.fast.OPTION_DOCS)
    execution: str = "auto"
    execution_options: dict[str, Any] = field(default_factory=dict)

    def check(self, path, file):
        from ..quant.fast import Execution

        problems = Problems()
        try:
            Execution.from_options(self.execution, self.execution_options)
        except PtqbenchError as exc:
            problems.add(file, f"{path}.execution", str(exc))
        if self.num_samples < 1:
            problems.add(file, f"{path}.num_samples", "must be >= 1")
        if self.batch_size < 1:
            problems.add(file, f"{path}.batch_size", "must be >= 1")
        for name in sorted(set(self.metric_options) - set(self.metrics)):
            problems.add(file, f"{path}.metric_options.{name}",
                         f"options for a metric that is not in {path}.metrics")
        problems.raise_any()


@dataclass
class RunSettings:
    executor: str = "local"
    executor_options: dict[str, Any] = field(default_factory=dict)
    #: shared cache of trajectories and reference statistics (default: <output>/cache)
    cache_dir: Optional[str] = None
    #: bit-identical records on rerun (ptqbench.numerics): seeded generators, deterministic
    #: algorithms only, fixed cuBLAS workspace; reference suites turn it on
    deterministic: bool = False


@dataclass
class Suite:
    suite: SuiteInfo = field(default_factory=SuiteInfo)
    models: dict[str, ModelEntry] = field(default_factory=dict)
    samplers: dict[str, SamplerEntry] = field(default_factory=dict)
    methods: dict[str, MethodEntry] = field(default_factory=dict)
    grid: Grid = field(default_factory=Grid)
    evaluation: Evaluation = field(default_factory=Evaluation)
    run: RunSettings = field(default_factory=RunSettings)
    #: where to get files the suite names (references, prompt files) when they are absent:
    #: path as written in the suite -> URL or instructions (--dry-run reports them)
    downloads: dict[str, str] = field(default_factory=dict)

    def check(self, path, file):
        problems = Problems()
        for axis in ("models", "samplers", "methods", "seeds"):
            if not getattr(self.grid, axis):
                problems.add(file, f"grid.{axis}", "empty: the grid has no cells")
        for axis, table in (("models", self.models), ("samplers", self.samplers)):
            for i, name in enumerate(getattr(self.grid, axis)):
                if name not in table:
                    known = ", ".join(sorted(table)) or "(none declared)"
                    problems.add(file, f"grid.{axis}[{i}]",
                                 f"{name!r} is not declared under [{axis}]; declared: {known}")
        for name, entry in self.models.items():
            for i, sampler in enumerate(entry.samplers):
                if sampler not in self.samplers:
                    problems.add(file, f"models.{name}.samplers[{i}]",
                                 f"{sampler!r} is not declared under [samplers]")
        problems.raise_any()
