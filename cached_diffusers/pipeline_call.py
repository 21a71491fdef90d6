"""A cached pipeline's call lifecycle: one generation per call, one call at a time per pipeline and scheduler.

:func:`cache_generation` opens the cache state of one call (the transformer engine's generation for this thread,
with the pipeline's cache config, a step source reading the pipeline's scheduler, and the call's
``callback_on_step_end`` watched, :mod:`cached_diffusers.callback_watch`); :func:`cached_call` runs the parent's
``__call__`` inside it, serially or CFG-parallel (:mod:`cached_diffusers.cfg_parallel`); :func:`progress_bar`
shows the reused steps in the bar's postfix. These are the bodies of ``CachedPipelineMixin``'s methods of the same
names (:mod:`cached_diffusers.pipeline_mixin`, which documents them).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

from .callback_watch import watch_callback
from .pipeline_signatures import callback_argument
from .progress import progress_postfix

__all__ = ["cache_generation", "cached_call", "denoising_step", "progress_bar"]


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


def denoising_step(scheduler: Any) -> tuple[int, int]:
    """``(step, num_steps)`` of ``scheduler``: its step index (``None`` before the first ``scheduler.step`` of a
    call: its ``begin_index``, else 0) and the length of its ``timesteps``."""
    step = scheduler.step_index
    if step is None:
        step = getattr(scheduler, "begin_index", None) or 0
    return step, len(scheduler.timesteps)


@contextlib.contextmanager
def cache_generation(pipe, callback_on_step_end: Callable | None = None) -> Iterator[Callable | None]:
    """``CachedPipelineMixin.cache_generation``: the cache state of one call of ``pipe``; yields the watched
    callback. Raises ``RuntimeError`` when ``pipe`` or its scheduler is already running a generation."""
    engine = pipe.transformer.cache_engine
    with _exclusive(pipe), engine.generation(pipe.cache_config) as generation:
        pipe.__dict__["_cache_generation"] = generation
        generation.sigma_source = lambda: getattr(pipe.scheduler, "sigmas", None)
        try:
            with engine.step_source(pipe._denoising_step):
                yield watch_callback(callback_on_step_end, generation)
        finally:
            generation.sigma_source = None  # the kept generation (statistics) holds no reference to this pipeline
        if generation.config is None and generation.stats.num_steps is None:  # caching off records no step
            timesteps = getattr(pipe.scheduler, "timesteps", None)
            if timesteps is not None:
                generation.stats.num_steps = len(timesteps)
                generation.stats.first_step = getattr(pipe.scheduler, "begin_index", None) or 0


def cached_call(pipe, parent: type, parent_call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``CachedPipelineMixin._cached_call``: ``parent_call`` (``parent.__call__``) run in a generation of its own
    (:meth:`~cached_diffusers.CachedPipelineMixin.cache_generation`), its ``callback_on_step_end`` watched; under
    CFG-parallel with the transformer's calls routed (one branch per rank) and the ranks agreeing on failure at the
    end of the call."""
    transformer = pipe.transformer
    if transformer is None:
        return parent_call(pipe, *args, **kwargs)
    args, kwargs, callback, put = callback_argument(parent, args, kwargs)
    cfg = pipe.cfg_parallel
    if cfg is None:
        with pipe.cache_generation(callback) as watched:
            args, kwargs = put(watched)
            return parent_call(pipe, *args, **kwargs)
    from .cfg_parallel import CFGParallelCall

    call = CFGParallelCall(cfg, transformer)
    try:
        with pipe.cache_generation(callback) as watched, transformer.route_calls(call):
            pipe.__dict__["_cfg_parallel_call"] = call
            args, kwargs = put(watched)
            result = parent_call(pipe, *args, **kwargs)
            call.finish()
            return result
    except Exception as error:
        call.abort(error)
        raise
    finally:
        pipe.__dict__.pop("_cfg_parallel_call", None)


def progress_bar(pipe, parent_progress_bar: Callable[..., Any], iterable=None, total=None):
    """``CachedPipelineMixin.progress_bar``: the parent's bar (``parent_progress_bar``), whose postfix shows the steps
    reused so far per branch while caching is on."""
    if getattr(pipe, "transformer", None) is None or pipe.cache_config is None:
        return parent_progress_bar(iterable=iterable, total=total)
    if iterable is not None:
        holder = []

        def annotated():
            for item in iterable:
                yield item
                holder[0].set_postfix_str(progress_postfix(pipe.cache_stats), refresh=True)

        bar = parent_progress_bar(iterable=annotated())
        holder.append(bar)
        if bar.total is None and hasattr(iterable, "__len__"):
            bar.total = len(iterable)
        return bar
    bar = parent_progress_bar(total=total)
    if bar.disable:
        return bar
    update = bar.update

    def update_with_cache(n=1):
        bar.set_postfix_str(progress_postfix(pipe.cache_stats), refresh=False)
        return update(n)

    bar.update = update_with_cache
    return bar
