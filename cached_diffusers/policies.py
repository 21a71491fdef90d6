"""Decision policies: given a step, the branch's state and the step's signal, compute or reuse.

A policy is built from a config (``config.make_policy(defaults)``) and is stateless itself; the state it keeps per
guidance branch is created by ``new_state`` and owned by the engine. The decision (``decide``) is a pure function of
the step context, that state and scalar measurements, so that ranks of a multi-GPU run that gather the same scalars
take the same decision. Turning the model's signal tensor into scalars happens in ``observe``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from .configs import StepCacheConfig, TeaCacheConfig

__all__ = ["CachePolicy", "Decision", "Gate", "StepContext", "TeaCachePolicy", "TeaCacheState", "relative_l1", "polyval"]


@dataclass(frozen=True)
class StepContext:
    """Where the denoising loop is for one transformer call.

    Attributes:
        step: denoising step index, ``0 <= step < num_steps`` (not a count of forward calls).
        num_steps: number of denoising steps of this generation (``num_inference_steps``).
        branch: guidance branch name, e.g. ``"cond"`` / ``"uncond"``; each branch has its own cache state.
    """

    step: int
    num_steps: int
    branch: str

    @property
    def is_last(self) -> bool:
        return self.step == self.num_steps - 1


class Gate(enum.Enum):
    """Outcome of the guards shared by all methods, evaluated before the method's own test."""

    COMPUTE = "compute"  # a guard forces a compute
    TEST = "test"  # the method decides


@dataclass(frozen=True)
class Decision:
    """A policy's answer for one step of one branch.

    Attributes:
        reuse: ``True`` to skip the cached blocks and reuse the stored residual.
        reason: why (``"first-step"``, ``"warmup"``, ``"last-step"``, ``"max-cached-steps"``,
            ``"max-continuous-cached-steps"``, ``"no-residual"``, ``"below-threshold"``, ``"above-threshold"``).
        signal: the method's decision value at this step (TeaCache: the accumulated rescaled distance), or ``None``
            when the method did not test this step.
    """

    reuse: bool
    reason: str
    signal: float | None = None


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``sum|current - previous| / sum|previous|`` over the whole tensor, accumulated in float32.

    Equal to the ratio of means used by TeaCache, MagCache, cache-dit and diffusers (no epsilon, as in those).
    Returns ``inf`` when ``previous`` is all zeros and the tensors differ, 0.0 when both are all zeros.
    """
    current = current.float()
    previous = previous.float()
    numerator = (current - previous).abs().sum().item()
    denominator = previous.abs().sum().item()
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else float("inf")
    return numerator / denominator


def polyval(coefficients: tuple[float, ...], x: float) -> float:
    """Evaluate ``c[0]*x**n + ... + c[n]`` (highest order first, as ``numpy.poly1d``) by Horner's rule."""
    result = 0.0
    for c in coefficients:
        result = result * x + c
    return result


class CachePolicy:
    """Base policy: the shared guards and the interface the engine calls.

    Class attributes:
        signal_kind: what the model must provide before the decision (``"modulated_input"`` for TeaCache), or
            ``None`` when the method needs no signal.
    """

    signal_kind: ClassVar[str | None] = None

    def __init__(self, config: StepCacheConfig, defaults: Mapping[str, Any]):
        self.config = config

    def new_state(self) -> Any:
        """Fresh per-branch method state."""
        return None

    def gate(self, ctx: StepContext, *, has_residual: bool, num_reused: int, consecutive_reused: int) -> tuple[Gate, str]:
        """The guards every method shares, in order: first step, stored residual, warm-up, last step, caps."""
        config = self.config
        if ctx.step == 0:
            return Gate.COMPUTE, "first-step"
        if not has_residual:
            return Gate.COMPUTE, "no-residual"
        if ctx.step < config.max_warmup_steps:
            return Gate.COMPUTE, "warmup"
        if config.compute_last_step and ctx.is_last:
            return Gate.COMPUTE, "last-step"
        if config.max_cached_steps is not None and num_reused >= config.max_cached_steps:
            return Gate.COMPUTE, "max-cached-steps"
        if config.max_continuous_cached_steps is not None and consecutive_reused >= config.max_continuous_cached_steps:
            return Gate.COMPUTE, "max-continuous-cached-steps"
        return Gate.TEST, ""

    def observe(self, state: Any, signal: torch.Tensor | None) -> float | None:
        """Turn the step's signal tensor into the scalar the decision uses, updating tensor state. Default: none."""
        return None

    def decide(self, ctx: StepContext, state: Any, measurement: float | None, gate: Gate, reason: str) -> Decision:
        raise NotImplementedError


@dataclass
class TeaCacheState:
    """Per-branch TeaCache state: the previous step's modulated input and the accumulated rescaled distance."""

    previous_signal: torch.Tensor | None = None
    accumulated: float = 0.0


class TeaCachePolicy(CachePolicy):
    """TeaCache's rule (see :class:`~cached_diffusers.TeaCacheConfig`) on block 0's modulated input."""

    signal_kind = "modulated_input"

    def __init__(self, config: TeaCacheConfig, defaults: Mapping[str, Any]):
        super().__init__(config, defaults)
        coefficients = config.coefficients
        if coefficients is None:
            coefficients = defaults.get("teacache_coefficients")
        if coefficients is None:
            model = defaults.get("model_name", "this model")
            raise ValueError(
                f"TeaCacheConfig.coefficients is None and no TeaCache coefficients are known for {model}: pass "
                f"TeaCacheConfig(coefficients=[c4, c3, c2, c1, c0]) fitted for this model"
            )
        self.coefficients = tuple(float(c) for c in coefficients)

    def new_state(self) -> TeaCacheState:
        return TeaCacheState()

    def observe(self, state: TeaCacheState, signal: torch.Tensor | None) -> float | None:
        if signal is None:
            raise ValueError("TeaCache needs the model's modulated input of block 0, but the model provided none")
        previous, state.previous_signal = state.previous_signal, signal.detach()
        if previous is None or previous.shape != signal.shape:
            return None
        return relative_l1(signal, previous)

    def rescale(self, distance: float) -> float:
        """``|f(distance)|``, the rescaled distance added to the accumulator."""
        return abs(polyval(self.coefficients, distance))

    def decide(
        self, ctx: StepContext, state: TeaCacheState, measurement: float | None, gate: Gate, reason: str
    ) -> Decision:
        if gate is Gate.COMPUTE or measurement is None:
            state.accumulated = 0.0
            return Decision(False, reason or "no-previous-signal")
        accumulated = state.accumulated + self.rescale(measurement)
        if accumulated < self.config.rel_l1_thresh:
            state.accumulated = accumulated
            return Decision(True, "below-threshold", accumulated)
        state.accumulated = 0.0
        return Decision(False, "above-threshold", accumulated)
