"""Loading a suite and building the runner of its cells: what the suite runner (this process)
and worker processes (:mod:`.worker`) both need, kept here so that neither imports the other."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..registry import Registry, default_registry
from ..store import Store
from ..suite.expand import Cell, expand
from ..suite.loader import LoadedSuite, load_suite
from ..suite.preflight import preflight
from .cell import CellRunner


def prepare(suite_path=None, registry: Optional[Registry] = None,
            output: Optional[str | Path] = None, writable: Optional[dict] = None
            ) -> tuple[LoadedSuite, Registry, list[Cell]]:
    """Load and check a suite; every user error surfaces here, before any work starts, all
    problems of a suite together (see :mod:`ptqbench.suite.preflight`). ``output`` overrides
    the suite's results folder (checked for writing); ``writable``: more folders to check."""
    loaded = load_suite(suite_path, defer=True)
    if registry is None:
        registry = default_registry()
    preflight(loaded, registry, output=output, writable=writable)
    return loaded, registry, expand(loaded)


def make_runner(loaded: LoadedSuite, registry: Registry, output: Optional[str | Path] = None,
                reporter=None) -> CellRunner:
    out = Path(output or loaded.suite.suite.output)
    cache = Path(loaded.suite.run.cache_dir) if loaded.suite.run.cache_dir else out / "cache"
    return CellRunner(loaded, registry, Store(out), cache, reporter)
