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


def test_a_killed_writer_leaves_a_temp_file_that_the_next_run_removes(tmp_path):
    """A writer killed between writing its temporary file and the rename leaves the file; the
    sweep at the start of a run removes it when its process is dead, and never a live
    process's or another host's."""
    import subprocess
    import sys

    from ptqbench.atomic import _HOST, sweep_orphans, temp_path

    target = tmp_path / "records" / "abc.json"
    target.parent.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    orphan = target.with_name(f".abc.json.{_HOST}~{int(dead.stdout)}~0123abcd.tmp")
    orphan.write_text("{half")
    live = temp_path(target)  # this process: alive
    live.write_text("{writing")
    other_host = target.with_name(f".abc.json.elsewhere~{int(dead.stdout)}~0123abcd.tmp")
    other_host.write_text("{")
    foreign = target.with_name("notes.tmp")  # not ours: never touched
    foreign.write_text("x")
    assert sweep_orphans(tmp_path) == [orphan]
    assert not orphan.exists() and live.exists() and other_host.exists() and foreign.exists()
    atomic_write_json(target, {"v": 3})  # the writer's own temp file is gone after the rename
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(
        [live.name, other_host.name, "abc.json", "notes.tmp"])
