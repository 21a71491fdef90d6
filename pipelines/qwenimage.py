"""Cached Qwen-Image pipeline: diffusers' ``QwenImagePipeline`` with a cached transformer."""

from __future__ import annotations

from typing import Any, Mapping

from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from cached_diffusers.configs import CacheConfig
from cached_diffusers.models.qwenimage import CachedQwenImageTransformer2DModel
from cached_diffusers.pipeline_mixin import CachedPipelineMixin

__all__ = ["CachedQwenImagePipeline"]


class CachedQwenImagePipeline(CachedPipelineMixin, QwenImagePipeline):
    """``QwenImagePipeline`` whose transformer skips cached steps.

    ``CachedQwenImagePipeline.from_pretrained(path_or_hub_id, cache_config=TeaCacheConfig(rel_l1_thresh=0.2))``
    loads an ordinary diffusers Qwen-Image directory (its ``model_index.json`` names diffusers' classes) and turns
    its ``QwenImageTransformer2DModel`` into a :class:`~cached_diffusers.CachedQwenImageTransformer2DModel` with the
    same weights. Every call starts from a clean cache state; afterwards ``pipe.cache_stats`` holds per-branch
    statistics (``"cond"`` and, with true CFG, ``"uncond"``). Arguments and outputs are the parent's.

    Args:
        scheduler, vae, text_encoder, tokenizer, transformer: as for ``QwenImagePipeline``.
        cache_config (`CacheConfig`, `dict`, method name or `None`, defaults to `None`):
            The cache method; ``None`` or ``"none"`` disables caching. Readable and replaceable as
            ``pipe.cache_config`` between calls.

    Raises:
        ValueError: for an invalid ``cache_config``.
    """

    cached_transformer_class = CachedQwenImageTransformer2DModel

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLQwenImage,
        text_encoder: Qwen2_5_VLForConditionalGeneration,
        tokenizer: Qwen2Tokenizer,
        transformer: QwenImageTransformer2DModel,
        cache_config: CacheConfig | Mapping[str, Any] | str | None = None,
    ):
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
        self._init_cache(cache_config)
