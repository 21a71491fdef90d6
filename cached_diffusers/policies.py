"""Decision policies: given a step, the branch's state and the step's indicator, compute or reuse.

A policy is built from a config and the model's :class:`~cached_diffusers.spec.ModelCacheSpec`
(``config.make_policy(spec)``) and keeps no per-generation state itself: the
state it needs per guidance branch is created by ``new_state`` and owned by the engine. ``observe`` turns the model's
indicator tensor into a scalar; ``decide`` is a pure function of the step context, that state and scalars, so that ranks
of a multi-GPU run that gather the same scalars take the same decision.

Every policy shares the guards of :meth:`CachePolicy.gate` (first step, stored residual, warm-up, last step, SCM
mask, caps); the method's own test runs only when they leave the decision open.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

import numpy as np
import torch

from .parallel import sequence_mean, sequence_sums
from .residuals import LinearExtrapolationStore, ResidualStore, make_store, sigma_at
from .scm import steps_mask
from .sea import sea_distance, sea_filter
from .spec import BLOCK_STACK, PATTERNS, WHOLE_CALL, ModelCacheSpec

if TYPE_CHECKING:  # annotations only: the configs build their policies (configs -> policies), not the reverse
    from .configs import (
        DBCacheConfig,
        MagCacheConfig,
        SeaCacheConfig,
        StepCacheConfig,
        TaylorSeerConfig,
        TeaCacheConfig,
    )

__all__ = [
    "CachePolicy",
    "DBCachePolicy",
    "Decision",
    "Gate",
    "MagCachePolicy",
    "SeaCachePolicy",
    "StepContext",
    "TaylorSeerPolicy",
    "TeaCachePolicy",
    "interpolate_ratios",
    "polyval",
    "relative_l1",
]


@dataclass(frozen=True)
class StepContext:
    """Where the denoising loop is for one transformer call.

    Attributes:
        step: denoising step index in the full schedule, ``first_step <= step < num_steps`` (not a count of
            forward calls); what the statistics record, and what MagCache's ratios and TaylorSeer's distances use.
        num_steps: number of denoising steps of the full schedule (``len(scheduler.timesteps)``).
        branch: guidance branch name, e.g. ``"cond"`` / ``"uncond"``; each branch has its own cache state.
        first_step: the generation's first executed step: 0 for a full schedule, ``> 0`` when an img2img or inpaint
            pipeline starts at a ``strength``-dependent step (``scheduler.set_begin_index``).
    """

    step: int
    num_steps: int
    branch: str
    first_step: int = 0

    @property
    def is_last(self) -> bool:
        return self.step == self.num_steps - 1

    @property
    def executed(self) -> int:
        """Steps executed before this one in this generation (``step - first_step``): what the first-step guard,
        warm-up, retention ratios and SCM masks count."""
        return self.step - self.first_step

    @property
    def num_executed(self) -> int:
        """Steps this generation executes (``num_steps - first_step``): the length SCM masks and retention ratios
        are taken of."""
        return self.num_steps - self.first_step


class Gate(enum.Enum):
    """Outcome of the guards shared by all methods, evaluated before the method's own test."""

    COMPUTE = "compute"  # a guard forces a compute
    REUSE = "reuse"  # a static SCM mask forces a reuse
    TEST = "test"  # the method decides


