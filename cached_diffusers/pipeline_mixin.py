"""What every cached pipeline shares: the cache lifecycle around its parent's ``__call__``.

A cached pipeline is ``class CachedXPipeline(CachedPipelineMixin, XPipeline)``. Its parent's denoising loop already
wraps each transformer call in ``transformer.cache_context("cond" | "uncond")``, which names the guidance branch;
this mixin adds, per ``__call__``, a clean cache state and a step source that tells the transformer which denoising
step the loop is at (the scheduler's step index), and leaves the statistics readable afterwards.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from .configs import CacheConfig
from .model_mixin import stock_class_name_json
from .stats import CacheStats

__all__ = ["CachedPipelineMixin"]


class CachedPipelineMixin:
    """Mixin for a diffusers pipeline whose ``transformer`` is a cached model.

    Class attributes:
        cached_transformer_class: the cached model class the loaded transformer is turned into.
    """

    cached_transformer_class: ClassVar[type]

    def _init_cache(self, cache_config: CacheConfig | Mapping[str, Any] | str | None) -> None:
        if self.transformer is not None:
            self.cached_transformer_class.from_base(self.transformer)
        self.cache_config = cache_config

    @property
    def cache_config(self) -> CacheConfig | None:
        """The transformer's cache config (``None``: no caching); replace it between calls."""
        return self.transformer.cache_config

    @cache_config.setter
    def cache_config(self, value: CacheConfig | Mapping[str, Any] | str | None) -> None:
        if self.transformer is None:
            if value is not None:
                raise ValueError("cache_config needs a transformer, but this pipeline has none")
            return
        self.transformer.cache_config = value

    def to_json_string(self) -> str:
        """``model_index.json`` naming the diffusers parent pipeline, so that a saved directory stays stock."""
        return stock_class_name_json(super().to_json_string(), type(self), CachedPipelineMixin)

    @property
    def cache_stats(self) -> CacheStats:
        """Per-branch statistics of the last call: computed and reused step indices and the decision signals."""
        return self.transformer.cache_stats

    def _denoising_step(self) -> tuple[int, int]:
        # The scheduler's step index is the denoising step (None before the first `scheduler.step` of a call).
        scheduler = self.scheduler
        step = scheduler.step_index
        if step is None:
            step = getattr(scheduler, "begin_index", None) or 0
        return step, len(scheduler.timesteps)

    def __call__(self, *args: Any, **kwargs: Any):
        if self.transformer is None:
            return super().__call__(*args, **kwargs)
        engine = self.transformer.cache_engine
        engine.reset()
        with engine.step_source(self._denoising_step):
            return super().__call__(*args, **kwargs)
