"""The one timing helper of the tools and scripts: wall-clock seconds of a block of code, CUDA work included where a
``sync`` is given, and the seeded generators the timed calls draw from.

Every timed loop of ``cached_diffusers.tools`` and ``scripts/`` measures through :class:`Stopwatch` (or
:func:`timed_call`, built on it); warm-up, interleaved repeats and medians stay with the loops.
"""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["Stopwatch", "cuda_sync", "make_generator", "timed_call"]


def cuda_sync(device: Any = None) -> Callable[[], None] | None:
    """A function that waits for the CUDA work queued on ``device`` (``torch.cuda.synchronize``), for a
    :class:`Stopwatch` to time GPU work; ``None`` when ``device`` is not a CUDA device (``None``: the current CUDA
    device when CUDA is available)."""
    import torch

    if device is None:
        return torch.cuda.synchronize if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)


class Stopwatch:
    """Wall-clock seconds (``time.perf_counter``) of the block it wraps::

        with Stopwatch(cuda_sync(device)) as watch:
            run()
        seconds = watch.seconds

    Args:
        sync: called before the clock starts and before each reading (``cuda_sync(device)``: the queued GPU work
            is counted); ``None``: nothing waited for (CPU work, or a callee that synchronises itself).

    Attributes:
        seconds: the block's wall time in seconds, set when the block ends (``0.0`` before).
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync
        self.seconds = 0.0
        self._start = self._last = 0.0

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def start(self) -> Stopwatch:
        """Start (or restart) the clock; returns the stopwatch (``clock = Stopwatch().start()`` ... ``clock.elapsed()``,
        for a duration that spans more than one block)."""
        self._start = self._last = self._now()
        return self

    def __enter__(self) -> Stopwatch:
        return self.start()

    def lap(self) -> float:
        """Seconds since the previous lap (the first lap: since the block began), e.g. one denoising step's time
        from a step-end callback."""
        now = self._now()
        seconds, self._last = now - self._last, now
        return seconds

    def elapsed(self) -> float:
        """Seconds since the block began (the block may still be running)."""
        return self._now() - self._start

    def __exit__(self, *exc: Any) -> bool:
        self.seconds = self.elapsed()
        return False


def timed_call(pipe: Any, **kwargs: Any) -> tuple[Any, float]:
    """``(pipe(**kwargs), seconds)``: wall-clock seconds of one call, CUDA work included (synchronised before and
    after when CUDA is available)."""
    with Stopwatch(cuda_sync()) as watch:
        output = pipe(**kwargs)
    return output, watch.seconds


def make_generator(device: str, seed: int):
    """A ``torch.Generator`` seeded with ``seed`` on ``device`` (on the CPU for ``"mps"``, whose generators diffusers
    does not draw from)."""
    import torch

    return torch.Generator(device="cpu" if device == "mps" else device).manual_seed(seed)
