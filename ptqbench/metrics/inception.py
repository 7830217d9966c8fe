"""The Inception-v3 feature pass shared by FID, sFID, KID, precision/recall and IS.

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (its port of the TF
"inception-2015-12-05" graph used by the original FID/IS code); it is used as is, including its
TF1-exact bilinear resize to 299x299 and its (x - 128) / 128 input scaling. One forward pass of a
batch of uint8 images yields

- ``pool``: the 2048-d average-pool features (FID, KID, precision/recall);
- ``spatial``: the sFID features, i.e. TF ``mixed_6/conv``: the output (after BN and ReLU) of the
  first 1x1 conv block of Mixed_6d, first 7 of its 192 channels at 17x17, flattened in NHWC order
  to 7*17*17 = 2023 dims (captured by a forward hook, so no second pass);
- ``logits``: torch-fidelity's ``logits_unbiased`` (the 1008-way classifier without its bias, the
  layer torch-fidelity computes IS from), or ``None`` when the weights have no classifier (the
  features-only weights file stores ``fc`` as NaN).

Weights are found offline (``resolve_weights``): the metric option ``weights``, else the
environment variable ``PTQBENCH_INCEPTION_WEIGHTS``, else torch-fidelity's file name in the torch
hub cache; only when none exists is a download attempted, and its failure explains how to provide
the file. Convolutions run in strict fp32 (TF32 off) unless asked otherwise: FID is sensitive to it.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from ..errors import PtqbenchError
from .hashing import HashMemo, sha256_file, stat_signature

WEIGHTS_ENV = "PTQBENCH_INCEPTION_WEIGHTS"
#: torch-fidelity's file name; torch.hub finds a file of this name in $TORCH_HOME/hub/checkpoints
HUB_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{HUB_FILENAME}"
EXTRACTOR_CLASS = "torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3"
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023

_HOWTO = (
    "Inception weights for FID/KID/sFID were not found and could not be downloaded. Provide "
    "torch-fidelity's Inception-v3 weights file (weights-inception-2015-12-05-6726825d.pth, or a "
    "file in the same layout) in one of these ways: the metric option "
    "`weights = \"/path/to/file.pth\"` "
    f"in the suite; the environment variable {WEIGHTS_ENV}=/path/to/file.pth; or copy it to "
    "$TORCH_HOME/hub/checkpoints/" + HUB_FILENAME + " (TORCH_HOME defaults to ~/.cache/torch)."
)

_weights_memo = HashMemo()
_featurizers: dict[tuple, "InceptionFeaturizer"] = {}
_lock = threading.Lock()


def torch_fidelity_version() -> str:
    import torch_fidelity

    return torch_fidelity.__version__


def hub_weights_path() -> Path:
    """Where torch.hub (and so torch-fidelity) looks for the weights: honours TORCH_HOME."""
    return Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILENAME


def resolve_weights(option: Optional[str] = None, base_dir: Optional[Path] = None,
                    download: bool = True) -> Path:
    """Path of the Inception weights: option, else env var, else hub cache, else a download.

    ``option`` is resolved against ``base_dir`` (the suite's folder) when relative. A path that is
    given but missing is an error (it is never silently replaced by another file).
    """
    given = ((option, "metric option `weights`", base_dir),
             (os.environ.get(WEIGHTS_ENV), WEIGHTS_ENV, None))
    for value, origin, relative_to in given:
        if value:
            path = Path(value).expanduser()
            if not path.is_absolute() and relative_to is not None:
                path = Path(relative_to) / path
            if not path.is_file():
                raise PtqbenchError(f"Inception weights file {path} (from {origin}) does not exist")
            return path.resolve()
    hub = hub_weights_path()
    if hub.is_file():
        return hub.resolve()
    if not download:
        raise PtqbenchError(_HOWTO)
    old_timeout = socket.getdefaulttimeout()
    try:
        hub.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading Inception weights to {hub}", file=sys.stderr)
        socket.setdefaulttimeout(60)  # a firewalled machine must fail, not hang
        torch.hub.download_url_to_file(WEIGHTS_URL, str(hub), progress=False)
    except Exception as exc:  # no network, proxy, disk: all end in the same advice
        raise PtqbenchError(f"{_HOWTO} (download from {WEIGHTS_URL} failed: {exc})") from exc
    finally:
        socket.setdefaulttimeout(old_timeout)
    return hub.resolve()


def weights_sha256(path: Path) -> str:
    """Content hash of the weights file, computed once per (path, size, mtime) per process."""
    path = Path(path).resolve()
    value, _ = _weights_memo.get(str(path), stat_signature([path]),
                                 lambda: {"sha256": sha256_file(path)})
    return value["sha256"]


@contextmanager
def fp32_precision(allow_tf32: bool = False):
    """Run convolutions and matmuls in strict fp32 (or TF32 if allowed); restore afterwards.

    Uses the ``fp32_precision`` API where it exists (torch >= 2.9) and the legacy ``allow_tf32``
    flags otherwise; the two must not be mixed (torch raises when they disagree).
    """
    mode = "tf32" if allow_tf32 else "ieee"
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        old = (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
        conv.fp32_precision = mode
        torch.backends.cuda.matmul.fp32_precision = mode
        try:
            yield
        finally:
            conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = old
    else:
        old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def check_images(images: torch.Tensor, what: str = "samples") -> None:
    """Raise unless ``images`` is a uint8 (N, C, H, W) tensor with C in (1, 3) and N >= 1."""
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
        desc = (f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images)
                else type(images).__name__)
        raise PtqbenchError(f"{what} must be a uint8 tensor (N, C, H, W); got {desc}")
    if images.shape[1] not in (1, 3) or images.shape[0] < 1:
        raise PtqbenchError(f"{what} must have 1 or 3 channels and at least one image; "
                            f"got shape {tuple(images.shape)}")


class InceptionFeaturizer:
    """torch-fidelity's Inception-v3 on one device, giving pool/spatial/logits in one pass."""

    def __init__(self, weights: Path, device: torch.device | str = "cpu", channels_last: bool = False):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights = Path(weights).resolve()
        self.weights_sha256 = weights_sha256(self.weights)
        self.device = torch.device(device)
        self.channels_last = channels_last
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=str(self.weights))
        except Exception as exc:
            raise PtqbenchError(f"cannot load Inception weights {self.weights} into torch-fidelity's "
                                f"FeatureExtractorInceptionV3: {exc}") from exc
        #: False for the features-only weights (fc stored as NaN): no Inception Score from them
        self.has_logits = bool(torch.isfinite(net.fc.weight).all()
                               and torch.isfinite(net.fc.bias).all())
        net = net.to(self.device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self._captured: list[torch.Tensor] = []
        self._lock = threading.Lock()  # the hook's buffer is per featurizer: one caller at a time
        net.Mixed_6d.branch1x1.register_forward_hook(self._capture_spatial)

    def _capture_spatial(self, module, inputs, output):
        # output: ReLU(BN(conv)) of Mixed_6d's 1x1 branch, (B, 192, 17, 17); keep 7 channels, NHWC.
        b = output.shape[0]
        self._captured.append(output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(b, -1).clone())

    def identity(self) -> dict:
        return {"class": EXTRACTOR_CLASS, "weights": str(self.weights),
                "weights_sha256": self.weights_sha256, "has_logits": self.has_logits,
                "torch_fidelity": torch_fidelity_version()}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 200,
                 allow_tf32: bool = False) -> dict[str, Optional[torch.Tensor]]:
        """Features of uint8 images (N, C, H, W), C = 1 (replicated to RGB) or 3.

        Returns float32 tensors on the featurizer's device: ``pool`` (N, 2048), ``spatial``
        (N, 2023) and ``logits`` (N, 1008) or None.
        """
        check_images(images, "images")
        pools, spatials, logits = [], [], []
        with self._lock, fp32_precision(allow_tf32):
            self._captured.clear()
            for start in range(0, images.shape[0], batch_size):
                x = images[start:start + batch_size].to(self.device, non_blocking=True)
                if x.shape[1] == 1:
                    x = x.expand(-1, 3, -1, -1)
                pool, logit = self.net(x)
                pools.append(pool)
                spatials.append(self._captured.pop())
                if self.has_logits:
                    logits.append(logit)
        return {"pool": torch.cat(pools), "spatial": torch.cat(spatials),
                "logits": torch.cat(logits) if self.has_logits else None}


def get_featurizer(weights: Path, device: torch.device | str = "cpu",
                   channels_last: bool = False) -> InceptionFeaturizer:
    """A process-wide featurizer per (weights content, device, layout): the network loads once."""
    weights = Path(weights).resolve()
    key = (str(weights), weights_sha256(weights), str(torch.device(device)), channels_last)
    with _lock:
        fz = _featurizers.get(key)
    if fz is None:
        fz = InceptionFeaturizer(weights, device, channels_last)
        with _lock:
            # keep few networks alive: a process rarely needs more than one per device
            if len(_featurizers) >= 2:
                _featurizers.pop(next(iter(_featurizers)))
            _featurizers[key] = fz
    return fz
