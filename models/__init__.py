"""Cached transformer models (installed as ``cached_diffusers.models``)."""

from .flux2 import FLUX2_CALIBRATION_HINT, CachedFlux2Transformer2DModel
from .qwenimage import QWENIMAGE_MAG_RATIOS, QWENIMAGE_TEACACHE_COEFFICIENTS, CachedQwenImageTransformer2DModel

__all__ = [
    "CachedFlux2Transformer2DModel",
    "CachedQwenImageTransformer2DModel",
    "FLUX2_CALIBRATION_HINT",
    "QWENIMAGE_MAG_RATIOS",
    "QWENIMAGE_TEACACHE_COEFFICIENTS",
]
