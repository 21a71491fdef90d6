"""Calibration: fit what TeaCache and MagCache need from uncached runs of a model.

TeaCache (Liu et al., arXiv 2411.19108): a 4th-order polynomial mapping the relative L1 change of the model's indicator
(block 0's modulated input) to the relative L1 change of the block stack's output between consecutive steps, fitted
by unweighted least squares on the pairs of every prompt and branch (as handoku/TeaCache-Coeffients-Caculator and
vllm-omni's ``coefficient_estimator.py`` do, but with pairs formed per branch). MagCache (Ma et al., arXiv
2506.09045): per-step magnitude ratios per branch, averaged over the calibration prompts.

Both come from runs with ``TeaCacheConfig(calibrate=True)`` / ``MagCacheConfig(calibrate=True)``, which never reuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["PolynomialFit", "average_mag_ratios", "fit_teacache", "teacache_pairs"]


def _as_list(stats: Any) -> list[Any]:
    return list(stats) if isinstance(stats, (list, tuple)) else [stats]


def teacache_pairs(stats: Any) -> np.ndarray:
    """The ``(x, y)`` pairs recorded by TeaCache calibration runs, pooled over runs and branches: shape ``(P, 2)``."""
    pairs = [
        pair
        for run in _as_list(stats)
        for branch in run.branches.values()
        for pair in branch.calibration.get("teacache_pairs", [])
    ]
    return np.asarray(pairs, dtype=np.float64).reshape(-1, 2)


@dataclass(frozen=True)
class PolynomialFit:
    """A least-squares polynomial fit and its quality.

    Attributes:
        coefficients: highest order first (``numpy.polyfit`` order), 5 numbers for TeaCache.
        num_pairs: number of ``(x, y)`` pairs fitted.
        rmse: root mean square residual, in units of ``y`` (relative L1 change of the stack output).
        r2: coefficient of determination (1 is a perfect fit; <= 0 means no better than the mean).
        x_range: smallest and largest ``x`` fitted; outside it the polynomial extrapolates.
    """

    coefficients: tuple[float, ...]
    num_pairs: int
    rmse: float
    r2: float
    x_range: tuple[float, float]

    def summary(self) -> str:
        c = ", ".join(f"{v:.8e}" for v in self.coefficients)
        return (
            f"TeaCache fit on {self.num_pairs} pairs, x in [{self.x_range[0]:.4g}, {self.x_range[1]:.4g}]: "
            f"coefficients [{c}], RMSE {self.rmse:.4g}, R^2 {self.r2:.4f}"
        )


def fit_teacache(pairs: np.ndarray, degree: int = 4) -> PolynomialFit:
    """Fit ``y ~ poly(x)`` of ``degree`` (4 for TeaCache) by unweighted least squares.

    Raises:
        ValueError: with fewer than ``degree + 1`` pairs, or non-finite values.
    """
    pairs = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
    if len(pairs) < degree + 1:
        raise ValueError(
            f"a degree-{degree} TeaCache fit needs at least {degree + 1} (x, y) pairs, got {len(pairs)}: calibrate "
            f"with more steps or prompts"
        )
    if not np.isfinite(pairs).all():
        raise ValueError("the calibration pairs contain non-finite values")
    x, y = pairs[:, 0], pairs[:, 1]
    coefficients = np.polyfit(x, y, degree)
    residual = y - np.polyval(coefficients, x)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    return PolynomialFit(
        tuple(float(c) for c in coefficients),
        len(pairs),
        float(np.sqrt((residual**2).mean())),
        r2,
        (float(x.min()), float(x.max())),
    )


def average_mag_ratios(stats: Any) -> dict[str, tuple[float, ...]]:
    """Per branch, the mean over runs of the per-step ratios recorded by MagCache calibration runs (5 decimals).

    Raises:
        ValueError: if no run holds a MagCache calibration, or the runs differ in step count.
    """
    per_branch: dict[str, list[Sequence[float]]] = {}
    for run in _as_list(stats):
        for name, branch in run.branches.items():
            if "mag_ratios" in branch.calibration:
                per_branch.setdefault(name, []).append(branch.calibration["mag_ratios"])
    if not per_branch:
        raise ValueError("these statistics hold no MagCache calibration: run once with MagCacheConfig(calibrate=True)")
    averaged = {}
    for name, runs in per_branch.items():
        if len({len(r) for r in runs}) != 1:
            raise ValueError(f"MagCache calibration runs of branch {name!r} differ in step count: {[len(r) for r in runs]}")
        averaged[name] = tuple(round(float(v), 5) for v in np.mean(np.asarray(runs, dtype=np.float64), axis=0))
    return averaged
