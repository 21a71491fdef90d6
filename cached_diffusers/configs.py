"""Cache configurations.

A cache configuration is a value: a frozen dataclass that validates itself on construction, serialises to a
JSON-able ``dict`` (``to_dict``) and back (``CacheConfig.from_dict``), and names the method it configures. Every
method registers its config class under a name (``"teacache"``, ...); ``"none"`` (or ``cache_config=None``) means no
caching at all.

Guards shared by every step-caching method live on :class:`StepCacheConfig`: a warm-up of always-computed steps,
caps on the total and on the consecutive number of reused steps, and computing the last step (on by default). The
first denoising step of every guidance branch is always computed (there is nothing to reuse yet).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from .spec import ModelCacheSpec
from .validation import MAX_STEPS, FrozenDict, as_scalar, as_sequence

__all__ = [
    "CacheConfig",
    "NoCacheConfig",
    "DBCacheConfig",
    "FirstBlockCacheConfig",
    "LeMiCaConfig",
    "MagCacheConfig",
    "MeanCacheConfig",
    "PlannedScheduleConfig",
    "ResidualCacheConfig",
    "SeaCacheConfig",
    "StepCacheConfig",
    "TaylorSeerConfig",
    "TeaCacheConfig",
    "cache_config_from_dict",
    "available_cache_methods",
    "make_cache_config",
    "register_cache_method",
    "resolve_cache_config",
]

_REGISTRY: dict[str, type[CacheConfig]] = {}


def register_cache_method(cls: type[CacheConfig]) -> type[CacheConfig]:
    """Class decorator: register a :class:`CacheConfig` subclass under ``cls.method`` and its ``aliases``.

    Raises:
        ValueError: if the name (or an alias) is already registered to another class.
    """
    for name in (cls.method, *cls.aliases):
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"cache method name {name!r} is already registered to {_REGISTRY[key].__name__}")
        _REGISTRY[key] = cls
    return cls


def available_cache_methods() -> list[str]:
    """Canonical names of the registered cache methods (aliases excluded), sorted."""
    return sorted({cls.method for cls in _REGISTRY.values()})


def _config_class(method: str) -> type[CacheConfig]:
    if not isinstance(method, str) or method.lower() not in _REGISTRY:
        valid = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown cache method {method!r}; valid methods: {valid}")
    return _REGISTRY[method.lower()]


def cache_config_from_dict(data: Mapping[str, Any] | None) -> CacheConfig | None:
    """Build a config from ``{"method": <name>, <field>: <value>, ...}`` (the output of ``to_dict``).

    ``None`` and ``{"method": "none"}`` give ``None`` (no caching).

    Raises:
        ValueError: unknown method name, unknown field for that method, or an invalid value.
    """
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ValueError(f"a cache config dict must be a mapping, got {type(data).__name__}")
    if "method" not in data:
        raise ValueError(f"a cache config dict needs a 'method' key; valid methods: {', '.join(sorted(_REGISTRY))}")
    params = dict(data)
    cls = _config_class(params.pop("method"))
    config = cls._from_params(params)
    return config if config.enabled else None


def make_cache_config(method: str, **params: Any) -> CacheConfig | None:
    """``make_cache_config("teacache", rel_l1_thresh=0.3)``: the config class registered as ``method``.

    Returns ``None`` for ``"none"``. Raises ``ValueError`` as :func:`cache_config_from_dict` does.
    """
    return cache_config_from_dict({"method": method, **params})


def resolve_cache_config(value: CacheConfig | Mapping[str, Any] | str | None) -> CacheConfig | None:
    """Normalise what a user may pass as ``cache_config``: a config, a dict, a method name or ``None``.

    Returns ``None`` when no caching is wanted. Raises ``ValueError`` for anything else.
    """
    if value is None:
        return None
    if isinstance(value, CacheConfig):
        return value if value.enabled else None
    if isinstance(value, str):
        return make_cache_config(value)
    if isinstance(value, Mapping):
        return cache_config_from_dict(value)
    raise ValueError(
        f"cache_config must be a CacheConfig, a dict with a 'method' key, a method name or None; "
        f"got {type(value).__name__}"
    )


def _kind(value: Any) -> str:
    return "" if isinstance(value, (int, float)) else f" ({type(value).__name__})"


def _check_number(owner: str, name: str, value: Any, *, low: float | None = None, low_open: bool = False) -> float:
    bound = "" if low is None else (f" > {low}" if low_open else f" >= {low}")
    value = as_scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number{bound}, got {value!r}{_kind(value)}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{owner}.{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def _check_int(owner: str, name: str, value: Any, *, low: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    value = as_scalar(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        extra = " or None (no limit)" if allow_none else ""
        raise ValueError(f"{owner}.{name} must be an integer >= {low}{extra}, got {value!r}{_kind(value)}")
    return value


def _check_order(owner: str, name: str, value: Any) -> int:
    order = _check_int(owner, name, value, low=1)
    if order > 4:
        raise ValueError(f"{owner}.{name} must be an integer in [1, 4], got {order}")
    return order


def _check_bool(owner: str, name: str, value: Any) -> bool:
    value = as_scalar(value)
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be True or False, got {value!r}{_kind(value)}")
    return value


def _set_bool(config: CacheConfig, name: str) -> None:
    object.__setattr__(config, name, _check_bool(type(config).__name__, name, getattr(config, name)))


BATCH_DECISIONS = ("per_sample", "shared")
"""The valid values of ``CacheConfig.batch_decisions``."""


@dataclass(frozen=True)
class CacheConfig:
    """Base class of every cache configuration.

    Subclasses set ``method`` (the registry name), optionally ``aliases``, and ``source`` (the paper or reference
    implementation of the algorithm), validate their fields in ``validate`` and build their decision policy in
    ``make_policy``.

    Args:
        batch_decisions (`str`, keyword-only, defaults to ``"per_sample"``; ``"per_sample"`` or ``"shared"``):
            ``"per_sample"``: every sample of a batch keeps its own decision state, stored residuals and statistics,
            and decides for itself, so a batched call gives each sample the output of its own call (the engine runs
            the cached blocks on the samples that compute only; ``docs/batch-invariance.md``). ``"shared"``: one
            decision per step and guidance branch for the whole batch, taken on the batch's indicator, as diffusers'
            cache hooks, cache-dit and vllm-omni decide (uniform compute across the batch; a sample's output then
            depends on its batch-mates). With batch size 1 both are the same.
    """

    method: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    source: ClassVar[str] = ""
    batch_decisions: str = dataclasses.field(default="per_sample", kw_only=True)

    def __post_init__(self) -> None:
        if self.batch_decisions not in BATCH_DECISIONS:
            raise ValueError(
                f"{type(self).__name__}.batch_decisions must be one of {', '.join(map(repr, BATCH_DECISIONS))}, "
                f"got {self.batch_decisions!r}"
            )
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the field and its valid range."""

    @property
    def enabled(self) -> bool:
        """Whether this config caches anything (``False`` only for :class:`NoCacheConfig`)."""
        return True

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict ``{"method": ..., <field>: <value>}``; ``cache_config_from_dict`` inverts it."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            if f.name == "batch_decisions" and not self.enabled:
                continue  # no caching: no decisions
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def _from_params(cls, params: dict[str, Any]) -> CacheConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(unknown)} for cache method {cls.method!r}; "
                f"valid fields: {', '.join(names) or '(none)'}"
            )
        return cls(**params)

    def replace(self, **changes: Any) -> CacheConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def make_policy(self, spec: ModelCacheSpec | None = None):
        """The decision policy for this config and a model's :class:`~cached_diffusers.spec.ModelCacheSpec` (its
        coefficients, ratios, block count and wiring patterns; ``None``: a model that provides none).

        Raises:
            ValueError: when the model cannot run this method (missing coefficients or ratios, a wiring pattern the
                method does not support, too few blocks).
        """
        raise NotImplementedError(f"{type(self).__name__} does not define a caching policy")


