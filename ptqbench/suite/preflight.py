"""Pre-flight: every check of a suite that needs no model and no data runs here, before any
work, and all of its problems are reported together, one line each (file, key path, reason).

``run``, ``run --dry-run``, ``plugins --suite`` and ``diagnose`` all go through
:func:`ptqbench.pipeline.runner.prepare`, which calls :func:`preflight`:

- names and files found by the loader: methods, presets, model folders, plugin files;
- local plugin files import and register;
- every plugin a suite names is registered and accepts its options (selectors, weightings,
  reconstructors and metrics are built once; models and executors, whose constructors do work,
  have their options checked against their signatures); the quantization recipe of every
  method at every bit-width;
- what plugins' options name outside the suite (``Plugin.check_inputs``: a metric's reference
  dataset, an Inception weights file);
- output folders (results, cache, a command's own output) can be created and written.
"""
from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path
from typing import Optional

from ..errors import Problems, PtqbenchError, SuiteError
from ..methods import PRESETS, resolve
from .loader import LoadedSuite, path_exists, path_is_file


def preflight(loaded: LoadedSuite, registry, output: Optional[str | Path] = None,
              writable: Optional[dict[str, str | Path]] = None) -> None:
    """Load the suite's plugin files into ``registry`` and check everything; raises one
    SuiteError (or SuiteErrors) listing every problem. ``output``: the results folder when a
    command line overrides ``[suite].output``; ``writable``: more folders a command writes,
    by the option that named them (e.g. ``{"--out": path}``)."""
    problems = Problems.of(loaded.problems)
    loaded_ok = _load_plugin_files(loaded, registry, problems)
    problems.items += loaded.relevant(plugin_problems(loaded, registry, report_unknown=loaded_ok))
    problems.items += loaded.relevant(output_problems(loaded, output, writable or {}))
    problems.raise_any()


def _load_plugin_files(loaded: LoadedSuite, registry, problems: Problems) -> bool:
    ok = True
    for i, path in enumerate(loaded.plugin_files):
        if not path_is_file(path):
            continue  # reported by the loader
        try:
            registry.load_file(path)
        except PtqbenchError as exc:
            problems.add(loaded.file, f"suite.plugins[{i}]", str(exc))
            ok = False
    return ok


def plugin_problems(loaded: LoadedSuite, registry, report_unknown: bool = True
                    ) -> list[SuiteError]:
    """Unknown plugin names, options a plugin rejects, inputs it cannot find.
    ``report_unknown=False`` leaves out unknown names (a plugin file that failed to import may
    have been the one that defines them)."""
    from .expand import model_evaluation, model_method

    s, file = loaded.suite, loaded.file
    problems = Problems()
    try:
        registry.names("models")  # runs every plugin's register hook
    except Exception as exc:  # a plugin's hook raised: nothing can be looked up
        reason = str(exc) if isinstance(exc, PtqbenchError) else f"{type(exc).__name__}: {exc}"
        problems.add(file, "suite.plugins", f"registering plugins failed: {reason}")
        return problems.items

    def known(family: str, name: Optional[str], key: str) -> bool:
        if name is None:
            return False
        if name in registry.names(family):
            return True
        if report_unknown:
            names = ", ".join(registry.names(family)) or "(none)"
            problems.add(file, key, f"unknown {family[:-1]} plugin {name!r}; known: {names}")
        return False

    def build(family: str, name: str, options: dict, key: str) -> None:
        """Construct the plugin with the suite's options and let it check its inputs."""
        try:
            registry.create(family, name, options).check_inputs(file.parent)
        except PtqbenchError as exc:
            if any(Path(d).name and Path(d).name in str(exc) for d in s.downloads):
                return  # a file with a download hint: --dry-run says where to get it
            problems.add(file, key, str(exc))
        except Exception as exc:  # a constructor that validates with ValueError & co.
            problems.add(file, key, f"{family[:-1]} plugin {name!r} rejected its options: "
                                    f"{type(exc).__name__}: {exc}")

    def signature(family: str, name: str, kwargs: dict, key: str) -> None:
        """Options checked against the constructor's signature (it does work when called)."""
        cls = registry.get(family, name).cls
        try:
            inspect.signature(cls).bind(**kwargs)
        except TypeError as exc:
            problems.add(file, key, f"{family[:-1]} plugin {name!r}: bad options: {exc}")

    for mname, entry in s.models.items():
        if known("models", entry.plugin, f"models.{mname}.plugin"):
            base = loaded.model_dirs.get(mname, file.parent)
            signature("models", entry.plugin, {"path": entry.path, "base_dir": str(base),
                                               **entry.options}, f"models.{mname}.options")
    methods = [(i, name) for i, name in enumerate(s.grid.methods)
               if _resolvable(name, s.methods.get(name))]  # others: reported by the loader
    checks = [(mname, s.methods.get(mname), f"methods.{mname}" if mname in s.methods
               else f"grid.methods[{i}]") for i, mname in methods]
    # per-model method overrides ([models.X.methods.NAME]) are methods too
    checks += [(mname, model_method(s, model, mname), f"models.{model}.methods.{mname}")
               for model in s.grid.models if model in s.models
               for mname in s.models[model].methods if mname in {n for _, n in methods}]
    for mname, entry, where in checks:
        m = resolve(mname, entry)
        for family, name, options in (("selectors", m.selector, m.selector_options),
                                      ("weightings", m.weighting, m.weighting_options),
                                      ("reconstructors", m.reconstructor, m.reconstructor_options)):
            if known(family, name, f"{where}.{family[:-1]}"):
                build(family, name, options, f"{where}.{family[:-1]}_options")
        if not m.is_fp:
            for bits in s.grid.bits:
                _recipe(m, bits, problems, file, f"{where}.recipe")
    if not s.grid.bits and any(not resolve(m, s.methods.get(m)).is_fp for _, m in methods):
        problems.add(file, "grid.bits", "empty: quantized methods need at least one bit-width")
    # each model's metrics with its options ([models.X.evaluation] merged over [evaluation])
    names_ok = {m for i, m in enumerate(s.evaluation.metrics)
                if known("metrics", m, f"evaluation.metrics[{i}]")}
    built: set[tuple] = set()
    for model in [m for m in s.grid.models if m in s.models] or [None]:
        own = s.models[model].evaluation if model is not None else None
        ev = model_evaluation(s, model) if model is not None else s.evaluation
        for i, metric in enumerate(ev.metrics):
            mine = own is not None and (metric in own.metric_options or own.metrics is not None)
            if mine and metric not in names_ok and not known(
                    "metrics", metric, f"models.{model}.evaluation.metrics[{i}]"):
                continue
            if not mine and metric not in names_ok:
                continue
            key = (f"models.{model}.evaluation.metric_options.{metric}"
                   if own is not None and metric in own.metric_options
                   else f"evaluation.metric_options.{metric}")
            options = ev.metric_options.get(metric, {})
            ident = (key, repr(sorted(options.items(), key=str)))
            if ident not in built:
                built.add(ident)
                build("metrics", metric, options, key)
    if known("executors", s.run.executor, "run.executor"):
        signature("executors", s.run.executor, s.run.executor_options, "run.executor_options")
    return problems.items


