"""Calibration: fit what TeaCache and MagCache need from uncached runs of a model (the fits live in the method modules).

TeaCache (Liu et al., arXiv 2411.19108): a 4th-order polynomial mapping the relative L1 change of the model's indicator
(block 0's modulated input) to the relative L1 change of the block stack's output between consecutive steps, fitted
by unweighted least squares on the pairs of every prompt and branch (as handoku/TeaCache-Coeffients-Caculator and
vllm-omni's ``coefficient_estimator.py`` do, but with pairs formed per branch). MagCache (Ma et al., arXiv
2506.09045): per-step magnitude ratios per branch, averaged over the calibration prompts.

Both come from runs with ``TeaCacheConfig(calibrate=True)`` / ``MagCacheConfig(calibrate=True)``, which never reuse.

SeaCache (arXiv 2602.18993) needs no fit: ``SeaCacheConfig(calibrate=True)`` records each branch's filtered-latent
distance at every step, and :func:`suggest_sea_threshold` replays the rule on them to find the threshold that computes
a target number of steps.
"""

from __future__ import annotations

from typing import Any

from .registry import old_path_getattr

__all__ = ["runs_of"]
# Each method's fit lives in its module: TeaCache's pairs and polynomial fit (`teacache_pairs`, `PolynomialFit`,
# `fit_teacache`) in cached_diffusers/methods/teacache.py, MagCache's `average_mag_ratios` in .../magcache.py,
# SeaCache's replay (`sea_distances`, `replay_seacache`, `SeaThreshold`, `suggest_sea_threshold`) in .../seacache.py;
# `cached_diffusers.calibration.<name>` still resolves (module __getattr__).


def runs_of(stats: Any) -> list[Any]:
    """``stats`` as a list of runs: one ``CacheStats`` or a list / tuple of them."""
    return list(stats) if isinstance(stats, (list, tuple)) else [stats]


__getattr__ = old_path_getattr(__name__, "The methods' calibration functions")
