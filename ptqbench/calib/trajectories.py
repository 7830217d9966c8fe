"""The FP trajectory store: record x_t / t / conditioning at every sampler step once, reuse forever.

A store is a folder ``<cache_dir>/trajectories/<family>/n<count>/``: ``family`` is the SHA-256
of everything that determines the contents except the count (adapter identity, sampler spec,
seed, index offset, feature options; see :func:`trajectory_key`). It holds

- ``x.npy``         float32 (num_steps, num_samples, C, H, W): the denoiser *input* at each step,
- ``t.npy``         int64 (num_steps,): the timestep that exact input was fed with,
- ``cond.npy``      (num_samples, ...) conditioning of each entry, only when the adapter has any,
- ``features.npy``  float32 (num_steps, feature_samples, ...): feature-site outputs, when asked,
- ``manifest.json`` the key, shapes, and the SHA-256 of every file (written last).

Conditional models: the store's "samples" are *denoiser inputs* (entries). Under classifier-free
guidance the denoiser sees every x_t twice, with the condition and with the null condition, and
both passes are calibration data: entry j holds pass ``j % P`` of trajectory ``j // P``
(P = ``len(adapter.denoiser_passes(cond))``, recorded in the manifest as ``passes``). A store
of n entries therefore records ceil(n / P) trajectories, and the first n entries of any larger
store of the family are the same n.

Arrays are ``.npy`` so they can be memory-mapped: selectors gather a few thousand (step, sample)
pairs without reading the whole store. A recording is written into a ``.partial-*`` folder and
renamed into place only when complete, so a killed recording never leaves a store that looks
finished; a lock file makes concurrent workers wait for one recording instead of duplicating it.

Calibration trajectories use sample indices starting at ``CALIB_INDEX_OFFSET`` (10**9): the
sampler derives each x_T from (seed, index), and evaluation samples use indices 0..N-1, so the
calibration data never contains an evaluation sample's starting noise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..errors import PtqbenchError
from ..interfaces import ModelAdapter, Trajectories
from ..locks import exclusive_lock
from ..sampling import SamplerSpec

FORMAT = "ptqbench-trajectories/1"
#: first sample index of calibration trajectories (evaluation samples use 0..N-1)
CALIB_INDEX_OFFSET = 10 ** 9
#: default number of trajectories whose feature maps are kept (EDA-DM measures TDAC on one
#: sampling batch; 64 keeps the store small for large mid-blocks)
DEFAULT_FEATURE_SAMPLES = 64


# ------------------------------------------------------------------------------------------
# keys and hashing
# ------------------------------------------------------------------------------------------
def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def trajectory_key(adapter: ModelAdapter, spec: SamplerSpec, num_samples: int, seed: int,
                   index_offset: int = CALIB_INDEX_OFFSET, with_features: bool = False,
                   feature_samples: int = DEFAULT_FEATURE_SAMPLES,
                   feature_module: Optional[str] = None) -> dict:
    """Everything that determines a store's contents (batch size and device do not: samples
    are seeded one by one, so they only change floating-point rounding)."""
    return {
        "format": FORMAT,
        "adapter": json.loads(_canonical(adapter.identity())),
        "sampler": dataclasses.asdict(spec),
        "num_samples": int(num_samples),
        "seed": int(seed),
        "index_offset": int(index_offset),
        "features": {"site": feature_module or "adapter.feature_site",
                     "samples": int(min(feature_samples, num_samples))}
        if with_features else None,
    }


def key_hash(key: dict) -> str:
    return hashlib.sha256(_canonical(key).encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------
def family_key(key: dict) -> dict:
    """The key without the sample count: stores of one family differ only in how many samples
    they hold, and sample i is the same in all of them (per-sample seeds)."""
    fam = dict(key)
    fam.pop("num_samples")
    return fam


def store_dir(cache_dir: Path, key: dict) -> Path:
    return (Path(cache_dir) / "trajectories" / key_hash(family_key(key))[:32]
            / f"n{key['num_samples']}")


def find_store(cache_dir: Path, key: dict) -> Optional[Path]:
    """The smallest complete store of the key's family with at least the key's sample count."""
    family = store_dir(cache_dir, key).parent
    if not family.is_dir():
        return None
    best = None
    for d in family.iterdir():
        if not (d.is_dir() and d.name.startswith("n") and d.name[1:].isdigit()):
            continue
        n = int(d.name[1:])
        if n >= key["num_samples"] and (best is None or n < best[0]) and is_complete(d):
            best = (n, d)
    return None if best is None else best[1]


def _prefix(traj: Trajectories, n: int) -> Trajectories:
    """The first n samples (a view of the memory map, nothing is read)."""
    if traj.num_samples == n:
        return traj
    return Trajectories(x=traj.x[:, :n], t=traj.t,
                        cond=None if traj.cond is None else traj.cond[:n],
                        features=traj.features)


def is_complete(path: Path) -> bool:
    """A store is complete when its manifest exists and every listed file has its size."""
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        info = json.loads(manifest.read_text())
        return all((Path(path) / name).is_file() and (Path(path) / name).stat().st_size == f["bytes"]
                   for name, f in info["files"].items())
    except (ValueError, KeyError, OSError):
        return False


def verify_store(path: Path) -> None:
    """Recompute every file's SHA-256 against the manifest; raise on any mismatch."""
    info = json.loads((Path(path) / "manifest.json").read_text())
    for name, f in info["files"].items():
        actual = file_sha256(Path(path) / name)
        if actual != f["sha256"]:
            raise PtqbenchError(f"trajectory store {path}: {name} is corrupt "
                                f"(sha256 {actual[:12]} != manifest {f['sha256'][:12]})")


