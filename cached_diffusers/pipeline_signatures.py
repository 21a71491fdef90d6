"""A cached pipeline's constructor and ``__call__``: its diffusers parent's exact signatures and docstrings.

``class CachedX(CachedPipelineMixin, X)`` writes neither: :func:`install_parent_api` (run by
``CachedPipelineMixin.__init_subclass__``) gives it ``__init__(<X's parameters>, cache_config=None)`` and ``__call__``
with exactly ``X.__call__``'s signature and docstring, without per-class code (diffusers reads
``inspect.signature(cls.__init__)`` to know the components; users and diffusers' tests read
``inspect.signature(cls.__call__)``), and registers it in :data:`CACHED_PIPELINES`, what
:mod:`cached_diffusers.auto` looks up in ``model_index.json``. :func:`callback_argument` finds a call's
``callback_on_step_end`` among its positional or keyword arguments, by the parent's signature.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Callable, Mapping

from .configs import CacheConfig

__all__ = ["CACHED_PIPELINES", "cached_call", "cached_init", "callback_argument", "install_parent_api"]

CACHED_PIPELINES: dict[str, type] = {}
"""Diffusers parent pipeline class name -> the cached pipeline class built on it (first definition wins)."""


def install_parent_api(cls: type, parent: type) -> None:
    """Register ``cls`` as the cached counterpart of ``parent`` (unless ``parent`` is ``DiffusionPipeline``, the base
    of pipelines with a loop of their own) and give it ``parent``'s constructor and ``__call__`` (:func:`cached_init`,
    :func:`cached_call`), only where the nearest definition is still the parent's: a subclass of a cached pipeline,
    or a cached pipeline that writes its own, keeps the one it inherits or defines."""
    if parent.__name__ != "DiffusionPipeline":
        CACHED_PIPELINES.setdefault(parent.__name__, cls)
    if _nearest_definer(cls, "__init__") in parent.__mro__:
        cls.__init__ = cached_init(parent)
    if _nearest_definer(cls, "__call__") in parent.__mro__:
        cls.__call__ = cached_call(parent)


def _nearest_definer(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if name in c.__dict__)


def cached_init(parent: type) -> Callable[..., None]:
    """``__init__(self, <parent's parameters>, cache_config=None)``: the parent's constructor, then the cache
    (``self._init_cache(cache_config)``)."""
    parent_init = parent.__init__
    signature = inspect.signature(parent_init)
    cache_annotation = CacheConfig | Mapping[str, Any] | str | None
    cache_param = inspect.Parameter(
        "cache_config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=cache_annotation
    )
    try:  # resolved, so that diffusers' `get_type_hints(cls.__init__)` (from_pipe's component types) works
        annotations = typing.get_type_hints(parent_init)
    except Exception:
        annotations = {k: p.annotation for k, p in signature.parameters.items() if p.annotation is not p.empty}
    full = signature.replace(parameters=[*signature.parameters.values(), cache_param])

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = full.bind(self, *args, **kwargs)
        cache_config = bound.arguments.pop("cache_config", None)
        bound.arguments.pop(next(iter(signature.parameters)))
        parent_init(self, **bound.arguments)
        self._init_cache(cache_config)

    __init__.__signature__ = full
    __init__.__annotations__ = {**annotations, "cache_config": cache_annotation}
    __init__.__doc__ = parent_init.__doc__
    __init__.__qualname__ = f"{parent.__name__}.__init__"
    return __init__


def cached_call(parent: type) -> Callable[..., Any]:
    """``__call__`` with the parent's signature and docstring (``functools.wraps``) and the cache lifecycle
    (``self._cached_call(parent.__call__, args, kwargs)``)."""
    parent_call = parent.__call__

    @functools.wraps(parent_call)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._cached_call(parent_call, args, kwargs)

    return __call__


@functools.lru_cache(maxsize=None)
def _call_parameter_names(parent: type) -> tuple[str, ...]:
    return tuple(inspect.signature(parent.__call__).parameters)[1:]


def callback_argument(parent: type, args: tuple, kwargs: dict):
    """``(args, kwargs, callback, put)``: the call's ``callback_on_step_end`` (found by ``parent.__call__``'s
    signature, positional or keyword) and ``put(new)``, which returns the arguments with it replaced by ``new``."""
    names = _call_parameter_names(parent)
    name = "callback_on_step_end"
    if name in names and names.index(name) < len(args):
        index = names.index(name)

        def put(new):
            return args[:index] + (new,) + args[index + 1 :], kwargs

        return args, kwargs, args[index], put

    def put_keyword(new):
        if new is None:
            return args, kwargs
        return args, {**kwargs, name: new}

    return args, kwargs, kwargs.get(name), put_keyword
