"""Policies of the planned (static) schedules: LeMiCa and MeanCache.

Both compute exactly the steps of their config's ``computed_steps`` (per guidance branch, each branch with its own
stored residuals) and reuse at the others; the shared guards of :meth:`CachePolicy.gate` still force a compute where
nothing can be reused (the first executed step, a changed input). They differ in what a reused step adds: LeMiCa the
last computed residual (:class:`~cached_diffusers.residuals.ResidualStore`), MeanCache an average-velocity forecast
(:class:`~cached_diffusers.residuals.MeanCacheStore`). Sources: :class:`~cached_diffusers.configs.LeMiCaConfig`,
:class:`~cached_diffusers.configs.MeanCacheConfig`.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any, Callable

from .policies import CachePolicy, Decision, Gate, StepContext
from .residuals import MeanCacheStore, ResidualStore
from .spec import ModelCacheSpec

if TYPE_CHECKING:  # annotations only: the configs build their policies (configs -> planned), not the reverse
    from .configs import LeMiCaConfig, MeanCacheConfig, PlannedScheduleConfig

__all__ = ["LeMiCaPolicy", "MeanCachePolicy", "PlannedSchedulePolicy"]


class PlannedSchedulePolicy(CachePolicy):
    """Compute the planned steps, reuse the others.

    Raises:
        ValueError: (from ``decide``) when a call's step count differs from the plan's ``num_inference_steps``.
    """

    value_name = ""

    def __init__(self, config: PlannedScheduleConfig, spec: ModelCacheSpec):
        super().__init__(config, spec)
        self.computed = frozenset(config.computed_steps)

    def check_steps(self, ctx: StepContext) -> None:
        planned = self.config.num_inference_steps
        if ctx.num_steps != planned:
            raise ValueError(
                f"{type(self.config).__name__} was planned for num_inference_steps={planned} "
                f"(computed_steps={list(self.config.computed_steps)}), but this call runs {ctx.num_steps} steps: a "
                f"plan and its error matrix hold for one step count; calibrate at {ctx.num_steps} steps "
                f"(`cached-diffusers calibrate --method {self.config.method} --steps {ctx.num_steps} --budget ...`) "
                f"or call with num_inference_steps={planned}"
            )

    def decide(self, ctx: StepContext, state: Any, measurement: float | None, gate: Gate, reason: str) -> Decision:
        self.check_steps(ctx)
        if gate is Gate.COMPUTE:
            return Decision(False, reason)
        if gate is Gate.REUSE:
            return Decision(True, reason)
        if ctx.step in self.computed:
            return Decision(False, "planned-compute")
        return Decision(True, "planned-reuse")


class LeMiCaPolicy(PlannedSchedulePolicy):
    """LeMiCa (see :class:`~cached_diffusers.configs.LeMiCaConfig`): a reused step adds the last computed residual."""

    def __init__(self, config: LeMiCaConfig, spec: ModelCacheSpec):
        super().__init__(config, spec)


class MeanCachePolicy(PlannedSchedulePolicy):
    """MeanCache (see :class:`~cached_diffusers.configs.MeanCacheConfig`): a reused step adds the average-velocity
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
