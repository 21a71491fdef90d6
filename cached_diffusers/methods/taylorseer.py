"""TaylorSeer on its own (Liu et al., ICCV 2025, arXiv 2503.06923; Shenyi-Z/TaylorSeer): fixed-interval compute and
a Taylor forecast of the block-stack residual in between. The config (:class:`TaylorSeerConfig`), the rule
(:class:`TaylorSeerPolicy`) and the sweep metadata; the forecaster is the shared
:class:`~cached_diffusers.residuals.TaylorSeerStore` (also cache-dit's calibrator on the residual methods).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ..configs import StepCacheConfig, _check_int, _check_order, register_cache_method
from ..policies import CachePolicy, Decision, Gate, StepContext
from ..registry import Sweep
from ..spec import ModelCacheSpec

__all__ = ["TaylorSeerConfig", "TaylorSeerPolicy"]


class TaylorSeerPolicy(CachePolicy):
    """Fixed-interval TaylorSeer (see :class:`~cached_diffusers.TaylorSeerConfig`)."""

    value_name = ""

    def __init__(self, config: TaylorSeerConfig, spec: ModelCacheSpec):
        super().__init__(config, spec)

    @property
    def taylorseer_order(self) -> int:
        return self.config.order

    def decide(self, ctx: StepContext, state: Any, measurement: float | None, gate: Gate, reason: str) -> Decision:
        if gate is Gate.COMPUTE:
            return Decision(False, reason)
        if gate is Gate.REUSE:
            return Decision(True, reason)
        phase = ctx.executed - max(self.config.max_warmup_steps - 1, 0)
        if phase % self.config.interval == 0:
            return Decision(False, "interval")
        return Decision(True, "forecast")


@register_cache_method
@dataclass(frozen=True)
class TaylorSeerConfig(StepCacheConfig):
    """TaylorSeer on its own (Liu et al., ICCV 2025, arXiv 2503.06923): fixed-interval compute, forecast in between.

    The first ``max_warmup_steps`` steps are computed, then every ``interval``-th step (steps ``W - 1 + k*interval``).
    On the other steps the whole block stack is skipped and its residual forecast by a Taylor expansion from divided
    differences over the computed steps: ``R(s) ~ sum_k F^k (s - s_last)^k / k!`` up to ``order`` (orders become
    available as computed steps accumulate; factors are kept in float32, unlike diffusers' bfloat16 default).

    Args:
        order (`int`, defaults to 1, range 1 to 4): highest derivative order.
        interval (`int`, defaults to 5, range >= 1): compute every ``interval``-th step after the warm-up
            (1 computes every step); diffusers' ``cache_interval`` default is 5.
        max_warmup_steps (`int`, defaults to 3, range >= 0): diffusers' ``disable_cache_before_step`` default.
        other fields: shared guards, see :class:`StepCacheConfig`.
    """

    method: ClassVar[str] = "taylorseer"
    aliases: ClassVar[tuple[str, ...]] = ("taylor_seer", "taylor-seer")
    source: ClassVar[str] = "Liu et al., TaylorSeer, ICCV 2025 (arXiv 2503.06923); Shenyi-Z/TaylorSeer"
    policy_class: ClassVar[type] = TaylorSeerPolicy
    sweep: ClassVar[Sweep] = Sweep(
        "interval", "int", 2, math.inf, values=(2, 3, 5), rank=4,
        published={"order": 1, "interval": 5, "max_warmup_steps": 3},
        published_source="diffusers TaylorSeerCacheConfig defaults (cache_interval=5, disable_cache_before_step=3)",
    )

    order: int = 1
    interval: int = 5
    max_warmup_steps: int = 3

    @classmethod
    def sweep_config(cls, value: Any, **context: Any) -> TaylorSeerConfig:
        """``TaylorSeerConfig(order=1, interval=value)``."""
        return cls(order=1, interval=value)

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        object.__setattr__(self, "order", _check_order(owner, "order", self.order))
        object.__setattr__(self, "interval", _check_int(owner, "interval", self.interval, low=1))
