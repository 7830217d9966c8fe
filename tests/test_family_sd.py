"""Stable Diffusion on a tiny random instance (CLIP text encoder, char-level tokenizer built by
the test): prompts as token ids in the calibration data, empty-prompt guidance, the text encoder
kept FP by default, PLMS sampling, save/load, end to end; the clear message without transformers."""
import json
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="the sd extra (transformers) is not installed")

from family_suites import family_suite, run_suite  # noqa: E402
from ptqbench.calib.trajectories import CALIB_INDEX_OFFSET, get_trajectories  # noqa: E402
from ptqbench.errors import PtqbenchError  # noqa: E402
from ptqbench.families_testing import build_sd  # noqa: E402
from ptqbench.prompts import load_prompts  # noqa: E402
from ptqbench.quant import (QuantRecipe, calibrate_activation_ranges, load_quantized,  # noqa: E402
                            quantize_model, save_quantized)
from ptqbench.sampling import SamplerSpec  # noqa: E402
from ptqbench_plugins.models.stable_diffusion import StableDiffusion  # noqa: E402

CPU = torch.device("cpu")
PLMS = 'kind = "pndm"\nsteps = 4\nspacing = "leading"'


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return build_sd(tmp_path_factory.mktemp("sd"))


def test_prompts_guidance_and_text_encoder(sd, tmp_path):
    folder, _, options = sd
    (tmp_path / "calib.txt").write_text("a calibration caption\n")
    a = StableDiffusion(path=str(folder), prompts=options["prompts"],
                        calibration_prompts=str(tmp_path / "calib.txt"), guidance_scale=7.5)
    m = a.load(CPU)
    assert a.prompt_of(4) == "an astronaut riding a horse"  # 4 mod 3 prompts
    assert a.prompt_of(CALIB_INDEX_OFFSET + 5) == "a calibration caption"
    ids = a.conditioning(torch.tensor([0, 1]), 0)
    assert ids.shape == (2, 16) and not torch.equal(ids[0], ids[1])
    assert torch.equal(ids, a.tokenize(["a red cube on a table", "an astronaut riding a horse"]))
    null = a.null_conditioning(ids)
    assert torch.equal(null[0], a.tokenize([""])[0])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([901, 1])
    c, u = a.denoise(m, x, t, ids), a.denoise(m, x, t, null)
    torch.testing.assert_close(a.guided_denoise(m, x, t, ids), u + 7.5 * (c - u),
                               atol=1e-4, rtol=1e-4)
    # the context is the text encoder's last hidden state
    ctx = m.text_encoder(ids)[0]
    torch.testing.assert_close(m.unet(x, t, encoder_hidden_states=ctx).sample, c)

    traj = get_trajectories(a, m, SamplerSpec(kind="pndm", steps=2, spacing="leading"),
                            num_samples=4, seed=0, cache_dir=tmp_path, device=CPU, batch_size=2)
    assert traj.cond.shape == (4, 16)
    assert torch.equal(traj.cond[0], a.tokenize(["a calibration caption"])[0])
    assert torch.equal(traj.cond[1], null[0]) and torch.equal(traj.cond[3], null[0])

    _, fp_default = quantize_model(m, QuantRecipe.from_options("W8A8"), a)
    assert fp_default["roles"]["text_encoder"]["quantized"] == 0
    assert fp_default["roles"]["text_encoder"]["fp"] > 0
    _, quant_te = quantize_model(m, QuantRecipe.from_options("W8A8", quantize_text_encoder=True), a)
    assert quant_te["roles"]["text_encoder"]["fp"] == 0


def test_sd_save_load(sd, tmp_path):
    folder, _, options = sd
    a = StableDiffusion(path=str(folder), prompts=options["prompts"])
    m = a.load(CPU)
    traj = get_trajectories(a, m, SamplerSpec(kind="pndm", steps=2, spacing="leading"),
                            num_samples=4, seed=0, cache_dir=tmp_path, device=CPU, batch_size=4)
    calib = traj.gather(torch.tensor([0, 1, 2, 0]), torch.arange(4))
    recipe = QuantRecipe.from_options("W4A8")
    q, _ = quantize_model(m, recipe, a)
    calibrate_activation_ranges(q, a, calib, 4, CPU)
    save_quantized(q, tmp_path / "q.pt")
    loaded = load_quantized(a.load(CPU), recipe, a, tmp_path / "q.pt")
    x, t, ids = torch.randn(2, 4, 8, 8), torch.tensor([500, 20]), a.conditioning([0, 2], 0)
    torch.testing.assert_close(a.guided_denoise(loaded, x, t, ids), a.guided_denoise(q, x, t, ids),
                               rtol=0, atol=0)


def test_sd_end_to_end(sd, tmp_path):
    folder, _, options = sd
    recs = run_suite(family_suite(tmp_path, folder, "stable-diffusion", options, sampler=PLMS),
                     tmp_path / "out")
    assert all(r["status"] == "ok" for r in recs.values()), [r["error"] for r in recs.values()]
    q = recs[("qdiffusion", "W8A8")]
    assert q["metrics"]["paired_mse"]["value"] > 0
    assert any("transformer_blocks" in b["name"] for b in q["reconstruction"]["blocks"])


def test_missing_transformers_is_one_clear_line(sd, monkeypatch):
    folder, _, options = sd
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    with pytest.raises(PtqbenchError, match=r"pip install 'ptqbench\[sd\]'"):
        StableDiffusion(path=str(folder), prompts=options["prompts"])


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  second  \n")
    assert load_prompts(tmp_path / "p.txt") == ["first", "second"]
    coco = {"annotations": [{"image_id": 9, "id": 3, "caption": "b  later"},
                            {"image_id": 9, "id": 1, "caption": "b first"},
                            {"image_id": 2, "id": 7, "caption": "a dog.\n"}]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(coco))
    assert load_prompts(tmp_path / "captions_val2017.json") == ["a dog.", "b first"]
    with pytest.raises(PtqbenchError, match="not found"):
        load_prompts(tmp_path / "nope.txt")