def _resolvable(name: str, entry) -> bool:
    return (entry.preset if entry is not None and entry.preset else name) in PRESETS


def _recipe(m, bits: str, problems: Problems, file: Path, key: str) -> None:
    from ..quant import QuantRecipe

    options = dict(m.recipe)
    if options.get("act_params") == "per_step":
        options.setdefault("sampler_steps", 1)  # the real count comes from each cell's sampler
    try:
        QuantRecipe.from_options(bits=bits, **options)
    except PtqbenchError as exc:
        problems.add(file, key, str(exc))
    except (TypeError, ValueError) as exc:
        problems.add(file, key, f"{type(exc).__name__}: {exc}")


def output_problems(loaded: LoadedSuite, output: Optional[str | Path] = None,
                    writable: Optional[dict[str, str | Path]] = None) -> list[SuiteError]:
    """Folders the run will write: the results folder, the cache, and ``writable``'s."""
    s, file = loaded.suite, loaded.file
    problems = Problems()
    results = Path(output) if output is not None else Path(s.suite.output)
    folders: list[tuple[str, Path, str]] = [
        ("" if output is not None else "suite.output", results,
         "--output" if output is not None else "")]
    if s.run.cache_dir:
        folders.append(("run.cache_dir", Path(s.run.cache_dir), ""))
    folders += [("", Path(p), option) for option, p in (writable or {}).items()]
    for key, folder, option in folders:
        reason = folder_problem(folder)
        if reason is None:
            continue
        if option:  # named on the command line: the suite file is not where the fix is
            problems.items.append(_CommandLineError(f"{option} {folder}: {reason}"))
        else:
            problems.add(file, key, f"{folder}: {reason}")
    return problems.items


class _CommandLineError(SuiteError):
    """A problem of a command-line option, reported among the suite's problems."""

    def __init__(self, message: str):
        self.file, self.key, self.reason = "", "", message
        PtqbenchError.__init__(self, message)


def folder_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` cannot be used as an output folder, or None. Nothing is left behind: an
    existing folder gets a temporary file, a missing one a temporary folder in the nearest
    existing parent (what `run` would create must be creatable: read-only and virtual file
    systems say no only when asked)."""
    try:
        folder = folder.expanduser().absolute()
    except RuntimeError as exc:  # ~user that does not exist
        return f"cannot expand the path: {exc}"
    if "\0" in str(folder):
        return "not a valid path (NUL character)"
    parent = folder
    while not path_exists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is a file, not a folder"
    too_long = [part for part in folder.relative_to(parent).parts if len(part.encode()) > 255]
    if too_long:
        return f"cannot be created: a folder name of {len(too_long[0].encode())} bytes is too long"
    try:
        if parent == folder:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ptqbench-write-test-")
            os.close(fd)
            os.unlink(tmp)
        else:
            os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".ptqbench-write-test-"))
    except OSError as exc:
        what = "not writable" if parent == folder else f"cannot be created in {parent}"
        return f"{what}: {exc.strerror or exc}"
    return None
