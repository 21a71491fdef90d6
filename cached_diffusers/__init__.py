"""cached-diffusers: step caching for diffusion transformers, as drop-in subclasses of diffusers' classes.

Importing the package is cheap: each public name is imported from its submodule on first use (so ``import
cached_diffusers`` and the command line's ``--help`` load neither torch nor any model).
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes

__version__ = "0.1.0"

_import_structure = {
    "configs": [
        "CacheConfig",
        "NoCacheConfig",
        "ResidualCacheConfig",
        "StepCacheConfig",
        "cache_config_from_dict",
        "make_cache_config",
    ],
    "registry": ["CacheMethod", "Sweep", "available_cache_methods", "cache_method", "cache_methods", "register_cache_method"],
    "methods.dbcache": ["DBCacheConfig", "FirstBlockCacheConfig"],
    "methods.lemica": ["LeMiCaConfig"],
    "methods.magcache": ["MagCacheConfig"],
    "methods.meancache": ["MeanCacheConfig"],
    "methods.seacache": ["SeaCacheConfig"],
    "methods.taylorseer": ["TaylorSeerConfig"],
    "methods.teacache": ["TeaCacheConfig"],
    "engine": ["BlockStack", "CacheEngine"],
    "progress": ["summary"],
    "scm": ["steps_mask"],
    "spec": ["BLOCK_STACK", "ModelCacheSpec", "WHOLE_CALL"],
    "stats": ["BranchStats", "CacheStats", "StepRecord"],
    "models": [
        "AutoencoderKLHunyuanImage3",
        "BAGEL_TEACACHE_COEFFICIENTS",
        "BagelTransformer2DModel",
        "CachedBagelTransformer2DModel",
        "CachedFlux2Transformer2DModel",
        "CachedHunyuanImage3Transformer2DModel",
        "CachedQwenImageTransformer2DModel",
        "FLUX2_CALIBRATION_HINT",
        "HUNYUANIMAGE3_TEACACHE_COEFFICIENTS",
        "HunyuanImage3Transformer2DModel",
        "QWENIMAGE_MAG_RATIOS",
        "QWENIMAGE_TEACACHE_COEFFICIENTS",
    ],
    "pipelines": [
        "BagelPipeline",
        "CachedBagelPipeline",
        "CachedFlux2KleinInpaintPipeline",
        "CachedFlux2KleinKVPipeline",
        "CachedFlux2KleinPipeline",
        "CachedFlux2Pipeline",
        "CachedHunyuanImage3Pipeline",
        "CachedQwenImageControlNetInpaintPipeline",
        "CachedQwenImageControlNetPipeline",
        "CachedQwenImageEditInpaintPipeline",
        "CachedQwenImageEditPipeline",
        "CachedQwenImageEditPlusPipeline",
        "CachedQwenImageImg2ImgPipeline",
        "CachedQwenImageInpaintPipeline",
        "CachedQwenImageLayeredPipeline",
        "CachedQwenImagePipeline",
        "recommended_klein_cache_config",
    ],
    "auto": ["CachedDiffusionPipeline", "cached_pipeline_class", "cached_pipeline_class_for", "supported_pipelines"],
    "pipeline_mixin": ["CachedPipelineMixin"],
    "tools.tune": ["TuneResult", "tune"],  # tooling, imported only when the name is used (the core never imports it)
}

__getattr__, __dir__, __all__ = lazy_attributes(__name__, _import_structure)

if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from .configs import (
        CacheConfig,
        NoCacheConfig,
        ResidualCacheConfig,
        StepCacheConfig,
        cache_config_from_dict,
        make_cache_config,
    )
    from .methods.dbcache import DBCacheConfig, FirstBlockCacheConfig
    from .methods.lemica import LeMiCaConfig
    from .methods.magcache import MagCacheConfig
    from .methods.meancache import MeanCacheConfig
    from .methods.seacache import SeaCacheConfig
    from .methods.taylorseer import TaylorSeerConfig
    from .methods.teacache import TeaCacheConfig
    from .registry import CacheMethod, Sweep, available_cache_methods, cache_method, cache_methods, register_cache_method
    from .auto import CachedDiffusionPipeline, cached_pipeline_class, cached_pipeline_class_for, supported_pipelines
    from .engine import BlockStack, CacheEngine
    from .models import *  # noqa: F403
    from .pipeline_mixin import CachedPipelineMixin
    from .pipelines import *  # noqa: F403
    from .progress import summary
    from .scm import steps_mask
    from .spec import BLOCK_STACK, WHOLE_CALL, ModelCacheSpec
    from .stats import BranchStats, CacheStats, StepRecord
    from .tools.tune import TuneResult, tune
