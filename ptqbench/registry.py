"""The plugin registry: loads entry points and local files, and records where each plugin came from."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import pluggy

from . import hookspecs
from .errors import PtqbenchError, UnknownPluginError
from .interfaces import (Executor, Metric, ModelAdapter, Plugin, Reconstructor, Selector,
                         Weighting)

ENTRY_POINT_GROUP = "ptqbench"
#: set to "0" to load only ptqbench's own built-ins (tests use this to stay hermetic)
LOAD_EXTERNAL_ENV = "PTQBENCH_LOAD_EXTERNAL_PLUGINS"

BASES = {
    "models": ModelAdapter,
    "selectors": Selector,
    "weightings": Weighting,
    "reconstructors": Reconstructor,
    "metrics": Metric,
    "executors": Executor,
}


@dataclass(frozen=True)
class PluginInfo:
    family: str
    name: str
    cls: type
    source: str  # "ptqbench 0.1.0 (ptqbench_plugins.weightings.uniform)" or "file:/path/x.py"

    @property
    def description(self) -> str:
        text = self.cls.description or (self.cls.__doc__ or "").strip()
        return text.splitlines()[0] if text else ""


class Registry:
    def __init__(self):
        self.pm = pluggy.PluginManager("ptqbench")
        self.pm.add_hookspecs(hookspecs)
        self._sources: dict[str, str] = {}  # pluggy plugin name -> human-readable source
        self._plugins: dict[str, dict[str, PluginInfo]] = {f: {} for f in hookspecs.FAMILIES}
        self._collected = False

    # ---- loading ------------------------------------------------------------------------
    def load_entry_points(self, include_external: Optional[bool] = None) -> None:
        if include_external is None:
            include_external = os.environ.get(LOAD_EXTERNAL_ENV, "1") != "0"
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else "?"
            if not include_external and dist != "ptqbench":
                continue
            key = f"{dist}:{ep.name}"
            if self.pm.has_plugin(key):
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must not take the tool down
                print(f"warning: cannot load plugin {key} ({ep.value}): {exc}", file=sys.stderr)
                continue
            version = ep.dist.version if ep.dist else ""
            self._register_module(module, key, f"{dist} {version} ({ep.value})".replace("  ", " "))

    def load_file(self, path: str | Path) -> None:
        """Register a local ``.py`` file as a plugin (suites use this to try a new strategy)."""
        path = Path(path).resolve()
        key = f"file:{path}"
        if self.pm.has_plugin(key):
            return
        if not path.is_file():
            raise PtqbenchError(f"plugin file not found: {path}")
        mod_name = f"ptqbench_local_{abs(hash(str(path)))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise PtqbenchError(f"cannot import plugin file {path}: {exc!r}") from exc
        self._register_module(module, key, key)

    def register_module(self, module, name: str) -> None:
        """Register an already imported module or object with hook implementations."""
        self._register_module(module, name, name)

    def _register_module(self, module, key: str, source: str) -> None:
        self.pm.register(module, name=key)
        self._sources[key] = source
        self._collected = False

    # ---- collecting ---------------------------------------------------------------------
    def _collect(self) -> None:
        if self._collected:
            return
        self._plugins = {f: {} for f in hookspecs.FAMILIES}
        for family in hookspecs.FAMILIES:
            caller = getattr(self.pm.hook, f"register_{family}")
            # Call each implementation ourselves so every registration knows its source.
            for impl in caller.get_hookimpls():
                source = self._sources.get(impl.plugin_name, impl.plugin_name)

                def register(cls, _family=family, _source=source):
                    self._add(_family, cls, _source)

                impl.function(register=register)
        self._collected = True

    def _add(self, family: str, cls: type, source: str) -> None:
        base = BASES[family]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PtqbenchError(f"{source}: {cls!r} registered as a {family[:-1]} plugin "
                                f"is not a subclass of ptqbench.{base.__name__}")
        if not cls.name:
            raise PtqbenchError(f"{source}: {cls.__name__} has no `name`")
        existing = self._plugins[family].get(cls.name)
        if existing is not None and existing.cls is not cls:
            raise PtqbenchError(f"{family[:-1]} plugin {cls.name!r} is registered twice: "
                                f"by {existing.source} and by {source}")
        self._plugins[family][cls.name] = PluginInfo(family, cls.name, cls, source)

    # ---- lookup -------------------------------------------------------------------------
    def names(self, family: str) -> list[str]:
        self._collect()
        return sorted(self._plugins[family])

    def get(self, family: str, name: str, where: str = "") -> PluginInfo:
        self._collect()
        try:
            return self._plugins[family][name]
        except KeyError:
            raise UnknownPluginError(family, name, self._plugins[family], where) from None

    def create(self, family: str, name: str, options: Optional[dict] = None) -> Plugin:
        info = self.get(family, name)
        try:
            return info.cls(**(options or {}))
        except TypeError as exc:
            raise PtqbenchError(f"{family[:-1]} plugin {name!r}: bad options {options}: {exc}") from exc

    def all(self) -> Iterable[PluginInfo]:
        self._collect()
        for family in hookspecs.FAMILIES:
            yield from (self._plugins[family][n] for n in sorted(self._plugins[family]))


def default_registry(plugin_files: Iterable[str | Path] = (),
                     include_external: Optional[bool] = None) -> Registry:
    reg = Registry()
    reg.load_entry_points(include_external=include_external)
    for f in plugin_files:
        reg.load_file(f)
    return reg
