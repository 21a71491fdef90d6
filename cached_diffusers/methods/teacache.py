"""TeaCache: Timestep Embedding Aware Cache (Liu et al., CVPR 2025, arXiv 2411.19108; ali-vilab/TeaCache).

The config (:class:`TeaCacheConfig`), the decision rule on the model's indicator (:class:`TeaCachePolicy`, state
:class:`TeaCacheState`), the calibration (``calibrate=True`` records ``(x, y)`` pairs; :meth:`TeaCacheConfig.from_calibration`
fits the polynomial with :func:`cached_diffusers.calibration.fit_teacache`) and the sweep metadata
(:attr:`TeaCacheConfig.sweep`). A reused step adds the last computed residual (or the TaylorSeer forecast with
``enable_taylorseer``): the shared stores of :mod:`cached_diffusers.residuals`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np

from ..calibration import runs_of
from ..configs import ResidualCacheConfig, _check_number, _set_bool, register_cache_method
from ..policies import CachePolicy, Decision, Gate, StepContext, _hint, relative_l1
from ..registry import THRESHOLD_RANGE, Sweep
from ..spec import ModelCacheSpec
from ..validation import as_sequence

if TYPE_CHECKING:
    import torch

__all__ = ["PolynomialFit", "TeaCacheConfig", "TeaCachePolicy", "TeaCacheState", "fit_teacache", "polyval", "teacache_pairs"]


def polyval(coefficients: tuple[float, ...], x: float) -> float:
    """Evaluate ``c[0]*x**n + ... + c[n]`` (highest order first, as ``numpy.poly1d``) by Horner's rule."""
    result = 0.0
    for c in coefficients:
        result = result * x + c
    return result


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

    @property
    def samples_decide_alike(self) -> bool:
        """A calibration run (``calibrate=True``) computes every step: its samples agree by construction."""
        return self.config.calibrate

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


@register_cache_method
@dataclass(frozen=True)
class TeaCacheConfig(ResidualCacheConfig):
    """TeaCache: Timestep Embedding Aware Cache (Liu et al., CVPR 2025, arXiv 2411.19108).

    Per guidance branch, at each denoising step ``i`` the relative L1 change of block 0's modulated input ``m``,
    ``d_i = sum|m_i - m_{i-1}| / sum|m_{i-1}|``, is rescaled by the polynomial ``f`` with ``coefficients`` (highest
    order first, as ``numpy.poly1d``) and accumulated, ``A += |f(d_i)|``. While ``A < rel_l1_thresh`` the step reuses
    the residual of the whole block stack (output minus input of the blocks, image and text streams) stored at the
    last computed step; otherwise the step is computed, the residual stored and ``A`` reset to 0. ``m_{i-1}`` is
    updated on every step. Step 0 is always computed; the last step too unless ``compute_last_step=False``.

    The absolute value ``|f|`` is a deliberate difference from the official code (ali-vilab/TeaCache
    ``TeaCache4FLUX/teacache_flux.py``, which adds ``f``): several published polynomials, the Qwen-Image one
    included, are negative on part of their range, which would let a large jump *decrease* the accumulator.
    vllm-omni and ComfyUI-TeaCache's FLUX path use ``|f|`` too.

    Args:
        rel_l1_thresh (`float`, defaults to 0.2, range > 0):
            Accumulated rescaled distance below which steps are reused (the official TeaCache name, ali-vilab/TeaCache
            ``rel_l1_thresh``). Larger is faster and less faithful;
            0.2 is vllm-omni's default for Qwen-Image. The official FLUX.1 README reports 0.25 / 0.4 / 0.6 / 0.8 ->
            1.5x / 1.8x / 2.0x / 2.25x at 28 steps.
        coefficients (5 floats or `None`, defaults to `None`):
            ``[c4, c3, c2, c1, c0]`` of the rescaling polynomial. ``None`` takes the model's published or calibrated
            set (e.g. :data:`cached_diffusers.models.qwenimage.QWENIMAGE_TEACACHE_COEFFICIENTS`); a model without
            one raises ``ValueError`` when the config is applied.
        calibrate (`bool`, defaults to `False`):
            Calibration mode: never reuse; record per branch the pairs ``(x, y)`` of the indicator's relative L1 change
            and the block stack output's relative L1 change between consecutive steps
            (``stats.branches[b].calibration["teacache_pairs"]``); :meth:`from_calibration` fits the polynomial.
        max_warmup_steps, max_cached_steps, max_continuous_cached_steps, compute_last_step, warmup_interval,
        scm_steps_mask, scm_steps_policy, enable_taylorseer, taylorseer_order:
            Shared guards and calibrator, see :class:`StepCacheConfig` and :class:`ResidualCacheConfig`.
    """

    method: ClassVar[str] = "teacache"
    aliases: ClassVar[tuple[str, ...]] = ("tea_cache", "tea-cache")
    source: ClassVar[str] = "Liu et al., TeaCache, CVPR 2025 (arXiv 2411.19108); ali-vilab/TeaCache"
    policy_class: ClassVar[type] = TeaCachePolicy
    calibration: ClassVar[str] = "runs"
    sweep: ClassVar[Sweep] = Sweep(
        "rel_l1_thresh", "log", *THRESHOLD_RANGE, values=(0.1, 0.2, 0.4, 0.8), rank=0,
        published={"rel_l1_thresh": 0.2},
        published_source="vllm-omni's Qwen-Image default; the official FLUX.1 README reports 0.25 / 0.4 / 0.6 / 0.8",
    )

    rel_l1_thresh: float = 0.2
    coefficients: tuple[float, ...] | None = None
    calibrate: bool = False

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        _set_bool(self, "calibrate")
        object.__setattr__(
            self, "rel_l1_thresh", _check_number(owner, "rel_l1_thresh", self.rel_l1_thresh, low=0.0, low_open=True)
        )
        if self.coefficients is not None:
            coefficients = as_sequence(f"{owner}.coefficients", self.coefficients, "5 numbers [c4, c3, c2, c1, c0] or None")
            if len(coefficients) != 5:
                raise ValueError(
                    f"{owner}.coefficients must have exactly 5 numbers [c4, c3, c2, c1, c0] (a 4th-order polynomial, "
                    f"highest order first), got {len(coefficients)}"
                )
            values = tuple(_check_number(owner, f"coefficients[{i}]", c) for i, c in enumerate(coefficients))
            object.__setattr__(self, "coefficients", values)

    @classmethod
    def from_calibration(cls, stats: Any, **fields: Any) -> TeaCacheConfig:
        """A config whose coefficients are fitted on the pairs recorded by ``calibrate=True`` runs.

        Args:
            stats: one ``CacheStats`` or a list of them (e.g. one per prompt); the pairs of every branch are pooled.
            **fields: other fields of the config (``rel_l1_thresh``, ...).

        Raises:
            ValueError: if fewer than 5 pairs were recorded (a 4th-order fit needs 5).
        """
        return cls(coefficients=fit_teacache(teacache_pairs(stats)).coefficients, **fields)

    def calibrated_data(self) -> dict[str, Any]:
        return {"coefficients": self.coefficients} if self.coefficients and not self.calibrate else {}

    def missing_model_data(self, spec: ModelCacheSpec | None, model: str) -> str | None:
        if self.coefficients is None and not self.calibrate and (spec is None or spec.teacache_coefficients is None):
            return (
                f"no TeaCache coefficients for {model} (none published); calibrate with "
                f"`cached-diffusers calibrate --method teacache` and bench the directory holding its cache_config.json"
            )
        return None

    @classmethod
    def sweep_config(cls, value: Any, *, coefficients: Any = None, **context: Any) -> TeaCacheConfig:
        """The sweep's config at ``rel_l1_thresh=value``, with the model's calibrated ``coefficients`` if known."""
        return cls(rel_l1_thresh=value, coefficients=coefficients)

    @classmethod
    def calibrated(cls, runs: list[Any], options: Mapping[str, Any]) -> tuple[TeaCacheConfig, dict[str, Any], list[str]]:
        """``calibrate --method teacache``: the polynomial fitted on the runs' pairs, with ``options["rel_l1_thresh"]``."""
        fit = fit_teacache(teacache_pairs(runs))
        config = cls(rel_l1_thresh=options["rel_l1_thresh"], coefficients=fit.coefficients)
        quality = {"num_pairs": fit.num_pairs, "rmse": fit.rmse, "r2": fit.r2, "x_range": list(fit.x_range)}
        return config, quality, [fit.summary()]


