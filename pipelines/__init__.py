"""Cached pipelines (installed as ``cached_diffusers.pipelines``)."""

from .bagel import BagelPipeline, CachedBagelPipeline
from .flux2_klein import CachedFlux2KleinKVPipeline, CachedFlux2KleinPipeline, recommended_klein_cache_config
from .hunyuanimage3 import CachedHunyuanImage3Pipeline
from .qwenimage import CachedQwenImagePipeline

__all__ = [
    "BagelPipeline",
    "CachedBagelPipeline",
    "CachedFlux2KleinKVPipeline",
    "CachedFlux2KleinPipeline",
    "CachedHunyuanImage3Pipeline",
    "CachedQwenImagePipeline",
    "recommended_klein_cache_config",
]