@dataclass(frozen=True)
class Decision:
    """A policy's answer for one step of one branch.

    Attributes:
        reuse: ``True`` to skip the cached blocks and reuse (or forecast) the stored residual.
        reason: why: a guard (``"first-step"``, ``"no-residual"``, ``"warmup"``, ``"last-step"``,
            ``"scm-compute"``, ``"scm-static"``, ``"max-cached-steps"``, ``"max-continuous-cached-steps"``) or the
            method's test (``"below-threshold"``, ``"above-threshold"``, ``"retention"``, ``"max-skip-steps"``,
            ``"interval"``, ``"forecast"``, ``"calibration"``, ...).
        value: the method's decision value at this step (see ``CachePolicy.value_name``), or ``None``.
    """

    reuse: bool
    reason: str
    value: float | None = None


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``sum|current - previous| / sum|previous|`` over the whole tensor, accumulated in float32.

    Equal to the ratio of means used by TeaCache, MagCache, cache-dit and diffusers (no epsilon, as in those).
    Returns ``inf`` when ``previous`` is all zeros and the tensors differ, 0.0 when both are all zeros.
    Under context parallelism (the engine's sequence group, :mod:`cached_diffusers.parallel`) the tensors are this
    rank's shard and both sums are reduced over the group before the ratio: every rank gets the whole sequence's value.
    """
    current = current.float()
    previous = previous.float()
    numerator, denominator = sequence_sums((current - previous).abs().sum(), previous.abs().sum())
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else float("inf")
    return numerator / denominator


def polyval(coefficients: tuple[float, ...], x: float) -> float:
    """Evaluate ``c[0]*x**n + ... + c[n]`` (highest order first, as ``numpy.poly1d``) by Horner's rule."""
    result = 0.0
    for c in coefficients:
        result = result * x + c
    return result


def interpolate_ratios(ratios: tuple[float, ...], num_steps: int) -> tuple[float, ...]:
    """Nearest-neighbour resampling of per-step ratios to ``num_steps`` entries.

    ``idx_i = round(i * (L - 1) / (N - 1))`` with numpy's round-half-to-even, as Zehong-Ma/MagCache and diffusers'
    ``MagCacheConfig`` do; ``N = 1`` takes the last entry.
    """
    if num_steps == len(ratios):
        return tuple(ratios)
    if num_steps == 1:
        return (ratios[-1],)
    indices = np.round(np.linspace(0, len(ratios) - 1, num_steps)).astype(int)
    return tuple(float(ratios[i]) for i in indices)


def _hint(spec: ModelCacheSpec) -> str:
    """The model's ``calibration_hint`` (how to calibrate it), appended to errors about missing model data."""
    return f". {spec.calibration_hint}" if spec.calibration_hint else ""


PATTERN_DESCRIPTIONS = {
    BLOCK_STACK: "caches a block stack inside its forward",
    WHOLE_CALL: "caches whole transformer calls in its denoising loop",
}
"""What each wiring pattern means, for error messages."""


class CachePolicy:
    """Base policy: the shared guards and the interface the engine calls.

    Class attributes:
        indicator_kind: the decision indicator the method needs: ``"teacache_indicator"`` (TeaCache; the model's,
            e.g. block 0's modulated input), ``"front_residual"`` (DBCache; the image-stream residual of the first
            ``front_blocks`` blocks), ``"sea_latent"`` (SeaCache; the raw latent entering the transformer on its grid,
            ``(B, C, H, W)``, the same on every rank of a context-parallel group), or ``None``.
        value_name: what ``Decision.value`` measures, for the statistics.
        patterns: the wiring patterns the method works with (:data:`~cached_diffusers.spec.BLOCK_STACK`,
            :data:`~cached_diffusers.spec.WHOLE_CALL`); a model whose spec uses none of them is refused here.
        pattern_requirement: why the method needs those patterns, for the refusal's message.

    Raises:
        ValueError: when the model's ``spec.patterns`` share none of the method's ``patterns``, naming the method
            and the patterns.
    """

    indicator_kind: ClassVar[str | None] = None
    value_name: ClassVar[str] = ""
    patterns: ClassVar[tuple[str, ...]] = PATTERNS
    pattern_requirement: ClassVar[str] = ""

    def __init__(self, config: StepCacheConfig, spec: ModelCacheSpec):
        self.config = config
        self.spec = spec
        self._masks: dict[int, tuple[int, ...]] = {}
        if not set(spec.patterns) & set(self.patterns):
            self.check_pattern(spec.patterns[0], spec.model_name)

    def check_pattern(self, pattern: str, model_name: str) -> None:
        """Raise ``ValueError`` naming the method and ``pattern`` unless the method supports ``pattern``."""
        if pattern in self.patterns:
            return
        config = self.config
        supported = " or ".join(repr(p) for p in self.patterns)
        raise ValueError(
            f"{type(config).__name__} (method {config.method!r}) supports only the {supported} wiring pattern"
            f"{self.pattern_requirement}, but {model_name} {PATTERN_DESCRIPTIONS[pattern]} (pattern {pattern!r}). "
            f"Use a method that supports {pattern!r}: "
            + ", ".join(sorted(_methods_supporting(pattern)))
        )

    # -- what the engine needs to know ------------------------------------------------------------------------------
    @property
    def front_blocks(self) -> int:
        """Blocks always run before the cached span (DBCache's ``Fn``)."""
        return 0

    @property
    def back_blocks(self) -> int:
        """Blocks always run after the cached span (DBCache's ``Bn``)."""
        return 0

    @property
    def taylorseer_order(self) -> int | None:
        """Order of the TaylorSeer forecast of reused residuals, ``None`` to reuse the last residual as is."""
        return self.config.taylorseer_order if getattr(self.config, "enable_taylorseer", False) else None

    def new_state(self) -> Any:
        """Fresh per-branch method state."""
        return None

    def make_store(self, first_step: int = 0, sigmas: Callable[[], Any] | None = None) -> ResidualStore:
        """Fresh per-branch residual store (``first_step``: the generation's first executed step; ``sigmas``: the
        running schedule's sigmas, for stores that weight by time). Default: the last residual, or a TaylorSeer
        forecast when ``taylorseer_order`` is set."""
        return make_store(self.taylorseer_order, first_step)

    # -- shared guards -----------------------------------------------------------------------------------------------
    def scm_mask(self, num_steps: int) -> tuple[int, ...] | None:
        spec = self.config.scm_steps_mask
        if spec is None:
            return None
        if num_steps not in self._masks:
            self._masks[num_steps] = steps_mask(spec, num_steps)
        return self._masks[num_steps]

    def warmup_steps(self, num_steps: int) -> int:
        """Length of the warm-up window; with an SCM mask it ends with the mask's leading run of 1s (cache-dit)."""
        warmup = self.config.max_warmup_steps
        mask = self.scm_mask(num_steps)
        if mask is not None:
            leading = next((i for i, m in enumerate(mask) if m == 0), len(mask))
            warmup = min(warmup, leading)
        return warmup

    def gate(
        self, ctx: StepContext, *, has_residual: bool, num_reused: int, consecutive_reused: int
    ) -> tuple[Gate, str]:
        """The guards every method shares, in order: first step, stored residual, warm-up, last step, SCM mask, caps."""
        # On a partial schedule (img2img / inpaint at strength < 1) the guards count executed steps: the first
        # executed step computes, the warm-up and the SCM mask cover the executed steps from the first one.
        config = self.config
        executed = ctx.executed
        if executed == 0:
            return Gate.COMPUTE, "first-step"
        if not has_residual:
            return Gate.COMPUTE, "no-residual"
        if executed < self.warmup_steps(ctx.num_executed) and executed % config.warmup_interval == 0:
            return Gate.COMPUTE, "warmup"
        if config.compute_last_step and ctx.is_last:
            return Gate.COMPUTE, "last-step"
        mask = self.scm_mask(ctx.num_executed)
        if mask is not None:
            if mask[executed] == 1:
                return Gate.COMPUTE, "scm-compute"
            if config.scm_steps_policy == "static":
                return Gate.REUSE, "scm-static"
        if config.max_cached_steps is not None and num_reused >= config.max_cached_steps:
            return Gate.COMPUTE, "max-cached-steps"
        if config.max_continuous_cached_steps is not None and consecutive_reused >= config.max_continuous_cached_steps:
            return Gate.COMPUTE, "max-continuous-cached-steps"
        return Gate.TEST, ""

    # -- the method ---------------------------------------------------------------------------------------------------
    def observe(self, state: Any, indicator: torch.Tensor | None) -> float | None:
        """Turn the step's indicator tensor into the scalar the decision uses, updating tensor state. Default: none."""
        return None

    def observe_step(
        self, ctx: StepContext, sigmas: Callable[[], Any] | None, state: Any, indicator: torch.Tensor | None
    ) -> float | None:
        """:meth:`observe` with the step and the running schedule's sigmas (``sigmas() -> sequence or None``), for
        methods whose measurement depends on the noise level (SeaCache). Default: :meth:`observe`."""
        return self.observe(state, indicator)

    def decide(self, ctx: StepContext, state: Any, measurement: float | None, gate: Gate, reason: str) -> Decision:
        raise NotImplementedError

    def on_computed(
        self, ctx: StepContext, state: Any, indicator: torch.Tensor | None, residuals: tuple, outputs: tuple
    ) -> None:
        """Called after the cached span ran, with its residuals and outputs per stream (to store a probe, calibrate)."""

    def calibration(self, state: Any) -> dict[str, Any]:
        """What a calibration run recorded for this branch (empty for methods that do not calibrate)."""
        return {}


def _methods_supporting(pattern: str) -> list[str]:
    """Names of the policy classes (less ``Policy``) that support ``pattern``, for error messages."""
    names, pending = set(), list(CachePolicy.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if pattern in cls.patterns:
            names.add(cls.__name__.removesuffix("Policy"))
    return sorted(names)


# -- TeaCache ---------------------------------------------------------------------------------------------------------
@dataclass
class TeaCacheState:
    """Per-branch TeaCache state: the previous step's indicator and the accumulated rescaled distance; in
    calibration mode the last distance, the previous stack output and the recorded ``(x, y)`` pairs."""

    previous_indicator: torch.Tensor | None = None
    accumulated: float = 0.0
    distance: float | None = None
    previous_output: torch.Tensor | None = None
    pairs: list[tuple[float, float]] = field(default_factory=list)


class TeaCachePolicy(CachePolicy):
    """TeaCache's rule (see :class:`~cached_diffusers.TeaCacheConfig`) on the model's indicator (e.g. block 0's
    modulated input)."""

    indicator_kind = "teacache_indicator"
    value_name = "accumulated rescaled relative L1 distance of the TeaCache indicator"

    def __init__(self, config: TeaCacheConfig, spec: ModelCacheSpec):
        super().__init__(config, spec)
        coefficients = config.coefficients
        if coefficients is None:
            coefficients = spec.teacache_coefficients
        if coefficients is None and config.calibrate:
            coefficients = (0.0, 0.0, 0.0, 1.0, 0.0)  # unused: calibration never reuses
        if coefficients is None:
            raise ValueError(
                f"TeaCacheConfig.coefficients is None and no TeaCache coefficients are known for {spec.model_name}: "
                f"pass TeaCacheConfig(coefficients=[c4, c3, c2, c1, c0]) fitted for this model"
                + _hint(spec)
            )
        self.coefficients = tuple(float(c) for c in coefficients)

    def new_state(self) -> TeaCacheState:
        return TeaCacheState()

    def observe(self, state: TeaCacheState, indicator: torch.Tensor | None) -> float | None:
        if indicator is None:
            raise ValueError("TeaCache needs the model's TeaCache indicator, but the model provided none")
        previous, state.previous_indicator = state.previous_indicator, indicator.detach()
        if previous is None or previous.shape != indicator.shape:
            state.distance = None
        else:
            state.distance = relative_l1(indicator, previous)
        return state.distance

    def rescale(self, distance: float) -> float:
        """``|f(distance)|``, the rescaled distance added to the accumulator."""
        return abs(polyval(self.coefficients, distance))

    def decide(
        self, ctx: StepContext, state: TeaCacheState, measurement: float | None, gate: Gate, reason: str
    ) -> Decision:
        if self.config.calibrate:
            return Decision(False, "calibration", measurement)
        if gate is Gate.COMPUTE or measurement is None:
            state.accumulated = 0.0
            return Decision(False, reason or "no-previous-indicator")
        accumulated = state.accumulated + self.rescale(measurement)
        if gate is Gate.REUSE or accumulated < self.config.rel_l1_thresh:
            state.accumulated = accumulated
            return Decision(True, reason or "below-threshold", accumulated)
        state.accumulated = 0.0
        return Decision(False, "above-threshold", accumulated)

    def on_computed(
        self, ctx: StepContext, state: TeaCacheState, indicator: torch.Tensor | None, residuals: tuple, outputs: tuple
    ) -> None:
        if not self.config.calibrate:
            return
        # y: relative L1 change of the block stack's image output between consecutive steps (TeaCache paper; the
        # official and vllm-omni calibration scripts), paired with x, the indicator's change at the same step.
        output = outputs[0].detach()
        previous, state.previous_output = state.previous_output, output
        if state.distance is not None and previous is not None and previous.shape == output.shape:
            state.pairs.append((state.distance, relative_l1(output, previous)))

    def calibration(self, state: TeaCacheState) -> dict[str, Any]:
        return {"teacache_pairs": [list(p) for p in state.pairs]} if self.config.calibrate else {}


# -- MagCache ---------------------------------------------------------------------------------------------------------
@dataclass
class MagCacheState:
    """Per-branch MagCache state: running ratio, steps since the last compute, accumulated error; calibration."""

    ratio: float = 1.0
    skipped: int = 0
    error: float = 0.0
    previous_norm: torch.Tensor | None = None
    calibrated: list[float] = field(default_factory=list)

    def reset(self) -> None:
        self.ratio, self.skipped, self.error = 1.0, 0, 0.0


class MagCachePolicy(CachePolicy):
    """MagCache's rule (see :class:`~cached_diffusers.MagCacheConfig`), with per-call ratio interpolation."""

    value_name = "accumulated magnitude error |1 - prod(mag_ratios)|"

    def __init__(self, config: MagCacheConfig, spec: ModelCacheSpec):
        super().__init__(config, spec)
        ratios = config.mag_ratios if config.mag_ratios is not None else spec.mag_ratios
        if ratios is None and not config.calibrate:
            raise ValueError(
                f"MagCacheConfig.mag_ratios is None and no MagCache ratios are known for {spec.model_name}: run once "
                f"with MagCacheConfig(calibrate=True) and build the config with MagCacheConfig.from_calibration(stats)"
                + _hint(spec)
            )
        self.ratios = ratios
        self._interpolated: dict[tuple[str, int], tuple[float, ...]] = {}

    def new_state(self) -> MagCacheState:
        return MagCacheState()

    def ratios_for(self, branch: str, num_steps: int) -> tuple[float, ...]:
        """This branch's ratios at ``num_steps`` steps (a branch absent from a per-branch dict uses the first list)."""
        key = (branch, num_steps)
        if key not in self._interpolated:
            ratios = self.ratios
            if isinstance(ratios, Mapping):
                ratios = ratios.get(branch, next(iter(ratios.values())))
            self._interpolated[key] = interpolate_ratios(tuple(ratios), num_steps)
        return self._interpolated[key]

    def decide(
        self, ctx: StepContext, state: MagCacheState, measurement: float | None, gate: Gate, reason: str
    ) -> Decision:
        config = self.config
        if gate is Gate.COMPUTE:
            state.reset()
            return Decision(False, reason)
        if config.calibrate:
            return Decision(False, "calibration")
        if ctx.executed < int(config.mag_retention_ratio * ctx.num_executed + 0.5):
            state.reset()
            return Decision(False, "retention")
        state.ratio *= self.ratios_for(ctx.branch, ctx.num_steps)[ctx.step]
        state.skipped += 1
        state.error += abs(1.0 - state.ratio)
        if gate is Gate.REUSE:
            return Decision(True, reason, state.error)
        if state.error <= config.mag_threshold and state.skipped <= config.mag_max_skip_steps:
            return Decision(True, "below-threshold", state.error)
        error = state.error
        why = "max-skip-steps" if error <= config.mag_threshold else "above-threshold"
        state.reset()
        return Decision(False, why, error)

    def on_computed(
        self, ctx: StepContext, state: MagCacheState, indicator: torch.Tensor | None, residuals: tuple, outputs: tuple
    ) -> None:
        if not self.config.calibrate:
            return
        # ||r_t|| / ||r_{t-1}|| per token (L2 over channels) of the image-stream residual, mean over tokens, float32;
        # the first step has no previous residual and records 1.0 (Zehong-Ma/MagCache; diffusers adds 1e-8).
        # The list is indexed by denoising step and has one entry per step: a branch evaluated only at some steps
        # (BAGEL's CFG branches outside `cfg_interval`) gets 1.0 where it did not run, where its ratios are never
        # read, and its next ratio spans the steps since its last evaluation.
        norm = residuals[0].float().norm(dim=-1)
        if state.previous_norm is None or state.previous_norm.shape != norm.shape:
            ratio = 1.0
        else:
            ratio = sequence_mean(norm / (state.previous_norm + 1e-8))  # over every rank's tokens under CP
        state.previous_norm = norm
        if len(state.calibrated) != ctx.num_steps:
            state.calibrated = [1.0] * ctx.num_steps
        state.calibrated[ctx.step] = round(ratio, 5)

    def calibration(self, state: MagCacheState) -> dict[str, Any]:
        return {"mag_ratios": list(state.calibrated)} if self.config.calibrate else {}


# -- DBCache ----------------------------------------------------------------------------------------------------------
@dataclass
class DBCacheState:
    """Per-branch DBCache state: the probe of the last computed step and the sum of the diffs tested so far."""

    reference: torch.Tensor | None = None
    accumulated_diff: float = 0.0


class DBCachePolicy(CachePolicy):
    """DBCache's rule (see :class:`~cached_diffusers.DBCacheConfig`) on the residual of the first ``Fn`` blocks."""

    indicator_kind = "front_residual"
    value_name = "relative L1 change of the Fn blocks' residual since the last computed step"
    patterns = (BLOCK_STACK,)
    pattern_requirement = (
        " (it decides from the residual of the first Fn transformer blocks, run at every step, so it needs a block "
        "stack)"
    )

    def __init__(self, config: DBCacheConfig, spec: ModelCacheSpec):
        super().__init__(config, spec)
        num_blocks = spec.num_blocks
        if num_blocks is not None and config.Fn + config.Bn >= num_blocks:
            raise ValueError(
                f"{type(config).__name__}: Fn + Bn must be smaller than the model's {num_blocks} blocks (so that "
                f"some middle blocks can be skipped), got Fn={config.Fn}, Bn={config.Bn}"
            )

    @property
    def front_blocks(self) -> int:
        return self.config.Fn

    @property
    def back_blocks(self) -> int:
        return self.config.Bn

    def new_state(self) -> DBCacheState:
        return DBCacheState()

    def observe(self, state: DBCacheState, indicator: torch.Tensor | None) -> float | None:
        reference = state.reference
        if reference is None or reference.shape != indicator.shape:
            return None
        return relative_l1(indicator, reference)

    def decide(
        self, ctx: StepContext, state: DBCacheState, measurement: float | None, gate: Gate, reason: str
    ) -> Decision:
        config = self.config
        if gate is Gate.COMPUTE:
            return Decision(False, reason, measurement)
        if gate is Gate.REUSE:
            return Decision(True, reason, measurement)
        limit = config.max_accumulated_residual_diff_threshold
        if limit is not None and state.accumulated_diff >= limit:
            return Decision(False, "max-accumulated-residual-diff", measurement)
        if measurement is None:
            return Decision(False, "no-reference")
        state.accumulated_diff += measurement
        if measurement < config.residual_diff_threshold:
            return Decision(True, "below-threshold", measurement)
        return Decision(False, "above-threshold", measurement)

    def on_computed(
        self, ctx: StepContext, state: DBCacheState, indicator: torch.Tensor | None, residuals: tuple, outputs: tuple
    ) -> None:
        state.reference = indicator.detach()


# -- TaylorSeer (standalone) --------------------------------------------------------------------------------------------
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


# -- SeaCache ---------------------------------------------------------------------------------------------------------
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
    over the grid axes (:func:`cached_diffusers.sea.sea_filter`) at the step's ``sigma``. The latent is whole on every
    rank (models gather a sharded one), so the distance is local: no reduction over the sequence group.
    """

    indicator_kind = "sea_latent"
    value_name = "accumulated relative L1 distance of the SEA-filtered raw latent"

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
