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
    BAGEL_TEACACHE_COEFFICIENTS,
    BagelTransformer2DModel,
    CachedBagelTransformer2DModel,
    FLUX2_CALIBRATION_HINT,
    HUNYUANIMAGE3_TEACACHE_COEFFICIENTS,
    AutoencoderKLHunyuanImage3,
    CachedHunyuanImage3Transformer2DModel,
    HunyuanImage3Transformer2DModel,
    QWENIMAGE_MAG_RATIOS,
    QWENIMAGE_TEACACHE_COEFFICIENTS,
    CachedFlux2Transformer2DModel,
    CachedQwenImageTransformer2DModel,
)
from .pipelines import (
    BagelPipeline,
    CachedBagelPipeline,
    CachedFlux2KleinKVPipeline,
    CachedFlux2KleinPipeline,
    CachedHunyuanImage3Pipeline,
    CachedQwenImagePipeline,
    recommended_klein_cache_config,
)

__all__ = [
    "AutoencoderKLHunyuanImage3",
    "BAGEL_TEACACHE_COEFFICIENTS",
    "BagelPipeline",
    "BagelTransformer2DModel",
    "BlockStack",
    "BranchStats",
    "CacheConfig",
    "CacheEngine",
    "CacheStats",
    "CachedBagelPipeline",
    "CachedBagelTransformer2DModel",
    "CachedFlux2KleinKVPipeline",
    "CachedFlux2KleinPipeline",
    "CachedFlux2Transformer2DModel",
    "CachedHunyuanImage3Pipeline",
    "CachedHunyuanImage3Transformer2DModel",
    "CachedQwenImagePipeline",
    "CachedQwenImageTransformer2DModel",
    "DBCacheConfig",
    "FLUX2_CALIBRATION_HINT",
    "FirstBlockCacheConfig",
    "HUNYUANIMAGE3_TEACACHE_COEFFICIENTS",
    "HunyuanImage3Transformer2DModel",
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
