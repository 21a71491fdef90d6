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
from .progress import summary
from .scm import steps_mask
from .stats import BranchStats, CacheStats, StepRecord
from .models import (
    FLUX2_CALIBRATION_HINT,
    QWENIMAGE_MAG_RATIOS,
    QWENIMAGE_TEACACHE_COEFFICIENTS,
    CachedFlux2Transformer2DModel,
    CachedQwenImageTransformer2DModel,
)
from .pipelines import (
    CachedFlux2KleinKVPipeline,
    CachedFlux2KleinPipeline,
    CachedQwenImagePipeline,
    recommended_klein_cache_config,
)

__all__ = [
    "BlockStack",
    "BranchStats",
    "CacheConfig",
    "CacheEngine",
    "CacheStats",
    "CachedFlux2KleinKVPipeline",
    "CachedFlux2KleinPipeline",
    "CachedFlux2Transformer2DModel",
    "CachedQwenImagePipeline",
    "CachedQwenImageTransformer2DModel",
    "DBCacheConfig",
    "FLUX2_CALIBRATION_HINT",
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
    "recommended_klein_cache_config",
    "register_cache_method",
    "steps_mask",
    "summary",
]
