"""DBCache (vipshop/cache-dit) and its special case First-Block-Cache (chengzeyi/ParaAttention; diffusers'
``hooks/first_block_cache.py``): the configs (:class:`DBCacheConfig`, :class:`FirstBlockCacheConfig`), the decision
rule on the residual of the first ``Fn`` blocks (:class:`DBCachePolicy`, state :class:`DBCacheState`) and the sweep
metadata. A reused step adds the middle blocks' last computed residual (or, with ``enable_taylorseer``, cache-dit's
TaylorSeer calibrator's forecast): the shared stores of :mod:`cached_diffusers.residuals`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..configs import ResidualCacheConfig, _check_int, _check_number, register_cache_method
from ..policies import CachePolicy, Decision, Gate, StepContext, relative_l1
from ..registry import THRESHOLD_RANGE, Sweep
from ..spec import BLOCK_STACK, ModelCacheSpec

if TYPE_CHECKING:
    import torch

__all__ = ["DBCacheConfig", "DBCachePolicy", "DBCacheState", "FirstBlockCacheConfig"]


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


@register_cache_method
@dataclass(frozen=True)
class DBCacheConfig(ResidualCacheConfig):
    """DBCache: Dual Block Cache with ``Fn`` front and ``Bn`` back blocks (vipshop/cache-dit, ``DBCacheConfig``).

    Per guidance branch and step: the first ``Fn`` blocks always run; their image-stream residual ``F_i`` is the
    probe. ``diff = sum|F_i - F_ref| / sum|F_ref|`` against the probe ``F_ref`` stored at the branch's last computed
    step. If ``diff < residual_diff_threshold`` the middle blocks are skipped and the middle-block residual stored at
    the last computed step (both streams) is added to their input; otherwise they run, and the probe and residuals
    are stored. The last ``Bn`` blocks always run. First-Block-Cache is ``Fn=1, Bn=0`` (:class:`FirstBlockCacheConfig`).

    Args:
        Fn (`int`, defaults to 8, range >= 1): front blocks always computed (cache-dit's ``Fn_compute_blocks``).
        Bn (`int`, defaults to 0, range >= 0): back blocks always computed (``Bn_compute_blocks``).
            ``Fn + Bn`` must be smaller than the model's block count (checked when the config is applied).
        residual_diff_threshold (`float`, defaults to 0.08, range >= 0):
            Reuse while the probe's relative L1 change is below this; 0 never reuses (cache-dit's name).
        max_warmup_steps (`int`, defaults to 8): cache-dit's default warm-up.
        max_accumulated_residual_diff_threshold (`float` or `None`, defaults to `None`, range > 0):
            Once the diffs tested so far sum to this, the branch computes every remaining step (cache-dit's name).
        other fields: shared guards and calibrator (``enable_taylorseer`` makes this cache-dit's DBCache + TaylorSeer
            calibrator), see :class:`StepCacheConfig` and :class:`ResidualCacheConfig`.
    """

    method: ClassVar[str] = "dbcache"
    aliases: ClassVar[tuple[str, ...]] = ("db_cache", "db-cache", "cache_dit")
    source: ClassVar[str] = "vipshop/cache-dit DBCache (docs/papers/paper.tex); First-Block-Cache: chengzeyi/ParaAttention"
    policy_class: ClassVar[type] = DBCachePolicy
    sweep: ClassVar[Sweep] = Sweep(
        "residual_diff_threshold", "log", *THRESHOLD_RANGE, values=(0.08, 0.16, 0.32, 0.64), rank=3,
        published={"Fn": 8, "Bn": 0, "residual_diff_threshold": 0.08, "max_warmup_steps": 8},
        published_source="vipshop/cache-dit DBCacheConfig defaults",
    )

    Fn: int = 8
    Bn: int = 0
    residual_diff_threshold: float = 0.08
    max_accumulated_residual_diff_threshold: float | None = None
    max_warmup_steps: int = 8

    scm_presets: ClassVar[tuple[str, ...]] = ("slow", "medium", "fast", "ultra")
    """The SCM presets of the benchmark's ``dbcache+scm`` curve (:data:`cached_diffusers.scm.PRESET_BINS`)."""

    @classmethod
    def _sweep_shape(cls, num_blocks: int | None, num_steps: int | None) -> dict[str, int]:
        """``F{n}B0`` with ``n = clamp(blocks // 6, 1, 8)`` (cache-dit's ``Fn=8`` on large models, fewer front blocks
        on small ones) and a warm-up of ``clamp(num_steps // 4, 1, 8)`` steps (cache-dit: 8); unknown: 8 and 8."""
        fn = 8 if num_blocks is None else max(1, min(8, num_blocks // 6))
        warmup = 8 if num_steps is None else max(1, min(8, num_steps // 4))
        return {"Fn": fn, "Bn": 0, "max_warmup_steps": warmup}

    @classmethod
    def sweep_config(cls, value: Any, *, num_blocks: int | None = None, num_steps: int | None = None, **context: Any):
        """DBCache at ``residual_diff_threshold=value`` in the shape of :meth:`_sweep_shape`."""
        return cls(residual_diff_threshold=value, **cls._sweep_shape(num_blocks, num_steps))

    @classmethod
    def sweep_curves(cls, **context: Any) -> dict[str, list[Any]]:
        """The threshold curve, and ``dbcache+scm``: the same DBCache with each SCM preset of :attr:`scm_presets`,
        ``scm_steps_policy="static"`` and no warm-up (the mask alone decides: a fixed compute budget)."""
        curves = super().sweep_curves(**context)
        shape = {**cls._sweep_shape(context.get("num_blocks"), context.get("num_steps")), "max_warmup_steps": 0}
        curves[f"{cls.method}+scm"] = [
            cls(**shape, scm_steps_mask=preset, scm_steps_policy="static") for preset in cls.scm_presets
        ]
        return curves

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        object.__setattr__(self, "Fn", _check_int(owner, "Fn", self.Fn, low=1))
        object.__setattr__(self, "Bn", _check_int(owner, "Bn", self.Bn, low=0))
        object.__setattr__(
            self,
            "residual_diff_threshold",
            _check_number(owner, "residual_diff_threshold", self.residual_diff_threshold, low=0.0),
        )
        if self.max_accumulated_residual_diff_threshold is not None:
            object.__setattr__(
                self,
                "max_accumulated_residual_diff_threshold",
                _check_number(
                    owner, "max_accumulated_residual_diff_threshold", self.max_accumulated_residual_diff_threshold,
                    low=0.0, low_open=True,
                ),
            )


@register_cache_method
@dataclass(frozen=True)
class FirstBlockCacheConfig(DBCacheConfig):
    """First-Block-Cache (chengzeyi/ParaAttention; diffusers' ``FirstBlockCacheConfig``): DBCache with ``Fn=1, Bn=0``.

    Defaults: ``residual_diff_threshold=0.08`` (ParaAttention's "very good quality" FLUX.1 setting; diffusers uses
    0.05) and no warm-up. ``Fn`` and ``Bn`` are fixed; use :class:`DBCacheConfig` for other values.
    """

    method: ClassVar[str] = "fbcache"
    aliases: ClassVar[tuple[str, ...]] = ("first_block_cache", "first-block-cache", "fbc")
    source: ClassVar[str] = "chengzeyi/ParaAttention First-Block-Cache; huggingface/diffusers hooks/first_block_cache.py"
    sweep: ClassVar[Sweep] = Sweep(
        "residual_diff_threshold", "log", *THRESHOLD_RANGE, values=(0.05, 0.1, 0.2, 0.4, 0.8), rank=2,
        published={"residual_diff_threshold": 0.08},
        published_source="ParaAttention's 'very good quality' FLUX.1 setting (diffusers' FirstBlockCacheConfig: 0.05)",
    )

    Fn: int = 1
    Bn: int = 0
    max_warmup_steps: int = 0

    @classmethod
    def sweep_config(cls, value: Any, **context: Any) -> FirstBlockCacheConfig:
        """``FirstBlockCacheConfig(residual_diff_threshold=value)``."""
        return cls(residual_diff_threshold=value)

    @classmethod
    def sweep_curves(cls, **context: Any) -> dict[str, list[Any]]:
        """One curve over the thresholds (no SCM curve)."""
        return {cls.method: [cls.sweep_config(v, **context) for v in cls.sweep.values]}

    def validate(self) -> None:
        super().validate()
        if (self.Fn, self.Bn) != (1, 0):
            raise ValueError(
                f"FirstBlockCacheConfig has Fn=1 and Bn=0, got Fn={self.Fn}, Bn={self.Bn}; use DBCacheConfig instead"
            )
