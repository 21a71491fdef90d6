"""Cached transformer models (installed as ``cached_diffusers.models``)."""

from .bagel import BAGEL_TEACACHE_COEFFICIENTS, BagelTransformer2DModel, CachedBagelTransformer2DModel
from .flux2 import FLUX2_CALIBRATION_HINT, CachedFlux2Transformer2DModel
from .hunyuanimage3 import (
    HUNYUANIMAGE3_TEACACHE_COEFFICIENTS,
    CachedHunyuanImage3Transformer2DModel,
    HunyuanImage3Transformer2DModel,
)
from .hunyuanimage3_vae import AutoencoderKLHunyuanImage3
from .qwenimage import QWENIMAGE_MAG_RATIOS, QWENIMAGE_TEACACHE_COEFFICIENTS, CachedQwenImageTransformer2DModel

__all__ = [
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
]
