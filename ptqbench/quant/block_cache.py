"""Block inputs and outputs for reconstruction, produced block by block without re-running blocks.

A diffusion UNet is not a chain: up blocks read skip tensors produced long before, every ResNet
reads the time embedding. So the cache works on the real data flow:

1. *Discovery* (one forward of a 3-sample batch): every unit's forward is wrapped; its output is
   re-emitted as a fresh autograd leaf. Walking the autograd graph of each unit's captured inputs
   finds exactly which earlier units' outputs they depend on (their producers), which gives the
   liveness of every cached output. Inputs that depend on no unit (x, the sinusoidal timestep
   projection) are computed from the network inputs.
2. *Replay* for unit b: the model is run with every earlier unit replaced by a lookup of its
   cached output (or zeros when b does not depend on it) and stops when unit b is called, so
   only the cheap glue between units runs (concatenations, the time projection, the final
   norm) - never the network prefix. Two streams are kept: FP (on the FP model, giving the
   FP targets) and quantized (on the quantized model, reconstructed units' outputs).
3. After unit b is done, its output on each stream is computed by forwarding its own cached
   inputs and kept only while a later unit depends on it.

Tensors stay on the accelerator when they fit (``on_device='auto'``), else in pinned host memory,
and beyond a host budget in memory-mapped files (:class:`TensorStore`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import PtqbenchError
from ..interfaces import CalibSet
from .context import sampler_step

DISCOVERY_BATCH = 3  # odd, so batch dims are not confused with other dims of size 2


# --------------------------------------------------------------------------------------------
# nested args <-> flat tensor lists
# --------------------------------------------------------------------------------------------
def flatten(obj) -> tuple[list, Any]:
    """Tensors of a nested (tuple/list/dict) structure, and a spec to rebuild it."""
    leaves: list = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            leaves.append(o)
            return ("T", len(leaves) - 1)
        if isinstance(o, (tuple, list)):
            return ("L" if isinstance(o, list) else "U", [walk(v) for v in o])
        if isinstance(o, dict):
            return ("D", {k: walk(v) for k, v in o.items()})
        return ("C", o)

    return leaves, walk(obj)


def unflatten(spec, leaves):
    tag, val = spec
    if tag == "T":
        return leaves[val]
    if tag in ("L", "U"):
        items = [unflatten(s, leaves) for s in val]
        return items if tag == "L" else tuple(items)
    if tag == "D":
        return {k: unflatten(s, leaves) for k, s in val.items()}
    return val


class BlockInputs(tuple):
    """Tuple of a unit's batched input tensors; ``step`` (sampler steps of the samples) lets the
    quantized unit pick per-step activation parameters when called through ``BlockContext``."""

    step: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, tensors, step):
        obj = cls(tensors)
        obj.step = step
        return obj


def canonical_device(device) -> torch.device:
    """torch.device('cuda') -> 'cuda:<current>', so that device equality checks hold."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


