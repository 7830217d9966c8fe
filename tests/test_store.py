"""Atomic records and resumable sample shards."""
import json
import os

import numpy as np
import pytest

from ptqbench.pipeline.generate import missing_chunks
from ptqbench.store import Store, atomic_write_json


def test_atomic_write_leaves_no_temp_and_keeps_old_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "r" / "a.json"
    atomic_write_json(path, {"v": 1})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}  # the old record survives intact
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temp file left behind


def test_shards_roundtrip_and_resume(tmp_path):
    store = Store(tmp_path)
    data = np.random.default_rng(0).integers(0, 255, (10, 1, 4, 4), dtype=np.uint8)
    store.write_shard("g", 0, data[:4])
    assert store.load_samples("g", 10) is None  # incomplete
    assert [list(r) for r in missing_chunks(store.shard_starts("g"), 10, 4)] == [[4, 5, 6, 7], [8, 9]]
    store.write_shard("g", 4, data[4:8])
    # batch size changed between runs: still only the gap is produced
    assert [list(r) for r in missing_chunks(store.shard_starts("g"), 10, 3)] == [[8, 9]]
    store.write_shard("g", 8, data[8:])
    np.testing.assert_array_equal(store.load_samples("g", 10), data)


def test_records_roundtrip(tmp_path):
    store = Store(tmp_path)
    store.write_record("k1", {"status": "ok", "x": np.float32(1.5)})
    assert store.read_record("k1") == {"status": "ok", "x": 1.5}
    assert store.read_record("missing") is None
    assert len(list(store.records())) == 1