# -- calibration ------------------------------------------------------------------------------------------------------
def teacache_pairs(stats: Any) -> np.ndarray:
    """The ``(x, y)`` pairs recorded by TeaCache calibration runs, pooled over runs and branches: shape ``(P, 2)``."""
    pairs = [
        pair
        for run in runs_of(stats)
        for branch in run.branches.values()
        for pair in branch.calibration.get("teacache_pairs", [])
    ]
    return np.asarray(pairs, dtype=np.float64).reshape(-1, 2)


@dataclass(frozen=True)
class PolynomialFit:
    """A least-squares polynomial fit and its quality.

    Attributes:
        coefficients: highest order first (``numpy.polyfit`` order), 5 numbers for TeaCache.
        num_pairs: number of ``(x, y)`` pairs fitted.
        rmse: root mean square residual, in units of ``y`` (relative L1 change of the stack output).
        r2: coefficient of determination (1 is a perfect fit; <= 0 means no better than the mean).
        x_range: smallest and largest ``x`` fitted; outside it the polynomial extrapolates.
    """

    coefficients: tuple[float, ...]
    num_pairs: int
    rmse: float
    r2: float
    x_range: tuple[float, float]

    def summary(self) -> str:
        c = ", ".join(f"{v:.8e}" for v in self.coefficients)
        return (
            f"TeaCache fit on {self.num_pairs} pairs, x in [{self.x_range[0]:.4g}, {self.x_range[1]:.4g}]: "
            f"coefficients [{c}], RMSE {self.rmse:.4g}, R^2 {self.r2:.4f}"
        )


def fit_teacache(pairs: np.ndarray, degree: int = 4) -> PolynomialFit:
    """Fit ``y ~ poly(x)`` of ``degree`` (4 for TeaCache) by unweighted least squares.

    Raises:
        ValueError: with fewer than ``degree + 1`` pairs, or non-finite values.
    """
    pairs = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
    if len(pairs) < degree + 1:
        raise ValueError(
            f"a degree-{degree} TeaCache fit needs at least {degree + 1} (x, y) pairs, got {len(pairs)}: calibrate "
            f"with more steps or prompts"
        )
    if not np.isfinite(pairs).all():
        raise ValueError("the calibration pairs contain non-finite values")
    x, y = pairs[:, 0], pairs[:, 1]
    coefficients = np.polyfit(x, y, degree)
    residual = y - np.polyval(coefficients, x)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    return PolynomialFit(
        tuple(float(c) for c in coefficients),
        len(pairs),
        float(np.sqrt((residual**2).mean())),
        r2,
        (float(x.min()), float(x.max())),
    )
