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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from .registry import methods_supporting, old_path_getattr
from .residuals import ResidualStore, make_store
from .scm import steps_mask
from .spec import BLOCK_STACK, PATTERNS, WHOLE_CALL, ModelCacheSpec

if TYPE_CHECKING:  # annotations only (importing this module loads no torch: the command line's --help lists methods)
    import torch

    from .configs import StepCacheConfig

__all__ = ["CachePolicy", "Decision", "Gate", "StepContext", "relative_l1", "unsupported_reason"]
# Each method's policy lives in its module (cached_diffusers.methods.<name>); the old paths resolve via __getattr__.


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
            method's test (``"below-threshold"``, ``"above-threshold"``, ``"retention"``, ``"max-reused-steps"``,
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
    from .parallel import sequence_sums  # torch, loaded when a step is measured

    current = current.float()
    previous = previous.float()
    numerator, denominator = sequence_sums((current - previous).abs().sum(), previous.abs().sum())
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else float("inf")
    return numerator / denominator


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

    @property
    def samples_decide_alike(self) -> bool:
        """Whether every sample of a batch takes the same decision at every step under this config, by construction
        (a calibration run that computes every step: TeaCache's, MagCache's and SeaCache's ``calibrate=True``).

        When ``True`` the engine keeps the branch's batch-level state even with ``batch_decisions="per_sample"``: one
        decision per step and branch, and one calibration record over the batch (what ``from_calibration(stats)``
        reads), as with ``batch_decisions="shared"``. Default ``False``: the config's ``batch_decisions`` decides.
        """
        return False

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
        """The method's rule for one step of one guidance branch: compute or reuse. The extension point of a method.

        **How to write a method** (``docs/development.md``, "Adding a method": one new file
        ``cached_diffusers/methods/<name>.py`` plus one registration line). The file holds a config, a frozen
        dataclass deriving from :class:`~cached_diffusers.configs.StepCacheConfig` (the shared guards), decorated with
        ``@register_cache_method`` (:func:`cached_diffusers.registry.register_cache_method`, the registration line),
        naming this class as its ``policy_class`` and its ``sweep``; and this policy, a subclass of
        :class:`CachePolicy` that overrides ``decide`` (the only method it must write) and, as it needs:

        * ``indicator_kind`` (class attribute): the indicator the model hands the engine, ``None`` for none. The
          kinds: ``"teacache_indicator"`` (the model's cheap probe at the stack's input, e.g. block 0's modulated
          input ``(B, L, D)``, any shape constant over the steps), ``"front_residual"`` (the image-stream residual
          of the policy's ``front_blocks``, ``(B, L, D)``, block stack only, made by the engine) and
          ``"sea_latent"`` (the raw latent entering the transformer on its grid ``(B, C, H, W)``, whole on every
          rank). A model offers its kinds in ``BlockStack.indicators`` (block stack) or to ``CacheEngine.decide``
          (whole call); a kind the model lacks raises ``ValueError`` naming the method and the kind.
        * :meth:`new_state`: the method's per-branch state (a small mutable object, or ``None``). The engine owns
          it: one per guidance branch and, with ``batch_decisions="per_sample"`` and a batch of ``B > 1``, one per
          sample (each sample decides on its own rows of the inputs and the indicator, ``B = 1`` slices), so a
          policy keeps no per-generation state on itself.
        * :meth:`observe` / :meth:`observe_step`: turn the step's indicator tensor into the scalar ``measurement``
          (e.g. a relative L1 distance to the previous step's, :func:`relative_l1`; under context parallelism
          reduce sums over the sequence group, :mod:`cached_diffusers.parallel`, so every rank gets the same scalar),
          keeping the tensors it compares with in ``state``; ``None`` when there is nothing to compare with yet.
        * :meth:`make_store`: what a reused step adds, a :class:`~cached_diffusers.residuals.ResidualStore` (the
          last computed residual, the default), its TaylorSeer forecast (``taylorseer_order``) or the method's own
          store or forecaster subclass, defined in the method's module (SeaCache's ``LinearExtrapolationStore``,
          MeanCache's ``MeanCacheStore``).
        * ``front_blocks`` / ``back_blocks`` (blocks always run around the cached span), ``patterns`` (the wiring
          patterns it supports), ``value_name``, :meth:`on_computed` and :meth:`calibration` (what a calibration
          run records), ``samples_decide_alike``: defaults that fit most methods.

        **What it receives.** The engine calls it once per branch (per sample) and step, after :meth:`observe_step`
        and :meth:`gate`:

        * ``ctx``: the :class:`StepContext`: ``step`` (index in the full schedule), ``num_steps``, ``branch``
          (``"cond"``, ``"uncond"``, ...), ``first_step`` (``> 0`` for img2img / inpaint at ``strength < 1``);
          ``executed`` / ``num_executed`` count from the first executed step (what warm-ups and intervals count).
        * ``state``: this branch's (or sample's) object from :meth:`new_state`; ``decide`` may update it (accumulate,
          reset), and only it.
        * ``measurement``: the scalar from :meth:`observe_step`, or ``None``.
        * ``gate`` and ``reason``: the shared guards' outcome (:meth:`gate`, then the engine's own: a repeated or
          earlier step, inputs changed behind the cache). ``Gate.COMPUTE``: a guard forces a compute (``reason``:
          ``"first-step"``, ``"no-residual"``, ``"warmup"``, ``"last-step"``, ``"scm-compute"``, a cap,
          ``"input-changed"``, ...); return ``Decision(False, reason)`` and reset what the method accumulates.
          ``Gate.REUSE``: a static SCM mask forces a reuse; return ``Decision(True, reason)``. ``Gate.TEST``
          (``reason`` empty): the method's own rule decides.

        **What it returns.** A :class:`Decision`: ``reuse`` (``True``: skip the cached blocks and add the store's
        residual), ``reason`` (a short hyphenated word: ``"below-threshold"``, ``"interval"``, ...; the statistics
        count decisions by it) and ``value`` (the decision value ``value_name`` describes, or ``None``).

        **Purity.** The decision must be a pure function of ``ctx``, ``state`` and the scalars (``measurement`` and
        the config): no tensors, clocks, random numbers or global state. Ranks of a multi-process run (CFG-parallel,
        context-parallel) that gather the same scalars then take the same decision, and a sample of a batch decides
        as it would alone (``docs/batch-invariance.md``).

        Raises:
            NotImplementedError: in the base class.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define decide()")

    def on_computed(
        self, ctx: StepContext, state: Any, indicator: torch.Tensor | None, residuals: tuple, outputs: tuple
    ) -> None:
        """Called after the cached span ran, with its residuals and outputs per stream (to store a probe, calibrate)."""

    def calibration(self, state: Any) -> dict[str, Any]:
        """What a calibration run recorded for this branch (empty for methods that do not calibrate)."""
        return {}


def _methods_supporting(pattern: str) -> list[str]:
    """Names of the registered methods that support ``pattern``, for error messages (from the registry, so the
    message lists every registered method and no abstract policy, whatever modules happen to be imported)."""
    return methods_supporting(pattern)


__getattr__ = old_path_getattr(__name__, "The methods' policies and helpers")


# -- questions the tools ask of a config (answered here, so that no tool re-implements the engine's logic) -----------
def unsupported_reason(config: StepCacheConfig, spec: ModelCacheSpec | None, model: str | None = None) -> str | None:
    """Why a model cannot run ``config``, as a short reason for the tools' "skipped" records; ``None`` when it can.

    First the model data the method needs (``config.missing_model_data``: TeaCache's coefficients, MagCache's
    ratios), then the model's own checks of the policy (``config.make_policy(spec)`` raising ``ValueError``:
    DBCache's ``Fn + Bn`` against the block count, a wiring pattern the method does not support, ...).

    Args:
        config: the cache config.
        spec: the model's :class:`~cached_diffusers.spec.ModelCacheSpec` (``transformer.cache_engine.spec``; ``None``
            for a model that provides none).
        model: the model's name in the reason (default: ``spec.model_name``).
    """
    if model is None:
        model = spec.model_name if spec is not None else "this model"
    missing = config.missing_model_data(spec, model)
    if missing is not None:
        return missing
    try:
        config.make_policy(spec)
    except ValueError as error:
        return str(error)
    return None
