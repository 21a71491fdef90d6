"""SeaCache: Spectral-Evolution-Aware Cache (Chung et al., CVPR 2026, arXiv 2602.18993; diffusers 0.42
``hooks/sea_cache.py``). The config (:class:`SeaCacheConfig`), the rule on the SEA-filtered raw latent
(:class:`SeaCachePolicy`, state :class:`SeaCacheState`), the SEA filter and distance it measures with
(:func:`sea_filter`, :func:`sea_gain`, :func:`sea_distance`), its residual extrapolation
(:class:`LinearExtrapolationStore`), the calibration (``calibrate=True`` records the distances;
:func:`suggest_sea_threshold` replays the rule) and the sweep metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

from ..calibration import runs_of
from ..configs import StepCacheConfig, _check_int, _check_number, _set_bool, register_cache_method
from ..policies import CachePolicy, Decision, Gate, StepContext
from ..registry import THRESHOLD_RANGE, Sweep
from ..residuals import ResidualStore, Streams, sigma_at
from ..spec import ModelCacheSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "SEA_EPSILON",
    "LinearExtrapolationStore",
    "SeaCacheConfig",
    "SeaCachePolicy",
    "SeaCacheState",
    "SeaThreshold",
    "replay_seacache",
    "sea_distance",
    "sea_distances",
    "sea_filter",
    "sea_gain",
    "suggest_sea_threshold",
]


# -- the SEA filter and distance (torch is imported when a step runs: importing this module loads none) ------------
# SeaCache decides from the *raw latent* entering the transformer, not from an embedding: before two consecutive
# steps' latents are compared, each is passed through a filter that keeps the part of its spectrum where the clean
# signal dominates the noise at the step's noise level. Per latent, over its grid axes (the two spatial axes of an
# image, ``(T, H, W)`` of a video), each channel on its own:
#
# * ``sigma`` is the step's noise level of the flow-matching schedule (``x_sigma = (1 - sigma) x_0 + sigma eps``),
#   clamped to ``[1e-6, 1 - 1e-6]``; ``s = 1 - sigma`` scales the signal, ``n = sigma`` the noise.
# * The clean signal's power along an axis is a power law of the frequency, ``P(f) = |f|^-power_exp``
#   (``f = torch.fft.fftfreq(size)``, cycles per sample in ``[-1/2, 1/2)``); the noise is white. The Wiener-like gain
#   of the axis is ``g(f) = s P(f) / (s^2 P(f) + n^2) = s / (s^2 + n^2 |f|^power_exp)`` (at ``f = 0``: ``1 / s``).
# * The gain over the grid is the product of the per-axis gains, divided by its mean over the grid (unit mean, the
#   paper's Eq. (7), so that distances are comparable across steps); the filtered latent is
#   ``real(ifftn(fftn(x) * gain))``, computed in float32 and returned in the input's dtype.
#
# An image is a one-frame video: the gain of an axis of length 1 is a constant, which the unit-mean normalisation
# removes, so the 2-D filter over ``(H, W)`` equals the hook's 3-D filter of the same image with ``T = 1`` (checked
# against the installed ``_apply_sea_filter`` in ``tests/test_seacache.py``).
#
# The distance between consecutive steps' filtered latents is the hook's: per batch row (the hook's list of latents,
# one per sample), ``mean|a - b| / (mean|b| + 1e-16)`` in float32, then the mean over the rows.

SEA_EPSILON = 1e-16
"""Added to the mean of the previous filtered latent in the distance (diffusers' ``SeaCacheSharedState.resolve_gate``)."""

_SIGMA_CLAMP = 1e-6
"""``sigma`` is clamped to ``[1e-6, 1 - 1e-6]`` before the gain (diffusers' ``_apply_sea_filter``)."""


def _axis_gain(size: int, sigma: float, power_exp: float, device: torch.device) -> torch.Tensor:
    """The Wiener-like gain ``s / (s^2 + n^2 |f|^power_exp)`` over ``fftfreq(size)``, float32, shape ``(size,)``."""
    import torch

    signal, noise = 1.0 - sigma, sigma
    frequencies = torch.fft.fftfreq(size, device=device, dtype=torch.float32).abs()
    return signal / (signal * signal + noise * noise * frequencies.pow(power_exp))


def sea_gain(grid: tuple[int, ...], sigma: float, power_exp: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The unit-mean separable SEA gain over a grid of shape ``grid`` (float32, shape ``grid``).

    Args:
        grid: the sizes of the filtered axes, e.g. ``(H, W)``.
        sigma: the step's noise level in ``[0, 1]`` (clamped to ``[1e-6, 1 - 1e-6]``).
        power_exp: the exponent of the clean signal's power-law prior, ``> 0``.
    """
    import torch

    sigma = min(max(float(sigma), _SIGMA_CLAMP), 1.0 - _SIGMA_CLAMP)
    gain = torch.ones((), dtype=torch.float32, device=device)
    for axis, size in enumerate(grid):
        shape = [1] * len(grid)
        shape[axis] = size
        gain = gain * _axis_gain(size, sigma, power_exp, torch.device(device)).reshape(shape)
    mean = gain.mean()
    if torch.isfinite(mean) and mean > 0:
        gain = gain / mean
    return gain


def sea_filter(latents: torch.Tensor, sigma: float, power_exp: float, grid_dims: int = 2) -> torch.Tensor:
    """The SEA-filtered latent: ``real(ifftn(fftn(x) * gain))`` over the last ``grid_dims`` axes.

    Args:
        latents: ``(..., *grid)``, e.g. ``(B, C, H, W)`` for images (``grid_dims=2``) or ``(B, C, T, H, W)`` for
            videos (``grid_dims=3``); every leading index (batch row, channel) is filtered on its own.
        sigma: the step's noise level in ``[0, 1]``.
        power_exp: the prior's exponent, ``> 0`` (SeaCache's default 3.0, see ``SeaCacheConfig.power_exp``).
        grid_dims: how many trailing axes form the grid, ``>= 1``.

    Returns:
        The filtered latent, same shape and dtype as ``latents`` (computed in float32).

    Raises:
        ValueError: when ``latents`` has fewer than ``grid_dims`` axes or ``grid_dims < 1``.
    """
    if grid_dims < 1 or latents.ndim < grid_dims:
        raise ValueError(f"sea_filter: need grid_dims >= 1 trailing axes, got grid_dims={grid_dims} for shape "
                         f"{tuple(latents.shape)}")
    import torch

    dims = tuple(range(latents.ndim - grid_dims, latents.ndim))
    values = latents.detach().float()
    gain = sea_gain(tuple(values.shape[d] for d in dims), sigma, power_exp, values.device)
    filtered = torch.fft.ifftn(torch.fft.fftn(values, dim=dims) * gain, dim=dims).real
    return filtered.to(latents.dtype)


def sea_distance(current: torch.Tensor, previous: torch.Tensor) -> float:
    """Mean over batch rows of ``mean|current - previous| / (mean|previous| + 1e-16)`` (float32).

    Args:
        current, previous: filtered latents of one shape ``(B, ...)``; row ``b`` is one sample.

    Raises:
        ValueError: when the shapes differ.
    """
    if current.shape != previous.shape:
        raise ValueError(f"sea_distance: shapes differ, {tuple(current.shape)} and {tuple(previous.shape)}")
    current = current.float().flatten(1)
    previous = previous.float().flatten(1)
    per_row = (current - previous).abs().mean(dim=1) / (previous.abs().mean(dim=1) + SEA_EPSILON)
    return float(per_row.mean())


class LinearExtrapolationStore(ResidualStore):
    """SeaCache's ``residual_order=1``: the residual extrapolated linearly from the last two computed steps.

    With residuals ``R_1``, ``R_2`` computed at steps ``s_1 < s_2``, a reused step ``s`` gets
    ``R_2 + (R_2 - R_1) * (s - s_2) / (s_2 - s_1)``, in the residuals' dtype (as diffusers'
    ``hooks/sea_cache.py``, ``SeaCacheLeaderBlockHook.new_forward``); with one computed step, ``R_2`` as it is. A
    change of the inputs' shapes restarts the history.
    """

    def __init__(self) -> None:
        super().__init__()
        self.previous: tuple[int, Streams] | None = None

    def update(self, step: int, streams: Streams, residuals: Streams) -> None:
        keep = self.residuals is not None and self.input_shapes == tuple(s.shape for s in streams)
        self.previous = (self.last_step, self.residuals) if keep and self.last_step != step else None
        super().update(step, streams, residuals)

    def get(self, step: int) -> Streams:
        if self.previous is None:
            return self.residuals
        previous_step, previous = self.previous
        scale = (step - self.last_step) / (self.last_step - previous_step)
        return tuple(r + (r - p) * scale for r, p in zip(self.residuals, previous))


@dataclass
class SeaCacheState:
    """Per-branch SeaCache state: the previous step's filtered latent and step, the accumulated distance, the reused
    steps in a row; in calibration mode the distance recorded at every step."""

    previous: torch.Tensor | None = None
    previous_step: int | None = None
    accumulated: float = 0.0
    consecutive: int = 0
    why_none: str = "no-previous-indicator"
    distances: list[float | None] = field(default_factory=list)


class SeaCachePolicy(CachePolicy):
    """SeaCache's rule (see :class:`~cached_diffusers.SeaCacheConfig`) on the SEA-filtered raw latent.

    The model's indicator (kind ``"sea_latent"``) is the raw latent on its grid, ``(B, C, *grid)``; it is filtered
    over the grid axes (:func:`sea_filter`) at the step's ``sigma``. The latent is whole on every
    rank (models gather a sharded one), so the distance is local: no reduction over the sequence group.
    """

    indicator_kind = "sea_latent"
    value_name = "accumulated relative L1 distance of the SEA-filtered raw latent"

    @property
    def samples_decide_alike(self) -> bool:
        """A calibration run (``calibrate=True``) computes every step: its samples agree by construction."""
        return self.config.calibrate

    def __init__(self, config: SeaCacheConfig, spec: ModelCacheSpec):
        super().__init__(config, spec)

    def new_state(self) -> SeaCacheState:
        return SeaCacheState()

    def make_store(self, first_step: int = 0, sigmas: Callable[[], Any] | None = None) -> ResidualStore:
        return LinearExtrapolationStore() if self.config.residual_order == 1 else ResidualStore()

    def observe_step(
        self, ctx: StepContext, sigmas: Callable[[], Any] | None, state: SeaCacheState, indicator: torch.Tensor | None
    ) -> float | None:
        if indicator is None:
            raise ValueError("SeaCache needs the model's raw latent ('sea_latent' indicator), but the model provided none")
        if indicator.ndim < 3:
            raise ValueError(
                f"SeaCache's indicator must be a latent grid (B, C, *grid), got shape {tuple(indicator.shape)}"
            )
        sigma = sigma_at(sigmas() if sigmas is not None else None, ctx.step, ctx.num_steps)
        filtered = sea_filter(indicator, sigma, self.config.power_exp, grid_dims=indicator.ndim - 2)
        previous, previous_step = state.previous, state.previous_step
        state.previous, state.previous_step = filtered, ctx.step
        distance = None
        if previous is None:
            state.why_none = "no-previous-indicator"
        elif previous_step != ctx.step - 1:
            # diffusers' gate resets its trajectory on non-adjacent steps and runs full
            state.why_none = "non-adjacent-step"
        elif previous.shape != filtered.shape:
            state.why_none = "indicator-changed-shape"
        else:
            distance = sea_distance(filtered, previous)
        if self.config.calibrate:
            if len(state.distances) != ctx.num_steps:
                state.distances = [None] * ctx.num_steps
            state.distances[ctx.step] = distance
        return distance

    def _compute(self, state: SeaCacheState, reason: str, value: float | None = None) -> Decision:
        state.accumulated = 0.0
        state.consecutive = 0
        return Decision(False, reason, value)

    def decide(
        self, ctx: StepContext, state: SeaCacheState, measurement: float | None, gate: Gate, reason: str
    ) -> Decision:
        config = self.config
        if config.calibrate:
            return self._compute(state, "calibration", measurement)
        if gate is Gate.COMPUTE:
            return self._compute(state, reason)
        if gate is Gate.REUSE:  # a static SCM mask
            state.accumulated += measurement or 0.0
            state.consecutive += 1
            return Decision(True, reason, state.accumulated)
        # the hook's forced computes (diffusers SeaCacheSharedState.resolve_gate), counted in executed steps
        if ctx.executed < config.retention_steps:
            return self._compute(state, "retention")
        if ctx.executed >= ctx.num_executed - config.cache_end_steps:
            return self._compute(state, "cache-end")
        if measurement is None:
            return self._compute(state, state.why_none)
        if config.max_consecutive_cached and state.consecutive >= config.max_consecutive_cached:
            return self._compute(state, "max-consecutive-cached")
        accumulated = state.accumulated + measurement
        if accumulated >= config.threshold:
            return self._compute(state, "above-threshold", accumulated)
        state.accumulated = accumulated
        state.consecutive += 1
        return Decision(True, "below-threshold", accumulated)

    def calibration(self, state: SeaCacheState) -> dict[str, Any]:
        return {"sea_distances": list(state.distances)} if self.config.calibrate else {}


@register_cache_method
@dataclass(frozen=True)
class SeaCacheConfig(StepCacheConfig):
    """SeaCache: Spectral-Evolution-Aware Cache (Chung et al., CVPR 2026, arXiv 2602.18993; diffusers 0.42
    ``diffusers/hooks/sea_cache.py``, whose parameter names and defaults these are).

    Per guidance branch, the indicator is the *raw latent* entering the transformer on its grid ``(B, C, H, W)``
    (packed patch tokens unpacked; see ``docs/methods.md`` for each model), passed through the SEA filter at the
    step's noise level ``sigma`` (:func:`sea_filter`: an FFT over the grid per channel, a
    per-axis Wiener-like gain ``s / (s^2 + sigma^2 |f|^power_exp)`` with ``s = 1 - sigma``, normalised to unit mean).
    The relative L1 distance between consecutive steps' filtered latents (mean over batch rows of
    ``mean|a - b| / (mean|b| + 1e-16)``) accumulates; a step reuses while the sum stays below ``threshold``; when it
    reaches ``threshold`` the step computes and the sum restarts from 0. The previous filtered latent is updated at
    every step. The first ``retention_steps`` and the last ``cache_end_steps`` executed steps always compute, and
    after ``max_consecutive_cached`` reused steps in a row the next one computes. A reused step adds the residual of
    the last computed step (``residual_order=0``) or its linear extrapolation from the last two computed steps
    ``s_1 < s_2`` (``residual_order=1``): ``R(s) = R_2 + (R_2 - R_1) (s - s_2) / (s_2 - s_1)``.

    ``sigma`` is the running scheduler's ``sigmas[step]`` (the value diffusers' pipelines pass to the hook's
    ``cache_context(..., sigma=...)``), or ``1 - step / N`` for a transformer driven without a pipeline.

    Args:
        threshold (`float`, defaults to 0.25, range >= 0):
            Accumulated filtered-latent distance at which a step computes; larger reuses more. 0 computes every step.
        residual_order (`int`, defaults to 1, 0 or 1):
            0 reuses the last computed residual; 1 extrapolates linearly from the last two computed steps.
        retention_steps (`int`, defaults to 1, range >= 0):
            The first executed steps that always compute (step 0 of a branch computes regardless).
        cache_end_steps (`int`, defaults to 1, range >= 0):
            The last steps that always compute.
        max_consecutive_cached (`int`, defaults to 2, range >= 0):
            After this many reused steps in a row, the next step computes; 0 means no limit. The name is diffusers'
            (``hooks/sea_cache.py``, ``SeaCacheConfig.max_consecutive_cached``), kept so its configs read the same;
            "cached" here means reused.
        power_exp (`float`, defaults to 3.0, range > 0):
            Exponent of the clean signal's power-law prior ``|f|^-power_exp`` per grid axis (the hook's default, for
            video features; kept for images, see ``docs/methods.md``).
        calibrate (`bool`, defaults to `False`):
            Calibration mode: never reuse; record each branch's distance at every step in
            ``stats.branches[b].calibration["sea_distances"]`` (``None`` where there is no previous step), from
            which :func:`suggest_sea_threshold` replays the rule.
        other fields: the shared guards of :class:`StepCacheConfig` (``compute_last_step`` duplicates
            ``cache_end_steps >= 1``; ``max_continuous_cached_steps`` is the engine's cap, independent of
            ``max_consecutive_cached``).

    Raises:
        ValueError: for a value outside its range, naming the field.
    """

    method: ClassVar[str] = "seacache"
    aliases: ClassVar[tuple[str, ...]] = ("sea_cache", "sea-cache")
    source: ClassVar[str] = (
        "Chung et al., SeaCache: Spectral-Evolution-Aware Cache for Accelerating Diffusion Models, CVPR 2026 "
        "(arXiv 2602.18993); huggingface/diffusers 0.42 hooks/sea_cache.py"
    )
    policy_class: ClassVar[type] = SeaCachePolicy
    calibration: ClassVar[str] = "runs"
    sweep: ClassVar[Sweep] = Sweep(
        "threshold", "log", *THRESHOLD_RANGE, values=(0.1, 0.25, 0.5, 1.0), rank=5,
        published={"threshold": 0.25},
        published_source="diffusers 0.42 hooks/sea_cache.py default (an SGLang pull request reports 0.3 on FLUX.1-dev)",
    )

    threshold: float = 0.25
    residual_order: int = 1
    retention_steps: int = 1
    cache_end_steps: int = 1
    max_consecutive_cached: int = 2
    power_exp: float = 3.0
    calibrate: bool = False

    calibration_target: ClassVar[str] = "computed_steps"

    def for_budget_search(self, num_steps: int) -> SeaCacheConfig:
        """``max_consecutive_cached = 0`` (no limit; the hook's other defaults kept), so that the cap does not keep
        SeaCache above small budgets."""
        return self.replace(max_consecutive_cached=0)

    @classmethod
    def calibrated(cls, runs: list[Any], options: Mapping[str, Any]) -> tuple[SeaCacheConfig, dict[str, Any], list[str]]:
        """``calibrate --method seacache --computed-steps N``: the largest threshold whose replay on the runs computes
        at least ``options["computed_steps"]`` steps per branch (:func:`suggest_sea_threshold`)."""
        target = options["computed_steps"]
        suggestion = suggest_sea_threshold(runs, target, cls())
        quality = {"target_computed_steps": target, "replayed_computed_steps": suggestion.computed_steps}
        return cls(threshold=suggestion.threshold), quality, [suggestion.summary()]

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        object.__setattr__(self, "threshold", _check_number(owner, "threshold", self.threshold, low=0.0))
        order = _check_int(owner, "residual_order", self.residual_order, low=0)
        if order > 1:
            raise ValueError(f"{owner}.residual_order must be 0 or 1, got {order}")
        object.__setattr__(self, "residual_order", order)
        for name in ("retention_steps", "cache_end_steps", "max_consecutive_cached"):
            object.__setattr__(self, name, _check_int(owner, name, getattr(self, name), low=0))
        object.__setattr__(
            self, "power_exp", _check_number(owner, "power_exp", self.power_exp, low=0.0, low_open=True)
        )
        _set_bool(self, "calibrate")


# -- calibration ------------------------------------------------------------------------------------------------------
def sea_distances(stats: Any) -> list[dict[str, list[float | None]]]:
    """Per run, ``{branch: distances}`` recorded by ``SeaCacheConfig(calibrate=True)`` runs (``None`` where a step had
    no previous one).

    Raises:
        ValueError: if no run holds a SeaCache calibration.
    """
    runs = []
    for run in runs_of(stats):
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
    first_steps = [getattr(run, "first_step", None) or 0 for run in runs_of(stats)]
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
