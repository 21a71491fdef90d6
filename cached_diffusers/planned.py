"""Planned (static) schedules: the config base and the policy base of LeMiCa and MeanCache.

Both compute exactly the steps of their config's ``computed_steps`` (per guidance branch, each branch with its own
stored residuals) and reuse at the others; the shared guards of :meth:`CachePolicy.gate` still force a compute where
nothing can be reused (the first executed step, a changed input). They differ in what a reused step adds: LeMiCa the
last computed residual (:class:`~cached_diffusers.residuals.ResidualStore`), MeanCache an average-velocity forecast
(:class:`~cached_diffusers.methods.meancache.MeanCacheStore`). Sources: :class:`~cached_diffusers.methods.lemica.LeMiCaConfig`,
:class:`~cached_diffusers.methods.meancache.MeanCacheConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .configs import StepCacheConfig, _check_int
from .policies import CachePolicy, Decision, Gate, StepContext
from .registry import old_path_getattr
from .spec import ModelCacheSpec
from .validation import MAX_STEPS, as_sequence

__all__ = ["PlannedScheduleConfig", "PlannedSchedulePolicy"]
# LeMiCa's and MeanCache's config and policy live in their modules (cached_diffusers.methods.lemica / .meancache);
# the old paths resolve via __getattr__.


def _check_schedule(owner: str, computed_steps: Any, num_inference_steps: Any) -> tuple[int, tuple[int, ...]]:
    num_steps = _check_int(owner, "num_inference_steps", num_inference_steps, low=2)
    if num_steps > MAX_STEPS:
        raise ValueError(f"{owner}.num_inference_steps must be an integer in [2, {MAX_STEPS}], got {num_steps}")
    if computed_steps is None:
        raise ValueError(
            f"{owner}.computed_steps is required (the planned computed steps for num_inference_steps={num_steps}); "
            f"solve one with `cached-diffusers calibrate --method {owner.replace('Config', '').lower()} --budget ...`"
        )
    raw = as_sequence(f"{owner}.computed_steps", computed_steps, f"step indices in [0, {num_steps})")
    steps = tuple(_check_int(owner, f"computed_steps[{i}]", s, low=0) for i, s in enumerate(raw))
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"{owner}.computed_steps must be strictly increasing, got {list(steps)}")
    if len(steps) < 2 or steps[0] != 0 or steps[-1] != num_steps - 1:
        raise ValueError(
            f"{owner}.computed_steps must start at step 0 and end at the last step {num_steps - 1} "
            f"(num_inference_steps={num_steps}), got {list(steps)}"
        )
    return num_steps, steps


@dataclass(frozen=True, kw_only=True)
class PlannedScheduleConfig(StepCacheConfig):
    """A schedule planned offline: the steps to compute, fixed for one step count; every other step is reused.

    Args:
        computed_steps (sequence of int, required):
            The computed denoising steps, strictly increasing, from 0 to ``num_inference_steps - 1`` (both ends are
            always computed); its length is the budget ``B``. The other ``N - B`` steps reuse.
        num_inference_steps (`int`, required, range >= 2):
            The step count the schedule was planned for. A call with another step count raises ``ValueError``
            (calibrate at that step count, see ``docs/calibration.md``).
        other fields: the shared guards of :class:`StepCacheConfig`; a guard that forces a compute (warm-up, caps)
            adds computed steps to the plan, so leave them at their defaults for an exact budget.

    At ``strength < 1`` (img2img, inpaint: only steps ``first .. N-1`` run) the first executed step always computes,
    and so do the plan's steps after it: ``1 + |{s in computed_steps: s > first}|`` computed steps, not ``B``.
    ``cached-diffusers calibrate --strength S`` plans for the executed steps: its plan is step 0 (never executed), the
    first executed step and ``B - 1`` later steps, so that exactly ``B`` steps compute at that strength.
    """

    computed_steps: tuple[int, ...] | None = None
    num_inference_steps: int | None = None

    calibration_needs_model: ClassVar[bool] = False
    """Whether :meth:`planned` runs the model (besides the error matrix) to finish a config."""

    @classmethod
    def planned(cls, computed_steps: list[int], num_inference_steps: int, **measure: Any) -> tuple[PlannedScheduleConfig, dict[str, Any]]:
        """``calibrate``'s config for one solved plan, and what to add to its record. ``measure`` holds what a
        method that runs the model needs (``pipe``, ``prompts``, ``kwargs``, ``candidates``, ``seed``, ``progress``);
        the default uses none of it."""
        return cls(computed_steps=computed_steps, num_inference_steps=num_inference_steps), {}

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        num_steps, steps = _check_schedule(owner, self.computed_steps, self.num_inference_steps)
        object.__setattr__(self, "num_inference_steps", num_steps)
        object.__setattr__(self, "computed_steps", steps)

    @property
    def budget(self) -> int:
        """``B``: the number of computed steps per branch."""
        return len(self.computed_steps)


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


__getattr__ = old_path_getattr(__name__, "LeMiCa's and MeanCache's policies")
