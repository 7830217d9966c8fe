"""Class-conditional latent diffusion in the LDM cin256-v2 layout.

``unet/`` is a ``UNet2DConditionModel`` whose cross-attention context is one token: the learned
class embedding in ``class_embedder/`` (``embedding.safetensors``, key ``weight``, rows = classes
+ the null class, which is the last row: 1000 for cin256-v2). The VQ f4 autoencoder and the
scheduler are as in :mod:`ldm`. Classifier-free guidance: eps_u + s (eps_c - eps_u) on every
channel with the null class (LDM's scale 3.0 for the ImageNet grid is the default here); labels
per sample from (seed, index).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ptqbench import hookimpl
from ptqbench.adapter_utils import OnceLoaded, per_sample_labels, weights_sha256
from ptqbench.conditioned import ClassConditionedUNet
from ptqbench.errors import PtqbenchError
from ptqbench_plugins.models.ldm import LatentDiffusion

EMBEDDER_DIR = "class_embedder"
EMBEDDER_FILE = "embedding.safetensors"


def save_class_embedder(embedding: nn.Embedding, folder: Path) -> None:
    """Write the class embedding in the layout this adapter reads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"weight": embedding.weight.detach().contiguous().cpu()}, folder / EMBEDDER_FILE)
    (folder / "config.json").write_text(json.dumps(
        {"num_embeddings": embedding.num_embeddings, "embedding_dim": embedding.embedding_dim}))


def load_class_embedder(folder: Path) -> nn.Embedding:
    from safetensors.torch import load_file

    f = Path(folder) / EMBEDDER_FILE
    if not f.is_file():
        raise PtqbenchError(f"class embedding not found: {f}")
    w = load_file(str(f))["weight"]
    emb = nn.Embedding(*w.shape)
    emb.weight.data.copy_(w)
    return emb


class ClassConditionalLDM(LatentDiffusion):
    name = "ldm-cin"
    description = ("Class-conditional LDM (cin256-v2 layout): UNet2DConditionModel with a "
                   "learned class token, null-class guidance, VQ decoder")
    unet_class = "UNet2DConditionModel"

    def __init__(self, path: str, base_dir: str = ".", guidance_scale: float = 3.0,
                 labels: str = "random", null_class: Optional[int] = None,
                 latent_scale: Optional[float] = None, autoencoder: Optional[str] = None,
                 revision: Optional[str] = None):
        super().__init__(path, base_dir, latent_scale, autoencoder, revision)
        self.options.update(guidance_scale=guidance_scale, labels=labels, null_class=null_class)
        self.guidance_scale = float(guidance_scale)
        if labels not in ("random", "balanced"):
            raise PtqbenchError(f"model option labels must be 'random' or 'balanced', got {labels!r}")
        self.labels = labels
        emb_dir = Path(self.path) / EMBEDDER_DIR
        if not emb_dir.is_dir():
            raise PtqbenchError(f"{self.path}: no {EMBEDDER_DIR}/ folder (convert the CompVis "
                                "checkpoint with `ptqbench convert-ldm`)")
        rows = json.loads((emb_dir / "config.json").read_text())["num_embeddings"]
        self.null_class = int(null_class) if null_class is not None else rows - 1
        self.num_classes = self.null_class  # labels 0..null-1 are real classes
        unet = self._unet

        self._model = OnceLoaded(lambda: ClassConditionedUNet(unet.module,
                                                              load_class_embedder(emb_dir)))

    def load(self, device: torch.device) -> nn.Module:
        return self._model.copy_to(device)

    def conditioning(self, indices, seed):
        return per_sample_labels(indices, seed, self.num_classes, self.labels)

    def null_conditioning(self, cond):
        return torch.full_like(cond, self.null_class)

    def denoise(self, model, x, t, cond=None):
        if cond is None:
            cond = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        return model(x, t, cond)

    def unet_of(self, model: nn.Module) -> nn.Module:
        return model.unet

    def block_prefix(self) -> str:
        return "unet."

    def extra_identity(self) -> dict:
        return {"guidance_scale": self.guidance_scale, "labels": self.labels,
                "null_class": self.null_class,
                "class_embedder_sha256": weights_sha256(Path(self.path) / EMBEDDER_DIR)}


@hookimpl
def register_models(register):
    register(ClassConditionalLDM)
