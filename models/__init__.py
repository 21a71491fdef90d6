"""Cached transformer models (installed as ``cached_diffusers.models``)."""

from .qwenimage import QWENIMAGE_MAG_RATIOS, QWENIMAGE_TEACACHE_COEFFICIENTS, CachedQwenImageTransformer2DModel

__all__ = ["CachedQwenImageTransformer2DModel", "QWENIMAGE_MAG_RATIOS", "QWENIMAGE_TEACACHE_COEFFICIENTS"]
