"""Reading suites: TOML -> includes merged -> typed Suite -> plugin names checked."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import PtqbenchError, SuiteError
from ..methods import PRESETS
from .schema import Suite
from .typed import from_dict

DEFAULT_SUITE = "tiny.toml"


def default_suite_path() -> Path:
    """The embedded default suite (installed with the package as ptqbench_suites)."""
    import ptqbench_suites

    return Path(ptqbench_suites.__file__).resolve().parent / DEFAULT_SUITE


@dataclass
class LoadedSuite:
    suite: Suite
    file: Path
    #: folder of each declared model's suite file: relative model paths resolve there
    model_dirs: dict[str, Path]
    plugin_files: list[Path]


def _read_toml(file: Path) -> dict:
    try:
        with open(file, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SuiteError(file, "", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(file, "", f"not valid TOML: {exc}") from None


def _merge(base: dict, over: dict) -> dict:
    """Tables merge recursively; any other value (lists included) is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _raw_with_includes(file: Path, seen: tuple[Path, ...], model_dirs: dict[str, Path],
                       plugin_files: list[Path]) -> dict:
    file = file.resolve()
    if file in seen:
        chain = " -> ".join(str(p) for p in (*seen, file))
        raise SuiteError(file, "suite.include", f"include cycle: {chain}")
    raw = _read_toml(file)
    info = raw.get("suite", {})
    includes = info.get("include", []) if isinstance(info, dict) else []
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise SuiteError(file, "suite.include", "expected a list of file paths")
    merged: dict = {}
    for inc in includes:
        merged = _merge(merged, _raw_with_includes(file.parent / inc, (*seen, file), model_dirs,
                                                   plugin_files))
    for name in (raw.get("models") or {}):
        model_dirs[name] = file.parent
    plugins = info.get("plugins", []) if isinstance(info, dict) else []
    if isinstance(plugins, list):
        plugin_files.extend((file.parent / p).resolve() for p in plugins if isinstance(p, str))
    merged = _merge(merged, raw)
    if isinstance(merged.get("suite"), dict):
        merged["suite"] = {k: v for k, v in merged["suite"].items() if k not in ("include",)}
    return merged


def load_suite(path: Optional[str | Path] = None) -> LoadedSuite:
    """Parse and validate a suite file (the embedded default when ``path`` is None)."""
    file = Path(path) if path is not None else default_suite_path()
    model_dirs: dict[str, Path] = {}
    plugin_files: list[Path] = []
    raw = _raw_with_includes(file, (), model_dirs, plugin_files)
    suite = from_dict(Suite, raw, "", file)
    # plugin lists of included suites add up (the merge would keep only the last list)
    suite.suite.plugins = [str(p) for p in dict.fromkeys(plugin_files)]
    for i, p in enumerate(dict.fromkeys(plugin_files)):
        if not p.is_file():
            raise SuiteError(file, f"suite.plugins[{i}]", f"plugin file not found: {p}")
    for i, name in enumerate(suite.grid.methods):
        if name not in suite.methods and name not in PRESETS:
            known = sorted(set(PRESETS) | set(suite.methods))
            raise SuiteError(file, f"grid.methods[{i}]",
                             f"unknown method {name!r}; presets and declared methods: {', '.join(known)}")
    for name, entry in suite.methods.items():
        if entry.preset is not None and entry.preset not in PRESETS:
            raise SuiteError(file, f"methods.{name}.preset",
                             f"unknown preset {entry.preset!r}; presets: {', '.join(sorted(PRESETS))}")
        if entry.preset is None and name not in PRESETS:
            raise SuiteError(file, f"methods.{name}.preset",
                             "required: the preset this method starts from")
    for name, entry in suite.models.items():
        if not entry.download:  # with a download hint, --dry-run reports a missing folder
            _check_model_path(file, name, entry.path, model_dirs.get(name, file.parent))
    return LoadedSuite(suite, file.resolve(), model_dirs, list(dict.fromkeys(plugin_files)))


