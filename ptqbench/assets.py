"""What a suite needs on disk, and whether it is here: for ``ptqbench run --dry-run``.

Every model of the selected cells and every file-like option (metric references, prompt files,
CLIP/Inception weights, model prompt files) is classified offline, without loading anything:
``builtin``, ``local`` (present), ``hub cache`` (a hub id already in the local Hugging Face
cache), ``hub`` (a hub id that must be downloaded on first use) or ``missing`` (a local path
that is absent; the suite's ``download`` / ``[downloads]`` hint says where to get it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

#: option names whose values are files, folders or hub ids
FILE_OPTIONS = ("reference", "prompts", "calibration_prompts", "weights")


@dataclass
class Asset:
    what: str  # "model m", "fid reference", ...
    value: str
    status: str
    hint: str = ""

    def line(self) -> str:
        hint = f" -> {self.hint}" if self.hint else ""
        return f"  {self.what}: {self.value}  [{self.status}]{hint}"


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - diffusers depends on huggingface_hub
        return False
    return (Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}").is_dir()


def classify(value: str, base: Path, hub_ok: bool = True) -> str:
    """builtin / local / hub cache / hub / missing for a path-or-hub-id as a suite writes it."""
    if value.startswith("builtin:"):
        return "builtin"
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if p.exists():
        return "local"
    looks_local = value.startswith((".", "/", "~")) or value.count("/") != 1 or not hub_ok
    if looks_local:
        return "missing"
    return "hub cache" if _hub_cached(value) else "hub"


def suite_assets(loaded, cells) -> list[Asset]:
    from .suite.expand import model_evaluation

    suite, base = loaded.suite, loaded.file.parent
    hints = suite.downloads
    out: list[Asset] = []
    seen: set[tuple[str, str]] = set()

    def add(what: str, value: str, folder: Path, hub_ok: bool = True,
            hint: Optional[str] = None) -> None:
        if (what, value) in seen:
            return
        seen.add((what, value))
        status = classify(value, folder, hub_ok)
        hint = hint or hints.get(value, "")
        if status == "hub":
            hint = hint or "downloaded from the hub on first use"
        elif status == "missing":
            hint = hint or "not found; no download hint in the suite"
        elif status != "missing":
            hint = ""
        out.append(Asset(what, value, status, hint))

    models = list(dict.fromkeys(c.model for c in cells))
    for name in models:
        entry = suite.models[name]
        folder = loaded.model_dirs.get(name, base)
        add(f"model {name} ({entry.plugin})", entry.path, folder, hint=entry.download or None)
        for opt in FILE_OPTIONS:
            if isinstance(entry.options.get(opt), str):
                add(f"model {name} option {opt}", entry.options[opt], folder, hub_ok=False)
        ev = model_evaluation(suite, name)
        for metric in ev.metrics:
            for opt in FILE_OPTIONS:
                v = ev.metric_options.get(metric, {}).get(opt)
                if isinstance(v, str):
                    add(f"{metric} {opt}", v, base, hub_ok=opt == "weights")
    return out