def _mmap(path: Path) -> torch.Tensor:
    # Copy-on-write map: zero-copy and lazily read, yet writable, so torch does not warn and a
    # careless in-place edit can never reach the file.
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def load_trajectories(path: Path, verify: bool = False) -> Trajectories:
    """Open a complete store as memory-mapped CPU tensors."""
    path = Path(path)
    if not is_complete(path):
        raise PtqbenchError(f"{path} is not a complete trajectory store")
    if verify:
        verify_store(path)
    files = json.loads((path / "manifest.json").read_text())["files"]
    return Trajectories(
        x=_mmap(path / "x.npy"),
        t=torch.from_numpy(np.load(path / "t.npy")),
        cond=_mmap(path / "cond.npy") if "cond.npy" in files else None,
        features=_mmap(path / "features.npy") if "features.npy" in files else None,
    )


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------
# recording
# ------------------------------------------------------------------------------------------
def _report(progress, done: int, total: int, msg: str) -> None:
    if progress is None:
        return
    if hasattr(progress, "log"):
        progress.log(msg)
    elif callable(progress):
        progress(done, total)


def _site_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def denoiser_passes(adapter: ModelAdapter, seed: int, index: int = CALIB_INDEX_OFFSET) -> int:
    """How many denoiser inputs one trajectory step gives (2 under classifier-free guidance)."""
    cond = adapter.conditioning(torch.tensor([index]), seed)
    return len(adapter.denoiser_passes(cond))


