"""What every cached pipeline shares: the cache lifecycle around its parent's ``__call__``.

A cached pipeline is ``class CachedXPipeline(CachedPipelineMixin, XPipeline)``. Its parent's denoising loop already
wraps each transformer call in ``transformer.cache_context("cond" | "uncond")``, which names the guidance branch;
this mixin adds, per ``__call__``, a clean cache state and a step source that tells the transformer which denoising
step the loop is at (the scheduler's step index), and leaves the statistics readable afterwards.

It also makes the cache config travel with the model (``save_pretrained`` / ``push_to_hub`` write
``cache_config.json`` beside ``model_index.json``, ``from_pretrained`` reads it back; see
:mod:`cached_diffusers.hub`), shows reused steps in the progress bar's postfix as they happen, and prints a summary
(:meth:`CachedPipelineMixin.cache_summary`).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Mapping, TextIO

from .configs import CacheConfig
from .hub import check_local_path, load_cache_config
from .hub import save_cache_config as save_cache_config_file
from .model_mixin import stock_class_name_json
from .progress import progress_postfix, summary
from .stats import CacheStats

__all__ = ["CachedPipelineMixin"]


class CachedPipelineMixin:
    """Mixin for a diffusers pipeline whose ``transformer`` is a cached model.

    Class attributes:
        cached_transformer_class: the cached model class the loaded transformer is turned into.
    """

    cached_transformer_class: ClassVar[type]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a diffusers pipeline directory or Hub repository, as the parent does, with its saved cache config.

        ``cache_config`` decides the caching: when it is passed (a config, a dict, a method name, or ``None`` /
        ``"none"`` for no caching) it wins; when it is not passed, the ``cache_config.json`` saved beside
        ``model_index.json`` is used (for a Hub id it is fetched with the same ``cache_dir``, ``revision``, ``token``,
        ``local_files_only`` and ``force_download``); without that file the pipeline loads with caching off, as
        before. The file is read and validated before any weights are loaded.

        Raises:
            FileNotFoundError: naming the path, when it looks local (not ``namespace/name``) and does not exist.
            ValueError: for an invalid ``cache_config`` argument; naming the file, for a ``cache_config.json`` that is
                not a valid config (unknown method or field, coefficients of the wrong length, ...) or that the model
                cannot run (e.g. TeaCache without coefficients on a model that has none, DBCache with more ``Fn + Bn``
                blocks than the model has).
        """
        check_local_path(pretrained_model_name_or_path)
        if "cache_config" in kwargs:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        saved, source = load_cache_config(pretrained_model_name_or_path, **kwargs)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if source is not None:
            try:
                pipe.cache_config = saved
            except ValueError as error:
                model = type(pipe.transformer).__name__ if pipe.transformer is not None else "this pipeline"
                raise ValueError(f"the cache config in {source} cannot be used with {model}: {error}") from None
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, save_cache_config: bool = True, **kwargs: Any):
        """Save as the parent does (an ordinary diffusers directory), plus ``cache_config.json`` when caching is on.

        The active cache config is written to ``save_directory/cache_config.json`` before the parent saves, so
        ``push_to_hub=True`` uploads it with the weights (``pipe.push_to_hub(repo_id)`` too, which calls this). With
        caching off, a ``cache_config.json`` left in ``save_directory`` by an earlier save is removed, so that the
        directory loads uncached. ``save_cache_config=False`` leaves the file alone (neither written nor removed).
        Stock diffusers ignores the file.
        """
        if save_cache_config:
            config = self.cache_config if self.transformer is not None else None
            save_cache_config_file(config, save_directory)
        return super().save_pretrained(save_directory, *args, **kwargs)

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

    def cache_summary(self, file: TextIO | None = None, details: bool = True) -> CacheStats:
        """Print the last call's cache statistics per guidance branch and return them.

        Config, share of transformer blocks run, and per branch: computed and reused steps and the distribution of
        the method's decision value (see :func:`cached_diffusers.progress.summary`).
        """
        return summary(self, file=file, details=details)

    def progress_bar(self, iterable=None, total=None):
        """The parent's tqdm bar; while caching is on, its postfix shows the steps reused so far per branch.

        E.g. ``reused cond 3/7, uncond 3/7``, updated at every step as the parent's loop advances the bar.
        """
        transformer = getattr(self, "transformer", None)
        if transformer is None or not transformer.cache_engine.active:
            return super().progress_bar(iterable=iterable, total=total)
        if iterable is not None:
            holder = []

            def annotated():
                for item in iterable:
                    yield item
                    holder[0].set_postfix_str(progress_postfix(transformer.cache_stats), refresh=True)

            bar = super().progress_bar(iterable=annotated())
            holder.append(bar)
            if bar.total is None and hasattr(iterable, "__len__"):
                bar.total = len(iterable)
            return bar
        bar = super().progress_bar(total=total)
        if bar.disable:
            return bar
        update = bar.update

        def update_with_cache(n=1):
            bar.set_postfix_str(progress_postfix(transformer.cache_stats), refresh=False)
            return update(n)

        bar.update = update_with_cache
        return bar

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
