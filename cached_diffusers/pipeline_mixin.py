"""What every cached pipeline shares: the cache lifecycle around its parent's ``__call__``.

A cached pipeline is ``class CachedXPipeline(CachedPipelineMixin, XPipeline)``. Its parent's denoising loop already
wraps each transformer call in ``transformer.cache_context("cond" | "uncond")``, which names the guidance branch;
this mixin adds, per ``__call__``, a generation of its own (:meth:`CachedPipelineMixin.cache_generation`: branch
states, statistics, and a step source that tells the transformer which denoising step the loop is at, the
scheduler's step index), so that pipelines sharing a transformer can run concurrently, and leaves the statistics
readable afterwards. A ``callback_on_step_end`` that changes the latents (or other tensors it receives, or the
schedule) makes the next step compute, whatever the method.

It also makes the cache config travel with the model (``save_pretrained`` / ``push_to_hub`` write
``cache_config.json`` beside ``model_index.json``, ``from_pretrained`` reads it back; see
:mod:`cached_diffusers.hub`), shows reused steps in the progress bar's postfix as they happen, and prints a summary
(:meth:`CachedPipelineMixin.cache_summary`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from typing import Any, Callable, ClassVar, Iterator, Mapping, TextIO

import torch

from .configs import CacheConfig
from .hub import check_local_path, load_cache_config
from .hub import save_cache_config as save_cache_config_file
from .engine import Generation
from .model_mixin import diffusers_parent, stock_class_name_json
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
        """``model_index.json`` naming the diffusers parent pipeline, so that a saved directory stays stock."""
        return stock_class_name_json(super().to_json_string(), type(self), CachedPipelineMixin)

    @property
    def cache_stats(self) -> CacheStats:
        """Per-branch statistics of this pipeline's last call (of the running one, during a call): computed and
        reused step indices and the decision signals."""
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
        if getattr(self, "transformer", None) is None or self.cache_config is None:
            return super().progress_bar(iterable=iterable, total=total)
        pipe = self
        if iterable is not None:
            holder = []

            def annotated():
                for item in iterable:
                    yield item
                    holder[0].set_postfix_str(progress_postfix(pipe.cache_stats), refresh=True)

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
            bar.set_postfix_str(progress_postfix(pipe.cache_stats), refresh=False)
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

    @contextlib.contextmanager
    def cache_generation(self, callback_on_step_end: Callable | None = None) -> Iterator[Callable | None]:
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
        engine = self.transformer.cache_engine
        with _exclusive(self), engine.generation(self.cache_config) as generation:
            self.__dict__["_cache_generation"] = generation
            with engine.step_source(self._denoising_step):
                yield _watch_callback(callback_on_step_end, generation)

    def __call__(self, *args: Any, **kwargs: Any):
        if self.transformer is None:
            return super().__call__(*args, **kwargs)
        args, kwargs, callback, put = _callback_argument(type(self), args, kwargs)
        with self.cache_generation(callback) as watched:
            args, kwargs = put(watched)
            return super().__call__(*args, **kwargs)


# -- one generation at a time per pipeline and scheduler -------------------------------------------------------------
_BUSY_LOCK = threading.Lock()
_BUSY: dict[int, str] = {}
"""``{id(pipeline or scheduler): thread name}`` of the pipelines and schedulers running a generation."""


@contextlib.contextmanager
def _exclusive(pipe) -> Iterator[None]:
    scheduler = getattr(pipe, "scheduler", None)
    held = [(pipe, "this pipeline")] + ([(scheduler, "this pipeline's scheduler")] if scheduler is not None else [])
    name = threading.current_thread().name
    with _BUSY_LOCK:
        for obj, what in held:
            owner = _BUSY.get(id(obj))
            if owner is not None:
                cls = type(pipe).__name__
                raise RuntimeError(
                    f"{what} is already running a generation (in thread {owner!r}); diffusers keeps per-call state on "
                    f"the pipeline and its scheduler, so each must run one generation at a time. For concurrent "
                    f"generations give each caller its own pipeline with its own scheduler, sharing the heavy "
                    f"components: `{cls}(**{{**pipe.components, 'scheduler': copy.deepcopy(pipe.scheduler)}})` "
                    f"(the transformer can be shared: each call keeps its own cache state)"
                )
        for obj, _ in held:
            _BUSY[id(obj)] = name
    try:
        yield
    finally:
        with _BUSY_LOCK:
            for obj, _ in held:
                _BUSY.pop(id(obj), None)


# -- callbacks that change the inputs -----------------------------------------------------------------------------
def _same_tensor(a: torch.Tensor, b: Any) -> bool:
    """Equal shape, dtype, device and values (NaN equal to NaN)."""
    if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if torch.equal(a, b):
        return True
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return False


def _schedule(scheduler: Any) -> list[torch.Tensor | None]:
    values = []
    for name in ("timesteps", "sigmas"):
        value = getattr(scheduler, name, None)
        values.append(value.clone() if isinstance(value, torch.Tensor) else None)
    return values


def _watch_callback(callback: Callable | None, generation: Generation) -> Callable | None:
    """``callback`` wrapped so that a change of the tensors it receives, or of the schedule, invalidates the cache."""
    if callback is None:
        return None

    @functools.wraps(callback)
    def watched(pipe, step, timestep, callback_kwargs):
        before = {k: v.clone() for k, v in callback_kwargs.items() if isinstance(v, torch.Tensor)}
        scheduler = getattr(pipe, "scheduler", None)
        schedule = _schedule(scheduler)
        result = callback(pipe, step, timestep, callback_kwargs)
        changed = any(not _same_tensor(v, callback_kwargs[k]) for k, v in before.items())
        if isinstance(result, Mapping):
            changed = changed or any(
                isinstance(v, torch.Tensor) and not (k in before and _same_tensor(before[k], v)) for k, v in result.items()
            )
        after = _schedule(scheduler)
        changed = changed or any(
            (a is None) != (b is None) or (a is not None and not _same_tensor(a, b)) for a, b in zip(schedule, after)
        )
        if changed:
            generation.invalidate()
        return result

    return watched


@functools.lru_cache(maxsize=None)
def _call_parameter_names(cls: type) -> tuple[str, ...]:
    parent = diffusers_parent(cls, CachedPipelineMixin)
    return tuple(inspect.signature(parent.__call__).parameters)[1:]


def _callback_argument(cls: type, args: tuple, kwargs: dict):
    """``(args, kwargs, callback, put)``: the call's ``callback_on_step_end`` and ``put(new)``, which returns the
    arguments with it replaced by ``new``."""
    names = _call_parameter_names(cls)
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
