"""Cached pipelines (installed as ``cached_diffusers.pipelines``); each is imported on first use."""

from typing import TYPE_CHECKING

from cached_diffusers._lazy import lazy_attributes

_import_structure = {
    "bagel": ["BagelPipeline", "CachedBagelPipeline"],
    "flux2": ["CachedFlux2Pipeline"],
    "flux2_klein": [
        "CachedFlux2KleinInpaintPipeline",
        "CachedFlux2KleinKVPipeline",
        "CachedFlux2KleinPipeline",
        "recommended_klein_cache_config",
    ],
    "hunyuanimage3": ["CachedHunyuanImage3Pipeline"],
    "qwenimage": [
        "CachedQwenImageControlNetInpaintPipeline",
        "CachedQwenImageControlNetPipeline",
        "CachedQwenImageEditInpaintPipeline",
        "CachedQwenImageEditPipeline",
        "CachedQwenImageEditPlusPipeline",
        "CachedQwenImageImg2ImgPipeline",
        "CachedQwenImageInpaintPipeline",
        "CachedQwenImageLayeredPipeline",
        "CachedQwenImagePipeline",
    ],
}
"""``{module: public names}``; every module here defines cached pipelines (``cached_diffusers.auto`` imports them all
to fill its registry)."""

__getattr__, __dir__, __all__ = lazy_attributes(__name__, _import_structure)

if TYPE_CHECKING:
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
