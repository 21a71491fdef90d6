"""Which cached pipeline class opens a diffusers directory: the registry of cached pipelines and
:class:`CachedDiffusionPipeline`, the counterpart of diffusers' ``AutoPipelineFor...`` classes.

Every ``class CachedX(CachedPipelineMixin, X)`` registers itself under its diffusers parent's name ``"X"`` when it is
defined (in ``pipelines/``), so a new cached pipeline needs no entry here.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["CachedDiffusionPipeline", "cached_pipeline_class", "cached_pipeline_class_for", "supported_pipelines"]


def supported_pipelines() -> dict[str, type]:
    """``{diffusers pipeline class name: cached pipeline class}`` for every cached pipeline, sorted by name."""
    import importlib

    from . import pipelines
    from .pipeline_signatures import CACHED_PIPELINES

    for module in pipelines._import_structure:  # defining the classes registers them (the package imports lazily)
        importlib.import_module(f"{pipelines.__name__}.{module}")

    return dict(sorted(CACHED_PIPELINES.items()))


def cached_pipeline_class(class_name: str) -> type:
    """The cached pipeline class for a pipeline class name, e.g. ``"QwenImageEditPipeline"`` (or its cached name,
    ``"CachedQwenImageEditPipeline"``, which returns that class).

    Raises:
        ValueError: for a pipeline that has no cached counterpart; the message lists the supported classes.
    """
    known = supported_pipelines()
    if class_name in known:
        return known[class_name]
    by_cached_name = {cls.__name__: cls for cls in known.values()}
    if class_name in by_cached_name:
        return by_cached_name[class_name]
    raise ValueError(
        f"no cached pipeline for {class_name!r}; cached-diffusers caches these diffusers pipelines: "
        f"{', '.join(known)}"
    )


def cached_pipeline_class_for(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> type:
    """The cached pipeline class for a diffusers directory or Hub repository, read from its ``model_index.json``
    (``_class_name``). ``kwargs`` are passed to ``DiffusionPipeline.load_config`` (``cache_dir``, ``revision``,
    ``token``, ``local_files_only``, ...).

    Raises:
        ValueError: when ``model_index.json`` names a pipeline without cached counterpart (listing the supported
            ones) or has no ``_class_name``.
        OSError / EnvironmentError: when ``model_index.json`` cannot be found, as from diffusers.
    """
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(pretrained_model_name_or_path, **kwargs)
    class_name = config.get("_class_name")
    if not class_name:
        raise ValueError(f"{pretrained_model_name_or_path}: model_index.json has no _class_name")
    try:
        return cached_pipeline_class(class_name)
    except ValueError as error:
        raise ValueError(f"{pretrained_model_name_or_path}: {error}") from None


_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


class CachedDiffusionPipeline:
    """Opens any diffusers directory whose pipeline cached-diffusers caches, as the matching cached class.

    ``CachedDiffusionPipeline.from_pretrained("Qwen/Qwen-Image-Edit", cache_config=TeaCacheConfig(...))`` returns a
    :class:`~cached_diffusers.CachedQwenImageEditPipeline`. Not instantiable.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        raise EnvironmentError(
            "CachedDiffusionPipeline is not instantiable: use CachedDiffusionPipeline.from_pretrained(path, ...)"
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load with the cached class matching ``model_index.json``; ``kwargs`` (incl. ``cache_config``) as for
        that class's ``from_pretrained``.

        Raises:
            ValueError: for a pipeline without cached counterpart (the message lists the supported classes), and
                whatever the matched class's ``from_pretrained`` raises.
        """
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        pipeline_class = cached_pipeline_class_for(pretrained_model_name_or_path, **hub)
        return pipeline_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
