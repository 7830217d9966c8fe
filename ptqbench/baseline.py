"""Baseline files of ``ptqbench check``: what each cell of a suite scored, to compare runs with.

A snapshot is built from a results folder's records (and its samples, for the paired test);
``ptqbench check --update-baseline`` writes it, ``ptqbench check`` compares a new one with it.
The file (JSON, sorted, diff-friendly)::

    format      "ptqbench-baseline/1"
    suite       name of the suite the cells came from
    created     when the file was written
    code        hashes of the ptqbench and built-in plugin sources that made the records
    versions    package versions;  numerics: device, platform, torch threads
    slack       per-metric allowances {"paired_mse": {"abs": 0.0, "rel": 0.1}, "*": ...}: edited
                by hand, kept when the file is updated
    cells       one entry per (model, sampler, bits, method, seed): key, status, metrics (value,
                95% interval, direction, n), fingerprint (ptqbench.reproducible), samples_sha256,
                code, plugins, and per_sample: the per-sample MSE against the FP samples (base64
                float64, little-endian), which the paired test of paired metrics needs
"""
from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import PtqbenchError
from .atomic import atomic_write_bytes
from .store import Store
from .reproducible import fingerprint, samples_sha256

FORMAT = "ptqbench-baseline/1"
IDENT = ("model", "sampler", "bits", "method", "seed")
#: cells with more samples keep no per-sample values (the file would grow by ~11 bytes a sample);
#: their paired metrics are then compared by their intervals
MAX_PER_SAMPLE = 16384

Ident = tuple  # (model, sampler, bits, method, seed)


@dataclass
class CellResult:
    """One cell as ``check`` sees it (from a record and its samples, or from a baseline file)."""
    ident: Ident
    key: str
    status: str
    error: Optional[str]
    metrics: dict
    fingerprint: str
    samples_sha256: Optional[str] = None
    per_sample_mse: Optional[np.ndarray] = None
    values_per_sample: Optional[int] = None
    code: dict = field(default_factory=dict)
    plugins: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        model, sampler, bits, method, seed = self.ident
        return f"{model} | {sampler} | {bits} | {method} | seed {seed}"

    @classmethod
    def from_record(cls, record: dict, store: Optional[Store] = None) -> "CellResult":
        cell = record["cell"]
        err = record.get("error") or None
        metrics = {name: {k: v[k] for k in ("value", "ci", "higher_is_better", "n", "unavailable")
                          if k in v}
                   for name, v in (record.get("metrics") or {}).items()}
        out = cls(ident=tuple(cell[k] for k in IDENT), key=record["key"],
                  status=record.get("status") or "?",
                  error=None if err is None else f"{err.get('type')}: {err.get('message')}",
                  metrics=metrics, fingerprint=fingerprint(record), code=record.get("code") or {},
                  plugins=_plugin_names(record.get("plugins") or {}))
        if store is not None:
            n = record.get("num_samples")
            out.samples_sha256 = samples_sha256(store, record.get("gen_key"), n)
            if cell["method"] != "fp" and n and n <= MAX_PER_SAMPLE:
                out.per_sample_mse, out.values_per_sample = _per_sample_mse(
                    store, record.get("gen_key"), record.get("fp_gen_key"), n)
        return out

    def to_json(self) -> dict:
        out = {"cell": dict(zip(IDENT, self.ident)), "key": self.key, "status": self.status,
               "error": self.error, "metrics": self.metrics, "fingerprint": self.fingerprint,
               "samples_sha256": self.samples_sha256, "code": self.code, "plugins": self.plugins}
        if self.per_sample_mse is not None:
            data = np.ascontiguousarray(self.per_sample_mse, dtype="<f8").tobytes()
            out["per_sample"] = {"mse": base64.b64encode(data).decode(),
                                 "values_per_sample": self.values_per_sample}
        return out

    @classmethod
    def from_json(cls, obj: dict, where: str) -> "CellResult":
        try:
            ident = tuple(obj["cell"][k] for k in IDENT)
            out = cls(ident=ident, key=obj["key"], status=obj["status"], error=obj.get("error"),
                      metrics=dict(obj.get("metrics") or {}), fingerprint=obj["fingerprint"],
                      samples_sha256=obj.get("samples_sha256"), code=obj.get("code") or {},
                      plugins=obj.get("plugins") or {})
            per = obj.get("per_sample")
            if per:
                out.per_sample_mse = np.frombuffer(base64.b64decode(per["mse"]),
                                                   dtype="<f8").astype(np.float64)
                out.values_per_sample = int(per["values_per_sample"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PtqbenchError(f"{where}: not a valid baseline cell ({type(exc).__name__}: "
                                f"{exc})") from None
        return out


@dataclass
class Snapshot:
    """Every cell of one run (or of a baseline file), by identity."""
    cells: dict[Ident, CellResult]
    suite: Optional[str] = None
    code: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    numerics: dict = field(default_factory=dict)
    slack: dict = field(default_factory=dict)
    created: Optional[str] = None


def snapshot(records: list[dict], store: Optional[Store] = None, suite: Optional[str] = None,
             numerics: Optional[dict] = None) -> Snapshot:
    """The newest record of every cell (a method redefined in a suite leaves older records in
    the folder), with its samples' hash and per-sample errors when ``store`` has them."""
    newest: dict[Ident, dict] = {}
    for r in sorted(records, key=lambda r: r.get("finished") or ""):
        if "cell" in r and "key" in r:
            newest[tuple(r["cell"][k] for k in IDENT)] = r
    cells = {i: CellResult.from_record(r, store) for i, r in newest.items()}
    first = next(iter(newest.values()), {})
    info = dict(numerics or {})
    if first:
        host = first.get("host") or {}
        info.setdefault("device", host.get("device"))
        info.setdefault("platform", host.get("platform"))
    return Snapshot(cells=cells, suite=suite or (first.get("suite") or {}).get("name"),
                    code=first.get("code") or {}, versions=first.get("versions") or {},
                    numerics=info)


def write_baseline(snap: Snapshot, path: Path) -> Path:
    """Write ``snap`` to ``path``; the ``slack`` of an existing file there is kept."""
    path = Path(path)
    slack = snap.slack
    if path.exists():
        slack = read_baseline(path).slack or slack
    cells = sorted(snap.cells.values(), key=lambda c: tuple(str(x) for x in c.ident))
    obj = {"format": FORMAT, "suite": snap.suite,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code": snap.code,
           "versions": snap.versions, "numerics": snap.numerics, "slack": slack,
           "cells": [c.to_json() for c in cells]}
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, allow_nan=True)
                              + "\n").encode())
    return path


