"""Cached pipelines (installed as ``cached_diffusers.pipelines``)."""

from .bagel import BagelPipeline, CachedBagelPipeline
from .flux2 import CachedFlux2Pipeline
from .flux2_klein import (
    CachedFlux2KleinInpaintPipeline,
    CachedFlux2KleinKVPipeline,
    CachedFlux2KleinPipeline,
    recommended_klein_cache_config,
)
from .hunyuanimage3 import CachedHunyuanImage3Pipeline
from .qwenimage import (
    CachedQwenImageControlNetInpaintPipeline,
    CachedQwenImageControlNetPipeline,
    CachedQwenImageEditInpaintPipeline,
    CachedQwenImageEditPipeline,
    CachedQwenImageEditPlusPipeline,
    CachedQwenImageImg2ImgPipeline,
    CachedQwenImageInpaintPipeline,
    CachedQwenImageLayeredPipeline,
    CachedQwenImagePipeline,
)

__all__ = [
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
]
