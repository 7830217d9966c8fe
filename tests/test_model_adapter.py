"""The diffusers adapter: pipeline and flat folder layouts, blocks in forward order, decoding."""
import shutil

import pytest
import torch

from ptqbench.errors import PtqbenchError
from ptqbench_plugins.models.diffusers_unet import DiffusersUNet


def test_builtin_model_loads_and_runs(tiny_model_dir):
    a = DiffusersUNet(path="builtin:tiny-mnist")
    m = a.load(torch.device("cpu"))
    assert a.sample_shape == (1, 32, 32)
    out = a.denoise(m, torch.randn(2, 1, 32, 32), torch.tensor([10, 900]))
    assert out.shape == (2, 1, 32, 32)
    names = [b.name for b in a.blocks(m)]
    assert names[0] == "time_embedding" and names[1] == "conv_in" and names[-1] == "conv_out"
    assert any(b.kind == "attention" for b in a.blocks(m))
    img = a.decode(torch.tensor([[[[-1.0, 0.0, 1.0, 3.0]]]]))
    assert img.dtype == torch.uint8 and img.flatten().tolist() == [0, 128, 255, 255]


def test_flat_layout_like_hub_ddpm_repos(tmp_path, tiny_model_dir):
    # google/ddpm-cifar10-32 keeps config.json and scheduler_config.json at the repo root
    for sub in ("unet", "scheduler"):
        for f in (tiny_model_dir / sub).iterdir():
            shutil.copy(f, tmp_path / f.name)
    a = DiffusersUNet(path=str(tmp_path))
    ref = DiffusersUNet(path="builtin:tiny-mnist")
    x, t = torch.randn(1, 1, 32, 32), torch.tensor([500])
    cpu = torch.device("cpu")
    torch.testing.assert_close(a.denoise(a.load(cpu), x, t), ref.denoise(ref.load(cpu), x, t))
    assert len(a.identity()["weights_sha256"]) == 64


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(PtqbenchError, match="not found"):
        DiffusersUNet(path=str(tmp_path / "nope"))
