"""Cached transformer models (installed as ``cached_diffusers.models``); each is imported on first use."""

from typing import TYPE_CHECKING

from cached_diffusers._lazy import lazy_attributes

_import_structure = {
    "bagel": ["BAGEL_TEACACHE_COEFFICIENTS", "BagelTransformer2DModel", "CachedBagelTransformer2DModel"],
    "flux2": ["FLUX2_CALIBRATION_HINT", "CachedFlux2Transformer2DModel"],
    "hunyuanimage3": [
        "HUNYUANIMAGE3_TEACACHE_COEFFICIENTS",
        "CachedHunyuanImage3Transformer2DModel",
        "HunyuanImage3Transformer2DModel",
    ],
    "hunyuanimage3_vae": ["AutoencoderKLHunyuanImage3"],
    "qwenimage": ["QWENIMAGE_MAG_RATIOS", "QWENIMAGE_TEACACHE_COEFFICIENTS", "CachedQwenImageTransformer2DModel"],
}

__getattr__, __dir__, __all__ = lazy_attributes(__name__, _import_structure)

if TYPE_CHECKING:
    from .bagel import BAGEL_TEACACHE_COEFFICIENTS, BagelTransformer2DModel, CachedBagelTransformer2DModel
    from .flux2 import FLUX2_CALIBRATION_HINT, CachedFlux2Transformer2DModel
    from .hunyuanimage3 import (
        HUNYUANIMAGE3_TEACACHE_COEFFICIENTS,
        CachedHunyuanImage3Transformer2DModel,
        HunyuanImage3Transformer2DModel,
    )
    from .hunyuanimage3_vae import AutoencoderKLHunyuanImage3
    from .qwenimage import QWENIMAGE_MAG_RATIOS, QWENIMAGE_TEACACHE_COEFFICIENTS, CachedQwenImageTransformer2DModel
