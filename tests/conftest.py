"""Shared fixtures: hermetic plugin loading, small thread counts, the shared data folder."""
import os
from pathlib import Path

import pytest

# Tests see only ptqbench's own plugins (plus the local files they register themselves).
os.environ.setdefault("PTQBENCH_LOAD_EXTERNAL_PLUGINS", "0")

import torch  # noqa: E402

# pytest-xdist runs one worker per core: one thread each avoids oversubscription, also in the
# processes that tests start (CLI runs, executor workers), which read OMP_NUM_THREADS: with a
# thread per core, the killed-and-resumed test's CLI run took over 300 s in CI instead of ~25 s.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (it exists on the project's machines)")
    return SHARED_DATA


@pytest.fixture
def tiny_model_dir() -> Path:
    path = REPO / "ptqbench" / "assets" / "tiny-mnist"
    if not (path / "unet" / "config.json").exists():
        pytest.fail(f"the bundled tiny model is missing from {path}")
    return path
