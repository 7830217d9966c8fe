"""Lets a benchmark script run from a bare checkout as well as from an installed ptqbench:
the repository goes on sys.path, and plugins/ is importable as ``ptqbench_plugins`` (the name
an install gives it). Import it first: ``import checkout  # noqa: F401``."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
try:
    import ptqbench_plugins  # noqa: F401
except ImportError:
    _spec = importlib.util.spec_from_file_location(
        "ptqbench_plugins", REPO / "plugins" / "__init__.py",
        submodule_search_locations=[str(REPO / "plugins")])
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["ptqbench_plugins"] = _mod
    _spec.loader.exec_module(_mod)