def read_baseline(path: Path) -> Snapshot:
    path = Path(path)
    if not path.is_file():
        raise PtqbenchError(f"baseline not found: {path} (write one with "
                            f"`ptqbench check SUITE --update-baseline`)")
    try:
        obj = json.loads(path.read_text())
    except ValueError as exc:
        raise PtqbenchError(f"{path}: not JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise PtqbenchError(f"{path}: format: expected {FORMAT!r}, got "
                            f"{obj.get('format') if isinstance(obj, dict) else type(obj).__name__!r}")
    cells = {}
    for i, c in enumerate(obj.get("cells") or []):
        cell = CellResult.from_json(c, f"{path}: cells[{i}]")
        cells[cell.ident] = cell
    slack = obj.get("slack") or {}
    if not isinstance(slack, dict):
        raise PtqbenchError(f"{path}: slack: expected a table of metric -> {{abs, rel}}")
    return Snapshot(cells=cells, suite=obj.get("suite"), code=obj.get("code") or {},
                    versions=obj.get("versions") or {}, numerics=obj.get("numerics") or {},
                    slack=slack, created=obj.get("created"))


def _plugin_names(plugins: dict) -> dict:
    """Plugin names and versions per role (their sources name local paths: not kept)."""
    out = {}
    for role, info in plugins.items():
        if isinstance(info, dict) and "name" in info:
            out[role] = {"name": info["name"], "version": info.get("version")}
        elif isinstance(info, dict):
            out[role] = _plugin_names(info)
    return out


def _per_sample_mse(store: Store, gen_key, fp_gen_key, n: int
                    ) -> tuple[Optional[np.ndarray], Optional[int]]:
    from .metrics.paired import per_sample_mse

    if not gen_key or not fp_gen_key:
        return None, None
    samples = store.load_samples(gen_key, n)
    fp = store.load_samples(fp_gen_key, n)
    if samples is None or fp is None or samples.shape != fp.shape:
        return None, None
    mse = per_sample_mse(torch.from_numpy(samples), torch.from_numpy(fp)).numpy()
    return mse, int(samples[0].size)
