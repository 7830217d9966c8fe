"""Stable Diffusion (v1.x layout): ``UNet2DConditionModel`` + CLIP text encoder + ``AutoencoderKL``.

``path`` is a folder or hub id (``CompVis/stable-diffusion-v1-4``) with ``unet/``,
``text_encoder/``, ``tokenizer/``, ``vae/`` and ``scheduler/``. Needs ``transformers``
(``pip install 'ptqbench[sd]'``).

- Prompts come from ``prompts`` (a text file, one per line, or COCO captions JSON; see
  ``ptqbench.prompts``): sample i gets prompt i mod n. Calibration trajectories use
  ``calibration_prompts`` when given (a disjoint caption set, as the papers calibrate on other
  captions than they evaluate), else the same list.
- The conditioning stored with every trajectory entry is the prompt's CLIP token ids; the empty
  prompt's ids are the null conditioning of classifier-free guidance (scale 7.5 by default).
- The denoiser module is :class:`ptqbench.conditioned.TextConditionedUNet`, so the text encoder
  is part of what quantization sees; the recipe keeps it in full precision unless
  ``quantize_text_encoder = true``. The VAE always stays FP.
- Sample with ``kind = "pndm"`` (PLMS, 50 steps, ``spacing = "leading"``) as the papers, or ddim.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ptqbench import hookimpl
from ptqbench.adapter_utils import OnceLoaded, load_component, weights_sha256
from ptqbench.calib.trajectories import CALIB_INDEX_OFFSET
from ptqbench.conditioned import TextConditionedUNet
from ptqbench.errors import PtqbenchError
from ptqbench.prompts import load_prompts, prompt_for_index
from ptqbench_plugins.models.ldm import LatentDiffusion

SD_EXTRA_MESSAGE = ("Stable Diffusion needs the `transformers` package (CLIP text encoder and "
                    "tokenizer): pip install 'ptqbench[sd]'")


def require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise PtqbenchError(SD_EXTRA_MESSAGE) from None
    return transformers


class StableDiffusion(LatentDiffusion):
    name = "stable-diffusion"
    description = ("Stable Diffusion: UNet2DConditionModel + CLIP text encoder (FP by default) "
                   "+ AutoencoderKL; prompts from a file, guidance with the empty prompt")
    unet_class = "UNet2DConditionModel"

    def __init__(self, path: str, base_dir: str = ".", prompts: Optional[str] = None,
                 calibration_prompts: Optional[str] = None, guidance_scale: float = 7.5,
                 latent_scale: Optional[float] = None, revision: Optional[str] = None):
        transformers = require_transformers()
        if not prompts:
            raise PtqbenchError("model option prompts is required for stable-diffusion: a text "
                                "file (one prompt per line) or COCO captions JSON")
        super().__init__(path, base_dir, latent_scale, "vae", revision)
        self.options.update(prompts=prompts, calibration_prompts=calibration_prompts,
                            guidance_scale=guidance_scale)
        base = Path(base_dir)
        self.prompts_path = _resolve(prompts, base)
        self.prompts = load_prompts(self.prompts_path)
        self.calib_prompts_path = _resolve(calibration_prompts, base) if calibration_prompts else None
        self.calib_prompts = (load_prompts(self.calib_prompts_path) if self.calib_prompts_path
                              else self.prompts)
        self.guidance_scale = float(guidance_scale)
        self.tokenizer = load_component(transformers.CLIPTokenizer, self.path, "tokenizer",
                                        "CLIP tokenizer", revision)
        unet = self._unet
        self._text = OnceLoaded(lambda: load_component(
            transformers.CLIPTextModel, self.path, "text_encoder", "CLIP text encoder", revision))
        self._model = OnceLoaded(lambda: TextConditionedUNet(unet.module, self._text.module))
        self._null_ids: Optional[torch.Tensor] = None

    # ---- loading ------------------------------------------------------------------------
    def load(self, device: torch.device) -> nn.Module:
        return self._model.copy_to(device)

    # ---- conditioning -------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", truncation=True,
                              max_length=self.tokenizer.model_max_length,
                              return_tensors="pt").input_ids.long()

    def prompt_of(self, index: int) -> str:
        if index >= CALIB_INDEX_OFFSET:
            return prompt_for_index(self.calib_prompts, index - CALIB_INDEX_OFFSET)
        return prompt_for_index(self.prompts, index)

    def conditioning(self, indices, seed):
        return self.tokenize([self.prompt_of(int(i)) for i in torch.as_tensor(indices).flatten()])

    def null_conditioning(self, cond):
        if self._null_ids is None:
            self._null_ids = self.tokenize([""])
        return self._null_ids.to(cond.device).expand(cond.shape[0], -1).clone()

    def denoise(self, model, x, t, cond=None):
        if cond is None:
            cond = self.null_conditioning(torch.empty(x.shape[0], 1, device=x.device))
        return model(x, t, cond)

    def unet_of(self, model: nn.Module) -> nn.Module:
        return model.unet

    def block_prefix(self) -> str:
        return "unet."

    def extra_identity(self) -> dict:
        return {"guidance_scale": self.guidance_scale,
                "text_encoder_sha256": weights_sha256(Path(self.path) / "text_encoder"),
                "prompts": _file_identity(self.prompts_path),
                "calibration_prompts": (_file_identity(self.calib_prompts_path)
                                        if self.calib_prompts_path else None)}


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p)


def _file_identity(path: Path) -> dict:
    import hashlib

    return {"path": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


@hookimpl
def register_models(register):
    register(StableDiffusion)
