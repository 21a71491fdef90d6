"""What the command line and the benchmark share to time a pipeline call reproducibly."""

from __future__ import annotations

import time
from typing import Any


def timed_call(pipe: Any, **kwargs: Any) -> tuple[Any, float]:
    """``(pipe(**kwargs), seconds)``: wall-clock seconds of one call, CUDA work included (synchronised before and
    after when CUDA is available)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    output = pipe(**kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return output, time.perf_counter() - start


def make_generator(device: str, seed: int):
    """A ``torch.Generator`` seeded with ``seed`` on ``device`` (on the CPU for ``"mps"``, whose generators diffusers
    does not draw from)."""
    import torch

    return torch.Generator(device="cpu" if device == "mps" else device).manual_seed(seed)