def record_trajectories(adapter: ModelAdapter, fp_model: torch.nn.Module, spec: SamplerSpec,
                        num_samples: int, seed: int, out_dir: Path, device, batch_size: int,
                        index_offset: int = CALIB_INDEX_OFFSET, with_features: bool = False,
                        feature_samples: int = DEFAULT_FEATURE_SAMPLES,
                        progress=None, feature_module: Optional[str] = None,
                        host_budget: Optional[int] = None) -> dict:
    """Run the FP sampler and write the arrays into ``out_dir`` (no manifest). Returns info.

    Every step's denoiser input is captured in ``on_step`` *together with the timestep vector
    passed alongside it*, so x[k] and t[k] are paired by construction rather than by re-deriving
    the schedule (the off-by-one some codebases have).

    A batch's steps are buffered in (pinned) host memory and written once; when that buffer
    would exceed ``host_budget`` bytes (default: a quarter of the host's available memory) each
    step is written straight into the memory-mapped file instead.
    """
    device = torch.device(device)
    sampler = adapter.make_sampler(spec)
    S = len(sampler.timesteps)
    P = denoiser_passes(adapter, seed, index_offset)
    num_traj = -(-num_samples // P)
    shape = tuple(adapter.sample_shape)
    # features of the first trajectories (their conditional pass: the first rows of a batch)
    n_feat = min(feature_samples, num_traj) if with_features else 0
    x_mm = np.lib.format.open_memmap(out_dir / "x.npy", mode="w+", dtype=np.float32,
                                     shape=(S, num_samples, *shape))
    t_rec: Optional[torch.Tensor] = None
    cond_mm = None
    feat_mm = None
    site = None
    if with_features:
        site = (fp_model.get_submodule(feature_module) if feature_module
                else adapter.feature_site(fp_model))
    state: dict = {"k": 0, "feat_buf": None, "n_feat": 0}
    if host_budget is None:
        from ..memory import host_available_bytes
        host_budget = host_available_bytes() // 4 or (1 << 62)
    per_sample = S * int(np.prod(shape)) * 4

    def hook(_module, _inputs, output):
        if state["n_feat"] > 0:
            out = _site_output(output)[: state["n_feat"]].detach().float()
            if state["feat_buf"] is None:
                state["feat_buf"] = torch.empty((S, *out.shape), device=out.device)
            state["feat_buf"][state["k"]].copy_(out)

    handle = site.register_forward_hook(hook) if site is not None else None
    started = time.time()
    try:
        for start in range(0, num_traj, batch_size):
            stop = min(start + batch_size, num_traj)
            e0, e1 = start * P, min(stop * P, num_samples)  # the entries of these trajectories
            indices = list(range(index_offset + start, index_offset + stop))
            # On CUDA the steps stream into pinned host memory (async copies, no per-step sync),
            # so a batch's trajectories never have to fit on the device.
            direct = per_sample * (stop - start) > host_budget
            xbuf = None if direct else torch.empty((S, stop - start, *shape),
                                                   pin_memory=device.type == "cuda")
            tbuf = torch.empty((S, stop - start), dtype=torch.long, device=device)
            state["n_feat"] = max(0, min(stop, n_feat) - start)
            state["feat_buf"] = None
            cond = adapter.conditioning(torch.tensor(indices), seed)
            if cond is not None:
                cond = cond.to(device)
                # (B*P, ...): the passes of each trajectory next to each other
                entries_cond = torch.stack(adapter.denoiser_passes(cond), 1).flatten(0, 1)
                if cond_mm is None:
                    cond_mm = np.lib.format.open_memmap(
                        out_dir / "cond.npy", mode="w+",
                        dtype=np.dtype(str(cond.dtype).replace("torch.", "")),
                        shape=(num_samples, *cond.shape[1:]))

            def on_step(k, x_t, t_vec, _e0=e0, _e1=e1, _direct=direct):
                state["k"] = k
                if _direct:  # over the host budget: one synchronous write per step
                    xs = x_t.detach().float().cpu().numpy()
                    xs = xs if P == 1 else np.repeat(xs, P, axis=0)  # one entry per pass
                    x_mm[k, _e0:_e1] = xs[:_e1 - _e0]
                else:
                    xbuf[k].copy_(x_t, non_blocking=True)
                tbuf[k].copy_(t_vec)

            with torch.no_grad():
                adapter.sample(fp_model, spec, indices, seed, device, on_step=on_step,
                               sampler=sampler)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the async copies into xbuf have landed
            # One transfer per batch, not per step.
            tb = tbuf.cpu()
            if not bool((tb == tb[:, :1]).all()):
                raise PtqbenchError("sampler fed different timesteps to one batch; the store "
                                    "assumes one timestep per step")
            if t_rec is None:
                t_rec = tb[:, 0].clone()
            elif not torch.equal(t_rec, tb[:, 0]):
                raise PtqbenchError("sampler timesteps differ between batches")
            if not direct:
                xs = xbuf.numpy() if P == 1 else np.repeat(xbuf.numpy(), P, axis=1)
                x_mm[:, e0:e1] = xs[:, :e1 - e0]
            if cond_mm is not None:
                cond_mm[e0:e1] = entries_cond[:e1 - e0].cpu().numpy()
            if state["feat_buf"] is not None:
                fb = state["feat_buf"].cpu().numpy()
                if feat_mm is None:
                    feat_mm = np.lib.format.open_memmap(
                        out_dir / "features.npy", mode="w+", dtype=np.float32,
                        shape=(S, n_feat, *fb.shape[2:]))
                feat_mm[:, start:start + fb.shape[1]] = fb
            _report(progress, e1, num_samples,
                    f"trajectories: {e1}/{num_samples} samples ({time.time() - started:.0f} s)")
    finally:
        if handle is not None:
            handle.remove()
    if with_features and feat_mm is None:
        raise PtqbenchError(f"feature site of {adapter.name} produced no output while sampling")
    for mm in (x_mm, cond_mm, feat_mm):
        if mm is not None:
            mm.flush()
    del x_mm, cond_mm, feat_mm
    np.save(out_dir / "t.npy", t_rec.numpy().astype(np.int64))
    return {"num_steps": S, "seconds": time.time() - started, "passes": P,
            "sampler_timesteps": sampler.timesteps.tolist()}


def get_trajectories(adapter: ModelAdapter, fp_model: torch.nn.Module, sampler_spec: SamplerSpec,
                     num_samples: int, seed: int, cache_dir: Path, device, batch_size: int,
                     with_features: bool = False, progress=None, *,
                     feature_samples: int = DEFAULT_FEATURE_SAMPLES,
                     feature_module: Optional[str] = None,
                     index_offset: int = CALIB_INDEX_OFFSET,
                     verify: bool = False) -> Trajectories:
    """FP trajectories of ``num_samples`` calibration samples, from the store or recorded now.

    Cache hit: memory-maps the existing store (no sampling); a store of the same recording with
    *more* samples is a hit too (its first ``num_samples`` are exactly these). Miss: records into
    a partial folder, hashes every file into the manifest, and renames the folder into place.

    ``with_features`` also keeps, for the first ``feature_samples`` trajectories, the output of
    the feature site at every step (TDAC); the site is ``adapter.feature_site(model)`` or the
    submodule named ``feature_module`` (e.g. ``"mid_block.attentions.0"``).
    """
    if num_samples < 1:
        raise PtqbenchError(f"need at least one trajectory, got {num_samples}")
    if batch_size < 1:
        raise PtqbenchError(f"trajectory batch_size must be >= 1, got {batch_size}")
    if with_features and feature_module:
        try:
            fp_model.get_submodule(feature_module)
        except AttributeError as exc:
            raise PtqbenchError(f"feature site {feature_module!r} is not a submodule of the "
                                f"model") from exc
    key = trajectory_key(adapter, sampler_spec, num_samples, seed, index_offset, with_features,
                         feature_samples, feature_module)
    final = store_dir(cache_dir, key)
    found = find_store(cache_dir, key)
    if found is not None:
        return _prefix(load_trajectories(found, verify=verify), num_samples)
    with exclusive_lock(final.parent / f".{final.name}.lock"):
        found = find_store(cache_dir, key)  # another worker may have finished while we waited
        if found is not None:
            return _prefix(load_trajectories(found, verify=verify), num_samples)
        if final.exists():  # leftover of a different, broken write: never trust it
            shutil.rmtree(final)
        # Partial folders of this store belong to killed recordings: a live one would hold
        # the lock we now have.
        for stale in final.parent.glob(f".partial-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = final.parent / f".partial-{final.name}-{uuid.uuid4().hex[:8]}"
        partial.mkdir(parents=True)
        try:
            info = record_trajectories(adapter, fp_model, sampler_spec, num_samples, seed,
                                       partial, device, batch_size, index_offset, with_features,
                                       feature_samples, progress, feature_module)
            files = {}
            for f in sorted(partial.glob("*.npy")):
                files[f.name] = {"sha256": file_sha256(f), "bytes": f.stat().st_size}
            content = hashlib.sha256(_canonical(files).encode()).hexdigest()
            manifest = {
                "format": FORMAT, "key": key, "key_sha256": key_hash(key),
                "content_sha256": content, "num_steps": info["num_steps"],
                "num_samples": int(num_samples), "sample_shape": list(adapter.sample_shape),
                "timesteps": info["sampler_timesteps"], "passes": info["passes"],
                "files": files,
                "record_seconds": round(info["seconds"], 3), "batch_size": int(batch_size),
                "device": str(device), "torch": torch.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            atomic_write_text(partial / "manifest.json", json.dumps(manifest, indent=1))
            os.rename(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return load_trajectories(final)
