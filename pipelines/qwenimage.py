"""Cached Qwen-Image pipelines: every diffusers pipeline driving ``QwenImageTransformer2DModel``, with a cached
transformer.

Each class is ``class CachedX(CachedPipelineMixin, X)``: the parent's constructor (plus ``cache_config``), call
signature, docstring, loop and outputs, with the cache lifecycle of :class:`~cached_diffusers.CachedPipelineMixin`.
Every parent's loop wraps its transformer calls in ``cache_context("cond" | "uncond")``, so each true-CFG branch
keeps its own cache state. Img2img and inpaint pipelines start at a ``strength``-dependent step; the cache methods
count warm-up, retention and SCM masks from that first executed step (see ``docs/pipelines.md``).
"""

from __future__ import annotations

from diffusers import (
    QwenImageControlNetInpaintPipeline,
    QwenImageControlNetPipeline,
    QwenImageEditInpaintPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageImg2ImgPipeline,
    QwenImageInpaintPipeline,
    QwenImageLayeredPipeline,
    QwenImagePipeline,
)

from cached_diffusers.models.qwenimage import CachedQwenImageTransformer2DModel
from cached_diffusers.pipeline_mixin import CachedPipelineMixin

__all__ = [
    "CachedQwenImageControlNetInpaintPipeline",
    "CachedQwenImageControlNetPipeline",
    "CachedQwenImageEditInpaintPipeline",
    "CachedQwenImageEditPipeline",
    "CachedQwenImageEditPlusPipeline",
    "CachedQwenImageImg2ImgPipeline",
    "CachedQwenImageInpaintPipeline",
    "CachedQwenImageLayeredPipeline",
    "CachedQwenImagePipeline",
]


class CachedQwenImagePipeline(CachedPipelineMixin, QwenImagePipeline):
    """``QwenImagePipeline`` whose transformer skips cached steps.

    ``CachedQwenImagePipeline.from_pretrained(path_or_hub_id, cache_config=TeaCacheConfig(rel_l1_thresh=0.2))``
    loads an ordinary diffusers Qwen-Image directory (its ``model_index.json`` names diffusers' classes) and turns
    its ``QwenImageTransformer2DModel`` into a :class:`~cached_diffusers.CachedQwenImageTransformer2DModel` with the
    same weights. Every call starts from a clean cache state; afterwards ``pipe.cache_stats`` holds per-branch
    statistics (``"cond"`` and, with true CFG, ``"uncond"``). Arguments and outputs are the parent's.

    Args:
        scheduler, vae, text_encoder, tokenizer, transformer: as for ``QwenImagePipeline``.
        cache_config (`CacheConfig`, `dict`, method name or `None`, defaults to `None`):
            The cache method; ``None`` or ``"none"`` disables caching. Readable and replaceable as
            ``pipe.cache_config`` between calls.

    Raises:
        ValueError: for an invalid ``cache_config``.
    """

    cached_transformer_class = CachedQwenImageTransformer2DModel


def _doc(parent: str, what: str) -> str:
    return f"""``{parent}`` ({what}) whose transformer skips cached steps.

    Built, loaded and called as :class:`CachedQwenImagePipeline` is: ``from_pretrained(path_or_hub_id,
    cache_config=...)`` loads an ordinary diffusers directory of ``{parent}``; the constructor takes the parent's
    components plus ``cache_config``; ``__call__`` has the parent's exact signature, docstring and outputs.
    Afterwards ``pipe.cache_stats`` holds per-branch statistics (``"cond"`` and, with true CFG, ``"uncond"``).

    Raises:
        ValueError: for an invalid ``cache_config``.
    """


class CachedQwenImageImg2ImgPipeline(CachedPipelineMixin, QwenImageImg2ImgPipeline):
    __doc__ = _doc("QwenImageImg2ImgPipeline", "image-to-image; starts at a `strength`-dependent step")
    cached_transformer_class = CachedQwenImageTransformer2DModel


class CachedQwenImageInpaintPipeline(CachedPipelineMixin, QwenImageInpaintPipeline):
    __doc__ = _doc("QwenImageInpaintPipeline", "inpainting; starts at a `strength`-dependent step")
    cached_transformer_class = CachedQwenImageTransformer2DModel


class CachedQwenImageEditPipeline(CachedPipelineMixin, QwenImageEditPipeline):
    __doc__ = _doc("QwenImageEditPipeline", "instruction editing of one image")
    cached_transformer_class = CachedQwenImageTransformer2DModel


class CachedQwenImageEditInpaintPipeline(CachedPipelineMixin, QwenImageEditInpaintPipeline):
    __doc__ = _doc("QwenImageEditInpaintPipeline", "instruction editing inside a mask; `strength`-dependent start")
    cached_transformer_class = CachedQwenImageTransformer2DModel


class CachedQwenImageEditPlusPipeline(CachedPipelineMixin, QwenImageEditPlusPipeline):
    __doc__ = _doc("QwenImageEditPlusPipeline", "instruction editing of one or more images")
    cached_transformer_class = CachedQwenImageTransformer2DModel


class CachedQwenImageControlNetPipeline(CachedPipelineMixin, QwenImageControlNetPipeline):
    __doc__ = _doc(
        "QwenImageControlNetPipeline",
        "ControlNet; the controlnet runs at every step, a reused step reuses the blocks' residual including the "
        "controlnet samples added inside the stack",
    )
    cached_transformer_class = CachedQwenImageTransformer2DModel


class CachedQwenImageControlNetInpaintPipeline(CachedPipelineMixin, QwenImageControlNetInpaintPipeline):
    __doc__ = _doc("QwenImageControlNetInpaintPipeline", "ControlNet inpainting")
    cached_transformer_class = CachedQwenImageTransformer2DModel


class CachedQwenImageLayeredPipeline(CachedPipelineMixin, QwenImageLayeredPipeline):
    __doc__ = _doc("QwenImageLayeredPipeline", "decomposition of an image into RGBA layers")
    cached_transformer_class = CachedQwenImageTransformer2DModel
