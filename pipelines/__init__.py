"""Cached pipelines (installed as ``cached_diffusers.pipelines``)."""

from .qwenimage import CachedQwenImagePipeline

__all__ = ["CachedQwenImagePipeline"]