# --------------------------------------------------------------------------------------------
# storage
# --------------------------------------------------------------------------------------------
class TensorStore:
    """(N, ...) tensors gathered by sample index onto ``device``, in three tiers.

    1. the device, while the cache stays under ``reserve`` x the free device memory at the time
       of each put (``on_device``: 'auto'; True forces the device, False skips it; a float in
       (0, 1] is the fraction itself);
    2. pinned host memory (async copies), while host caches stay under ``host_budget`` bytes
       (default: half the host's available memory when the store is made);
    3. memory-mapped files under ``spill_dir`` (default: the system temp folder), deleted when
       released: a cache larger than host memory costs disk reads, not an out-of-memory kill.
    Batches are gathered on the host from the map (sorted reads, then the caller's order) and
    copied to the device through pinned memory.
    """

    def __init__(self, device: torch.device, on_device: Any = "auto", reserve: float = 0.5,
                 host_budget: Optional[int] = None, spill_dir: Optional[str] = None):
        self.device = canonical_device(device)
        self.on_device = on_device
        self.reserve = float(on_device) if isinstance(on_device, float) else reserve
        if host_budget is None:
            from ..memory import host_available_bytes
            host_budget = host_available_bytes() // 2 or (1 << 62)
        self.host_budget = int(host_budget)
        self.spill_dir = spill_dir
        self.bytes_device = 0
        self.bytes_host = 0
        self.bytes_mapped = 0
        self.peak_bytes = 0
        self.peak = {"device": 0, "host": 0, "mapped": 0}
        self._files: dict[int, str] = {}  # data_ptr of a mapped tensor -> its file

    def _fits(self, nbytes: int) -> bool:
        if self.device.type != "cuda":
            return True
        if self.on_device is True:
            return True
        if self.on_device is False:
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        return nbytes < free * self.reserve

    def _map(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        import os
        import tempfile

        import numpy as np

        n = sum(c.shape[0] for c in chunks)
        shape = (n,) + tuple(chunks[0].shape[1:])
        dtype = chunks[0].dtype
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        fd, path = tempfile.mkstemp(prefix="ptqbench-cache-", suffix=".bin", dir=self.spill_dir)
        os.close(fd)
        mm = np.memmap(path, dtype=np_dtype, mode="w+", shape=shape)
        t = torch.from_numpy(mm)
        row = 0
        for c in chunks:  # chunk by chunk: the whole tensor is never in memory at once
            t[row:row + c.shape[0]].copy_(c)
            row += c.shape[0]
        mm.flush()
        self._files[t.data_ptr()] = path
        return t

    def put(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        nbytes = sum(c.numel() * c.element_size() for c in chunks)
        cpu = self.device.type == "cpu"
        if (self._fits(nbytes) if not cpu
                else self.bytes_device + nbytes <= self.host_budget):
            t = torch.cat([c.to(self.device) for c in chunks])
            self.bytes_device += nbytes
        elif not cpu and self.bytes_host + nbytes <= self.host_budget:
            t = torch.cat([c.cpu() for c in chunks])
            t = t.pin_memory() if self.device.type == "cuda" else t
            self.bytes_host += nbytes
        else:
            t = self._map(chunks)
            self.bytes_mapped += nbytes
        self.peak_bytes = max(self.peak_bytes,
                              self.bytes_device + self.bytes_host + self.bytes_mapped)
        for tier in self.peak:
            self.peak[tier] = max(self.peak[tier], getattr(self, f"bytes_{tier}"))
        return t

    def release(self, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        path = self._files.pop(t.data_ptr(), None)
        if path is not None:
            import os

            self.bytes_mapped -= nbytes
            try:
                os.unlink(path)  # the map stays readable until the tensor is gone
            except OSError:
                pass
        elif t.device == self.device:
            self.bytes_device -= nbytes
        else:
            self.bytes_host -= nbytes

    def gather(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if t.device == self.device:
            return t.index_select(0, idx.to(t.device, non_blocking=True))
        idx = idx.cpu()
        if t.data_ptr() in self._files:
            # read the pages in file order, then put the rows in the caller's order
            order, inverse = torch.unique(idx, sorted=True, return_inverse=True)
            rows = t.index_select(0, order).index_select(0, inverse)
            if self.device.type == "cuda":
                rows = rows.pin_memory()
            return rows.to(self.device, non_blocking=True)
        return t.index_select(0, idx).to(self.device, non_blocking=True)

    def stats(self) -> dict:
        return {"bytes": {"device": self.bytes_device, "host": self.bytes_host,
                          "mapped": self.bytes_mapped},
                "peak_bytes": dict(self.peak), "host_budget": self.host_budget}


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------
@dataclass
class UnitIO:
    """What discovery learned about one unit."""

    name: str
    order: int
    spec: Any  # structure of (args, kwargs) with tensors as leaf indices
    batched: list[bool]  # per input leaf: has the batch dimension
    consts: dict[int, Any]  # non-batched tensor leaves (used as they are)
    producers: set[int]  # indices (in call order) of units whose outputs feed this unit
    out_shape: tuple  # per-sample shape of the output
    out_dtype: torch.dtype = torch.float32
    last_use: int = -1  # last unit that reads this unit's output


class _Stop(Exception):
    def __init__(self, args, kwargs):
        super().__init__("captured")
        self.args, self.kwargs = args, kwargs


def _producers(tensor: torch.Tensor, leaf_owner: dict[int, int]) -> set[int]:
    if not tensor.requires_grad:
        return set()
    if tensor.grad_fn is None:
        return {leaf_owner[id(tensor)]} if id(tensor) in leaf_owner else set()
    out, seen, stack = set(), set(), [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and id(var) in leaf_owner:
            out.add(leaf_owner[id(var)])
        stack.extend(n for n, _ in fn.next_functions)
    return out


class _Patched:
    """Temporarily replaces ``forward`` of module instances (never the model's code)."""

    def __init__(self, patches: dict[nn.Module, Callable]):
        self.patches = patches

    def __enter__(self):
        for m, fn in self.patches.items():
            m.forward = fn
        return self

    def __exit__(self, *exc):
        for m in self.patches:
            if "forward" in m.__dict__:
                del m.forward
        return False


def discover(model: nn.Module, units: dict[str, nn.Module],
             run: Callable[[nn.Module, CalibSet], Any], calib: CalibSet,
             device) -> list[UnitIO]:
    """Call order, input structure and producers of every unit (see module docstring)."""
    n = min(DISCOVERY_BATCH, len(calib))
    batch = calib.subset(torch.arange(n)).to(device)
    calls: list[tuple[str, Any, Any, torch.Tensor]] = []
    leaf_owner: dict[int, int] = {}
    keep_alive = []

    def make(name, module):
        orig = module.forward

        def fwd(*args, **kwargs):
            if any(c[0] == name for c in calls):
                raise PtqbenchError(f"reconstruction unit {name} is called twice in one forward; "
                                    "units must be distinct modules called once")
            out = orig(*args, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise PtqbenchError(f"reconstruction unit {name} returns {type(out).__name__}; "
                                    "units must return one tensor")
            leaf = out.detach().requires_grad_(True)
            leaf_owner[id(leaf)] = len(calls)
            keep_alive.append(leaf)
            calls.append((name, args, kwargs, leaf))
            return leaf
        return fwd

    with torch.enable_grad(), _Patched({m: make(nm, m) for nm, m in units.items()}):
        run(model, batch)
    infos = []
    for order, (name, args, kwargs, out) in enumerate(calls):
        leaves, spec = flatten((args, kwargs))
        batched = [t.dim() > 0 and t.shape[0] == n for t in leaves]
        producers = set()
        for t, b in zip(leaves, batched):
            producers |= _producers(t, leaf_owner)
        consts = {i: t.detach() for i, (t, b) in enumerate(zip(leaves, batched)) if not b}
        infos.append(UnitIO(name, order, spec, batched, consts, producers,
                            tuple(out.shape[1:]), out.dtype))
    for info in infos:
        for p in info.producers:
            infos[p].last_use = max(infos[p].last_use, info.order)
    return infos


# --------------------------------------------------------------------------------------------
# the cache of one data set (calibration or validation) on one stream
# --------------------------------------------------------------------------------------------
@dataclass
class StreamCache:
    """Outputs (kept while live) of one stream (FP or quantized) over one data set."""

    outputs: dict[int, torch.Tensor] = field(default_factory=dict)


class BlockCache:
    """Inputs/targets of the current unit for a data set, on the FP and quantized streams."""

    def __init__(self, infos: list[UnitIO], data: CalibSet, store: TensorStore,
                 batch_size: int, run: Callable[[nn.Module, CalibSet], Any],
                 streams: tuple[str, ...] = ("fp", "q")):
        self.infos, self.data, self.store = infos, data, store
        self.batch_size, self.run = batch_size, run
        self.streams = {s: StreamCache() for s in streams}
        self.inputs: dict[str, list[Optional[torch.Tensor]]] = {}
        self.consts: dict[int, Any] = {}
        self.step = data.step.to(store.device)
        self.t = data.t.to(store.device)

    def __len__(self):
        return len(self.data)

    def _batches(self):
        n = len(self.data)
        for s in range(0, n, self.batch_size):
            idx = torch.arange(s, min(n, s + self.batch_size))
            yield idx, self.data.subset(idx).to(self.store.device)

    # ---- replay -------------------------------------------------------------------------
    @torch.no_grad()
    def capture_inputs(self, b: int, stream: str, model: nn.Module,
                       units: dict[str, nn.Module]) -> None:
        """Unit b's inputs on ``stream`` for the whole data set, by glue-only replay."""
        info = self.infos[b]
        outs = self.streams[stream].outputs
        dev = self.store.device
        chunks: list[list[torch.Tensor]] = [[] for _ in info.batched]
        consts = {}
        for idx, batch in self._batches():
            patches = {}
            for j in range(b):
                uj = self.infos[j]
                module = units[uj.name]
                if j in outs:
                    patches[module] = (lambda *a, _t=outs[j], _i=idx, **k:
                                       self.store.gather(_t, _i.to(dev)))
                else:  # b does not depend on it: any tensor of the right shape will do
                    patches[module] = (lambda *a, _u=uj, _n=len(idx), **k:
                                       torch.zeros((_n,) + _u.out_shape, dtype=_u.out_dtype,
                                                   device=dev))

            def stop(*args, **kwargs):
                raise _Stop(args, kwargs)
            patches[units[info.name]] = stop
            try:
                with _Patched(patches):
                    self.run(model, batch)
            except _Stop as cap:
                leaves, _ = flatten((cap.args, cap.kwargs))
            else:
                raise PtqbenchError(f"unit {info.name} was not called during replay")
            for i, (t, is_b) in enumerate(zip(leaves, info.batched)):
                if is_b:
                    chunks[i].append(t.detach())
                elif i not in consts:
                    consts[i] = t.detach()
        self.consts = consts
        self.inputs[stream] = [self.store.put(c) if c else None for c in chunks]

    def drop_inputs(self) -> None:
        for ts in self.inputs.values():
            for t in ts:
                if t is not None:
                    self.store.release(t)
        self.inputs = {}

    # ---- access -------------------------------------------------------------------------
    def input_leaves(self, stream: str, idx: torch.Tensor) -> list[torch.Tensor]:
        return [self.store.gather(t, idx) for t in self.inputs[stream] if t is not None]

    def call_args(self, b: int, leaves: list[torch.Tensor]):
        """(args, kwargs) of unit b from its batched leaves (in order) and its constants."""
        info = self.infos[b]
        it = iter(leaves)
        full = [next(it) if is_b else self.consts[i] for i, is_b in enumerate(info.batched)]
        return unflatten(info.spec, full)

    def block_inputs(self, stream: str, idx: torch.Tensor) -> BlockInputs:
        return BlockInputs.of(self.input_leaves(stream, idx), self.step[idx.to(self.step.device)])

    # ---- outputs ------------------------------------------------------------------------
    @torch.no_grad()
    def compute_outputs(self, b: int, stream: str, module: nn.Module,
                        keep: bool = True) -> torch.Tensor:
        """Forward unit b on its cached ``stream`` inputs; store as that stream's output."""
        chunks = []
        n = len(self.data)
        for s in range(0, n, self.batch_size):
            idx = torch.arange(s, min(n, s + self.batch_size), device=self.store.device)
            args, kwargs = self.call_args(b, self.input_leaves(stream, idx))
            with sampler_step(self.step[idx]):
                chunks.append(module(*args, **kwargs).detach())
        out = self.store.put(chunks)
        if keep:
            self.streams[stream].outputs[b] = out
        return out

    def set_output(self, b: int, stream: str, t: torch.Tensor) -> None:
        self.streams[stream].outputs[b] = t

    def free_dead(self, b: int) -> None:
        """Drop outputs no unit after b reads."""
        for sc in self.streams.values():
            for j in [j for j in sc.outputs if self.infos[j].last_use <= b]:
                self.store.release(sc.outputs.pop(j))

    def gather(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.store.gather(t, idx)
