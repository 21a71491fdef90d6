"""Callbacks that change the inputs: a ``callback_on_step_end`` that replaces or edits the latents (or another tensor
it receives), returns changed tensors, or changes the scheduler's timesteps or sigmas makes every branch compute its
next step, whatever the method (a stored residual describes the old inputs).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

if TYPE_CHECKING:  # annotations only
    from .generation import Generation

__all__ = ["watch_callback"]


def _same_tensor(a: torch.Tensor, b: Any) -> bool:
    """Equal shape, dtype, device and values (NaN equal to NaN)."""
    if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if torch.equal(a, b):
        return True
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return False


def _schedule(scheduler: Any) -> list[torch.Tensor | None]:
    """Copies of the scheduler's ``timesteps`` and ``sigmas`` (``None`` where absent)."""
    values = []
    for name in ("timesteps", "sigmas"):
        value = getattr(scheduler, name, None)
        values.append(value.clone() if isinstance(value, torch.Tensor) else None)
    return values


def watch_callback(callback: Callable | None, generation: Generation) -> Callable | None:
    """``callback`` wrapped so that a change of the tensors it receives, or of the schedule, invalidates the cache
    (:meth:`~cached_diffusers.generation.Generation.invalidate`); ``None`` stays ``None``."""
    if callback is None:
        return None

    @functools.wraps(callback)
    def watched(pipe, step, timestep, callback_kwargs):
        before = {k: v.clone() for k, v in callback_kwargs.items() if isinstance(v, torch.Tensor)}
        scheduler = getattr(pipe, "scheduler", None)
        schedule = _schedule(scheduler)
        result = callback(pipe, step, timestep, callback_kwargs)
        changed = any(not _same_tensor(v, callback_kwargs[k]) for k, v in before.items())
        if isinstance(result, Mapping):
            changed = changed or any(
                isinstance(v, torch.Tensor) and not (k in before and _same_tensor(before[k], v)) for k, v in result.items()
            )
        after = _schedule(scheduler)
        changed = changed or any(
            (a is None) != (b is None) or (a is not None and not _same_tensor(a, b)) for a, b in zip(schedule, after)
        )
        if changed:
            generation.invalidate()
        return result

    return watched
