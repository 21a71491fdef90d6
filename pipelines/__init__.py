"""Cached pipelines (installed as ``cached_diffusers.pipelines``)."""

from .flux2_klein import CachedFlux2KleinKVPipeline, CachedFlux2KleinPipeline, recommended_klein_cache_config
from .qwenimage import CachedQwenImagePipeline

__all__ = [
    "CachedFlux2KleinKVPipeline",
    "CachedFlux2KleinPipeline",
    "CachedQwenImagePipeline",
    "recommended_klein_cache_config",
]
