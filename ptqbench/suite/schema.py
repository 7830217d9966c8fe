"""The suite schema: what a TOML suite may say, with defaults. See suites/tiny.toml for an example."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import Problems, PtqbenchError
from ..quant.bits import parse_bits
from ..sampling import SPACINGS


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
class ModelEntry:
    path: str
    plugin: str = "diffusers-unet"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplerEntry:
    kind: str = "ddim"
    steps: int = 100
    eta: float = 0.0
    spacing: str = "uniform"

    def check(self, path, file):
        problems = Problems()
        if self.kind != "ddim":
            problems.add(file, f"{path}.kind", f"unknown sampler {self.kind!r}; known: ddim")
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

    def check(self, path, file):
        problems = Problems()
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


@dataclass
class Suite:
    suite: SuiteInfo = field(default_factory=SuiteInfo)
    models: dict[str, ModelEntry] = field(default_factory=dict)
    samplers: dict[str, SamplerEntry] = field(default_factory=dict)
    methods: dict[str, MethodEntry] = field(default_factory=dict)
    grid: Grid = field(default_factory=Grid)
    evaluation: Evaluation = field(default_factory=Evaluation)
    run: RunSettings = field(default_factory=RunSettings)

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
        problems.raise_any()
