"""Inception-based metric plugins: ``fid``, ``sfid``, ``kid``, ``prc``, ``is`` and ``fid-to-fp``.

All of them share one Inception-v3 forward pass per cell (torch-fidelity's extractor; see
``ptqbench.metrics.inception``) through ``MetricContext.shared``, and the features of fixed image
sets (the dataset reference, the FP samples) are cached on disk under ``MetricContext.cache_dir``
by content hash (``ptqbench.metrics.features``).

Options (suite keyword arguments), common to all six:
  weights        Inception weights file (relative to the suite's folder); default: the env var
                 PTQBENCH_INCEPTION_WEIGHTS, else the torch hub cache, else a download
  download       allow that download when no file is found (default true)
  batch_size     images per forward pass (default 200)
  channels_last  run the network in channels_last layout (default false)
  tf32           allow TF32 convolutions on the GPU (default false: strict fp32)
  seed           seed of every resampling/subset choice (default 2020, torch-fidelity's)
fid, sfid, kid, prc also take
  reference      the dataset to compare with (required): .npy/.npz uint8 array, image folder or
                 CIFAR-10 python-batch folder (see ``ptqbench.metrics.reference``)
  num_reference  use the first N reference images (default: all)
  reference_statistics  fid/sfid: "images" (default: statistics of the reference images with
                 this extractor) or "file" (an ADM .npz's precomputed mu/sigma, mu_s/sigma_s)
fid, sfid, fid-to-fp: bootstrap (resamples for the 95% interval, default 30; 0 = no interval)
kid: subsets (default 100), subset_size (default 1000, capped at N // 2)
prc: neighborhood (k of the k-NN balls, default 3)
is:  splits (default 10)

Outputs: ``fid``, ``sfid``, ``kid``, ``precision`` + ``recall``, ``is``, ``fid_to_fp``. Interval
methods are documented in ``ptqbench.metrics.fid`` and ``ptqbench.metrics.scores``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ptqbench import Metric, MetricContext, hookimpl
from ptqbench.errors import PtqbenchError
from ptqbench.metrics.features import (FeatureSet, cached_features, featurize, sample_features,
                                       tensor_hash)
from ptqbench.metrics.fid import bootstrap_fid, fid_value, frechet_distance
from ptqbench.metrics.inception import (EXTRACTOR_CLASS, InceptionFeaturizer, check_images,
                                        get_featurizer, resolve_weights)
from ptqbench.metrics.fid import Gaussian
from ptqbench.metrics.reference import STAT_KEYS, file_statistics, fingerprint, open_reference
from ptqbench.metrics.scores import inception_score, kid, precision_recall

_REQUIRED = object()
# option -> (default, type, minimum)
_COMMON = {
    "weights": (None, str, None),
    "download": (True, bool, None),
    "batch_size": (200, int, 1),
    "channels_last": (False, bool, None),
    "tf32": (False, bool, None),
    "seed": (2020, int, 0),
}
_REFERENCE = {
    "reference": (_REQUIRED, str, None),
    "num_reference": (None, int, 2),
}
_REFERENCE_HELP = ("a .npy/.npz uint8 array (NHWC or NCHW), a folder of PNG/JPEG images, or a "
                   "CIFAR-10 python-batch folder (data_batch_*)")


def _validate(metric: str, spec: dict, options: dict) -> dict:
    unknown = sorted(set(options) - set(spec))
    if unknown:
        raise PtqbenchError(f"metric {metric!r}: unknown option(s) {unknown}; known: {sorted(spec)}")
    cfg = {}
    for name, (default, kind, minimum) in spec.items():
        value = options.get(name, default)
        if value is _REQUIRED:
            extra = f" ({_REFERENCE_HELP})" if name == "reference" else ""
            raise PtqbenchError(f"metric {metric!r}: option {name!r} is required{extra}")
        if value is not None:
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if not ok:
                raise PtqbenchError(f"metric {metric!r}: option {name!r} must be a {kind.__name__}, "
                                    f"got {value!r}")
            if minimum is not None and value < minimum:
                raise PtqbenchError(f"metric {metric!r}: option {name!r} must be >= {minimum}, "
                                    f"got {value}")
        cfg[name] = value
    return cfg


class _InceptionMetric(Metric):
    """Shared option handling, featurizer and reference loading of the Inception metrics."""

    #: option specs of the subclass, added to _COMMON
    extra_options: dict = {}

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.cfg = _validate(self.name, {**_COMMON, **self.extra_options}, options)
        self._extractor: Optional[dict] = None  # filled by compute(): class, weights path + hash
        self._reference: Optional[dict] = None

    def check_inputs(self, base_dir: Path) -> None:
        # a missing reference or weights file must fail the suite now, not after sampling
        if self.cfg.get("weights"):
            resolve_weights(self.cfg["weights"], base_dir, download=False)
        if self.cfg.get("reference") is not None:
            open_reference(self.cfg["reference"], base_dir, self.cfg["num_reference"])

    # ---- shared steps ---------------------------------------------------------------------
    def _featurizer(self, context: MetricContext) -> InceptionFeaturizer:
        path = resolve_weights(self.cfg["weights"], context.base_dir, self.cfg["download"])
        fz = get_featurizer(path, context.device, self.cfg["channels_last"])
        self._extractor = fz.identity()
        return fz

    def _samples(self, samples: torch.Tensor, context: MetricContext,
                 fz: InceptionFeaturizer) -> FeatureSet:
        check_images(samples, f"metric {self.name!r}: samples")
        if samples.shape[0] < 2:
            raise PtqbenchError(f"metric {self.name!r} needs at least 2 samples, "
                                f"got {samples.shape[0]}")
        return sample_features(samples, fz, context.shared, self.cfg["batch_size"], self.cfg["tf32"])

    def _cached(self, context: MetricContext, sha: str, n: int, load, fz) -> FeatureSet:
        def compute() -> FeatureSet:
            return featurize(load(), fz, self.cfg["batch_size"], self.cfg["tf32"])

        fs, _ = cached_features(context.cache_dir, sha, n, compute, fz, self.cfg["tf32"])
        return fs

    def _dataset_reference(self, context: MetricContext,
                           fz: InceptionFeaturizer) -> tuple[FeatureSet, dict]:
        src = open_reference(self.cfg["reference"], context.base_dir, self.cfg["num_reference"])
        memo_dir = Path(context.cache_dir) / "inception" / "fingerprints"
        ident, images = fingerprint(src, memo_dir)
        fs = self._cached(context, ident["sha256"], ident["n"],
                          lambda: images if images is not None else src.load(), fz)
        self._reference = {"path": str(src.path), "kind": src.kind, "sha256": ident["sha256"],
                           "n": ident["n"], "shape": ident["shape"]}
        return fs, self._reference

    def _annotate(self, value: dict, n: int, reference: Optional[dict] = None) -> dict:
        value["n"] = n
        if reference is not None:
            value["reference"] = reference
        value["extractor"] = dict(self._extractor or {})
        return value

    def identity(self) -> dict:
        try:
            from ptqbench.metrics.inception import torch_fidelity_version

            tf_version = torch_fidelity_version()
        except ImportError:
            tf_version = None
        out = {"implementation": f"ptqbench.metrics + torch-fidelity {tf_version}",
               "extractor_class": EXTRACTOR_CLASS, "torch_fidelity": tf_version,
               "torch": torch.__version__, "options": dict(self.cfg)}
        if self._extractor is not None:
            out["extractor"] = self._extractor  # weights path and sha256, known after compute()
        if self._reference is not None:
            out["reference"] = self._reference
        return out


class _FrechetMetric(_InceptionMetric):
    """FID on pool features or sFID on spatial features against a dataset reference."""

    extra_options = {**_REFERENCE, "bootstrap": (30, int, 0),
                     "reference_statistics": ("images", str, None)}
    kind = "pool"
    output = "fid"

    def __init__(self, **options: Any):
        super().__init__(**options)
        if self.cfg["reference_statistics"] not in ("images", "file"):
            raise PtqbenchError(f"metric {self.name!r}: option 'reference_statistics' must be "
                                f"'images' or 'file', got {self.cfg['reference_statistics']!r}")

    def compute(self, samples: torch.Tensor, context: MetricContext) -> dict[str, dict]:
        fz = self._featurizer(context)
        gen = self._samples(samples, context, fz)
        ref_gauss, ref_info = self._file_reference(context)
        if ref_gauss is None:
            ref, ref_info = self._dataset_reference(context, fz)
            ref_gauss = ref.gaussian(self.kind, context.device)
        value = frechet_distance(gen.gaussian(self.kind, context.device), ref_gauss)
        reps = bootstrap_fid(gen.raw(self.kind), ref_gauss, self.cfg["bootstrap"], self.cfg["seed"])
        out = fid_value(value, reps, "samples resampled, reference statistics fixed")
        return {self.output: self._annotate(out, gen.n, ref_info)}


    def _file_reference(self, context: MetricContext):
        """ADM batches' precomputed statistics, when ``reference_statistics = "file"``."""
        if self.cfg["reference_statistics"] != "file":
            return None, None
        src = open_reference(self.cfg["reference"], context.base_dir, self.cfg["num_reference"])
        stats = file_statistics(src, self.kind)
        if stats is None:
            raise PtqbenchError(f"reference {src.path}: reference_statistics = 'file' but it "
                                f"holds no {'/'.join(STAT_KEYS[self.kind])} (an ADM .npz does)")
        self._reference = {"path": str(src.path), "kind": "adm-statistics", "n": stats.n,
                           "statistics": "/".join(STAT_KEYS[self.kind])}
        return Gaussian.from_stats(stats, context.device), self._reference


