"""Cached FLUX.2 [klein] pipelines: diffusers' ``Flux2KleinPipeline`` and ``Flux2KleinKVPipeline`` with a cached
transformer, and the recommended cache settings per variant."""

from __future__ import annotations

from typing import Any, Mapping

from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinInpaintPipeline,
    Flux2KleinKVPipeline,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from transformers import Qwen2TokenizerFast, Qwen3ForCausalLM

from cached_diffusers.configs import CacheConfig
from cached_diffusers.methods.dbcache import DBCacheConfig
from cached_diffusers.models.flux2 import CachedFlux2Transformer2DModel
from cached_diffusers.pipeline_mixin import CachedPipelineMixin

__all__ = [
    "CachedFlux2KleinInpaintPipeline",
    "CachedFlux2KleinKVPipeline",
    "CachedFlux2KleinPipeline",
    "recommended_klein_cache_config",
]


def recommended_klein_cache_config(distilled: bool) -> DBCacheConfig:
    """A calibration-free starting point for FLUX.2 [klein] (not measured on the real checkpoints).

    Args:
        distilled: ``True`` for the 4-step distilled checkpoints (FLUX.2-klein-4B / -9B, no CFG), ``False`` for the
            50-step base checkpoints (FLUX.2-klein-base-4B / -base-9B, CFG 4.0).

    Returns:
        Distilled: ``DBCacheConfig(Fn=1, Bn=0, residual_diff_threshold=0.5, max_warmup_steps=2)``, the cache-dit
        maintainers' guidance for 4-step Klein (vipshop/cache-dit issue #767). Steps 0 and 1 (warm-up) and 3 (last)
        are computed, so at most step 2 of 4 is reused: at most 4 / (3 + 1/blocks) = 1.32x on the transformer, less
        end to end. Base: ``DBCacheConfig(Fn=1, Bn=0, residual_diff_threshold=0.12, max_warmup_steps=8,
        max_continuous_cached_steps=3)``, cache-dit's example setting ``F1B0_W8MC3_R0.12`` (on FLUX.1-dev at 50
        steps cache-dit measured F1B0 at thresholds 0.08-0.12, with its TaylorSeer calibrator, at 1.84-2.14x and
        34.5-33.9 dB PSNR against uncached); each CFG branch keeps its own state.
    """
    if distilled:
        return DBCacheConfig(Fn=1, Bn=0, residual_diff_threshold=0.5, max_warmup_steps=2)
    return DBCacheConfig(Fn=1, Bn=0, residual_diff_threshold=0.12, max_warmup_steps=8, max_continuous_cached_steps=3)


class CachedFlux2KleinPipeline(CachedPipelineMixin, Flux2KleinPipeline):
    """``Flux2KleinPipeline`` whose transformer skips cached steps.

    ``CachedFlux2KleinPipeline.from_pretrained(path_or_hub_id, cache_config=...)`` loads an ordinary diffusers
    FLUX.2 [klein] directory (its ``model_index.json`` names diffusers' classes; ``is_distilled`` is read from it as
    by the parent) and turns its ``Flux2Transformer2DModel`` into a
    :class:`~cached_diffusers.CachedFlux2Transformer2DModel` with the same weights. Every call starts from a clean
    cache state and tells the transformer the denoising step; the parent's loop names the branch (``"cond"`` and,
    when CFG is on, i.e. ``guidance_scale > 1`` on a base checkpoint, ``"uncond"``), and each branch keeps its own
    state. Afterwards ``pipe.cache_stats`` holds per-branch statistics. Arguments and outputs are the parent's.

    Args:
        scheduler, vae, text_encoder, tokenizer, transformer, is_distilled: as for ``Flux2KleinPipeline``.
        cache_config (`CacheConfig`, `dict`, method name or `None`, defaults to `None`):
            The cache method; ``None`` or ``"none"`` disables caching. Readable and replaceable as
            ``pipe.cache_config`` between calls. See :func:`recommended_klein_cache_config`.

    Raises:
        ValueError: for an invalid ``cache_config``, or TeaCache / MagCache without coefficients / ratios (none are
            known for Klein; the message says how to calibrate).
    """

    cached_transformer_class = CachedFlux2Transformer2DModel


class CachedFlux2KleinKVPipeline(CachedPipelineMixin, Flux2KleinKVPipeline):
    """``Flux2KleinKVPipeline`` (reference-image K/V caching, 4 distilled steps, no CFG) whose transformer skips
    cached steps.

    The parent's loop runs step 0 with the reference-image tokens in ``kv_cache_mode="extract"`` (filling its K/V
    cache) and later steps in ``"cached"`` mode, which only reads that cache. Step 0 is computed by every cache
    method, so the K/V cache is always filled; a reused later step skips blocks that would only have read it, so the
    cache stays intact. Step 0's residual covers the reference tokens too, so step 1 cannot reuse it (its image stream
    is shorter) and is computed: with reference images at most step 2 of 4 is reused (the last step is computed by
    default). The parent calls the transformer outside any ``cache_context``, so its single branch is the engine's
    ``DEFAULT_BRANCH``, ``"cond"``, as the text-to-image pipelines' without CFG.

    Args:
        scheduler, vae, text_encoder, tokenizer, transformer, is_distilled: as for ``Flux2KleinKVPipeline``.
        cache_config: as for :class:`CachedFlux2KleinPipeline`.
    """

    cfg_parallel_sizes = ()  # one transformer call per step: no CFG-parallel

    cached_transformer_class = CachedFlux2Transformer2DModel


class CachedFlux2KleinInpaintPipeline(CachedPipelineMixin, Flux2KleinInpaintPipeline):
    """``Flux2KleinInpaintPipeline`` whose transformer skips cached steps.

    Built, loaded and called as :class:`CachedFlux2KleinPipeline` is (the parent's constructor plus
    ``cache_config``; ``__call__`` with the parent's exact signature, docstring and outputs). The loop starts at a
    ``strength``-dependent step: the cache methods count warm-up, retention and SCM masks from that first executed
    step, and ``pipe.cache_stats`` records the absolute step indices that ran. Branches ``"cond"`` and, with CFG on a
    base checkpoint, ``"uncond"``, each with its own state.

    Raises:
        ValueError: for an invalid ``cache_config`` (see :class:`CachedFlux2KleinPipeline`).
    """

    cached_transformer_class = CachedFlux2Transformer2DModel