def _check_model_path(file: Path, name: str, path: str, base: Path) -> None:
    if path.startswith("builtin:"):
        return
    p = Path(path).expanduser()
    p = p if p.is_absolute() else base / p
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local and not p.exists():
        raise SuiteError(file, f"models.{name}.path", f"model folder not found: {p.resolve()}")


def check_plugins(loaded: LoadedSuite, registry) -> None:
    """Every plugin a suite names must be registered; fails before any work starts."""
    from ..methods import resolve

    s, file = loaded.suite, loaded.file

    def need(family: str, name: Optional[str], key: str) -> None:
        if name is None:
            return
        if name not in registry.names(family):
            known = ", ".join(registry.names(family)) or "(none)"
            raise SuiteError(file, key, f"unknown {family[:-1]} plugin {name!r}; known: {known}")

    for mname, entry in s.models.items():
        need("models", entry.plugin, f"models.{mname}.plugin")
    for i, mname in enumerate(s.grid.methods):
        m = resolve(mname, s.methods.get(mname))
        where = f"methods.{mname}" if mname in s.methods else f"grid.methods[{i}]"
        for family, name in (("selectors", m.selector), ("weightings", m.weighting),
                             ("reconstructors", m.reconstructor)):
            need(family, name, f"{where}.{family[:-1]}")
    for i, metric in enumerate(s.evaluation.metrics):
        need("metrics", metric, f"evaluation.metrics[{i}]")
    for mname, entry in s.models.items():
        for i, metric in enumerate(entry.evaluation.metrics or []):
            need("metrics", metric, f"models.{mname}.evaluation.metrics[{i}]")
    need("executors", s.run.executor, "run.executor")
    if not s.grid.bits and any(not resolve(m, s.methods.get(m)).is_fp for m in s.grid.methods):
        raise SuiteError(file, "grid.bits", "empty: quantized methods need at least one bit-width")
    check_options(loaded, registry)


def check_options(loaded: LoadedSuite, registry) -> None:
    """Build every selector, weighting, reconstructor, metric and recipe once with the suite's
    options, so a misspelt or out-of-range option fails now, not hours into a run."""
    from ..methods import resolve
    from ..quant import QuantRecipe

    s, file = loaded.suite, loaded.file

    def build(key: str, make) -> None:
        try:
            make()
        except PtqbenchError as exc:
            raise SuiteError(file, key, str(exc)) from None

    from .expand import model_evaluation, model_method

    checks = [(mname, s.methods.get(mname), f"methods.{mname}" if mname in s.methods
               else f"grid.methods[{i}]") for i, mname in enumerate(s.grid.methods)]
    checks += [(mname, model_method(s, model, mname), f"models.{model}.methods.{mname}")
               for model in s.grid.models for mname in s.models[model].methods
               if mname in s.grid.methods]
    for mname, entry, where in checks:
        m = resolve(mname, entry)
        for family, name, options in (("selectors", m.selector, m.selector_options),
                                      ("weightings", m.weighting, m.weighting_options),
                                      ("reconstructors", m.reconstructor, m.reconstructor_options)):
            if name is not None:
                build(f"{where}.{family[:-1]}_options",
                      lambda f=family, n=name, o=options: registry.create(f, n, o))
        if not m.is_fp:
            for bits in s.grid.bits:
                build(f"{where}.recipe", lambda b=bits: QuantRecipe.from_options(
                    bits=b, **{"sampler_steps": 1, **m.recipe}
                    if m.recipe.get("act_params") == "per_step" else m.recipe))
    # each model's metrics with its options ([evaluation] merged with [models.X.evaluation])
    for model in s.grid.models:
        ev = model_evaluation(s, model)
        own = s.models[model].evaluation.metric_options
        for name in ev.metrics:
            key = (f"models.{model}.evaluation.metric_options.{name}" if name in own
                   else f"evaluation.metric_options.{name}")
            build(key, lambda n=name, e=ev: registry.create("metrics", n,
                                                             e.metric_options.get(n, {})))


__all__ = ["load_suite", "check_plugins", "LoadedSuite", "default_suite_path", "PtqbenchError"]
