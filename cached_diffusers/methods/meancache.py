"""MeanCache: average-velocity caching (Gao et al., ICLR 2026, arXiv 2601.19961; UnicomAI/MeanCache), a planned
schedule. The config (:class:`MeanCacheConfig`), the policy (:class:`MeanCachePolicy`), the average-velocity forecast
of the residual (:class:`MeanCacheStore`), its calibration (the window per gap, :func:`choose_meancache_windows`) and
the sweep metadata (the budget). The schedule (solved from LeMiCa's error matrix) and the window per gap come from
``cached-diffusers calibrate --method meancache``.

:func:`choose_meancache_windows`: MeanCache's averaging window per gap of a schedule (Gao et al., ICLR 2026, arXiv
2601.19961; the official schedules pick one of 1..6 per gap, UnicomAI/MeanCache). One pass over the gaps in order:
each candidate window is tried on the full schedule with the windows chosen so far, and kept if it lowers the global
error of the final latents (:func:`cached_diffusers.calibration_schedules.latent_error`); window 1 (plain reuse,
LeMiCa's rule) is the start.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from ..calibration_schedules import final_latents, latent_error
from ..configs import _check_int, register_cache_method
from ..planned import PlannedScheduleConfig, PlannedSchedulePolicy
from ..registry import Sweep
from ..residuals import ResidualStore, Streams, sigma_at
from ..spec import ModelCacheSpec
from ..validation import as_scalar, as_sequence

__all__ = ["MEANCACHE_MAX_WINDOW", "MeanCacheConfig", "MeanCachePolicy", "MeanCacheStore", "choose_meancache_windows"]


class MeanCacheStore(ResidualStore):
    """MeanCache's average-velocity forecast of the residuals (Gao et al., ICLR 2026, arXiv 2601.19961;
    UnicomAI/MeanCache ``MeanCache4Qwen-Image/Mc_qwenimage.py``, ``compute_current_jvp``).

    Keeps ``u_m``, the residuals of the last :data:`MEANCACHE_MAX_WINDOW` steps of the
    branch, computed or forecast (float32). At a reused step ``i`` with window ``k = window_for(i)`` (clipped to the
    history held), over the window's steps ``m_0 < ... < m_{k-1}`` (the last ``k`` held):
    ``avg = sum_j u_{m_j} (sigma_{m_{j+1}} - sigma_{m_j}) / (sigma_i - sigma_{m_0})`` with ``m_k = i``,
    ``d = (u_{m_0} - avg) / (sigma_i - sigma_{m_0})`` and the forecast ``u_i = u_{m_{k-1}} - d (sigma_{i+1} - sigma_i)``,
    which joins the history. ``k = 1`` returns the last residual unchanged.

    Args:
        window_for: ``window_for(step) -> k``, the window of the gap holding ``step``.
        sigmas: ``sigmas() -> sequence or None``, the scheduler's sigmas of the running generation (``None``: uniform
            ``1 - step / N``, see :func:`sigma_at`).
        num_steps: ``N``, the step count of the schedule.
        max_window: the longest window that can be asked for (history kept).
    """

    def __init__(
        self, window_for: Callable[[int], int], sigmas: Callable[[], Any] | None, num_steps: int, max_window: int
    ) -> None:
        super().__init__()
        self.window_for = window_for
        self.sigmas = sigmas
        self.num_steps = num_steps
        self.max_window = max_window
        self.history: list[tuple[int, Streams]] = []

    def _sigma(self, step: int) -> float:
        sigmas = self.sigmas() if self.sigmas is not None else None
        return sigma_at(sigmas, step, self.num_steps)

    def _remember(self, step: int, values: Streams) -> None:
        if self.history and any(a.shape != b.shape for a, b in zip(values, self.history[-1][1])):
            self.history = []
        self.history.append((step, values))
        del self.history[: -self.max_window]

    def update(self, step: int, streams: Streams, residuals: Streams) -> None:
        super().update(step, streams, residuals)
        self._remember(step, tuple(r.detach().float() for r in residuals))

    def get(self, step: int) -> Streams:
        window = self.history[-min(self.window_for(step), len(self.history)):]
        last = window[-1][1]
        if len(window) == 1:
            forecast = last
        else:
            ends = [m for m, _ in window[1:]] + [step]
            span = self._sigma(step) - self._sigma(window[0][0])
            average = [v.new_zeros(v.shape) for v in last]
            for (m, values), end in zip(window, ends):
                weight = (self._sigma(end) - self._sigma(m)) / span
                average = [a + weight * v for a, v in zip(average, values)]
            scale = (self._sigma(step + 1) - self._sigma(step)) / span
            forecast = tuple(u - scale * (u0 - a) for u, u0, a in zip(last, window[0][1], average))
        self._remember(step, forecast)
        return tuple(f.to(r.dtype) for f, r in zip(forecast, self.residuals))


class MeanCachePolicy(PlannedSchedulePolicy):
    """MeanCache (see :class:`MeanCacheConfig`): a reused step adds the average-velocity
    forecast of the residual, with the window of the gap it lies in."""

    def __init__(self, config: MeanCacheConfig, spec: ModelCacheSpec):
        super().__init__(config, spec)

    def window_at(self, step: int) -> int:
        """The window of the gap holding ``step`` (the gap after the last computed step ``<= step``)."""
        steps = self.config.computed_steps
        gap = min(max(bisect.bisect_right(steps, step) - 1, 0), len(steps) - 2)
        return self.config.window_of_gap(gap)

    def make_store(self, first_step: int = 0, sigmas: Callable[[], Any] | None = None) -> ResidualStore:
        return MeanCacheStore(self.window_at, sigmas, self.config.num_inference_steps, self.config.max_window)


MEANCACHE_MAX_WINDOW = 6
"""Largest averaging window of MeanCache's official schedules (``v_diff_mean_jvp1_s2`` .. ``_s6``,
UnicomAI/MeanCache ``MeanCache4Qwen-Image/Mc_qwenimage.py``)."""


@register_cache_method
@dataclass(frozen=True, kw_only=True)
class MeanCacheConfig(PlannedScheduleConfig):
    """MeanCache: average-velocity caching (Gao et al., ICLR 2026, arXiv 2601.19961; UnicomAI/MeanCache).

    A static schedule like :class:`LeMiCaConfig`, with another reuse rule. On a reused step ``i`` MeanCache does not
    reuse the last instantaneous quantity ``u_{i-1}`` as it is, it corrects it with the trend of the *average*
    velocity over a window of the last ``k`` steps ``i-k .. i-1`` (computed or reused):

    * ``avg = sum_m u_m (sigma_{m+1} - sigma_m) / (sigma_i - sigma_{i-k})``, the average velocity over the window
      (for the Euler flow-matching step, ``(x_i - x_{i-k}) / (sigma_i - sigma_{i-k})`` as in the official code);
    * ``d = (u_{i-k} - avg) / (sigma_i - sigma_{i-k})``, its estimate of the derivative (the official "JVP");
    * ``u_i = u_{i-1} - d * (sigma_{i+1} - sigma_i)``.

    ``k = 1`` gives ``avg = u_{i-1}`` and plain reuse. The official code applies this to the guided velocity at the
    pipeline; here ``u`` is the branch's block-stack residual (the quantity every method of this engine reuses), so
    each guidance branch keeps its own history, and ``sigma`` is the pipeline scheduler's ``sigmas`` (uniform
    ``1 - i/N`` for a transformer driven without a pipeline). The window is chosen per gap of the schedule.

    Args:
        computed_steps, num_inference_steps: the plan, see :class:`PlannedScheduleConfig`.
        windows (`int` or sequence of int, defaults to 2, range 1 to ``MEANCACHE_MAX_WINDOW`` = 6):
            The averaging window ``k``: one value for every gap, or one per gap between consecutive computed steps
            (``len(computed_steps) - 1`` values; gaps without a reused step ignore theirs). The official Qwen-Image
            schedules use 1 on most gaps and 2, 4 or 5 on a few; ``cached-diffusers calibrate --method meancache``
            picks the best window per edge.
        other fields: shared guards, see :class:`StepCacheConfig`.

    Raises:
        ValueError: as :class:`LeMiCaConfig`, and for a window outside ``[1, 6]`` or a window list of the wrong length.
    """

    method: ClassVar[str] = "meancache"
    aliases: ClassVar[tuple[str, ...]] = ("mean_cache", "mean-cache")
    source: ClassVar[str] = (
        "Gao et al., MeanCache: From Instantaneous to Average Velocity for Accelerating Flow Matching Inference, "
        "ICLR 2026 (arXiv 2601.19961); UnicomAI/MeanCache"
    )
    policy_class: ClassVar[type] = MeanCachePolicy
    calibration: ClassVar[str] = "schedule"
    sweep: ClassVar[Sweep] = Sweep("budget", "budget", 2, math.inf, faster_up=False, rank=7)

    windows: int | tuple[int, ...] = 2
    max_window: ClassVar[int] = MEANCACHE_MAX_WINDOW
    calibration_needs_model: ClassVar[bool] = True

    @classmethod
    def planned(cls, computed_steps: list[int], num_inference_steps: int, **measure: Any) -> tuple[MeanCacheConfig, dict[str, Any]]:
        """The plan with the best window per gap, measured on the model
        (:func:`choose_meancache_windows` with ``measure``'s ``pipe``, ``prompts``, ``kwargs``, ``candidates``,
        ``seed`` and ``progress``)."""
        windows, error, plain = choose_meancache_windows(
            measure["pipe"], measure["prompts"], measure["kwargs"], computed_steps, candidates=measure["candidates"],
            seed=measure["seed"], progress=measure["progress"],
        )
        config = cls(computed_steps=computed_steps, num_inference_steps=num_inference_steps, windows=windows)
        return config, dict(windows=list(windows), final_latent_error=error, final_latent_error_windows_1=plain)

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        gaps = len(self.computed_steps) - 1
        windows = as_scalar(self.windows)
        if isinstance(windows, (int, float)) and not isinstance(windows, bool):
            values: tuple[Any, ...] = (windows,) * gaps
        else:
            values = as_sequence(f"{owner}.windows", windows, f"integers in [1, {MEANCACHE_MAX_WINDOW}]")
            if len(values) != gaps:
                raise ValueError(
                    f"{owner}.windows must be one integer or one per gap ({gaps} = len(computed_steps) - 1), "
                    f"got {len(values)} values"
                )
        checked = []
        for i, w in enumerate(values):
            w = _check_int(owner, f"windows[{i}]", w, low=1)
            if w > MEANCACHE_MAX_WINDOW:
                raise ValueError(f"{owner}.windows[{i}] must be an integer in [1, {MEANCACHE_MAX_WINDOW}], got {w}")
            checked.append(w)
        if isinstance(windows, (int, float)) and not isinstance(windows, bool):
            object.__setattr__(self, "windows", checked[0] if checked else int(windows))
        else:
            object.__setattr__(self, "windows", tuple(checked))

    def window_of_gap(self, gap: int) -> int:
        """The window of gap ``gap`` (between ``computed_steps[gap]`` and ``computed_steps[gap + 1]``)."""
        return self.windows if isinstance(self.windows, int) else self.windows[gap]


# -- calibration: the window per gap ----------------------------------------------------------------------------------
def choose_meancache_windows(
    pipe,
    prompts: Sequence[str],
    call_kwargs: Mapping[str, Any],
    computed_steps: Sequence[int],
    *,
    candidates: Sequence[int] = (1, 2, 4),
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[tuple[int, ...], float, float]:
    """MeanCache's window per gap of ``computed_steps`` (see the module docstring) and the resulting global error.

    Returns:
        ``(windows, error, plain_error)``: one window per gap (``len(computed_steps) - 1``), the mean relative L1 error
        of the final latents of the schedule with them, and with window 1 everywhere (LeMiCa's plain reuse).

    Raises:
        ValueError: no prompts, or a candidate outside ``[1, 6]`` (from :class:`MeanCacheConfig`).
    """
    if not prompts:
        raise ValueError("choose_meancache_windows needs at least one calibration prompt")
    steps = tuple(int(s) for s in computed_steps)
    num_steps = steps[-1] + 1
    kwargs = {**call_kwargs, "num_inference_steps": num_steps}
    say = progress or (lambda line: None)
    original = pipe.cache_config
    try:
        references = [final_latents(pipe, p, kwargs, seed + k, None) for k, p in enumerate(prompts)]

        def error_of(windows: tuple[int, ...]) -> float:
            config = MeanCacheConfig(computed_steps=steps, num_inference_steps=num_steps, windows=windows)
            return float(np.mean([
                latent_error(final_latents(pipe, p, kwargs, seed + k, config), references[k])
                for k, p in enumerate(prompts)
            ]))

        windows = [1] * (len(steps) - 1)
        best = plain = error_of(tuple(windows))
        for gap in range(len(steps) - 1):
            if steps[gap + 1] - steps[gap] < 2:
                continue  # nothing reused in this gap
            for window in candidates:
                if window == windows[gap]:
                    continue
                trial = tuple(windows[:gap] + [window] + windows[gap + 1:])
                error = error_of(trial)
                if error < best:
                    best, windows = error, list(trial)
            say(f"gap {steps[gap]} -> {steps[gap + 1]}: window {windows[gap]} (error {best:.4g})")
    finally:
        pipe.cache_config = original
    return tuple(windows), best, plain
