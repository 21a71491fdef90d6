"""cached-diffusers: step caching for diffusion transformers, as drop-in subclasses of diffusers' classes."""

__version__ = "0.1.0"

from .configs import (
    CacheConfig,
    NoCacheConfig,
    StepCacheConfig,
    TeaCacheConfig,
    available_cache_methods,
    cache_config_from_dict,
    make_cache_config,
    register_cache_method,
)
from .engine import BlockStack, CacheEngine
from .stats import BranchStats, CacheStats, StepRecord
from .models import QWENIMAGE_TEACACHE_COEFFICIENTS, CachedQwenImageTransformer2DModel
from .pipelines import CachedQwenImagePipeline

__all__ = [
    "BlockStack",
    "BranchStats",
    "CacheConfig",
    "CacheEngine",
    "CacheStats",
    "CachedQwenImagePipeline",
    "CachedQwenImageTransformer2DModel",
    "NoCacheConfig",
    "QWENIMAGE_TEACACHE_COEFFICIENTS",
    "StepCacheConfig",
    "StepRecord",
    "TeaCacheConfig",
    "available_cache_methods",
    "cache_config_from_dict",
    "make_cache_config",
    "register_cache_method",
]
