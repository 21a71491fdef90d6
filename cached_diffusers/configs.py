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

__all__ = [
    "CacheConfig",
    "NoCacheConfig",
    "StepCacheConfig",
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


def _check_number(owner: str, name: str, value: Any, *, low: float | None = None, low_open: bool = False) -> float:
    bound = "" if low is None else (f" > {low}" if low_open else f" >= {low}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number{bound}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{owner}.{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def _check_int(owner: str, name: str, value: Any, *, low: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        extra = " or None (no limit)" if allow_none else ""
        raise ValueError(f"{owner}.{name} must be an integer >= {low}{extra}, got {value!r}")
    return value


def _check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be True or False, got {value!r}")
    return value


@dataclass(frozen=True)
class CacheConfig:
    """Base class of every cache configuration.

    Subclasses set ``method`` (the registry name), optionally ``aliases``, and ``source`` (the paper or reference
    implementation of the algorithm), validate their fields in ``validate`` and build their decision policy in
    ``make_policy``.
    """

    method: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    source: ClassVar[str] = ""

    def __post_init__(self) -> None:
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

    def make_policy(self, defaults: Mapping[str, Any] | None = None):
        """The decision policy for this config. ``defaults`` are model-provided values (e.g. coefficients)."""
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

    Names follow cache-dit's ``DBCacheConfig`` (vipshop/cache-dit), where ``-1`` means "no cap"; here that is ``None``.
    """

    max_warmup_steps: int = 0
    max_cached_steps: int | None = None
    max_continuous_cached_steps: int | None = None
    compute_last_step: bool = True

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
        _check_bool(owner, "compute_last_step", self.compute_last_step)


@register_cache_method
@dataclass(frozen=True)
class TeaCacheConfig(StepCacheConfig):
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
        max_warmup_steps, max_cached_steps, max_continuous_cached_steps, compute_last_step:
            Shared guards, see :class:`StepCacheConfig`.
    """

    method: ClassVar[str] = "teacache"
    aliases: ClassVar[tuple[str, ...]] = ("tea_cache", "tea-cache")
    source: ClassVar[str] = "Liu et al., TeaCache, CVPR 2025 (arXiv 2411.19108); ali-vilab/TeaCache"

    rel_l1_thresh: float = 0.2
    coefficients: tuple[float, ...] | None = None

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        object.__setattr__(
            self, "rel_l1_thresh", _check_number(owner, "rel_l1_thresh", self.rel_l1_thresh, low=0.0, low_open=True)
        )
        if self.coefficients is not None:
            coefficients = self.coefficients
            if isinstance(coefficients, (str, bytes)) or not hasattr(coefficients, "__len__"):
                raise ValueError(f"{owner}.coefficients must be a sequence of 5 numbers or None, got {coefficients!r}")
            if len(coefficients) != 5:
                raise ValueError(
                    f"{owner}.coefficients must have exactly 5 numbers [c4, c3, c2, c1, c0] (a 4th-order polynomial, "
                    f"highest order first), got {len(coefficients)}"
                )
            values = tuple(_check_number(owner, f"coefficients[{i}]", c) for i, c in enumerate(coefficients))
            object.__setattr__(self, "coefficients", values)

    def make_policy(self, defaults: Mapping[str, Any] | None = None):
        from .policies import TeaCachePolicy

        return TeaCachePolicy(self, defaults or {})
