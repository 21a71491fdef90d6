"""Stored residuals of one guidance branch, shared by the methods: the last computed one, or a TaylorSeer forecast from
several (a method with a forecaster of its own keeps it in its module, e.g. MeanCache's)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .registry import old_path_getattr

if TYPE_CHECKING:  # annotations only: importing the stores loads no torch
    import torch

__all__ = ["FIRST_DIFFERENCE_STEP", "ResidualStore", "Streams", "TaylorSeerStore", "make_store", "sigma_at"]
# A method's own store lives in its module (SeaCache's LinearExtrapolationStore, MeanCache's MeanCacheStore); the old
# paths resolve via __getattr__.

FIRST_DIFFERENCE_STEP = 3
"""No finite difference is formed at a computed step before this one: the first denoising steps change too fast for
a derivative to extrapolate. As cache-dit 1.5.3's TaylorSeer calibrator (``calibrators/taylorseer.py``, whose step
counter condition ``current_step > 1`` holds from step 3 on); see ``docs/cachedit-spec.md`` section 3.4."""

Streams = tuple["torch.Tensor", ...]


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


__getattr__ = old_path_getattr(__name__, "The methods' own stores")
