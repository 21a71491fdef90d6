"""Cached pipelines (installed as ``cached_diffusers.pipelines``); each is imported on first use."""

from typing import TYPE_CHECKING

from cached_diffusers._lazy import lazy_attributes

_import_structure = {
    "bagel": ["BagelPipeline", "CachedBagelPipeline"],
    "flux2_klein": ["CachedFlux2KleinKVPipeline", "CachedFlux2KleinPipeline", "recommended_klein_cache_config"],
    "hunyuanimage3": ["CachedHunyuanImage3Pipeline"],
    "qwenimage": ["CachedQwenImagePipeline"],
}

__getattr__, __dir__, __all__ = lazy_attributes(__name__, _import_structure)

if TYPE_CHECKING:
    from .bagel import BagelPipeline, CachedBagelPipeline
    from .flux2_klein import CachedFlux2KleinKVPipeline, CachedFlux2KleinPipeline, recommended_klein_cache_config
    from .hunyuanimage3 import CachedHunyuanImage3Pipeline
    from .qwenimage import CachedQwenImagePipeline
