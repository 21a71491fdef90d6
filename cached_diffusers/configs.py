"""Cache configurations: the bases every method's config derives from, the shared guards and the parsing of configs.

A cache configuration is a value: a frozen dataclass that validates itself on construction, serialises to a
JSON-able ``dict`` (``to_dict``) and back (``CacheConfig.from_dict``), and names the method it configures. Every
method registers its config class under a name (``"teacache"``, ...); ``"none"`` (or ``cache_config=None``) means no
caching at all. Each method's config lives in its own module, :mod:`cached_diffusers.methods` (``TeaCacheConfig`` in
``cached_diffusers/methods/teacache.py``, ...); the registry (:mod:`cached_diffusers.registry`) is the one list of
them. ``cached_diffusers.configs.TeaCacheConfig`` and the other old paths still resolve (module ``__getattr__``).

Guards shared by every step-caching method live on :class:`StepCacheConfig`: a warm-up of always-computed steps,
caps on the total and on the consecutive number of reused steps, and computing the last step (on by default). The
first denoising step of every guidance branch is always computed (there is nothing to reuse yet).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from .registry import (
    available_cache_methods,
    cache_method,
    config_class as _config_class,
    old_path_getattr,
    register_cache_method,
    registered_names,
)
from .scm import validate_mask_spec
from .spec import ModelCacheSpec
from .validation import MAX_STEPS, FrozenDict, as_scalar, as_sequence

__all__ = [
    "CacheConfig",
    "NoCacheConfig",
    "ResidualCacheConfig",
    "StepCacheConfig",
    "available_cache_methods",
    "cache_config_from_dict",
    "cache_method",
    "make_cache_config",
    "register_cache_method",
    "resolve_cache_config",
]
# The methods' own configs live in their modules (cached_diffusers.methods.<name>); `cached_diffusers.configs.<Name>`
# still resolves through the module's __getattr__ below.


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
        raise ValueError(f"a cache config dict needs a 'method' key; valid methods: {', '.join(registered_names())}")
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
            At most this many reused steps per guidance branch and generation; ``None`` means no cap. The name is
            cache-dit's (``DBCacheConfig.max_cached_steps``), kept so that its configs read the same; "cached" here
            means reused.
        max_continuous_cached_steps (`int` or `None`, defaults to `None`, range >= 1):
            At most this many reused steps in a row per branch; ``None`` means no cap. cache-dit's name
            (``DBCacheConfig.max_continuous_cached_steps``), kept likewise.
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

    policy_class: ClassVar[type | None] = None
    """The :class:`~cached_diffusers.policies.CachePolicy` subclass :meth:`make_policy` builds (set by each method)."""
    sweep: ClassVar[Any] = None
    """The method's :class:`~cached_diffusers.registry.Sweep` (what ``bench`` / ``tune`` vary), or ``None``."""
    calibration: ClassVar[str | None] = None
    """``"runs"``: ``calibrate=True`` runs and ``from_calibration``; ``"schedule"``: a planned schedule solved from
    an error matrix; ``None``: nothing to calibrate."""
    calibration_target: ClassVar[str | None] = None
    """The option a ``"runs"`` calibration needs besides the runs (SeaCache: ``"computed_steps"``), or ``None``."""

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
            object.__setattr__(self, "scm_steps_mask", validate_mask_spec(f"{owner}.scm_steps_mask", self.scm_steps_mask))
        if self.scm_steps_policy not in ("dynamic", "static"):
            raise ValueError(f"{owner}.scm_steps_policy must be 'dynamic' or 'static', got {self.scm_steps_policy!r}")

    def make_policy(self, spec: ModelCacheSpec | None = None):
        """``policy_class(self, spec)`` (``spec=None``: a model that provides no coefficients, ratios or patterns).

        Raises:
            NotImplementedError: when the class names no ``policy_class``.
            ValueError: when the model cannot run this method (see :meth:`CacheConfig.make_policy`).
        """
        if self.policy_class is None:
            raise NotImplementedError(f"{type(self).__name__} names no policy_class")
        return self.policy_class(self, spec if spec is not None else ModelCacheSpec())

    @classmethod
    def calibrated(cls, runs: list[Any], options: Mapping[str, Any]) -> tuple[StepCacheConfig, dict[str, Any], list[str]]:
        """A ``"runs"`` calibration's result: ``(config, fit quality for the provenance record, lines to print)``
        from the statistics of ``calibrate=True`` runs and the ``calibrate`` command's options (``rel_l1_thresh``,
        ``mag_threshold``, ``computed_steps``, ...).

        Raises:
            NotImplementedError: for a method without a ``"runs"`` calibration.
        """
        raise NotImplementedError(f"{cls.__name__} has no calibration from runs")

    @classmethod
    def sweep_config(cls, value: Any, **context: Any) -> StepCacheConfig:
        """The config a sweep runs at knob value ``value`` (``cls.sweep.knob``), the other fields at their defaults.

        ``context`` (the model's ``num_blocks``, the run's ``num_steps``, calibrated ``coefficients`` /
        ``mag_ratios``; ``None`` where unknown) lets a method adapt its other fields to the model; the default
        ignores it."""
        return cls(**{cls.sweep.knob: value})

    def calibrated_data(self) -> dict[str, Any]:
        """The model data this config carries from a calibration (TeaCache's ``coefficients``, MagCache's
        ``mag_ratios``), as sweep context: ``{}`` for a method that needs none."""
        return {}

    def missing_model_data(self, spec: ModelCacheSpec | None, model: str) -> str | None:
        """Why ``model`` (its ``spec``) cannot run this config for lack of data (no published coefficients or ratios),
        as a short reason for the tools' "skipped" records; ``None`` when nothing is missing."""
        return None

    def for_budget_search(self, num_steps: int) -> StepCacheConfig:
        """This config as a base for tuning to a computed-step budget (``bench --equal-budget``, ``tune``): a method
        whose own caps would keep it above small budgets lifts them here; the default changes nothing."""
        return self

    @classmethod
    def sweep_curves(cls, **context: Any) -> dict[str, list[StepCacheConfig]]:
        """The benchmark's curves for this method: ``{label: configs}``, by default one curve named after the method
        over ``cls.sweep.values``."""
        return {cls.method: [cls.sweep_config(v, **context) for v in cls.sweep.values]}

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


_moved = old_path_getattr(__name__, "The methods' configs")


def __getattr__(name: str) -> Any:
    """The methods' configs at their old path (``cached_diffusers.configs.TeaCacheConfig``): looked up in the method
    modules (and ``PlannedScheduleConfig`` in :mod:`cached_diffusers.planned`)."""
    if name == "PlannedScheduleConfig":  # the planned-schedule base (importlib: planned imports this module)
        return importlib.import_module(f"{__package__}.planned").PlannedScheduleConfig
    return _moved(name)
