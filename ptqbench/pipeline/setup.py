"""Loading a suite and building the runner of its cells: what the suite runner (this process)
and worker processes (:mod:`.worker`) both need, kept here so that neither imports the other."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..registry import Registry, default_registry
from ..store import Store
from ..suite.expand import Cell, expand
from ..suite.loader import LoadedSuite, check_plugins, load_suite
from .cell import CellRunner


def prepare(suite_path=None, registry: Optional[Registry] = None
            ) -> tuple[LoadedSuite, Registry, list[Cell]]:
    """Load and check a suite; every user error surfaces here, before any work starts."""
    loaded = load_suite(suite_path)
    if registry is None:
        registry = default_registry()
    for f in loaded.plugin_files:
        registry.load_file(f)
    check_plugins(loaded, registry)
    return loaded, registry, expand(loaded)


def make_runner(loaded: LoadedSuite, registry: Registry, output: Optional[str | Path] = None,
                reporter=None) -> CellRunner:
    out = Path(output or loaded.suite.suite.output)
    cache = Path(loaded.suite.run.cache_dir) if loaded.suite.run.cache_dir else out / "cache"
    return CellRunner(loaded, registry, Store(out), cache, reporter)
