"""The clip-score metric with a tiny CLIP built by the test; "unavailable" when offline."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the sd extra (transformers) is not installed")

from ptqbench import MetricContext  # noqa: E402
from ptqbench.families_testing import build_clip  # noqa: E402
from ptqbench_plugins.metrics.clip_score import ClipScore, preprocess  # noqa: E402


def _ctx(tmp_path: Path) -> MetricContext:
    return MetricContext(fp_samples=None, is_reference_cell=False, cache_dir=tmp_path,
                         device=torch.device("cpu"), seed=0, base_dir=tmp_path)


def test_clip_score_matches_a_direct_computation(tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    folder = build_clip(tmp_path / "clip")
    (tmp_path / "p.txt").write_text("a red square\na blue sky\n")
    imgs = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8)
    out = ClipScore(prompts="p.txt", weights=str(folder), bootstrap=50,
                    batch_size=2).compute(imgs, _ctx(tmp_path))["clip_score"]
    model, tok = CLIPModel.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder)
    texts = ["a red square", "a blue sky", "a red square"]  # sample i -> prompt i mod 2
    with torch.no_grad():
        ie = model.get_image_features(pixel_values=preprocess(imgs, 16))
        te = model.get_text_features(**tok(texts, padding=True, return_tensors="pt"))
    ie, te = getattr(ie, "pooler_output", ie), getattr(te, "pooler_output", te)
    expected = (100 * F.cosine_similarity(ie, te, dim=-1).clamp(min=0)).mean()
    assert out["value"] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert out["n"] == 3 and out["higher_is_better"] and len(out["ci"]) == 2


def test_preprocess_crops_the_centre():
    img = torch.zeros(1, 3, 8, 16, dtype=torch.uint8)
    img[..., 4:12] = 255  # a white centre square
    x = preprocess(img, 8)
    assert x.shape == (1, 3, 8, 8)
    assert torch.allclose(x[0, 0], torch.full((8, 8), (1 - 0.48145466) / 0.26862954), atol=1e-4)


def test_unavailable_offline_with_the_reason(tmp_path):
    (tmp_path / "p.txt").write_text("a prompt\n")
    out = ClipScore(prompts="p.txt", weights="no-such-org/no-such-clip",
                    download=False).compute(torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
                                            _ctx(tmp_path))["clip_score"]
    assert out["value"] is None and "not found locally" in out["unavailable"]
