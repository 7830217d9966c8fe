"""Sampling a model into sharded uint8 arrays, resumable shard by shard."""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch

from ..interfaces import ModelAdapter
from ..quant.fast import Execution, make_denoiser
from ..sampling import SamplerSpec
from ..store import Store


def generate(adapter: ModelAdapter, model: torch.nn.Module, spec: SamplerSpec, num_samples: int,
             seed: int, batch_size: int, device: torch.device, store: Store, gen_key: str,
             reporter=None, label: str = "sampling", execution: Optional[Execution] = None,
             quantized: bool = False, numerics: Optional[dict] = None) -> np.ndarray:
    """Sample indices 0..num_samples-1 (sample i from seed (seed, i)); finished shards are kept,
    so a killed run resumes where it stopped. Returns all samples, uint8 (N, C, H, W).

    Workers that need the same samples (a sharded cell, a quantized cell waiting for its FP
    pairs) share the work chunk by chunk: see :func:`generate_range`. ``execution`` (default:
    the reference path) says how the denoiser runs; what ran (resolved settings, execution
    manifest) is written into ``numerics`` when given.
    """
    generate_range(adapter, model, spec, range(num_samples), seed, batch_size, device, store,
                   gen_key, reporter, label, execution, quantized, numerics)
    samples = store.load_samples(gen_key, num_samples)
    assert samples is not None, "all shards were just written"
    return samples


def generate_range(adapter: ModelAdapter, model: torch.nn.Module, spec: SamplerSpec,
                   indices: range, seed: int, batch_size: int, device: torch.device, store: Store,
                   gen_key: str, reporter=None, label: str = "sampling",
                   execution: Optional[Execution] = None, quantized: bool = False,
                   numerics: Optional[dict] = None) -> None:
    """Write every missing shard of the sample indices ``indices`` (a shard of a cell's samples).

    Each chunk of at most ``batch_size`` samples has its own lock: a chunk another worker is
    sampling is skipped and, once every free chunk is done, waited for (and sampled here if its
    holder died). So parallel workers never sample a chunk twice and this returns only when the
    whole range exists. A range that starts on a multiple of ``batch_size`` is cut into the same
    chunks as the whole run, so its samples are bit-identical to an unsharded run's.
    """
    todo = missing_chunks(store.shard_starts(gen_key), indices.stop, batch_size,
                          start=indices.start)
    if not todo:
        return
    # the adapter owns the loop: conditioning, guidance and the sampler kind are its business;
    # the denoiser call (reference, or the fast path: folded weights, compiled / graphed) is ours
    sampler = adapter.make_sampler(spec)
    ex = execution or Execution("reference")
    denoise, info = make_denoiser(adapter, model, ex, device, quantized)
    if numerics is not None:
        numerics.update(info)

    def sample_chunk(idx: range) -> None:
        if store.has_shard(gen_key, idx):
            return  # another worker finished it since we listed the missing chunks
        with torch.inference_mode():
            x0 = adapter.run_sampler(denoise, spec, idx, seed, device, sampler=sampler)
            images = adapter.decode(x0).cpu().numpy()
        store.write_shard(gen_key, idx.start, images)

    bar = (reporter.task(label, total=len(indices)) if reporter
           else contextlib.nullcontext(lambda n=1, description=None: None))
    with bar as advance:
        advance(len(indices) - sum(len(idx) for idx in todo))  # shards of an earlier run
        busy = []
        for idx in todo:
            with store.lock(f"{gen_key}.{idx.start}", blocking=False) as held:
                if held:
                    sample_chunk(idx)
                    advance(len(idx))
                else:
                    busy.append(idx)
        for idx in busy:  # chunks other workers were sampling: wait for them
            with store.lock(f"{gen_key}.{idx.start}"):
                sample_chunk(idx)
            advance(len(idx))


def missing_chunks(done: dict[int, int], num_samples: int, batch_size: int,
                   start: int = 0) -> list[range]:
    """Index ranges in ``start..num_samples-1`` (at most ``batch_size`` long) not covered by
    finished shards; works even when the batch size changed between runs."""
    covered = np.zeros(num_samples, dtype=bool)
    for first, n in done.items():
        covered[first:first + n] = True
    chunks, i = [], start
    while i < num_samples:
        if covered[i]:
            i += 1
            continue
        j = i
        while j < num_samples and not covered[j] and j - i < batch_size:
            j += 1
        chunks.append(range(i, j))
        i = j
    return chunks
