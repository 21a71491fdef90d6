"""Steps computation masks (SCM), after cache-dit's ``steps_mask`` (vipshop/cache-dit ``caching/cache_interface.py``).

A mask has one entry per denoising step: ``1`` means the step is always computed, ``0`` that it may be reused
(``"dynamic"`` policy: if the method's own test agrees; ``"static"``: always). Masks come from a preset name
(``"slow"``, ``"medium"``, ``"fast"``, ``"ultra"``), from alternating run lengths (``compute_bins``, ``cache_bins``:
``[4, 2, 1]`` and ``[2, 3, 4]`` give ``1111 00 11 000 1 0000``) or from an explicit 0/1 list, and are fitted to any
step count. The first and the last step of every mask are computed.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

__all__ = ["PRESET_BINS", "steps_mask", "validate_mask_spec", "mask_from_bins"]

PRESET_BINS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "slow": ((8, 3, 3, 2, 1, 1), (1, 2, 2, 2, 3)),
    "medium": ((6, 2, 2, 2, 2, 1), (1, 3, 3, 3, 3)),
    "fast": ((6, 1, 1, 1, 1, 1), (1, 3, 4, 5, 4)),
    "ultra": ((4, 1, 1, 1, 1), (2, 5, 6, 7)),
}
"""``(compute_bins, cache_bins)`` of cache-dit's presets, defined for 28 steps (cache-dit 1.5.3 ``steps_mask``)."""


def _positive_ints(owner: str, name: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) == 0:
        raise ValueError(f"{owner}['{name}'] must be a non-empty sequence of integers >= 1, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{owner}['{name}'] must be a non-empty sequence of integers >= 1, got {values!r}")
        out.append(v)
    return tuple(out)


def validate_mask_spec(owner: str, spec: Any) -> str | tuple[int, ...] | Mapping[str, tuple[int, ...]]:
    """Check and normalise a mask specification; ``owner`` names the field in error messages.

    Returns the preset name (lower case), a tuple of 0/1, or a read-only ``{"compute_bins", "cache_bins"}`` dict.

    Raises:
        ValueError: unknown preset, a list that is empty or not of 0/1, bins that are not positive integers, or
            ``cache_bins`` longer than ``compute_bins``.
    """
    from .configs import FrozenDict

    if isinstance(spec, str):
        name = spec.lower()
        if name not in PRESET_BINS:
            raise ValueError(f"{owner}: unknown preset {spec!r}; valid presets: {', '.join(PRESET_BINS)}")
        return name
    if isinstance(spec, Mapping):
        if set(spec) != {"compute_bins", "cache_bins"}:
            raise ValueError(f"{owner} as a dict needs exactly the keys 'compute_bins' and 'cache_bins', got {sorted(spec)}")
        compute = _positive_ints(owner, "compute_bins", spec["compute_bins"])
        cache = _positive_ints(owner, "cache_bins", spec["cache_bins"])
        if len(cache) > len(compute):
            raise ValueError(f"{owner}: cache_bins ({len(cache)}) must not be longer than compute_bins ({len(compute)})")
        return FrozenDict(compute_bins=compute, cache_bins=cache)
    if isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        values = tuple(spec)
        if not values or any(isinstance(v, bool) or v not in (0, 1) for v in values):
            raise ValueError(f"{owner} as a list must be a non-empty sequence of 0 and 1, got {spec!r}")
        return tuple(int(v) for v in values)
    raise ValueError(f"{owner} must be a preset name, a 0/1 list or a compute_bins/cache_bins dict, got {spec!r}")


def mask_from_bins(compute_bins: Sequence[int], cache_bins: Sequence[int]) -> tuple[int, ...]:
    """Alternating runs: ``compute_bins[0]`` ones, ``cache_bins[0]`` zeros, ``compute_bins[1]`` ones, ..."""
    mask: list[int] = []
    for i, ones in enumerate(compute_bins):
        mask += [1] * ones
        if i < len(cache_bins):
            mask += [0] * cache_bins[i]
    return tuple(mask)


def _resample(mask: Sequence[int], num_steps: int) -> tuple[int, ...]:
    """Nearest-neighbour resampling to ``num_steps`` entries: ``mask[round(i * (L - 1) / (N - 1))]``."""
    length = len(mask)
    if length == num_steps:
        return tuple(mask)
    if num_steps == 1:
        return (mask[-1],)
    return tuple(mask[round(i * (length - 1) / (num_steps - 1))] for i in range(num_steps))


def _preset_mask(name: str, num_steps: int) -> tuple[int, ...]:
    compute_bins, cache_bins = PRESET_BINS[name]
    return _resample(mask_from_bins(compute_bins, cache_bins), num_steps)


def steps_mask(spec: str | Sequence[int] | Mapping[str, Sequence[int]], num_steps: int) -> tuple[int, ...]:
    """The 0/1 mask of ``num_steps`` entries for a preset, bins or an explicit mask (see the module docstring).

    Args:
        spec: a preset name, a 0/1 sequence or ``{"compute_bins": [...], "cache_bins": [...]}``.
        num_steps: the number of denoising steps, >= 1.

    Returns:
        A tuple of ``num_steps`` ints in {0, 1}; its first and last entries are 1.

    Raises:
        ValueError: for an invalid ``spec`` or ``num_steps < 1``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    spec = validate_mask_spec("steps_mask spec", spec)
    if isinstance(spec, str):
        mask = list(_preset_mask(spec, num_steps))
    elif isinstance(spec, Mapping):
        mask = list(_resample(mask_from_bins(spec["compute_bins"], spec["cache_bins"]), num_steps))
    else:
        mask = list(_resample(spec, num_steps))
    mask[0] = mask[-1] = 1
    return tuple(mask)
