"""What every cached pipeline shares: the cache lifecycle around its parent's ``__call__``.

A cached pipeline is ``class CachedXPipeline(CachedPipelineMixin, XPipeline)``. Its parent's denoising loop already
wraps each transformer call in ``transformer.cache_context("cond" | "uncond")``, which names the guidance branch;
this mixin adds, around the parent's ``__call__`` (whose signature and docstring it keeps), a generation of its own
per call (:meth:`CachedPipelineMixin.cache_generation`: branch states, statistics, and a step source that tells
the transformer which denoising step the loop is at, the scheduler's step index), so that pipelines sharing a
transformer can run concurrently, and leaves the statistics readable afterwards. A ``callback_on_step_end`` that
changes the latents (or other tensors it receives, or the schedule) makes the next step compute, whatever the
method.

It also makes the cache config travel with the model (``save_pretrained`` / ``push_to_hub`` write
``cache_config.json`` beside ``model_index.json``, ``from_pretrained`` reads it back; see
:mod:`cached_diffusers.hub`), shows reused steps in the progress bar's postfix as they happen, and prints a summary
(:meth:`CachedPipelineMixin.cache_summary`).

The class is the public surface; each job's code lives in its module: the parent's signatures
(:mod:`cached_diffusers.pipeline_signatures`), the Hub I/O (:mod:`cached_diffusers.pipeline_hub`), the call lifecycle
(:mod:`cached_diffusers.pipeline_call`) and the callback watch (:mod:`cached_diffusers.callback_watch`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, ClassVar, Mapping, TextIO

import torch

from . import pipeline_call, pipeline_hub
from .configs import CacheConfig
from .model_mixin import _NOT_OURS, CachedTransformerMixin, diffusers_parent, property_keeping_cause
from .pipeline_call import _BUSY  # noqa: F401  (its old path: the pipelines and schedulers running a generation)
from .pipeline_signatures import install_parent_api
from .progress import summary
from .stats import CacheStats

__all__ = ["CachedPipelineMixin"]


class CachedPipelineMixin:
    """Mixin for a diffusers pipeline whose ``transformer`` is a cached model.

    Class attributes:
        cached_transformer_class: the cached model class the loaded transformer is turned into.

    A subclass ``CachedX(CachedPipelineMixin, X)`` needs no ``__init__`` or ``__call__``: it gets
    ``__init__(<X's parameters>, cache_config=None)`` and ``__call__`` with exactly ``X.__call__``'s signature and
    docstring (``inspect.signature(CachedX.__call__) == inspect.signature(X.__call__)``), and registers itself as the
    cached counterpart of ``X`` for :class:`~cached_diffusers.CachedDiffusionPipeline`.
    """

    cached_transformer_class: ClassVar[type]

    cfg_parallel_sizes: ClassVar[tuple[int, ...]] = (2,)
    """The CFG-parallel group sizes the pipeline's loop fits: its guidance branches per step (``"cond"``, ``"uncond"``);
    ``()`` for a loop with one transformer call per step (nothing to run in parallel)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every cached pipeline gets its parent's exact constructor (plus `cache_config`) and `__call__` signatures
        # and docstrings, without per-class code: diffusers reads `inspect.signature(cls.__init__)` to know the
        # components, and users (and diffusers' tests) read `inspect.signature(cls.__call__)`.
        super().__init_subclass__(**kwargs)
        install_parent_api(cls, diffusers_parent(cls, CachedPipelineMixin))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a diffusers pipeline directory or Hub repository, as the parent does, with its saved cache config.

        ``cache_config`` decides the caching: when it is passed (a config, a dict, a method name, or ``None`` /
        ``"none"`` for no caching) it wins; when it is not passed, the ``cache_config.json`` saved beside
        ``model_index.json`` is used (for a Hub id it is fetched with the same ``cache_dir``, ``revision``, ``token``,
        ``local_files_only`` and ``force_download``); without that file the pipeline loads with caching off, as
        before. The file is read and validated before any weights are loaded. With ``transformer=None`` (e.g. to
        encode prompts only) the saved config is ignored, as the parent ignores the transformer's weights.

        A directory whose ``model_index.json`` names a cached transformer class (what a stock pipeline built from a
        cached pipeline's components writes, e.g. ``QwenImagePipeline(**cached.components).save_pretrained(d)``)
        loads as well: the cached model modules expose ``ModelMixin``, which is how diffusers finds the loading
        method of a class from another library.

        Raises:
            FileNotFoundError: naming the path, when it looks local (not ``namespace/name``) and does not exist.
            ValueError: for an invalid ``cache_config`` argument (before any weight is loaded); naming the file, for
                a ``cache_config.json`` that is not a valid config (unknown method or field, coefficients of the wrong
                length, ...) or that the model cannot run (e.g. TeaCache without coefficients on a model that has
                none, DBCache with more ``Fn + Bn`` blocks than the model has).
        """
        return pipeline_hub.from_pretrained(super().from_pretrained, pretrained_model_name_or_path, kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, save_cache_config: bool = True, **kwargs: Any):
        """Save as the parent does (an ordinary diffusers directory), plus ``cache_config.json`` when caching is on.

        The active cache config is written to ``save_directory/cache_config.json`` before the parent saves, so
        ``push_to_hub=True`` uploads it with the weights (``pipe.push_to_hub(repo_id)`` too, which calls this). With
        caching off, a ``cache_config.json`` left in ``save_directory`` by an earlier save is removed, so that the
        directory loads uncached. ``save_cache_config=False`` leaves the file alone (neither written nor removed).
        Stock diffusers ignores the file.
        """
        return pipeline_hub.save_pretrained(self, super().save_pretrained, save_directory, args, save_cache_config, kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs: Any):
        """The parent's ``from_pipe``: a new pipeline of this class sharing ``pipeline``'s components.

        ``pipeline`` is left as it was, cache config included: the new pipeline gets a cached view of its transformer
        (the same parameters, buffers and submodules, no copy, and a cache of its own) instead of converting it in
        place. When ``pipeline`` is itself a cached pipeline, the new one starts with its cache config unless
        ``cache_config`` is passed. A transformer wrapped by accelerate's offloading hooks is shared as it is
        (converted in place when stock). The other direction, ``XPipeline.from_pipe(cached_pipe)``, is diffusers'
        own, which carries over only components of exactly the annotated classes: there the cached pipeline's
        :attr:`components` hand it the transformer's stock view (same weights, no cache; the source keeps its cache
        config).
        """
        source_is_cached = isinstance(pipeline, CachedPipelineMixin)
        return pipeline_hub.from_pipe(super().from_pipe, pipeline, cls.cached_transformer_class, source_is_cached, kwargs)

    def _init_cache(self, cache_config: CacheConfig | Mapping[str, Any] | str | None) -> None:
        if self.transformer is not None:
            self.cached_transformer_class.from_base(self.transformer)
        self.cache_config = cache_config

    def __setattr__(self, name: str, value: Any) -> None:
        """``pipe.transformer = model`` (and ``register_modules(transformer=model)``) converts a stock ``model`` in
        place, as the constructor does, and applies the pipeline's :attr:`cache_config` to it.

        Raises:
            TypeError: for a transformer that is neither the cached transformer class nor its diffusers parent.
            ValueError: when the pipeline's cache config cannot run on the new transformer (it is converted, but
                not assigned).
        """
        if name != "transformer" or not isinstance(value, torch.nn.Module):
            super().__setattr__(name, value)
            return
        from diffusers.pipelines.pipeline_loading_utils import _unwrap_model

        model = _unwrap_model(value)  # a torch.compile'd transformer is assigned as it is, its module converted
        try:
            self.cached_transformer_class.from_base(model)  # in place; a cached one is kept as it is
        except TypeError as error:
            raise TypeError(f"{type(self).__name__}.transformer: {error}") from None
        initialised = "_pipeline_cache_config" in self.__dict__
        config = self.cache_config if initialised else None
        if config is not None:
            try:
                model.cache_engine.make_policy(config)
            except ValueError as error:
                raise ValueError(f"this pipeline's cache_config cannot run on the new transformer: {error}") from None
        super().__setattr__(name, value)
        if initialised:
            model.cache_config = config

    def __getattr__(self, name: str) -> Any:
        # As for cached models: an AttributeError raised inside one of this class's properties keeps its cause.
        value = property_keeping_cause(self, name, CachedPipelineMixin)
        return super().__getattr__(name) if value is _NOT_OURS else value

    @property
    def components(self) -> dict[str, Any]:
        """The parent's ``components`` (``CachedX(**pipe.components)`` shares this pipeline's cached transformer).

        Read by diffusers' own ``from_pipe`` (``XPipeline.from_pipe(cached_pipe)``, to a stock class), which carries
        over only models of exactly the annotated classes: there, a cached transformer is handed as its
        :meth:`~cached_diffusers.CachedTransformerMixin.stock_view` (the same weights, no cache).
        """
        from diffusers import DiffusionPipeline

        components = super().components
        if sys._getframe(1).f_code is DiffusionPipeline.from_pipe.__func__.__code__:
            components = {
                name: value.stock_view() if isinstance(value, CachedTransformerMixin) else value
                for name, value in components.items()
            }
        return components

    @property
    def cache_config(self) -> CacheConfig | None:
        """This pipeline's cache config (``None``: no caching); replace it between calls.

        It belongs to the pipeline: another pipeline built around the same transformer has its own, and assigning
        either leaves the other unchanged. Assigning also sets ``transformer.cache_config``, which is what the
        transformer uses when it is called directly, outside a pipeline.

        Raises:
            ValueError: on assignment of an invalid config or one the transformer cannot run.
        """
        return self.__dict__.get("_pipeline_cache_config")

    @cache_config.setter
    def cache_config(self, value: CacheConfig | Mapping[str, Any] | str | None) -> None:
        if self.transformer is None:
            if value is not None:
                raise ValueError("cache_config needs a transformer, but this pipeline has none")
            self.__dict__["_pipeline_cache_config"] = None
            return
        self.transformer.cache_config = value  # validates it for this model (its own checks included)
        self.__dict__["_pipeline_cache_config"] = self.transformer.cache_config

    def to_json_string(self) -> str:
        """``model_index.json`` naming only diffusers classes, so that a saved directory stays stock.

        The pipeline is named by its diffusers parent, and a component that is a cached model (e.g. a transformer
        that was already cached when the pipeline was constructed) by its model's diffusers parent.
        """
        return pipeline_hub.stock_model_index(self, super().to_json_string(), CachedPipelineMixin)

    @property
    def cache_stats(self) -> CacheStats:
        """Per-branch statistics of this pipeline's last call (of the running one, during a call): computed and
        reused step indices and the decision values."""
        generation = self.__dict__.get("_cache_generation")
        return generation.stats if generation is not None else self.transformer.cache_stats

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
        return pipeline_call.progress_bar(self, super().progress_bar, iterable, total)

    def _denoising_step(self) -> tuple[int, int]:
        # The scheduler's step index is the denoising step (None before the first `scheduler.step` of a call).
        return pipeline_call.denoising_step(self.scheduler)

    def cache_generation(self, callback_on_step_end: Callable | None = None) -> contextlib.AbstractContextManager:
        """The cache state of one call: opened by ``__call__`` around the parent's (and by pipelines with their own
        loop), closed when the call ends.

        Inside, the transformer's cache engine uses a :class:`~cached_diffusers.engine.Generation` of its own for
        this thread, with this pipeline's cache config and a step source reading this pipeline's scheduler, so that
        pipelines sharing a transformer can run at the same time (threads, or one called from another's callback)
        and each gets exactly what it would get alone. ``pipe.cache_stats`` is this generation's statistics, from
        its start until the next call.

        Args:
            callback_on_step_end: the call's ``callback_on_step_end`` (or ``None``).

        Yields:
            The callback to pass on: it calls the given one and, when that changed a tensor it was given (the latents
            replaced or edited in place, prompt embeddings, ...) or the scheduler's timesteps or sigmas, makes every
            branch compute its next step (a stored residual describes the old inputs).

        Raises:
            RuntimeError: when this pipeline, or its scheduler, is already running a generation (diffusers keeps
                per-call state on both): give each concurrent caller its own pipeline and scheduler.
        """
        return pipeline_call.cache_generation(self, callback_on_step_end)

    # -- CFG-parallel ------------------------------------------------------------------------------------------------
    def enable_cfg_parallel(self, group: Any = None) -> None:
        """Run each guidance branch on its own rank of a ``torch.distributed`` group, from the next call on.

        Branch ``k`` of every step (``"cond"`` = 0, ``"uncond"`` = 1) runs on rank ``k`` of ``group``, all branches
        at once, and the ranks exchange the predictions with one ``all_gather`` per step; every rank then combines the
        same predictions as the serial run (images equal within float rounding) and returns the same images. Each
        branch's cache state lives on its rank: ``pipe.cache_stats`` on rank ``k`` holds branch ``k`` only, equal to
        that branch's statistics in the serial run. Every rank must make the same calls (same arguments and
        generator seed). See :mod:`cached_diffusers.cfg_parallel` and ``docs/multi-gpu.md``.

        Args:
            group: ``None`` (the default group), a ``ProcessGroup``, or a 1-D ``DeviceMesh`` (e.g. ``mesh["cfg"]`` of
                a 2-D mesh whose other dimension runs context parallelism). Its size must equal the number of
                guidance branches per step (2 for Qwen-Image and FLUX.2 [klein] base with guidance).

        Raises:
            RuntimeError: when ``torch.distributed`` is not initialised.
            ValueError: for a group whose size is not the pipeline's branch count (:attr:`cfg_parallel_sizes`), or a
                pipeline with one transformer call per step.
            NotImplementedError: when the parent's loop does more than slice the first branch's prediction before
                the last branch's call (checked from its source; see
                :func:`~cached_diffusers.cfg_parallel.check_parent_loop`).
        """
        from .cfg_parallel import CFGParallel, check_parent_loop

        if not self.cfg_parallel_sizes:
            raise ValueError(
                f"{type(self).__name__} calls the transformer once per step (one branch, no CFG): there is nothing "
                f"to run in parallel"
            )
        problem = self._cfg_parallel_problem(check_parent_loop)
        if problem is not None:
            raise NotImplementedError(f"CFG-parallel is not available for {type(self).__name__}: {problem}")
        cfg = CFGParallel(group)
        if cfg.world_size not in self.cfg_parallel_sizes:
            raise ValueError(
                f"{type(self).__name__} runs {' or '.join(map(str, self.cfg_parallel_sizes))} guidance branches per "
                f"step, one per rank, but the CFG-parallel group has {cfg.world_size} ranks"
            )
        self.__dict__["_cfg_parallel"] = cfg

    def _cfg_parallel_problem(self, check_parent_loop: Callable[[type], str | None]) -> str | None:
        # Pipelines with their own loop (BAGEL) override this.
        return check_parent_loop(diffusers_parent(type(self), CachedPipelineMixin))

    def disable_cfg_parallel(self) -> None:
        """Run every guidance branch on this rank again (the serial loop), from the next call on."""
        self.__dict__.pop("_cfg_parallel", None)

    @property
    def cfg_parallel(self):
        """The :class:`~cached_diffusers.cfg_parallel.CFGParallel` group (rank, world size), or ``None`` when off."""
        return self.__dict__.get("_cfg_parallel")

    def _cached_call(self, parent_call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Run the parent's ``__call__`` in a generation of its own (:meth:`cache_generation`), with its
        ``callback_on_step_end`` watched. A parent whose loop names no branch (e.g. ``Flux2Pipeline``) runs the
        engine's ``DEFAULT_BRANCH``, ``"cond"``. Under CFG-parallel the transformer's calls are routed (one branch per
        rank) and the ranks agree on failure at the end of the call (see :mod:`cached_diffusers.cfg_parallel`)."""
        parent = diffusers_parent(type(self), CachedPipelineMixin)
        return pipeline_call.cached_call(self, parent, parent_call, args, kwargs)
