"""Bounded memory: the block-cache store's tiers (device, host, memory-mapped files) and the
per-stage host peak."""
import torch

from ptqbench import memory
from ptqbench.quant.block_cache import TensorStore


def test_tensor_store_spills_to_memory_mapped_files_over_the_budget(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 3, 4, generator=g)
    b = torch.randn(12, 3, 4, generator=g)
    budget = a.numel() * 4 + 16  # room for a, not for b as well
    store = TensorStore(torch.device("cpu"), host_budget=budget, spill_dir=str(tmp_path))
    ta = store.put([a[:4], a[4:]])
    tb = store.put([b[:5], b[5:]])
    assert store.bytes_device == a.numel() * 4 and store.bytes_mapped == b.numel() * 4
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].stat().st_size == b.numel() * 4
    idx = torch.tensor([7, 0, 7, 3, 11])  # unsorted, repeated: the caller's order is kept
    assert torch.equal(store.gather(ta, idx[idx < 10]), a[idx[idx < 10]])
    assert torch.equal(store.gather(tb, idx), b[idx])
    assert store.stats()["peak_bytes"]["mapped"] == b.numel() * 4
    store.release(tb)
    store.release(ta)
    assert store.bytes_mapped == 0 and store.bytes_device == 0
    assert not any(tmp_path.iterdir())  # the spill file is gone once released


def test_host_peak_is_per_stage():
    assert memory.host_available_bytes() > 0
    memory.reset_host_peak()
    base = memory.host_peak_mb()
    # a fresh anonymous mapping, touched: always new resident pages (a bytearray may reuse
    # pages the allocator kept resident from earlier tests, leaving the RSS where it was)
    import mmap

    block = mmap.mmap(-1, 64 * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    grown = memory.host_peak_mb()
    assert grown >= base + 48
    block.close()
    if memory.reset_host_peak():  # Linux: a new window starts below the old peak
        assert memory.host_peak_mb() < grown - 32
