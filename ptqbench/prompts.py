"""Text prompts for text-to-image models: read from a file, assigned to sample indices.

A prompt file is plain text (one prompt per line, blank lines skipped) or COCO captions JSON
(``captions_train2017.json`` / ``captions_val2017.json``: ``annotations`` with ``image_id``,
``id`` and ``caption``), from which the first caption (lowest annotation id) of every image is
taken, images in ascending id order. Sample ``i`` gets prompt ``i mod len(prompts)``: the adapter
and the CLIP-score metric use the same rule, so a metric knows what each sample was asked for.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .errors import PtqbenchError


def load_prompts(path) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise PtqbenchError(f"prompt file not found: {p}")
    return list(_load(str(p.resolve()), p.stat().st_mtime_ns))


@lru_cache(maxsize=8)
def _load(path: str, _mtime: int) -> tuple[str, ...]:
    p = Path(path)
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text())
            first: dict[int, tuple[int, str]] = {}
            for a in data["annotations"]:
                img, aid, cap = int(a["image_id"]), int(a.get("id", 0)), str(a["caption"])
                if img not in first or aid < first[img][0]:
                    first[img] = (aid, cap)
        except (ValueError, KeyError, TypeError) as exc:
            raise PtqbenchError(f"{p}: not a COCO captions file ({exc})") from None
        prompts = [" ".join(first[k][1].split()) for k in sorted(first)]
    else:
        prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise PtqbenchError(f"{p}: no prompts")
    return tuple(prompts)


def prompt_for_index(prompts: list[str], index: int) -> str:
    return prompts[int(index) % len(prompts)]