class FID(_FrechetMetric):
    name = "fid"
    description = "Fréchet Inception Distance to a dataset reference (torch-fidelity Inception-v3)"


class SFID(_FrechetMetric):
    name = "sfid"
    description = "spatial FID: Fréchet distance of Mixed_6d/conv features (7x17x17) to a reference"
    kind = "spatial"
    output = "sfid"


class KID(_InceptionMetric):
    name = "kid"
    description = "Kernel Inception Distance to a dataset reference (torch-fidelity subsets)"
    extra_options = {**_REFERENCE, "subsets": (100, int, 1), "subset_size": (1000, int, 2)}

    def compute(self, samples: torch.Tensor, context: MetricContext) -> dict[str, dict]:
        fz = self._featurizer(context)
        gen = self._samples(samples, context, fz)
        ref, ref_info = self._dataset_reference(context, fz)
        out = kid(gen.pool, ref.pool, self.cfg["subsets"], self.cfg["subset_size"], self.cfg["seed"])
        return {"kid": self._annotate(out, gen.n, ref_info)}


class PRC(_InceptionMetric):
    name = "prc"
    description = "precision and recall (k-NN manifolds) on Inception-2048 features vs a reference"
    extra_options = {**_REFERENCE, "neighborhood": (3, int, 1)}

    def compute(self, samples: torch.Tensor, context: MetricContext) -> dict[str, dict]:
        fz = self._featurizer(context)
        gen = self._samples(samples, context, fz)
        ref, ref_info = self._dataset_reference(context, fz)
        k = self.cfg["neighborhood"]
        if min(gen.n, ref.n) <= k:
            reason = f"k-NN balls with k = {k} need more than {k} samples in each set"
            values = {"precision": None, "recall": None}
        else:
            precision, recall = precision_recall(gen.pool, ref.pool, k)
            values = {"precision": precision, "recall": recall}
        out = {}
        for name, v in values.items():
            entry = {"value": v, "higher_is_better": True, "neighborhood": k}
            if v is None:
                entry["unavailable"] = reason
            out[name] = self._annotate(entry, gen.n, ref_info)
        return out


