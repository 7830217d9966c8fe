"""Sampling a model into sharded uint8 arrays, resumable shard by shard."""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch

from ..interfaces import ModelAdapter
from ..quant.fast import Execution, make_denoiser
from ..sampling import DDIMSampler, SamplerSpec
from ..store import Store


def generate(adapter: ModelAdapter, model: torch.nn.Module, spec: SamplerSpec, num_samples: int,
             seed: int, batch_size: int, device: torch.device, store: Store, gen_key: str,
             reporter=None, label: str = "sampling", execution: Optional[Execution] = None,
             quantized: bool = False, numerics: Optional[dict] = None) -> np.ndarray:
    """Sample indices 0..num_samples-1 (sample i from seed (seed, i)); finished shards are kept,
    so a killed run resumes where it stopped. Returns all samples, uint8 (N, C, H, W).

    Holds the store's lock on ``gen_key`` while sampling: a parallel worker that needs the same
    samples (a quantized cell waiting for its FP pairs) waits for them instead of sampling twice.
    
    ``execution`` (default: the reference path) says how the denoiser runs; what ran (resolved
    settings, execution manifest) is written into ``numerics`` when given.
    """
    with store.lock(gen_key):
        _generate_missing(adapter, model, spec, num_samples, seed, batch_size, device, store,
                          gen_key, reporter, label, execution, quantized, numerics)
    samples = store.load_samples(gen_key, num_samples)
    assert samples is not None, "all shards were just written"
    return samples


def _generate_missing(adapter, model, spec, num_samples, seed, batch_size, device, store,
                      gen_key, reporter, label, execution, quantized, numerics) -> None:
    todo = missing_chunks(store.shard_starts(gen_key), num_samples, batch_size)
    if not todo:
        return
    sampler = DDIMSampler(spec, adapter.scheduler_config)
    # per-timestep activation parameters (TFMQ-style) select their set by the step index k
    denoise, info = make_denoiser(adapter, model, execution or Execution("reference"), device,
                                  quantized)
    if numerics is not None:
        numerics.update(info)

    bar = (reporter.task(label, total=num_samples) if reporter
           else contextlib.nullcontext(lambda n=1, description=None: None))
    with bar as advance:
        advance(num_samples - sum(len(idx) for idx in todo))  # shards of an earlier run
        for idx in todo:
            with torch.inference_mode():
                x0 = sampler.run(denoise, adapter.sample_shape, idx, seed, device)
                images = adapter.decode(x0).cpu().numpy()
            store.write_shard(gen_key, idx.start, images)
            advance(len(idx))


def missing_chunks(done: dict[int, int], num_samples: int, batch_size: int) -> list[range]:
    """Index ranges (at most ``batch_size`` long) not covered by finished shards; works even
    when the batch size changed between runs."""
    covered = np.zeros(num_samples, dtype=bool)
    for start, n in done.items():
        covered[start:start + n] = True
    chunks, i = [], 0
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
