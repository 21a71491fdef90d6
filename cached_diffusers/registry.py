"""The cache-method registry: the one list of methods that the engine, the command line, the tools and the tests read.

A method is one module of :mod:`cached_diffusers.methods` (its config, its policy, its residual store or forecaster
if it has one, its calibration and its sweep metadata); its config class is registered with the
:func:`register_cache_method` decorator. Everything that iterates methods asks this module:
:func:`available_cache_methods` (names), :func:`cache_method` (one :class:`CacheMethod`), :func:`cache_methods`
(all of them), :func:`methods_supporting` (the ones a wiring pattern can run, for error messages).

The built-in methods are discovered like plugins: the first lookup imports the :mod:`cached_diffusers.methods`
package, which imports each of its modules; the method modules import the core (bases, shared guards, stores), the
core never imports them statically. A method registered outside the package (a test, a user's module) is one
``@register_cache_method`` away from every list.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:  # annotations only: the configs register themselves here (configs -> registry)
    from .configs import CacheConfig

__all__ = [
    "CacheMethod",
    "Sweep",
    "available_cache_methods",
    "cache_method",
    "cache_methods",
    "config_class",
    "methods_supporting",
    "register_cache_method",
]

_REGISTRY: dict[str, type[CacheConfig]] = {}
"""Lower-case name or alias -> config class."""

_BUILTINS = "cached_diffusers.methods"
_loaded = False


def _load_builtins() -> None:
    """Import the built-in method modules once (each registers itself on import)."""
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module(_BUILTINS)


@dataclass(frozen=True)
class Sweep:
    """What a sweep (``bench``, ``bench --equal-budget``, ``tune``) varies for a method.

    Attributes:
        knob: the config field a sweep varies, or ``"budget"`` (computed steps of a planned schedule).
        kind: ``"log"`` (a float, bisected geometrically in ``[low, high]``), ``"int"`` (an integer in
            ``[low, high]``; ``high = inf`` means the run's ``num_inference_steps - 1``) or ``"budget"`` (computed
            steps of a planned schedule, solved from an error matrix, ``[2, num_inference_steps]``).
        low, high: the range searched.
        faster_up: ``True`` when a larger value reuses more (thresholds, intervals); ``False`` for a budget.
        values: the benchmark's default sweep, conservative to aggressive (empty: not in the default benchmark).
        published: the published default setting (field -> value) and ``published_source``, where it is from.
        rank: position in listings (benchmark curves, tables); ties sort by name.
    """

    knob: str
    kind: str
    low: float
    high: float
    faster_up: bool = True
    values: tuple[Any, ...] = ()
    published: Mapping[str, Any] = field(default_factory=dict)
    published_source: str = ""
    rank: int = 100

    @property
    def name(self) -> str:
        """The knob (as the tools' ``Knob.name``)."""
        return self.knob

    def __post_init__(self) -> None:
        if self.kind not in ("log", "int", "budget"):
            raise ValueError(f"Sweep.kind must be 'log', 'int' or 'budget', got {self.kind!r}")
        if not (self.low < self.high or (self.low == self.high and math.isfinite(self.low))):
            raise ValueError(f"Sweep range must have low < high, got [{self.low}, {self.high}]")


THRESHOLD_RANGE = (1e-3, 10.0)
"""Bisection interval of every greedy method's threshold (log scale)."""


@dataclass(frozen=True)
class CacheMethod:
    """One registered method, as the tools see it.

    Attributes:
        name: the canonical name (``config_class.method``).
        config_class: the :class:`~cached_diffusers.configs.CacheConfig` subclass.
        policy_class: the :class:`~cached_diffusers.policies.CachePolicy` subclass its configs build (``None`` for
            ``"none"``).
        sweep: what sweeps vary (``None``: the tools skip the method with "no knob known").
        calibration: ``"runs"`` (``calibrate=True`` runs, then ``config_class.from_calibration``), ``"schedule"``
            (an error matrix and a planned schedule per budget) or ``None`` (nothing to calibrate).
        patterns: the wiring patterns its policy supports.
    """

    name: str
    config_class: type

    @property
    def policy_class(self) -> type | None:
        return getattr(self.config_class, "policy_class", None)

    @property
    def sweep(self) -> Sweep | None:
        return getattr(self.config_class, "sweep", None)

    @property
    def calibration(self) -> str | None:
        return getattr(self.config_class, "calibration", None)

    @property
    def patterns(self) -> tuple[str, ...]:
        policy = self.policy_class
        return tuple(policy.patterns) if policy is not None else ()

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(self.config_class.aliases)

    @property
    def enabled(self) -> bool:
        """Whether the method caches (``False`` for ``"none"``)."""
        return self.policy_class is not None


def register_cache_method(cls: type[CacheConfig]) -> type[CacheConfig]:
    """Class decorator: register a :class:`~cached_diffusers.configs.CacheConfig` subclass under ``cls.method`` and
    its ``aliases``. This is the one registration of a method: the command line, ``calibrate``, ``bench``,
    ``bench --equal-budget``, ``tune``, the error messages and the tests' contract matrix read the registry.

    Raises:
        ValueError: if the name (or an alias) is already registered to another class, or ``cls.method`` is empty.
    """
    if not cls.method:
        raise ValueError(f"{cls.__name__}.method must name the method (a non-empty string)")
    if not cls.__module__.startswith("cached_diffusers."):  # a method from elsewhere: the built-in names come first
        _load_builtins()
    for name in (cls.method, *cls.aliases):
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"cache method name {name!r} is already registered to {_REGISTRY[key].__name__}")
    for name in (cls.method, *cls.aliases):
        _REGISTRY[name.lower()] = cls
    return cls


