"""ptqbench: one pipeline to benchmark post-training quantization of diffusion models."""
from .hookspecs import hookimpl
from .interfaces import (Block, BlockContext, CalibSet, Executor, Metric, MetricContext,
                         ModelAdapter, Plugin, Reconstructor, RunContext, Selector, Trajectories,
                         Weighting)

__version__ = "0.1.0"

__all__ = [
    "hookimpl", "Plugin", "ModelAdapter", "Block", "CalibSet", "Trajectories", "Selector",
    "Weighting", "BlockContext", "Reconstructor", "Metric", "MetricContext", "Executor",
    "RunContext", "__version__",
]
