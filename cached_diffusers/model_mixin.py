"""What every cached transformer shares: its engine, ``cache_config``, statistics and ``cache_context``.

A cached model is ``class CachedXModel(CachedTransformerMixin, XModel)``: it adds no parameters and no constructor
arguments, so the diffusers class's checkpoints, configs and loading code apply unchanged, and an already loaded
``XModel`` can be turned into the cached class in place (:meth:`CachedTransformerMixin.from_base`).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, ClassVar, Iterator, Mapping

from .configs import CacheConfig
from .engine import CacheEngine
from .stats import CacheStats

__all__ = ["CachedTransformerMixin", "diffusers_parent"]


def diffusers_parent(cls: type, mixin: type) -> type:
    """The first class in ``cls``'s MRO that is not ``mixin`` or one of its subclasses: the diffusers parent."""
    return next(c for c in cls.__mro__ if not issubclass(c, mixin))


def stock_class_name_json(text: str, cls: type, mixin: type) -> str:
    """A diffusers config JSON string with ``_class_name`` set to ``cls``'s diffusers parent.

    Saved directories then name only diffusers' classes and stay loadable by stock diffusers
    (``DiffusionPipeline.from_pretrained``); the cached classes load them as well.
    """
    data = json.loads(text)
    data["_class_name"] = diffusers_parent(cls, mixin).__name__
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


class CachedTransformerMixin:
    """Mixin for a diffusers ``ModelMixin`` subclass whose overridden ``forward`` calls :attr:`cache_engine`.

    Class attributes:
        cache_defaults: model-provided values for the configs, e.g. ``{"teacache_coefficients": (...)}``.
    """

    cache_defaults: ClassVar[Mapping[str, Any]] = {}

    @property
    def num_cache_blocks(self) -> int:
        """Blocks of the cached stack, in execution order (what DBCache's ``Fn`` and ``Bn`` count)."""
        raise NotImplementedError

    @property
    def cache_engine(self) -> CacheEngine:
        """This model's :class:`~cached_diffusers.engine.CacheEngine` (created on first use)."""
        engine = self.__dict__.get("_cache_engine")
        if engine is None:
            defaults = {"model_name": type(self).__name__, "num_blocks": self.num_cache_blocks, **self.cache_defaults}
            engine = CacheEngine(defaults)
            self.__dict__["_cache_engine"] = engine
        return engine

    @property
    def cache_config(self) -> CacheConfig | None:
        """The active cache config; ``None`` means no caching. Assign a config, a dict, a method name or ``None``.

        Raises:
            ValueError: on assignment of an invalid config, or one this model cannot run (e.g. TeaCache without
                coefficients for this model).
        """
        return self.cache_engine.config

    @cache_config.setter
    def cache_config(self, value: CacheConfig | Mapping[str, Any] | str | None) -> None:
        self.cache_engine.config = value

    @property
    def cache_stats(self) -> CacheStats:
        """Statistics of the current (or last) generation."""
        return self.cache_engine.stats

    def reset_cache(self) -> None:
        """Forget all cached residuals and statistics; the next call starts a new generation."""
        self.cache_engine.reset()

    def to_json_string(self) -> str:
        """The config as JSON, naming the diffusers parent class so that stock diffusers can load a saved model."""
        return stock_class_name_json(super().to_json_string(), type(self), CachedTransformerMixin)

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """Mark the guidance branch ``name`` (and optionally ``step_index``, ``num_inference_steps``) of the calls inside.

        Also forwards the context to diffusers' own cache hooks, as the parent's ``cache_context`` does.
        """
        step_index = kwargs.get("step_index")
        num_inference_steps = kwargs.get("num_inference_steps")
        with self.cache_engine.context(name, step_index=step_index, num_inference_steps=num_inference_steps):
            with super().cache_context(name, **kwargs):
                yield

    @classmethod
    def from_base(cls, model):
        """Turn a loaded instance of the diffusers parent class into this cached class, in place, and return it.

        The weights, device placement, dtype and hooks stay as they are (no copy). Caching starts off.

        Raises:
            TypeError: if ``model``'s class is not an ancestor of ``cls`` (the swap would change its architecture).
        """
        if isinstance(model, cls):
            return model
        if type(model) not in cls.__mro__:
            parent = diffusers_parent(cls, CachedTransformerMixin)
            raise TypeError(f"{cls.__name__}.from_base expects a {parent.__name__}, got {type(model).__name__}")
        model.__class__ = cls
        if "_old_forward" in model.__dict__:
            # accelerate's hooks (device_map, offloading) call the forward they wrapped: point it at ours.
            model._old_forward = cls.forward.__get__(model)
        return model
