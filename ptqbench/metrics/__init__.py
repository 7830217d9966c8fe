"""The metric stack: Inception features (FID, sFID, KID, precision/recall, IS, FID-to-FP), reference
sets and their feature cache, bootstrap intervals, and the significance rule reports use.

Modules: ``inception`` (weights, one-pass feature extractor), ``features`` (per-cell memo, disk
cache), ``reference`` (reference loading and content hashes), ``fid`` (Fréchet distance and its
bootstrap), ``scores`` (KID, precision/recall, IS), ``bootstrap``, ``hashing``, ``significance``.
The metric plugins themselves live in ``ptqbench_plugins.metrics``. Only ``significance`` is
imported here: importing this package must stay cheap (no torch-fidelity).
"""
from .significance import format_value, not_significantly_different

__all__ = ["format_value", "not_significantly_different"]