@register_cache_method
@dataclass(frozen=True)
class NoCacheConfig(CacheConfig):
    """No caching: every step runs every transformer block. Equivalent to ``cache_config=None``."""

    method: ClassVar[str] = "none"
    aliases: ClassVar[tuple[str, ...]] = ("off", "disabled")

    @property
    def enabled(self) -> bool:
        return False


@dataclass(frozen=True, kw_only=True)
class StepCacheConfig(CacheConfig):
    """Guards shared by every step-caching method (keyword-only fields).

    Args:
        max_warmup_steps (`int`, defaults to 0, range >= 0):
            The first ``max_warmup_steps`` denoising steps are always computed. Step 0 is computed regardless.
        max_cached_steps (`int` or `None`, defaults to `None`, range >= 0):
            At most this many reused steps per guidance branch and generation; ``None`` means no cap.
        max_continuous_cached_steps (`int` or `None`, defaults to `None`, range >= 1):
            At most this many reused steps in a row per branch; ``None`` means no cap.
        compute_last_step (`bool`, defaults to `True`):
            Always compute the last denoising step, which forms the finest detail (TeaCache's official rule).
        warmup_interval (`int`, defaults to 1, range >= 1):
            Within the warm-up, only every ``warmup_interval``-th step is forced (steps ``0, w, 2w, ...``).
        scm_steps_mask (preset name, sequence of 0/1, ``{"compute_bins": [...], "cache_bins": [...]}`` or `None`):
            Steps computation mask (SCM, cache-dit): ``1`` steps are always computed, ``0`` steps may be reused.
            Presets ``"slow"``, ``"medium"``, ``"fast"``, ``"ultra"``; any mask is rescaled to the run's step count
            by :func:`cached_diffusers.scm.steps_mask` and its last step is always computed.
        scm_steps_policy (`str`, defaults to ``"dynamic"``):
            ``"dynamic"``: a mask-0 step is reused only if the method's own test (and the caps) say so;
            ``"static"``: a mask-0 step is always reused (caps and test bypassed).

    Names follow cache-dit's ``DBCacheConfig`` (vipshop/cache-dit), where ``-1`` means "no cap"; here that is ``None``.
    """

    max_warmup_steps: int = 0
    max_cached_steps: int | None = None
    max_continuous_cached_steps: int | None = None
    compute_last_step: bool = True
    warmup_interval: int = 1
    scm_steps_mask: str | tuple[int, ...] | Mapping[str, Any] | None = None
    scm_steps_policy: str = "dynamic"

    def validate(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "max_warmup_steps", _check_int(owner, "max_warmup_steps", self.max_warmup_steps, low=0))
        object.__setattr__(
            self,
            "max_cached_steps",
            _check_int(owner, "max_cached_steps", self.max_cached_steps, low=0, allow_none=True),
        )
        object.__setattr__(
            self,
            "max_continuous_cached_steps",
            _check_int(owner, "max_continuous_cached_steps", self.max_continuous_cached_steps, low=1, allow_none=True),
        )
        _set_bool(self, "compute_last_step")
        object.__setattr__(self, "warmup_interval", _check_int(owner, "warmup_interval", self.warmup_interval, low=1))
        if self.scm_steps_mask is not None:
            from .scm import validate_mask_spec

            object.__setattr__(self, "scm_steps_mask", validate_mask_spec(f"{owner}.scm_steps_mask", self.scm_steps_mask))
        if self.scm_steps_policy not in ("dynamic", "static"):
            raise ValueError(f"{owner}.scm_steps_policy must be 'dynamic' or 'static', got {self.scm_steps_policy!r}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if isinstance(self.scm_steps_mask, Mapping):
            out["scm_steps_mask"] = {k: list(v) for k, v in self.scm_steps_mask.items()}
        return out


@dataclass(frozen=True, kw_only=True)
class ResidualCacheConfig(StepCacheConfig):
    """Guards plus an optional TaylorSeer calibrator for methods that reuse a stored residual.

    Args:
        enable_taylorseer (`bool`, defaults to `False`):
            On a reused step, add a Taylor forecast of the residual from the computed steps (finite differences up to
            ``taylorseer_order``, factors in float32) instead of the last computed residual. TaylorSeer: Liu et al.,
            ICCV 2025 (arXiv 2503.06923); as a calibrator on DBCache: cache-dit's ``TaylorSeerCalibratorConfig``.
        taylorseer_order (`int`, defaults to 1, range 1 to 4):
            Highest derivative order of the forecast; cache-dit recommends 1 or 2.
    """

    enable_taylorseer: bool = False
    taylorseer_order: int = 1

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        _set_bool(self, "enable_taylorseer")
        object.__setattr__(self, "taylorseer_order", _check_order(owner, "taylorseer_order", self.taylorseer_order))


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
            Accumulated rescaled distance below which steps are reused. Larger is faster and less faithful;
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
        from .calibration import fit_teacache, teacache_pairs

        return cls(coefficients=fit_teacache(teacache_pairs(stats)).coefficients, **fields)

    def make_policy(self, spec: ModelCacheSpec | None = None):
        from .policies import TeaCachePolicy

        return TeaCachePolicy(self, spec if spec is not None else ModelCacheSpec())


def _check_ratio_list(owner: str, name: str, values: Any) -> tuple[float, ...]:
    values = as_sequence(f"{owner}.{name}", values, "positive numbers, one per calibration step")
    if len(values) < 2:
        raise ValueError(f"{owner}.{name} must have at least 2 entries (one per calibration step), got {len(values)}")
    ratios = tuple(_check_number(owner, f"{name}[{i}]", v, low=0.0, low_open=True) for i, v in enumerate(values))
    return ratios


@register_cache_method
@dataclass(frozen=True)
class MagCacheConfig(ResidualCacheConfig):
    """MagCache: magnitude-aware cache (Ma et al., NeurIPS 2025, arXiv 2506.09045; Zehong-Ma/MagCache).

    Per guidance branch: the first ``int(mag_retention_ratio * N + 0.5)`` steps are computed. After them, each step
    multiplies a running ratio ``rho`` by the step's calibrated magnitude ratio ``gamma_i`` (``||r_i|| / ||r_{i-1}||``
    of consecutive whole-stack residuals, mean over tokens), counts ``k += 1`` and accumulates ``err += |1 - rho|``.
    The step reuses the residual of the last computed step while ``err <= mag_threshold`` and ``k <= mag_max_skip_steps``;
    otherwise it computes and resets ``rho = 1, k = 0, err = 0``. The ratios were calibrated at ``len(mag_ratios)``
    steps and are re-interpolated (nearest neighbour, ``idx_i = round(i * (L - 1) / (N - 1))``) to each call's
    ``num_inference_steps``. The decision needs no indicator from the model: it is a function of the ratios.

    Args:
        mag_threshold (`float`, defaults to 0.06, range >= 0):
            Accumulated error under which steps are reused. 0.06 is the official Qwen-Image setting (``E006K2R02``)
            and diffusers' default; the official FLUX.1 "fast" setting uses 0.24.
        mag_max_skip_steps (`int`, defaults to 3, range >= 1):
            ``K``, the most steps reused in a row (official Qwen-Image: 2, FLUX.1: 5; diffusers: 3).
        mag_retention_ratio (`float`, defaults to 0.2, range [0, 1)):
            Fraction of the first steps always computed (official Qwen-Image and diffusers: 0.2; FLUX.1: 0.1).
        mag_ratios (sequence of floats, ``{branch: sequence}`` or `None`, defaults to `None`):
            Per-step magnitude ratios, first entry 1.0 (no previous residual). A ``{branch: ratios}`` dict gives each
            guidance branch its own list (all of one length). ``None`` takes the model's published or calibrated
            ratios (e.g. :data:`cached_diffusers.models.qwenimage.QWENIMAGE_MAG_RATIOS`).
        calibrate (`bool`, defaults to `False`):
            Calibration mode: never reuse; record each branch's per-step ratios in the statistics
            (``stats.branches[b].calibration["mag_ratios"]``), see :meth:`from_calibration`.
        other fields: shared guards and calibrator, see :class:`StepCacheConfig` and :class:`ResidualCacheConfig`.
    """

    method: ClassVar[str] = "magcache"
    aliases: ClassVar[tuple[str, ...]] = ("mag_cache", "mag-cache")
    source: ClassVar[str] = "Ma et al., MagCache, NeurIPS 2025 (arXiv 2506.09045); Zehong-Ma/MagCache"

    mag_threshold: float = 0.06
    mag_max_skip_steps: int = 3
    mag_retention_ratio: float = 0.2
    mag_ratios: tuple[float, ...] | Mapping[str, tuple[float, ...]] | None = None
    calibrate: bool = False

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        object.__setattr__(self, "mag_threshold", _check_number(owner, "mag_threshold", self.mag_threshold, low=0.0))
        object.__setattr__(
            self, "mag_max_skip_steps", _check_int(owner, "mag_max_skip_steps", self.mag_max_skip_steps, low=1)
        )
        retention = _check_number(owner, "mag_retention_ratio", self.mag_retention_ratio, low=0.0)
        if retention >= 1.0:
            raise ValueError(f"{owner}.mag_retention_ratio must be in [0, 1), got {retention!r}")
        object.__setattr__(self, "mag_retention_ratio", retention)
        _set_bool(self, "calibrate")
        ratios = self.mag_ratios
        if ratios is None:
            return
        if self.calibrate:
            raise ValueError(f"{owner}.mag_ratios must be None when calibrate=True (calibration measures them)")
        if isinstance(ratios, Mapping):
            if not ratios:
                raise ValueError(f"{owner}.mag_ratios must not be an empty dict")
            checked = {str(b): _check_ratio_list(owner, f"mag_ratios[{b!r}]", v) for b, v in ratios.items()}
            lengths = {len(v) for v in checked.values()}
            if len(lengths) != 1:
                raise ValueError(
                    f"{owner}.mag_ratios lists must all have the calibration step count's length, got lengths "
                    f"{ {b: len(v) for b, v in checked.items()} }"
                )
            object.__setattr__(self, "mag_ratios", FrozenDict(checked))
        else:
            object.__setattr__(self, "mag_ratios", _check_ratio_list(owner, "mag_ratios", ratios))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if isinstance(self.mag_ratios, Mapping):
            out["mag_ratios"] = {b: list(v) for b, v in self.mag_ratios.items()}
        return out

    @classmethod
    def from_calibration(cls, stats: Any, **fields: Any) -> MagCacheConfig:
        """A config using the ratios ``calibrate=True`` runs recorded (``stats``: one ``CacheStats`` or a list).

        With several runs the ratios are averaged per branch and step. Identical branch lists are stored once,
        differing ones as ``{branch: ratios}``.

        Raises:
            ValueError: if ``stats`` holds no MagCache calibration, or the runs differ in step count.
        """
        from .calibration import average_mag_ratios

        recorded = average_mag_ratios(stats)
        values = list(recorded.values())
        ratios = values[0] if all(v == values[0] for v in values) else recorded
        return cls(mag_ratios=ratios, **fields)

    def make_policy(self, spec: ModelCacheSpec | None = None):
        from .policies import MagCachePolicy

        return MagCachePolicy(self, spec if spec is not None else ModelCacheSpec())


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
            Reuse while the probe's relative L1 change is below this; 0 never reuses.
        max_warmup_steps (`int`, defaults to 8): cache-dit's default warm-up.
        max_accumulated_residual_diff_threshold (`float` or `None`, defaults to `None`, range > 0):
            Once the diffs tested so far sum to this, the branch computes every remaining step.
        other fields: shared guards and calibrator (``enable_taylorseer`` makes this cache-dit's DBCache + TaylorSeer
            calibrator), see :class:`StepCacheConfig` and :class:`ResidualCacheConfig`.
    """

    method: ClassVar[str] = "dbcache"
    aliases: ClassVar[tuple[str, ...]] = ("db_cache", "db-cache", "cache_dit")
    source: ClassVar[str] = "vipshop/cache-dit DBCache (docs/papers/paper.tex); First-Block-Cache: chengzeyi/ParaAttention"

    Fn: int = 8
    Bn: int = 0
    residual_diff_threshold: float = 0.08
    max_accumulated_residual_diff_threshold: float | None = None
    max_warmup_steps: int = 8

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

    def make_policy(self, spec: ModelCacheSpec | None = None):
        from .policies import DBCachePolicy

        return DBCachePolicy(self, spec if spec is not None else ModelCacheSpec())


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

    Fn: int = 1
    Bn: int = 0
    max_warmup_steps: int = 0

    def validate(self) -> None:
        super().validate()
        if (self.Fn, self.Bn) != (1, 0):
            raise ValueError(
                f"FirstBlockCacheConfig has Fn=1 and Bn=0, got Fn={self.Fn}, Bn={self.Bn}; use DBCacheConfig instead"
            )


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

    order: int = 1
    interval: int = 5
    max_warmup_steps: int = 3

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        object.__setattr__(self, "order", _check_order(owner, "order", self.order))
        object.__setattr__(self, "interval", _check_int(owner, "interval", self.interval, low=1))

    def make_policy(self, spec: ModelCacheSpec | None = None):
        from .policies import TaylorSeerPolicy

        return TaylorSeerPolicy(self, spec if spec is not None else ModelCacheSpec())


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


@register_cache_method
@dataclass(frozen=True, kw_only=True)
class LeMiCaConfig(PlannedScheduleConfig):
    """LeMiCa: lexicographic-minimax path caching (Gao et al., NeurIPS 2025, arXiv 2511.00090; UnicomAI/LeMiCa).

    A static schedule: the steps in ``computed_steps`` run the block stack; every other step adds the block-stack
    residual of the branch's last computed step (as TeaCache does on a reused step). The schedule is the path of
    ``B`` nodes through the DAG of steps whose edge costs (the global error of the final output when only the steps
    strictly between the edge's ends reuse) are lexicographically minimax, solved exactly by
    :func:`cached_diffusers.schedules.solve_lexicographic_minimax` from the error matrix that
    ``cached-diffusers calibrate --method lemica`` measures on the model.

    Args:
        computed_steps, num_inference_steps: the plan, see :class:`PlannedScheduleConfig`.
        other fields: shared guards, see :class:`StepCacheConfig`.

    Raises:
        ValueError: for a schedule that is not strictly increasing, misses step 0 or the last step, or (when run)
            a call whose step count differs from ``num_inference_steps``.
    """

    method: ClassVar[str] = "lemica"
    aliases: ClassVar[tuple[str, ...]] = ("le_mi_ca", "lexicographic-minimax")
    source: ClassVar[str] = (
        "Gao et al., LeMiCa: Lexicographic Minimax Path Caching, NeurIPS 2025 (arXiv 2511.00090); UnicomAI/LeMiCa"
    )

    def make_policy(self, spec: ModelCacheSpec | None = None):
        from .planned import LeMiCaPolicy

        return LeMiCaPolicy(self, spec if spec is not None else ModelCacheSpec())


MEANCACHE_MAX_WINDOW = 6
"""Largest averaging window of MeanCache's official schedules (``v_diff_mean_jvp1_s2`` .. ``_s6``,
UnicomAI/MeanCache ``MeanCache4Qwen-Image/Mc_qwenimage.py``)."""


@register_cache_method
@dataclass(frozen=True, kw_only=True)
class MeanCacheConfig(PlannedScheduleConfig):
    """MeanCache: average-velocity caching (Gao et al., ICLR 2026, arXiv 2601.19961; UnicomAI/MeanCache).

    A static schedule like :class:`LeMiCaConfig`, with another reuse rule. On a reused step ``i`` MeanCache does not
    reuse the last instantaneous quantity ``u_{i-1}`` as it is, it corrects it with the trend of the *average*
    velocity over a window of the last ``k`` steps ``i-k .. i-1`` (computed or reused):

    * ``avg = sum_m u_m (sigma_{m+1} - sigma_m) / (sigma_i - sigma_{i-k})``, the average velocity over the window
      (for the Euler flow-matching step, ``(x_i - x_{i-k}) / (sigma_i - sigma_{i-k})`` as in the official code);
    * ``d = (u_{i-k} - avg) / (sigma_i - sigma_{i-k})``, its estimate of the derivative (the official "JVP");
    * ``u_i = u_{i-1} - d * (sigma_{i+1} - sigma_i)``.

    ``k = 1`` gives ``avg = u_{i-1}`` and plain reuse. The official code applies this to the guided velocity at the
    pipeline; here ``u`` is the branch's block-stack residual (the quantity every method of this engine reuses), so
    each guidance branch keeps its own history, and ``sigma`` is the pipeline scheduler's ``sigmas`` (uniform
    ``1 - i/N`` for a transformer driven without a pipeline). The window is chosen per gap of the schedule.

    Args:
        computed_steps, num_inference_steps: the plan, see :class:`PlannedScheduleConfig`.
        windows (`int` or sequence of int, defaults to 2, range 1 to ``MEANCACHE_MAX_WINDOW`` = 6):
            The averaging window ``k``: one value for every gap, or one per gap between consecutive computed steps
            (``len(computed_steps) - 1`` values; gaps without a reused step ignore theirs). The official Qwen-Image
            schedules use 1 on most gaps and 2, 4 or 5 on a few; ``cached-diffusers calibrate --method meancache``
            picks the best window per edge.
        other fields: shared guards, see :class:`StepCacheConfig`.

    Raises:
        ValueError: as :class:`LeMiCaConfig`, and for a window outside ``[1, 6]`` or a window list of the wrong length.
    """

    method: ClassVar[str] = "meancache"
    aliases: ClassVar[tuple[str, ...]] = ("mean_cache", "mean-cache")
    source: ClassVar[str] = (
        "Gao et al., MeanCache: From Instantaneous to Average Velocity for Accelerating Flow Matching Inference, "
        "ICLR 2026 (arXiv 2601.19961); UnicomAI/MeanCache"
    )

    windows: int | tuple[int, ...] = 2
    max_window: ClassVar[int] = MEANCACHE_MAX_WINDOW

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        gaps = len(self.computed_steps) - 1
        windows = as_scalar(self.windows)
        if isinstance(windows, (int, float)) and not isinstance(windows, bool):
            values: tuple[Any, ...] = (windows,) * gaps
        else:
            values = as_sequence(f"{owner}.windows", windows, f"integers in [1, {MEANCACHE_MAX_WINDOW}]")
            if len(values) != gaps:
                raise ValueError(
                    f"{owner}.windows must be one integer or one per gap ({gaps} = len(computed_steps) - 1), "
                    f"got {len(values)} values"
                )
        checked = []
        for i, w in enumerate(values):
            w = _check_int(owner, f"windows[{i}]", w, low=1)
            if w > MEANCACHE_MAX_WINDOW:
                raise ValueError(f"{owner}.windows[{i}] must be an integer in [1, {MEANCACHE_MAX_WINDOW}], got {w}")
            checked.append(w)
        if isinstance(windows, (int, float)) and not isinstance(windows, bool):
            object.__setattr__(self, "windows", checked[0] if checked else int(windows))
        else:
            object.__setattr__(self, "windows", tuple(checked))

    def window_of_gap(self, gap: int) -> int:
        """The window of gap ``gap`` (between ``computed_steps[gap]`` and ``computed_steps[gap + 1]``)."""
        return self.windows if isinstance(self.windows, int) else self.windows[gap]

    def make_policy(self, spec: ModelCacheSpec | None = None):
        from .planned import MeanCachePolicy

        return MeanCachePolicy(self, spec if spec is not None else ModelCacheSpec())


@register_cache_method
@dataclass(frozen=True)
class SeaCacheConfig(StepCacheConfig):
    """SeaCache: Spectral-Evolution-Aware Cache (Chung et al., CVPR 2026, arXiv 2602.18993; diffusers 0.42
    ``diffusers/hooks/sea_cache.py``, whose parameter names and defaults these are).

    Per guidance branch, the indicator is the *raw latent* entering the transformer on its grid ``(B, C, H, W)``
    (packed patch tokens unpacked; see ``docs/methods.md`` for each model), passed through the SEA filter at the
    step's noise level ``sigma`` (:func:`cached_diffusers.sea.sea_filter`: an FFT over the grid per channel, a
    per-axis Wiener-like gain ``s / (s^2 + sigma^2 |f|^power_exp)`` with ``s = 1 - sigma``, normalised to unit mean).
    The relative L1 distance between consecutive steps' filtered latents (mean over batch rows of
    ``mean|a - b| / (mean|b| + 1e-16)``) accumulates; a step reuses while the sum stays below ``threshold``; when it
    reaches ``threshold`` the step computes and the sum restarts from 0. The previous filtered latent is updated at
    every step. The first ``retention_steps`` and the last ``cache_end_steps`` executed steps always compute, and
    after ``max_consecutive_cached`` reused steps in a row the next one computes. A reused step adds the residual of
    the last computed step (``residual_order=0``) or its linear extrapolation from the last two computed steps
    ``s_1 < s_2`` (``residual_order=1``): ``R(s) = R_2 + (R_2 - R_1) (s - s_2) / (s_2 - s_1)``.

    ``sigma`` is the running scheduler's ``sigmas[step]`` (the value diffusers' pipelines pass to the hook's
    ``cache_context(..., sigma=...)``), or ``1 - step / N`` for a transformer driven without a pipeline.

    Args:
        threshold (`float`, defaults to 0.25, range >= 0):
            Accumulated filtered-latent distance at which a step computes; larger reuses more. 0 computes every step.
        residual_order (`int`, defaults to 1, 0 or 1):
            0 reuses the last computed residual; 1 extrapolates linearly from the last two computed steps.
        retention_steps (`int`, defaults to 1, range >= 0):
            The first executed steps that always compute (step 0 of a branch computes regardless).
        cache_end_steps (`int`, defaults to 1, range >= 0):
            The last steps that always compute.
        max_consecutive_cached (`int`, defaults to 2, range >= 0):
            After this many reused steps in a row, the next step computes; 0 means no limit.
        power_exp (`float`, defaults to 3.0, range > 0):
            Exponent of the clean signal's power-law prior ``|f|^-power_exp`` per grid axis (the hook's default, for
            video features; kept for images, see ``docs/methods.md``).
        calibrate (`bool`, defaults to `False`):
            Calibration mode: never reuse; record each branch's distance at every step in
            ``stats.branches[b].calibration["sea_distances"]`` (``None`` where there is no previous step), from
            which :func:`cached_diffusers.calibration.suggest_sea_threshold` replays the rule.
        other fields: the shared guards of :class:`StepCacheConfig` (``compute_last_step`` duplicates
            ``cache_end_steps >= 1``; ``max_continuous_cached_steps`` is the engine's cap, independent of
            ``max_consecutive_cached``).

    Raises:
        ValueError: for a value outside its range, naming the field.
    """

    method: ClassVar[str] = "seacache"
    aliases: ClassVar[tuple[str, ...]] = ("sea_cache", "sea-cache")
    source: ClassVar[str] = (
        "Chung et al., SeaCache: Spectral-Evolution-Aware Cache for Accelerating Diffusion Models, CVPR 2026 "
        "(arXiv 2602.18993); huggingface/diffusers 0.42 hooks/sea_cache.py"
    )

    threshold: float = 0.25
    residual_order: int = 1
    retention_steps: int = 1
    cache_end_steps: int = 1
    max_consecutive_cached: int = 2
    power_exp: float = 3.0
    calibrate: bool = False

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        object.__setattr__(self, "threshold", _check_number(owner, "threshold", self.threshold, low=0.0))
        order = _check_int(owner, "residual_order", self.residual_order, low=0)
        if order > 1:
            raise ValueError(f"{owner}.residual_order must be 0 or 1, got {order}")
        object.__setattr__(self, "residual_order", order)
        for name in ("retention_steps", "cache_end_steps", "max_consecutive_cached"):
            object.__setattr__(self, name, _check_int(owner, name, getattr(self, name), low=0))
        object.__setattr__(
            self, "power_exp", _check_number(owner, "power_exp", self.power_exp, low=0.0, low_open=True)
        )
        _set_bool(self, "calibrate")

    def make_policy(self, spec: ModelCacheSpec | None = None):
        from .policies import SeaCachePolicy

        return SeaCachePolicy(self, spec if spec is not None else ModelCacheSpec())
