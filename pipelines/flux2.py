"""Cached FLUX.2 [dev] pipeline: diffusers' ``Flux2Pipeline`` with a cached transformer."""

from __future__ import annotations

from diffusers import Flux2Pipeline

from cached_diffusers.models.flux2 import CachedFlux2Transformer2DModel
from cached_diffusers.pipeline_mixin import CachedPipelineMixin

__all__ = ["CachedFlux2Pipeline"]


class CachedFlux2Pipeline(CachedPipelineMixin, Flux2Pipeline):
    """``Flux2Pipeline`` (FLUX.2 [dev]: Mistral-3 text encoder, guidance-distilled, one transformer call per step)
    whose transformer skips cached steps.

    ``CachedFlux2Pipeline.from_pretrained(path_or_hub_id, cache_config=...)`` loads an ordinary diffusers FLUX.2 [dev]
    directory and turns its ``Flux2Transformer2DModel`` into a :class:`~cached_diffusers.CachedFlux2Transformer2DModel`
    with the same weights; the constructor takes the parent's components plus ``cache_config``, and ``__call__`` has
    the parent's exact signature, docstring and outputs. The parent calls the transformer outside any
    ``cache_context``, so its single branch is the engine's ``DEFAULT_BRANCH``, ``"cond"``
    (``pipe.cache_stats.branches["cond"]``), as in the loops that name their branches.

    No TeaCache coefficients or MagCache ratios are shipped for FLUX.2: calibrate, or use DBCache / First-Block-Cache /
    TaylorSeer, which need none.

    Raises:
        ValueError: for an invalid ``cache_config``, or TeaCache / MagCache without coefficients / ratios.
    """

    cfg_parallel_sizes = ()  # one transformer call per step: no CFG-parallel

    cached_transformer_class = CachedFlux2Transformer2DModel
