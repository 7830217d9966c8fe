"""One cell end to end: load -> (calibrate -> quantize -> reconstruct) -> sample -> metrics."""
from __future__ import annotations

import contextlib
import json
import resource
import time
import traceback
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import environment, memory
from .. import numerics as numerics_flags
from ..interfaces import MetricContext, RunContext
from ..quant.fast import Execution, int8_check, sampling_cost
from ..sampling import SamplerSpec
from ..store import Store, atomic_write_json
from ..suite.expand import Cell
from ..suite.loader import LoadedSuite
from . import faults
from .generate import generate


class StageTimer:
    """Wall-clock seconds and peak memory per stage; syncs the GPU only at stage boundaries."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_gpu_mb: dict[str, float] = {}
        self.peak_host_mb: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        memory.reset_host_peak()
        t0 = time.perf_counter()
        try:
            yield
        except BaseException as exc:
            faults.tag_stage(exc, name)  # the failed cell's message says where it happened
            raise
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                self.peak_gpu_mb[name] = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.peak_host_mb[name] = max(self.peak_host_mb.get(name, 0.0), memory.host_peak_mb())
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def as_dict(self) -> dict:
        out = {"seconds": {k: round(v, 3) for k, v in self.seconds.items()},
               "total_seconds": round(sum(self.seconds.values()), 3),
               # stage windows reset the OS peak: the lifetime peak is the largest of them
               "peak_rss_mb": max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                   *self.peak_host_mb.values()]),
               "peak_host_mb": {k: round(v, 1) for k, v in self.peak_host_mb.items()}}
        if self.peak_gpu_mb:
            out["peak_gpu_mb"] = {k: round(v, 1) for k, v in self.peak_gpu_mb.items()}
        return out


class CellRunner:
    """Runs cells of one suite; keeps loaded adapters between cells."""

    def __init__(self, loaded: LoadedSuite, registry, store: Store, cache_dir: Path,
                 reporter=None):
        self.loaded, self.registry, self.store = loaded, registry, store
        self.cache_dir = cache_dir
        self.reporter = reporter
        self._adapters: dict[str, object] = {}

    # ---- helpers ------------------------------------------------------------------------
    def adapter(self, model_name: str):
        if model_name not in self._adapters:
            entry = self.loaded.suite.models[model_name]
            base = self.loaded.model_dirs.get(model_name, self.loaded.file.parent)
            self._adapters[model_name] = self.registry.create(
                "models", entry.plugin, {"path": entry.path, "base_dir": str(base), **entry.options})
        return self._adapters[model_name]

    def sampler_spec(self, cell: Cell) -> SamplerSpec:
        s = self.loaded.suite.samplers[cell.sampler]
        return SamplerSpec(kind=s.kind, steps=s.steps, eta=s.eta, spacing=s.spacing)

    def plugin_info(self, family: str, name: Optional[str]) -> Optional[dict]:
        if name is None:
            return None
        info = self.registry.get(family, name)
        return {"name": name, "source": info.source,
                "version": getattr(info.cls, "version", None)}

    def evaluation(self, cell: Cell):
        """The cell's evaluation ([evaluation] with its model's overrides)."""
        return cell.evaluation or self.loaded.suite.evaluation

    def log(self, msg: str) -> None:
        if self.reporter is not None:
            self.reporter.log(msg)

    # ---- one cell -----------------------------------------------------------------------
    def _header(self, cell: Cell, device: torch.device) -> dict:
        """The part of a record known before the cell runs: what, with which code, where."""
        ev = self.evaluation(cell)
        m = cell.resolved
        return {
            "key": cell.key, "cell": {"model": cell.model, "sampler": cell.sampler,
                                      "bits": cell.bits, "method": cell.method, "seed": cell.seed},
            "config": cell.config, "config_hash": cell.key, "gen_key": cell.gen_key,
            "fp_gen_key": cell.fp_gen_key,
            "quant_key": cell.quant_key, "suite": {"name": self.loaded.suite.suite.name,
                                                   "file": str(self.loaded.file)},
            "git": environment.git_info(), "code": environment.code_identity(),
            "versions": environment.package_versions(),
            "host": environment.host_info(device),
            "seeds": {"run": cell.seed, "sampling": "per-sample: (seed, index)",
                      "calibration_generator": cell.seed},
            "plugins": {"model": self.plugin_info("models", self.loaded.suite.models[cell.model].plugin),
                        "selector": self.plugin_info("selectors", m.selector),
                        "weighting": self.plugin_info("weightings", m.weighting),
                        "reconstructor": self.plugin_info("reconstructors", m.reconstructor),
                        "metrics": {n: self.plugin_info("metrics", n) for n in ev.metrics}},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "status": "running", "error": None, "metrics": {}, "metric_errors": {},
            "coverage": None, "reconstruction": None, "weighting_state": None,
        }

    def crash_record(self, cell: Cell, device: torch.device, message: str) -> dict:
        """Record (and store) a cell whose worker process died, so reports and
        ``--retry-failed`` see it like any failed cell."""
        record = self._header(cell, device)
        record.update(status="failed", costs={}, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      error={"type": "WorkerDied", "message": message})
        self.store.write_record(cell.key, record)
        return record

    def run(self, cell: Cell, device: torch.device) -> dict:
        # The cell's lock is held while it runs (`ptqbench status` reports it as running). With
        # several runs on one folder, a cell another worker runs or has finished since this run
        # chose it is waited for and its record returned, not computed again.
        with self.store.lock(f"cell-{cell.key}", blocking=False) as free:
            if free:
                return self._run_unless_done(cell, device)
        self.log(f"{cell.title()} is running in another worker: waiting for its record")
        with self.store.lock(f"cell-{cell.key}"):
            return self._run_unless_done(cell, device)

    def _run_unless_done(self, cell: Cell, device: torch.device) -> dict:
        record = self.store.read_record(cell.key)
        if record is not None and record.get("status") == "ok":
            return record
        return self._run_and_record(cell, device)

    def _run_and_record(self, cell: Cell, device: torch.device) -> dict:
        timer = StageTimer(device)
        record = self._header(cell, device)
        try:
            record["numerics"] = numerics_flags.configure(self.loaded.suite.run.deterministic,
                                                          cell.seed)
            self._run(cell, device, timer, record)
            record["status"] = "failed" if record["metric_errors"] else "ok"
            if record["metric_errors"]:
                record["error"] = {"type": "MetricError", "message": "; ".join(
                    f"{k}: {v['message']}" for k, v in record["metric_errors"].items())}
        except Exception as exc:  # a failing cell is recorded and the suite goes on
            record["status"] = "failed"
            record["error"] = faults.describe(exc, device)
        if record["status"] == "failed":
            faults.release_memory(device)  # e.g. after an OOM: the next cell gets a clean GPU
        record["costs"] = timer.as_dict()
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.store.write_record(cell.key, record)
        return record

    def _run(self, cell: Cell, device: torch.device, timer: StageTimer, record: dict) -> None:
        ev = self.evaluation(cell)
        spec = self.sampler_spec(cell)
        with timer.stage("load"):
            adapter = self.adapter(cell.model)
            fp_model = adapter.load(device)
            faults.check_model_finite(fp_model, f"the weights of model {cell.model!r}")
        record["model_identity"] = adapter.identity()
        model = fp_model
        if not cell.is_fp:
            with self.store.lock(f"quant-{cell.quant_key}"):  # one builder per quantized model
                model = self._quantize(cell, adapter, fp_model, spec, device, timer, record)
        execution = Execution.from_options(ev.execution, ev.execution_options)
        numerics = record.setdefault("numerics", {})  # flags set by run(), plus what sampling ran
        numerics["execution"] = execution.resolved(device, not cell.is_fp).record()
        with timer.stage("sample"):
            samples = generate(adapter, model, spec, ev.num_samples, cell.seed, ev.batch_size,
                               device, self.store, cell.gen_key, self.reporter,
                               label=f"sampling {cell.method} {cell.bits}",
                               execution=execution, quantized=not cell.is_fp, numerics=numerics)
        if self.store.shard_reports(cell.gen_key):  # sampled by shard tasks (sample_shards)
            record["sample_shards"] = self.store.shard_reports(cell.gen_key)
        record["sampling"] = sampling_cost(timer, "sample", ev.num_samples, spec.steps, numerics)
        if isinstance(record.get("coverage"), dict) and "int8_layers" in numerics.get("manifest", {}):
            # what ran on int8 kernels and what stayed in (simulated) floating point
            record["coverage"]["execution"] = numerics["manifest"]
        if not cell.is_fp and numerics["execution"]["mode"] == "int8":
            with timer.stage("int8_check"):
                numerics["int8_check"] = int8_check(adapter, model, spec, cell.seed,
                                                    ev.batch_size, device, execution)
        fp_samples = samples if cell.is_fp else self._fp_samples(cell, adapter, fp_model, spec,
                                                                 device, timer)
        if not cell.is_fp:
            with timer.stage("trajectory_error"):
                record["trajectory_error"] = self._trajectory_error(cell, adapter, fp_model,
                                                                    model, spec, device)
        del model
        with timer.stage("metrics"):
            self._metrics(cell, samples, fp_samples, device, record)

    def _trajectory_error(self, cell, adapter, fp_model, model, spec, device) -> dict:
        """Per-step FP-vs-quantized error on the first paired seeds (a diagnostic: if it fails,
        the record says why and the cell's metrics still count)."""
        from .trajectory_error import TRAJECTORY_ERROR_SAMPLES, trajectory_error

        ev = self.loaded.suite.evaluation
        n = min(TRAJECTORY_ERROR_SAMPLES, ev.num_samples, ev.batch_size)
        try:
            return trajectory_error(adapter, fp_model, model, spec, cell.seed, n, device)
        except Exception as exc:
            return {"unavailable": f"{type(exc).__name__}: {exc}"}

    def _fp_samples(self, cell, adapter, fp_model, spec, device, timer) -> np.ndarray:
        ev = self.evaluation(cell)
        fp = self.store.load_samples(cell.fp_gen_key, ev.num_samples)
        if fp is None:
            # The FP cell is running in another worker (generate() waits for its lock, then
            # finds every shard), or it is not in this run: then this cell samples them.
            self.log(f"waiting for or generating the FP samples that {cell.title()} is paired with")
            with timer.stage("sample_fp"):
                fp = generate(adapter, fp_model, spec, ev.num_samples, cell.seed, ev.batch_size,
                              device, self.store, cell.fp_gen_key, self.reporter,
                              label="sampling fp (reference)",
                              execution=Execution.from_options(ev.execution,
                                                               ev.execution_options))
        return fp

    def _quantize(self, cell, adapter, fp_model, spec, device, timer, record):
        from ..calib.trajectories import get_trajectories
        from ..quant import (QuantRecipe, calibrate_activation_ranges, load_quantized,
                             quantize_model, save_quantized)

        m = cell.resolved
        bits = cell.bits
        recipe_options = dict(m.recipe)
        if recipe_options.get("act_params") == "per_step":
            # per-timestep activation parameters: one set per step of this cell's sampler
            recipe_options.setdefault("sampler_steps", spec.steps)
        recipe = QuantRecipe.from_options(bits=bits, **recipe_options)
        work = self.store.work_dir(cell.quant_key)
        saved = work / "qmodel.pt"
        if saved.exists():  # an earlier run finished calibration: reuse it
            with timer.stage("load_quantized"):
                qmodel = load_quantized(fp_model, recipe, adapter, saved)
            info = _read_json(work / "quantization.json")
            record.update(coverage=info.get("coverage"), reconstruction=info.get("reconstruction"),
                          weighting_state=info.get("weighting_state"),
                          calibration=info.get("calibration"))
            record["costs_calibration_reused"] = info.get("costs")
            return qmodel

        calib_timer = StageTimer(device)
        gen = torch.Generator().manual_seed(cell.seed)
        ctx = RunContext(device=device, seed=cell.seed, work_dir=work, cache_dir=self.cache_dir,
                         options={}, progress=self.reporter)
        selector = self.registry.create("selectors", m.selector, m.selector_options)
        weighting = self.registry.create("weightings", m.weighting, m.weighting_options)
        reconstructor = self.registry.create("reconstructors", m.reconstructor,
                                             m.reconstructor_options)
        batch = m.calibration_batch_size or self.evaluation(cell).batch_size
        traj_options = selector.trajectory_options(spec.steps)
        if m.calibration_trajectories:
            traj_options["num_samples"] = m.calibration_trajectories
        with calib_timer.stage("trajectories"):
            traj = get_trajectories(adapter, fp_model, spec, seed=cell.seed,
                                    cache_dir=self.cache_dir, device=device, batch_size=batch,
                                    progress=self.reporter, **traj_options)
        with calib_timer.stage("select"):
            calib, val = selector.select(traj, gen, ctx)
            if not getattr(weighting, "needs_validation", False):
                val = None  # nobody reads it: do not cache its block inputs
        del traj
        with calib_timer.stage("quantize"):
            qmodel, manifest = quantize_model(fp_model, recipe, adapter)
            calibrate_activation_ranges(qmodel, adapter, calib, batch, device)
        with calib_timer.stage("reconstruct"):
            weighting.prepare(calib, val, ctx)
            recon = reconstructor.reconstruct(fp_model, qmodel, adapter, calib, val, weighting, ctx)
            faults.check_reconstruction_finite(qmodel, recon)
        calibration = {"num_calibration": len(calib), "num_validation": len(val) if val is not None else 0,
                       "trajectories": traj_options["num_samples"],
                       "steps_used": sorted(set(int(s) for s in calib.step.tolist()))}
        info = {"coverage": manifest, "reconstruction": recon, "weighting_state": weighting.state(),
                "calibration": calibration, "costs": calib_timer.as_dict()}
        save_quantized(qmodel, saved)
        atomic_write_json(work / "quantization.json", info)
        record.update(coverage=manifest, reconstruction=recon, weighting_state=info["weighting_state"],
                      calibration=calibration)
        for k, v in calib_timer.seconds.items():
            timer.seconds[k] = v
        timer.peak_gpu_mb.update(calib_timer.peak_gpu_mb)
        timer.peak_host_mb.update(calib_timer.peak_host_mb)
        return qmodel

    def _metrics(self, cell, samples: np.ndarray, fp_samples: np.ndarray, device, record) -> None:
        ev = self.evaluation(cell)
        ctx = MetricContext(fp_samples=torch.from_numpy(fp_samples), is_reference_cell=cell.is_fp,
                            cache_dir=self.cache_dir, device=device, seed=cell.seed,
                            base_dir=self.loaded.file.parent)
        images = torch.from_numpy(samples)
        identities = {}
        for name in ev.metrics:
            try:
                metric = self.registry.create("metrics", name, ev.metric_options.get(name, {}))
                record["metrics"].update(metric.compute(images, ctx))
                identities[name] = metric.identity()
            except Exception as exc:
                record["metric_errors"][name] = {"type": type(exc).__name__, "message": str(exc),
                                                 "traceback": traceback.format_exc()}
        record["metric_identity"] = identities
        record["num_samples"] = int(samples.shape[0])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
