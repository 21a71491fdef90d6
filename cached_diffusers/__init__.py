"""cached-diffusers: step caching for diffusion transformers, as drop-in subclasses of diffusers' classes."""

__version__ = "0.1.0"

from .configs import (
    CacheConfig,
    DBCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    NoCacheConfig,
    ResidualCacheConfig,
    StepCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
    available_cache_methods,
    cache_config_from_dict,
    make_cache_config,
    register_cache_method,
)
from .engine import BlockStack, CacheEngine
from .scm import steps_mask
from .stats import BranchStats, CacheStats, StepRecord
from .models import QWENIMAGE_MAG_RATIOS, QWENIMAGE_TEACACHE_COEFFICIENTS, CachedQwenImageTransformer2DModel
from .pipelines import CachedQwenImagePipeline

__all__ = [
    "BlockStack",
    "BranchStats",
    "CacheConfig",
    "CacheEngine",
    "CacheStats",
    "CachedQwenImagePipeline",
    "CachedQwenImageTransformer2DModel",
    "DBCacheConfig",
    "FirstBlockCacheConfig",
    "MagCacheConfig",
    "NoCacheConfig",
    "QWENIMAGE_MAG_RATIOS",
    "QWENIMAGE_TEACACHE_COEFFICIENTS",
    "ResidualCacheConfig",
    "StepCacheConfig",
    "StepRecord",
    "TaylorSeerConfig",
    "TeaCacheConfig",
    "available_cache_methods",
    "cache_config_from_dict",
    "make_cache_config",
    "register_cache_method",
    "steps_mask",
]
