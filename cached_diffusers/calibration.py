"""Calibration: fit what TeaCache and MagCache need from uncached runs of a model.

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

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = [
    "PolynomialFit",
    "SeaThreshold",
    "average_mag_ratios",
    "fit_teacache",
    "replay_seacache",
    "sea_distances",
    "suggest_sea_threshold",
    "teacache_pairs",
]


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


def sea_distances(stats: Any) -> list[dict[str, list[float | None]]]:
    """Per run, ``{branch: distances}`` recorded by ``SeaCacheConfig(calibrate=True)`` runs (``None`` where a step had
    no previous one).

    Raises:
        ValueError: if no run holds a SeaCache calibration.
    """
    runs = []
    for run in _as_list(stats):
        recorded = {
            name: list(branch.calibration["sea_distances"])
            for name, branch in run.branches.items()
            if "sea_distances" in branch.calibration
        }
        if recorded:
            runs.append(recorded)
    if not runs:
        raise ValueError("these statistics hold no SeaCache calibration: run once with SeaCacheConfig(calibrate=True)")
    return runs


def replay_seacache(distances: Sequence[float | None], config: Any, first_step: int = 0) -> list[int]:
    """The steps SeaCache computes on recorded distances (one per step of the schedule), as the policy decides them.

    Replays the rule of :class:`~cached_diffusers.SeaCacheConfig` with its guards: the first executed step,
    ``compute_last_step``, ``max_warmup_steps``, ``retention_steps``, ``cache_end_steps``, steps without a distance,
    ``max_consecutive_cached``, ``max_continuous_cached_steps``, ``max_cached_steps`` and the threshold (SCM masks are
    not replayed). The distances of an uncached run are an estimate: reusing changes the later latents.

    Args:
        distances: ``distances[step]``, the filtered-latent distance to the previous step (``None``: none).
        config: a ``SeaCacheConfig``.
        first_step: the first executed step (img2img / inpaint start later).

    Returns:
        The computed steps, increasing.
    """
    num_steps = len(distances)
    num_executed = num_steps - first_step
    computed, accumulated, consecutive, reused = [], 0.0, 0, 0
    for step in range(first_step, num_steps):
        executed = step - first_step
        distance = distances[step]
        forced = (
            executed == 0
            or (executed < config.max_warmup_steps and executed % config.warmup_interval == 0)
            or (config.compute_last_step and step == num_steps - 1)
            or (config.max_cached_steps is not None and reused >= config.max_cached_steps)
            or (config.max_continuous_cached_steps is not None and consecutive >= config.max_continuous_cached_steps)
            or executed < config.retention_steps
            or executed >= num_executed - config.cache_end_steps
            or distance is None
            or (config.max_consecutive_cached and consecutive >= config.max_consecutive_cached)
        )
        if not forced:
            accumulated += distance
            if accumulated < config.threshold:
                consecutive += 1
                reused += 1
                continue
        computed.append(step)
        accumulated, consecutive = 0.0, 0
    return computed


@dataclass(frozen=True)
class SeaThreshold:
    """A SeaCache threshold suggested by replay.

    Attributes:
        threshold: the largest threshold whose replay computes at least the target steps in every branch and run.
        computed_steps: per run and branch, the number of computed steps at that threshold.
        target: the requested number of computed steps.
    """

    threshold: float
    computed_steps: list[dict[str, int]]
    target: int

    def summary(self) -> str:
        counts = sorted({n for run in self.computed_steps for n in run.values()})
        return (
            f"SeaCache threshold {self.threshold:.6g}: {', '.join(map(str, counts))} computed steps per branch "
            f"(target at least {self.target})"
        )


def suggest_sea_threshold(stats: Any, computed_steps: int, config: Any) -> SeaThreshold:
    """The largest SeaCache threshold that still computes at least ``computed_steps`` steps per branch.

    The accumulated distance only changes a decision when the threshold crosses one of its values, the sums of
    consecutive recorded distances, so the candidates are those sums (and 0); each is replayed with
    :func:`replay_seacache` on every run and branch, and the largest whose every replay computes at least
    ``computed_steps`` steps is returned.

    Args:
        stats: one ``CacheStats`` or a list, from ``SeaCacheConfig(calibrate=True)`` runs.
        computed_steps: the target, ``>= 1``.
        config: the ``SeaCacheConfig`` whose guards to replay (``SeaCacheConfig()`` for the hook's defaults).

    Raises:
        ValueError: without a SeaCache calibration, or for ``computed_steps`` < 1 or above the step count.
    """
    runs = sea_distances(stats)
    first_steps = [getattr(run, "first_step", None) or 0 for run in _as_list(stats)]
    num_steps = min(len(d) for run in runs for d in run.values())
    if not 1 <= computed_steps <= num_steps:
        raise ValueError(f"computed_steps must be an integer in [1, {num_steps}] (the step count), got {computed_steps}")
    candidates = {0.0}
    for run in runs:
        for distances in run.values():
            values = [d for d in distances if d is not None]
            for start in range(len(values)):
                total = 0.0
                for value in values[start:]:
                    total += value
                    candidates.add(total)
    best = None
    for threshold in sorted(candidates):
        trial = config.replace(threshold=threshold, calibrate=False)
        counts = [
            {name: len(replay_seacache(d, trial, first)) for name, d in run.items()}
            for run, first in zip(runs, first_steps)
        ]
        if all(n >= computed_steps for run in counts for n in run.values()):
            best = SeaThreshold(threshold, counts, computed_steps)
    return best