def unregister_cache_method(name: str) -> None:
    """Remove a method and its aliases (for tests that register a method of their own). Raises ``ValueError`` for an
    unknown name."""
    cls = config_class(name)
    for key in [k for k, v in _REGISTRY.items() if v is cls]:
        del _REGISTRY[key]


def _rank(cls: type) -> tuple[int, str]:
    sweep = getattr(cls, "sweep", None)
    return (sweep.rank if sweep is not None else 100, cls.method)


def available_cache_methods() -> list[str]:
    """Canonical names of the registered cache methods (aliases excluded), sorted."""
    _load_builtins()
    return sorted({cls.method for cls in _REGISTRY.values()})


def cache_methods(*, enabled: bool | None = None) -> list[CacheMethod]:
    """Every registered method, in listing order (:attr:`Sweep.rank`, then name); ``enabled=True`` leaves out
    ``"none"``."""
    _load_builtins()
    found = [CacheMethod(cls.method, cls) for cls in sorted(set(_REGISTRY.values()), key=_rank)]
    return [m for m in found if enabled is None or m.enabled == enabled]


def registered_names() -> list[str]:
    """Every registered name and alias (lower case), sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def config_class(method: str) -> type[CacheConfig]:
    """The config class registered as ``method`` (a name or an alias, any case).

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    _load_builtins()
    if not isinstance(method, str) or method.lower() not in _REGISTRY:
        valid = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown cache method {method!r}; valid methods: {valid}")
    return _REGISTRY[method.lower()]


def cache_method(name: str) -> CacheMethod:
    """The registered method ``name`` (or alias). Raises ``ValueError`` for an unknown name."""
    cls = config_class(name)
    return CacheMethod(cls.method, cls)


def methods_supporting(pattern: str) -> list[str]:
    """Names of the registered methods whose policy supports the wiring ``pattern``, sorted (for error messages)."""
    return sorted(m.name for m in cache_methods(enabled=True) if pattern in m.patterns)


def method_attribute(name: str) -> Any:
    """A name defined in one of the built-in method modules (what ``cached_diffusers.configs.TeaCacheConfig`` and the
    other old import paths resolve to). Raises ``AttributeError`` when no method module defines it."""
    _load_builtins()
    package = importlib.import_module(_BUILTINS)
    for module_name in package.MODULES:
        module = importlib.import_module(f"{_BUILTINS}.{module_name}")
        if name in getattr(module, "__all__", ()):
            return getattr(module, name)
    raise AttributeError(name)


def old_path_getattr(module_name: str, what: str) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``module_name`` that resolves the names moved into the method modules
    (:func:`method_attribute`), so their old import paths keep working (``cached_diffusers.configs.TeaCacheConfig``);
    ``what`` (e.g. "the methods' configs") is its docstring's subject. Any other name raises ``AttributeError``."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return method_attribute(name)
        except AttributeError:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}") from None

    __getattr__.__doc__ = f"{what} at their old path in {module_name}, looked up in the method modules."
    return __getattr__
