"""Stored residuals of one guidance branch: the last computed one, or a TaylorSeer forecast from several."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

__all__ = [
    "FIRST_DIFFERENCE_STEP",
    "LinearExtrapolationStore",
    "MeanCacheStore",
    "ResidualStore",
    "TaylorSeerStore",
    "make_store",
    "sigma_at",
]

FIRST_DIFFERENCE_STEP = 3
"""No finite difference is formed at a computed step before this one: the first denoising steps change too fast for
a derivative to extrapolate. As cache-dit 1.5.3's TaylorSeer calibrator (``calibrators/taylorseer.py``, whose step
counter condition ``current_step > 1`` holds from step 3 on); see ``docs/cachedit-spec.md`` section 3.4."""

Streams = tuple[torch.Tensor, ...]


class ResidualStore:
    """Keeps the residuals (one per stream) of the last computed step; a reused step gets them unchanged."""

    def __init__(self) -> None:
        self.residuals: Streams | None = None
        self.input_shapes: tuple[torch.Size, ...] | None = None
        self.last_step: int | None = None

    def fits(self, streams: Streams) -> bool:
        """Whether residuals were stored for inputs of these shapes."""
        return self.residuals is not None and self.input_shapes == tuple(s.shape for s in streams)

    def update(self, step: int, streams: Streams, residuals: Streams) -> None:
        """Store the residuals computed at ``step`` for inputs ``streams``."""
        self.residuals = tuple(r.detach() for r in residuals)
        self.input_shapes = tuple(s.shape for s in streams)
        self.last_step = step

    def get(self, step: int) -> Streams:
        """The residuals to add at ``step``."""
        return self.residuals


class TaylorSeerStore(ResidualStore):
    """TaylorSeer forecast of the residuals (Liu et al., ICCV 2025, arXiv 2503.06923).

    At computed steps ``s_0 < s_1 < ...`` it keeps the ladder ``F^0 = R(s_j)``,
    ``F^{k+1} = (F^k(s_j) - F^k(s_{j-1})) / (s_j - s_{j-1})`` up to ``order``, in float32 (every order divided by the
    last gap, as cache-dit's calibrator does). At a reused step ``s`` it returns ``sum_k F^k (s - s_j)^k / k!`` in the
    residual's dtype. Order ``k + 1`` becomes available at a computed step ``>= FIRST_DIFFERENCE_STEP`` whose
    previous computed step held order ``k``; a change of shape restarts the ladder.
    """

    def __init__(self, order: int, first_step: int = 0) -> None:
        super().__init__()
        self.order = order
        self.first_step = first_step  # the generation's first executed step: FIRST_DIFFERENCE_STEP counts from it
        self.factors: list[Streams] = []

    def update(self, step: int, streams: Streams, residuals: Streams) -> None:
        previous_step = self.last_step
        super().update(step, streams, residuals)
        factors = [tuple(r.detach().float() for r in residuals)]
        if (
            self.factors
            and previous_step is not None
            and FIRST_DIFFERENCE_STEP <= step - self.first_step
            and previous_step < step
            and self._same_shapes(factors[0])
        ):
            window = float(step - previous_step)
            for k in range(min(self.order, len(self.factors))):
                factors.append(tuple((new - old) / window for new, old in zip(factors[k], self.factors[k])))
        self.factors = factors

    def _same_shapes(self, values: Streams) -> bool:
        return all(a.shape == b.shape for a, b in zip(values, self.factors[0]))

    def get(self, step: int) -> Streams:
        distance = float(step - self.last_step)
        forecast = list(self.factors[0])
        for k in range(1, len(self.factors)):
            scale = distance**k / math.factorial(k)
            forecast = [f + scale * d for f, d in zip(forecast, self.factors[k])]
        return tuple(f.to(r.dtype) for f, r in zip(forecast, self.residuals))


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


def make_store(taylorseer_order: int | None, first_step: int = 0) -> ResidualStore:
    """A plain store, or a TaylorSeer store of the given order (``first_step``: the generation's first executed
    step, from which :data:`FIRST_DIFFERENCE_STEP` counts)."""
    return ResidualStore() if taylorseer_order is None else TaylorSeerStore(taylorseer_order, first_step)


def sigma_at(sigmas: Any, step: int, num_steps: int) -> float:
    """``sigma_step`` of a flow-matching schedule: ``sigmas[step]`` of the scheduler's ``sigmas`` (``N`` or ``N + 1``
    values; the terminal value is 0 when absent), or ``1 - step / N`` when ``sigmas`` is ``None`` (uniform time)."""
    if sigmas is None or len(sigmas) < num_steps:
        return 1.0 - step / num_steps
    if step >= len(sigmas):
        return 0.0
    return float(sigmas[step])


class MeanCacheStore(ResidualStore):
    """MeanCache's average-velocity forecast of the residuals (Gao et al., ICLR 2026, arXiv 2601.19961;
    UnicomAI/MeanCache ``MeanCache4Qwen-Image/Mc_qwenimage.py``, ``compute_current_jvp``).

    Keeps ``u_m``, the residuals of the last :data:`~cached_diffusers.configs.MEANCACHE_MAX_WINDOW` steps of the
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
            average = [torch.zeros_like(v) for v in last]
            for (m, values), end in zip(window, ends):
                weight = (self._sigma(end) - self._sigma(m)) / span
                average = [a + weight * v for a, v in zip(average, values)]
            scale = (self._sigma(step + 1) - self._sigma(step)) / span
            forecast = tuple(u - scale * (u0 - a) for u, u0, a in zip(last, window[0][1], average))
        self._remember(step, forecast)
        return tuple(f.to(r.dtype) for f, r in zip(forecast, self.residuals))