class IS(_InceptionMetric):
    name = "is"
    description = "Inception Score from the Inception-v3 logits (needs weights with a classifier)"
    extra_options = {"splits": (10, int, 1)}

    def compute(self, samples: torch.Tensor, context: MetricContext) -> dict[str, dict]:
        fz = self._featurizer(context)
        gen = self._samples(samples, context, fz)
        splits = self.cfg["splits"]
        if not fz.has_logits:
            out = {"value": None, "higher_is_better": True,
                   "unavailable": f"the Inception weights {fz.weights.name} have no classifier "
                                  f"(fc weights are NaN: a features-only file); IS needs "
                                  f"torch-fidelity's full weights"}
        elif gen.n < splits:
            out = {"value": None, "higher_is_better": True,
                   "unavailable": f"IS with {splits} splits needs at least {splits} samples"}
        else:
            try:
                out = inception_score(gen.logits, splits, self.cfg["seed"])
            except ValueError as exc:  # non-finite logits: report, never a number
                out = {"value": None, "higher_is_better": True, "unavailable": str(exc)}
        return {"is": self._annotate(out, gen.n)}


class FIDToFP(_InceptionMetric):
    name = "fid-to-fp"
    description = "FID of the samples against the FP model's samples with the same seeds (paired)"
    needs_fp_samples = True
    extra_options = {"bootstrap": (30, int, 0)}

    def compute(self, samples: torch.Tensor, context: MetricContext) -> dict[str, dict]:
        if context.is_reference_cell:
            # The FP cell's own samples: FID-to-FP is 0 by definition. Their features are stored
            # in the cache now, while at hand: every quantized cell of the run compares with them.
            fz = self._featurizer(context)
            gen = self._samples(samples, context, fz)
            sha = tensor_hash(samples, context.shared)
            cached_features(context.cache_dir, sha, gen.n, lambda: gen, fz, self.cfg["tf32"])
            self._reference = {"kind": "fp-samples", "sha256": sha, "n": gen.n}
            out = {"value": 0.0, "ci": [0.0, 0.0], "higher_is_better": False,
                   "note": "reference cell: the samples are the FP samples"}
            return {"fid_to_fp": self._annotate(out, gen.n, self._reference)}
        fp = context.fp_samples
        if fp is None:
            out = {"value": None, "higher_is_better": False,
                   "unavailable": "no FP samples with the same seeds (the FP cell has none)"}
            return {"fid_to_fp": self._annotate(out, int(samples.shape[0]))}
        check_images(fp, f"metric {self.name!r}: FP samples")
        if tuple(fp.shape) != tuple(samples.shape):
            raise PtqbenchError(f"metric {self.name!r}: samples {tuple(samples.shape)} and FP samples "
                                f"{tuple(fp.shape)} differ in shape; they must share seeds")
        fz = self._featurizer(context)
        gen = self._samples(samples, context, fz)
        sha = tensor_hash(fp, context.shared)
        self._reference = {"kind": "fp-samples", "sha256": sha, "n": int(fp.shape[0])}
        ref = self._cached(context, sha, int(fp.shape[0]), lambda: fp, fz)
        device = context.device
        value = frechet_distance(gen.gaussian("pool", device), ref.gaussian("pool", device))
        reps = bootstrap_fid(gen.pool, ref.pool, self.cfg["bootstrap"], self.cfg["seed"])
        out = fid_value(value, reps, "samples and FP samples resampled with the same indices (paired)")
        return {"fid_to_fp": self._annotate(out, gen.n, self._reference)}


@hookimpl
def register_metrics(register):
    for cls in (FID, SFID, KID, PRC, IS, FIDToFP):
        register(cls)
