"""Stand-ins that let the documentation's code blocks run offline on CPU (``tests/test_docs.py``).

The docs show real use: Hub ids and release directories, CUDA, 1024 x 1024 images, 50 steps. Here every such model
loads a small stand-in with the same classes (the trained reference models, the official-layout tiny checkpoints of
``tests/data/reference``), calls run at the stand-in's size for at most 3 steps, ``push_to_hub`` is a local save,
and ``"cuda"`` is replaced by ``"cpu"`` in the block's text. The code paths (loading, cache configs, calling,
statistics, saving) are the ones the docs show.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from cached_diffusers.tools import reference_model as ref

DATA = Path(__file__).resolve().parent / "data" / "reference"

STAND_INS = {
    "Qwen/Qwen-Image": ref.REFERENCE_MODEL_DIR,
    "black-forest-labs/FLUX.2-klein-base-4B": ref.REFERENCE_KLEIN_DIR,
    "BAGEL-7B-MoT": DATA / "bagel-tiny" / "checkpoint",
    "/models/HunyuanImage-3": DATA / "hunyuanimage3-tiny" / "checkpoint",
    "me/qwen-image-teacache": Path("qwen-image-teacache"),  # what the block itself saved, in the working directory
}
"""Model a doc names -> the local directory that stands in for it."""

SIZES = {"CachedBagelPipeline": (64, 96), "CachedHunyuanImage3Pipeline": (80, 48)}
"""Image size (height, width) the tiny BAGEL and HunyuanImage-3.0 checkpoints are run at (their reference cases)."""

MAX_STEPS = 3


def stand_in(name: Any) -> Any:
    return os.fspath(STAND_INS[name]) if isinstance(name, str) and name in STAND_INS else name


def install() -> None:
    """Patch the loaders, ``save_pretrained`` and ``__call__`` of the cached pipelines (this process only).

    Also reports one CPU device to diffusers on a host without an accelerator: diffusers 0.42's
    ``enable_parallelism`` resolves a rank's device as ``rank % torch.accelerator.device_count()``, which divides by
    zero there (``docs/multi-gpu.md``'s script runs under ``torchrun`` on CPU processes).
    """
    import torch

    if torch.accelerator.current_accelerator() is None and torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1
    from diffusers.models.modeling_utils import ModelMixin

    from cached_diffusers.pipeline_mixin import CachedPipelineMixin
    from cached_diffusers.pipelines.bagel import BagelPipeline
    from cached_diffusers.pipelines.hunyuanimage3 import CachedHunyuanImage3Pipeline

    for cls in (ModelMixin, CachedPipelineMixin, BagelPipeline, CachedHunyuanImage3Pipeline):
        original = cls.__dict__["from_pretrained"].__func__

        def from_pretrained(klass, name, *args, _original=original, **kwargs):
            return _original(klass, stand_in(name), *args, **kwargs)

        cls.from_pretrained = classmethod(from_pretrained)

    save = CachedPipelineMixin.save_pretrained

    @functools.wraps(save)
    def save_pretrained(self, directory, *args, push_to_hub=False, repo_id=None, **kwargs):
        return save(self, directory, *args, **kwargs)  # push_to_hub: saved locally, nothing uploaded

    CachedPipelineMixin.save_pretrained = save_pretrained

    def small_call(call):
        @functools.wraps(call)
        def wrapped(self, *args, **kwargs):
            height, width = SIZES.get(type(self).__name__, (ref.RESOLUTION, ref.RESOLUTION))
            kwargs.update(height=height, width=width)
            kwargs["num_inference_steps"] = min(kwargs.get("num_inference_steps") or MAX_STEPS, MAX_STEPS)
            if type(self).__name__.startswith("CachedFlux2Klein"):
                kwargs.setdefault("max_sequence_length", ref.KLEIN_MAX_SEQUENCE_LENGTH)
            return call(self, *args, **kwargs)

        return wrapped

    import cached_diffusers.pipelines as pipelines

    for name in pipelines.__all__:
        cls = getattr(pipelines, name)
        if isinstance(cls, type) and issubclass(cls, CachedPipelineMixin):
            cls.__call__ = small_call(cls.__call__)
