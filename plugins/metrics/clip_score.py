"""The ``clip-score`` metric: how well text-to-image samples match their prompts.

CLIP score (Hessel et al. 2021, as torchmetrics): ``100 * max(cos(E_img(x_i), E_txt(p_i)), 0)``
averaged over samples, with a 95% bootstrap interval. Sample i's prompt is prompt ``i mod n`` of
the ``prompts`` file, the rule the stable-diffusion adapter samples with (``ptqbench.prompts``).

Options:
  prompts      the prompt file the model sampled with (required)
  weights      a folder with a transformers CLIPModel and its tokenizer, or a hub id (default
               ``openai/clip-vit-large-patch14``, the papers' choice)
  download     let a hub id be downloaded (default true); without network or without it the
               metric reports "unavailable" with the reason, never a number
  batch_size   images per forward (default 64); bootstrap (1000), seed (0)

Images are resized (bicubic, shorter side) and centre-cropped to the model's input size and
normalised with CLIP's mean/std. Needs ``transformers`` (``pip install 'ptqbench[sd]'``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ptqbench import Metric, MetricContext, hookimpl
from ptqbench.errors import PtqbenchError
from ptqbench.metrics.bootstrap import bootstrap_mean
from ptqbench.prompts import load_prompts, prompt_for_index

DEFAULT_WEIGHTS = "openai/clip-vit-large-patch14"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_SPEC = {"prompts": None, "weights": DEFAULT_WEIGHTS, "download": True, "batch_size": 64,
         "bootstrap": 1000, "seed": 0}


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> CLIP's input: shorter side to ``size`` (bicubic), centre crop,
    [0, 1], normalised."""
    x = images.float() / 255.0
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipScore(Metric):
    name = "clip-score"
    description = "CLIP score of text-to-image samples against their prompts (transformers CLIP)"

    def __init__(self, **options: Any):
        super().__init__(**options)
        unknown = sorted(set(options) - set(_SPEC))
        if unknown:
            raise PtqbenchError(f"metric 'clip-score': unknown option(s) {unknown}; known: "
                                f"{sorted(_SPEC)}")
        self.cfg = {**_SPEC, **options}
        if not self.cfg["prompts"]:
            raise PtqbenchError("metric 'clip-score': option 'prompts' is required (the prompt "
                                "file the model sampled with)")
        self._loaded_from: Optional[str] = None

    def _load(self, base_dir: Path):
        """(model, tokenizer) or raise with the reason they are unavailable."""
        try:
            from transformers import CLIPModel, CLIPTokenizer
        except ImportError:
            raise RuntimeError("transformers is not installed (pip install 'ptqbench[sd]')") from None
        weights = str(self.cfg["weights"])
        local = Path(weights).expanduser()
        if not local.is_absolute():
            local = base_dir / local
        source = str(local) if local.is_dir() else weights
        offline = not local.is_dir() and not self.cfg["download"]
        try:
            model = CLIPModel.from_pretrained(source, local_files_only=offline)
            tok = CLIPTokenizer.from_pretrained(source, local_files_only=offline)
        except Exception as exc:  # no network, not in the hub cache, not a CLIP folder
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            how = ("not found locally and downloading is off" if offline
                   else "could not be loaded (offline, or not a CLIP model)")
            raise RuntimeError(f"CLIP weights {weights!r} {how}: {first}") from None
        self._loaded_from = source
        return model.eval().requires_grad_(False), tok

    @torch.no_grad()
    def compute(self, samples: torch.Tensor, context: MetricContext) -> dict[str, dict]:
        prompts = load_prompts(_resolve(self.cfg["prompts"], context.base_dir))
        try:
            model, tok = self._load(Path(context.base_dir))
        except RuntimeError as exc:
            return {"clip_score": {"value": None, "unavailable": str(exc),
                                   "higher_is_better": True}}
        model = model.to(context.device)
        size = int(model.config.vision_config.image_size)
        scores = []
        bs = int(self.cfg["batch_size"])
        for start in range(0, samples.shape[0], bs):
            imgs = samples[start:start + bs].to(context.device)
            if imgs.shape[1] == 1:
                imgs = imgs.expand(-1, 3, -1, -1)
            texts = [prompt_for_index(prompts, i) for i in range(start, start + imgs.shape[0])]
            ids = tok(texts, padding=True, truncation=True,
                      max_length=tok.model_max_length, return_tensors="pt").to(context.device)
            img_emb = model.get_image_features(pixel_values=preprocess(imgs, size))
            txt_emb = model.get_text_features(**ids)
            img_emb = getattr(img_emb, "pooler_output", img_emb)
            txt_emb = getattr(txt_emb, "pooler_output", txt_emb)
            cos = F.cosine_similarity(img_emb.float(), txt_emb.float(), dim=-1)
            scores.append(100 * cos.clamp(min=0).cpu())
        per_sample = torch.cat(scores)
        mean, ci = bootstrap_mean(per_sample, int(self.cfg["bootstrap"]), int(self.cfg["seed"]))
        out = {"value": mean, "n": int(per_sample.numel()), "higher_is_better": True}
        if ci is not None:
            out["ci"] = ci
        return {"clip_score": out}

    def identity(self) -> dict:
        return {"implementation": "ptqbench clip-score (transformers CLIPModel)",
                "weights": self._loaded_from or self.cfg["weights"],
                "prompts": str(self.cfg["prompts"])}


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base) / p


@hookimpl
def register_metrics(register):
    register(ClipScore)
