"""A cached pipeline's Hub I/O: the cache config travels with the model, and saved directories stay stock.

``save_pretrained`` / ``push_to_hub`` write ``cache_config.json`` beside ``model_index.json`` and ``from_pretrained``
reads it back (the file itself: :mod:`cached_diffusers.hub`); ``model_index.json`` names only diffusers classes;
``from_pipe`` shares the source's transformer through a cached view (:func:`cached_view`) instead of converting it.
These are the bodies of ``CachedPipelineMixin``'s methods of the same names (:mod:`cached_diffusers.pipeline_mixin`,
which documents them); each takes the parent's method (``super()``'s) as ``parent_*``.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Callable

from .configs import resolve_cache_config
from .hub import check_local_path, load_cache_config
from .hub import save_cache_config as save_cache_config_file
from .model_mixin import CachedTransformerMixin, diffusers_parent

__all__ = ["cached_view", "from_pipe", "from_pretrained", "save_pretrained", "stock_model_index"]


def from_pretrained(parent_from_pretrained: Callable[..., Any], path: str | os.PathLike, kwargs: dict[str, Any]):
    """``CachedPipelineMixin.from_pretrained``: the parent's loading, with the cache config passed (checked before
    any weight is loaded) or saved in ``cache_config.json`` beside ``model_index.json``."""
    check_local_path(path)
    if "cache_config" in kwargs:
        resolve_cache_config(kwargs["cache_config"])  # refused before any weight is loaded
        return parent_from_pretrained(path, **kwargs)
    saved, source = load_cache_config(path, **kwargs)
    pipe = parent_from_pretrained(path, **kwargs)
    if source is not None and pipe.transformer is not None:
        try:
            pipe.cache_config = saved
        except ValueError as error:
            model = type(pipe.transformer).__name__ if pipe.transformer is not None else "this pipeline"
            raise ValueError(f"the cache config in {source} cannot be used with {model}: {error}") from None
    return pipe


def save_pretrained(
    pipe, parent_save_pretrained: Callable[..., Any], save_directory: str | os.PathLike, args: tuple,
    save_cache_config: bool, kwargs: dict[str, Any],
):
    """``CachedPipelineMixin.save_pretrained``: ``cache_config.json`` written (or a stale one removed) first, so that
    ``push_to_hub=True`` uploads it, then the parent's save."""
    if save_cache_config:
        config = pipe.cache_config if pipe.transformer is not None else None
        save_cache_config_file(config, save_directory)
    return parent_save_pretrained(save_directory, *args, **kwargs)


def from_pipe(
    parent_from_pipe: Callable[..., Any], pipeline, cached_transformer_class: type, source_is_cached: bool,
    kwargs: dict[str, Any],
):
    """``CachedPipelineMixin.from_pipe``: the parent's ``from_pipe`` with a cached view of ``pipeline``'s transformer
    and, unless ``cache_config`` is passed, the cache config of the source (``source_is_cached``: ``pipeline`` is a
    cached pipeline, which owns its config) or of its cached transformer."""
    if "transformer" in kwargs:
        return parent_from_pipe(pipeline, **kwargs)
    transformer = getattr(pipeline, "transformer", None)
    if transformer is not None:
        if source_is_cached:  # each pipeline owns its config
            kwargs.setdefault("cache_config", pipeline.cache_config)
        elif isinstance(transformer, CachedTransformerMixin):
            kwargs.setdefault("cache_config", transformer.cache_config)
        # passed explicitly: diffusers' from_pipe carries over only components of exactly the annotated class
        kwargs["transformer"] = cached_view(transformer, cached_transformer_class)
    return parent_from_pipe(pipeline, **kwargs)


def stock_model_index(pipe, text: str, mixin: type) -> str:
    """``model_index.json`` (the parent's ``to_json_string`` output ``text``) naming only diffusers classes: the
    pipeline by its diffusers parent (the first class of its MRO that is no subclass of ``mixin``), and a component
    that is a cached model by its model's diffusers parent."""
    from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple

    data = json.loads(text)
    data["_class_name"] = diffusers_parent(type(pipe), mixin).__name__
    for name, value in data.items():
        component = getattr(pipe, name, None) if isinstance(value, list) and len(value) == 2 else None
        if isinstance(component, CachedTransformerMixin):
            stock = diffusers_parent(type(component), CachedTransformerMixin)
            data[name] = list(_fetch_class_library_tuple(stock))
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def cached_view(model, cached_class: type):
    """A ``cached_class`` instance sharing ``model``'s parameters, buffers, submodules and hooks, with a cache of its
    own (caching off); ``model`` unchanged.

    A model wrapped by accelerate's hooks (device map, offloading) cannot be viewed (the hooks call the wrapped
    instance's forward): it is converted in place, as :meth:`CachedTransformerMixin.from_base` does.

    Raises:
        TypeError: (from ``from_base``) for a model that is neither ``cached_class`` nor its diffusers parent.
    """
    if "_hf_hook" in model.__dict__ or "_old_forward" in model.__dict__:
        return cached_class.from_base(model)
    if not isinstance(model, cached_class) and type(model) not in cached_class.__mro__:
        return cached_class.from_base(model)  # raises the TypeError naming the expected class
    view = copy.copy(model)
    view.__class__ = cached_class if not isinstance(model, cached_class) else type(model)
    view.__dict__["_cache_engine"] = view._new_cache_engine()  # a cache of its own
    return view
