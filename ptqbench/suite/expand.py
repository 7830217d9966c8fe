"""Grid expansion: a suite -> cells (model x sampler x bits x method x seed), each with its keys.

Keys are content hashes of resolved configuration:
- ``key``: the whole cell (record file name; a changed metric list gives a new record),
- ``gen_key``: what determines the samples (reused when only metrics change),
- ``quant_key``: what determines the quantized model (reused across metric/sample-count changes),
- ``fp_gen_key``: the samples of the FP cell this cell is paired with.
The FP method ignores bit-widths, so it yields one cell per (model, sampler, seed).
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional

from ..methods import ResolvedMethod, resolve
from ..quant.fast import Execution
from .loader import LoadedSuite
from .schema import Evaluation, MethodEntry

FP_BITS = "FP"


def config_hash(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Cell:
    model: str
    sampler: str
    bits: str
    method: str
    seed: int
    resolved: ResolvedMethod
    config: dict
    key: str
    gen_key: str
    quant_key: Optional[str]
    fp_gen_key: str
    labels: dict = field(default_factory=dict)
    #: the evaluation of this cell: [evaluation] with its model's overrides
    evaluation: Optional[Evaluation] = None

    @property
    def is_fp(self) -> bool:
        return self.resolved.is_fp

    def title(self) -> str:
        return f"{self.model} | {self.sampler} | {self.bits} | {self.method} | seed {self.seed}"


def _model_config(loaded: LoadedSuite, name: str) -> dict:
    entry = loaded.suite.models[name]
    return {"name": name, "plugin": entry.plugin, "path": entry.path, "options": entry.options}


def _sampler_config(loaded: LoadedSuite, name: str) -> dict:
    s = loaded.suite.samplers[name]
    return {"name": name, "kind": s.kind, "steps": s.steps, "eta": s.eta, "spacing": s.spacing}


def model_evaluation(suite, model: str) -> Evaluation:
    """[evaluation] with the model's [models.X.evaluation] overrides."""
    ev, over = suite.evaluation, suite.models[model].evaluation
    options = copy.deepcopy(ev.metric_options)
    for name, opts in over.metric_options.items():
        options[name] = {**options.get(name, {}), **opts}
    metrics = list(over.metrics if over.metrics is not None else ev.metrics)
    return Evaluation(num_samples=over.num_samples or ev.num_samples,
                      batch_size=over.batch_size or ev.batch_size, metrics=metrics,
                      metric_options={k: v for k, v in options.items() if k in metrics},
                      execution=ev.execution,
                      execution_options=copy.deepcopy(ev.execution_options))


def model_method(suite, model: str, method: str) -> Optional[MethodEntry]:
    """The suite's [methods.M] (or the preset) with the model's [models.X.methods.M] overrides."""
    over = suite.models[model].methods.get(method)
    base = suite.methods.get(method)
    if over is None:
        return base
    entry = copy.deepcopy(base) if base is not None else MethodEntry()
    for part in ("selector_options", "weighting_options", "reconstructor_options", "recipe"):
        getattr(entry, part).update(copy.deepcopy(getattr(over, part)))
    for part in ("calibration_trajectories", "calibration_batch_size"):
        if getattr(over, part) is not None:
            setattr(entry, part, getattr(over, part))
    return entry


def expand(loaded: LoadedSuite) -> list[Cell]:
    s = loaded.suite
    cells: list[Cell] = []
    seen: set[str] = set()
    for model in s.grid.models:
        ev = model_evaluation(s, model)
        evaluation = {"metrics": list(ev.metrics), "metric_options": ev.metric_options}
        execution = Execution.from_options(ev.execution, ev.execution_options)
        only = s.models[model].samplers
        for sampler in [x for x in s.grid.samplers if not only or x in only]:
            for seed in s.grid.seeds:
                base = {"model": _model_config(loaded, model),
                        "sampler": _sampler_config(loaded, sampler), "seed": seed}
                fp_gen = {**base, "bits": FP_BITS, "method": resolve("fp").as_dict() | {"name": "fp"},
                          "num_samples": ev.num_samples,
                          **_numerics(execution, quantized=False)}
                fp_gen_key = config_hash(_gen_identity(fp_gen))
                for method in s.grid.methods:
                    resolved = resolve(method, model_method(s, model, method))
                    for bits in ([FP_BITS] if resolved.is_fp else s.grid.bits):
                        quant = {**base, "bits": bits, "method": resolved.as_dict()}
                        gen = {**quant, "num_samples": ev.num_samples,
                               **_numerics(execution, quantized=not resolved.is_fp)}
                        config = {**gen, "evaluation": evaluation, "batch_size": ev.batch_size}
                        key = config_hash(config)
                        if key in seen:
                            continue
                        seen.add(key)
                        cells.append(Cell(
                            model=model, sampler=sampler, bits=bits, method=method, seed=seed,
                            resolved=resolved, config=config, key=key,
                            gen_key=config_hash(_gen_identity(gen)),
                            quant_key=None if resolved.is_fp else config_hash(_gen_identity(quant)),
                            fp_gen_key=fp_gen_key, evaluation=ev))
    # FP cells first: every quantized cell is paired with their samples
    cells.sort(key=lambda c: (not c.is_fp,))
    return cells


def _numerics(execution: Execution, quantized: bool) -> dict:
    """Sampling numerics that change samples beyond fp32 rounding (bf16, TF32, int8) are part of
    the samples' identity; exact fast paths add nothing, so earlier keys stay valid."""
    ident = execution.identity(quantized)
    return {} if ident is None else {"numerics": ident}


def _gen_identity(gen: dict) -> dict:
    # The method's display name does not change the samples; its content does.
    g = json.loads(json.dumps(gen, default=str))
    g["method"].pop("name", None)
    return g
