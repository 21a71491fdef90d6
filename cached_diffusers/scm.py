"""Steps computation masks (SCM), after cache-dit's ``steps_mask`` (vipshop/cache-dit ``caching/cache_interface.py``).

A mask has one entry per denoising step: ``1`` means the step is always computed, ``0`` that it may be reused
(``"dynamic"`` policy: if the method's own test agrees; ``"static"``: always). Masks come from a preset name
(``"slow"``, ``"medium"``, ``"fast"``, ``"ultra"``), from alternating run lengths (``compute_bins``, ``cache_bins``:
``[4, 2, 1]`` and ``[2, 3, 4]`` give ``1111 00 11 000 1 0000``) or from an explicit 0/1 list, and are fitted to any
step count. A mask describes at most :data:`~cached_diffusers.validation.MAX_STEPS` steps (the bins' sum, the list's
length), and is built only as far as the run's step count. The first and the last step of every mask are computed.

Presets follow cache-dit 1.5.3 exactly where it defines them (4, 6 and >= 8 steps: 28-step bins stretched bin by
bin above 28 steps and truncated from the tail below, dedicated tables for 8 to 15 steps; see
``docs/cachedit-spec.md``) and extend them to 1, 2, 3, 5 and 7 steps, where cache-dit raises. Deliberate
differences: bins shorter than the run are resampled instead of rejected, explicit masks are resampled to the run's
length instead of treating missing steps as 0, and every mask's last step is computed (cache-dit forces it for
presets only).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .validation import MAX_STEPS, FrozenDict, as_scalar, as_sequence

__all__ = ["PRESET_BINS", "steps_mask", "validate_mask_spec", "mask_from_bins"]

PRESET_BINS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "slow": ((8, 3, 3, 2, 1, 1), (1, 2, 2, 2, 3)),
    "medium": ((6, 2, 2, 2, 2, 1), (1, 3, 3, 3, 3)),
    "fast": ((6, 1, 1, 1, 1, 1), (1, 3, 4, 5, 4)),
    "ultra": ((4, 1, 1, 1, 1), (2, 5, 6, 7)),
}
"""``(compute_bins, cache_bins)`` of cache-dit's presets, defined for 28 steps (cache-dit 1.5.3 ``steps_mask``)."""


def _positive_ints(owner: str, name: str, values: Any) -> tuple[int, ...]:

    values = as_sequence(f"{owner}['{name}']", values, "integers >= 1")
    if len(values) > MAX_STEPS:
        raise ValueError(f"{owner}['{name}'] must have at most {MAX_STEPS} bins, got {len(values)}")
    if not values:
        raise ValueError(f"{owner}['{name}'] must be a non-empty sequence of integers >= 1, got {values!r}")
    out = []
    for v in values:
        v = as_scalar(v)
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
        if sum(compute) + sum(cache) > MAX_STEPS:
            raise ValueError(
                f"{owner}: compute_bins and cache_bins must cover at most {MAX_STEPS} steps together, "
                f"got {sum(compute) + sum(cache)}"
            )
        return FrozenDict(compute_bins=compute, cache_bins=cache)
    if (
        (isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)))
        or getattr(spec, "ndim", None) == 1
        or isinstance(spec, (set, frozenset))
    ):

        values = tuple(as_scalar(v) for v in as_sequence(owner, spec, "0 and 1"))
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v not in (0, 1) for v in values):
            raise ValueError(f"{owner} as a list must be a non-empty sequence of 0 and 1, got {spec!r}")
        if len(values) > MAX_STEPS:
            raise ValueError(f"{owner} as a list must have at most {MAX_STEPS} entries (steps), got {len(values)}")
        return tuple(int(v) for v in values)
    raise ValueError(f"{owner} must be a preset name, a 0/1 list or a compute_bins/cache_bins dict, got {spec!r}")


def mask_from_bins(compute_bins: Sequence[int], cache_bins: Sequence[int]) -> tuple[int, ...]:
    """Alternating runs: ``compute_bins[0]`` ones, ``cache_bins[0]`` zeros, ``compute_bins[1]`` ones, ..."""
    return _interleave(compute_bins, cache_bins)


def _resample(mask: Sequence[int], num_steps: int) -> tuple[int, ...]:
    """Nearest-neighbour resampling to ``num_steps`` entries: ``mask[round(i * (L - 1) / (N - 1))]``."""
    length = len(mask)
    if length == num_steps:
        return tuple(mask)
    if num_steps == 1:
        return (mask[-1],)
    return tuple(mask[round(i * (length - 1) / (num_steps - 1))] for i in range(num_steps))


# cache-dit's bins for short runs (``steps_mask``): 10-15 steps truncate table A, 9 and 8 steps use B and C exactly.
_SHORT_BINS: dict[int, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = {
    15: {
        "slow": ((4, 2, 2, 2, 1), (1, 1, 1, 1)),
        "medium": ((4, 2, 1, 1, 1), (1, 1, 2, 2)),
        "fast": ((3, 1, 1, 1, 1), (1, 2, 2, 3)),
        "ultra": ((2, 1, 1, 1, 1), (1, 2, 3, 3)),
    },
    9: {"slow": ((5, 2, 1), (1,)), "medium": ((5, 1, 1), (1, 1)), "fast": ((4, 1, 1), (1, 2)), "ultra": ((3, 1, 1), (2, 2))},
    8: {"slow": ((5, 1, 1), (1,)), "medium": ((4, 1, 1), (1, 1)), "fast": ((3, 1, 1), (1, 2)), "ultra": ((2, 1, 1), (2, 2))},
}


def _stretch(compute: list[int], cache: list[int], num_steps: int) -> None:
    """Grow 28-step bins in place until they cover ``num_steps`` (cache-dit: increments from the original bins)."""
    factor = (num_steps / 28) * 0.5
    compute_inc = [max(int(b * factor), 1) for b in compute]
    cache_inc = [max(int(b * factor), 1) for b in cache]
    pairs = min(len(compute), len(cache))
    total = lambda: sum(compute) + sum(cache)  # noqa: E731
    while total() < num_steps:
        for i in range(pairs):
            compute[i] += compute_inc[i]
            if total() >= num_steps:
                return
            cache[i] += cache_inc[i]
            if total() >= num_steps:
                return
        compute[-1] += 1


def _truncate(compute: list[int], cache: list[int], num_steps: int) -> None:
    """Shorten bins in place to cover exactly ``num_steps``: alternately the last cache bin and the last compute bin."""
    total = lambda: sum(compute) + sum(cache)  # noqa: E731
    while total() > num_steps:
        if cache:
            cache[-1] -= 1
            if cache[-1] == 0:
                cache.pop()
        if total() <= num_steps:
            break
        if compute:
            compute[-1] -= 1
            if compute[-1] == 0:
                compute.pop()


def _preset_mask(name: str, num_steps: int) -> tuple[int, ...]:
    """cache-dit 1.5.3's preset masks for 4, 6 and >= 8 steps; for 1, 2, 3, 5 and 7 steps (where cache-dit raises
    ``AssertionError``) the rule cache-dit uses at 4 and 6 steps, ``N // 2`` ones, zeros, a final one."""
    if num_steps < 8:
        ones = num_steps // 2
        return (1,) * max(ones, 1) + (0,) * max(num_steps - ones - 1, 0) + ((1,) if num_steps > 1 else ())
    if num_steps >= 16:
        compute, cache = (list(b) for b in PRESET_BINS[name])
        if num_steps > 28:
            _stretch(compute, cache, num_steps)
    else:
        table = 15 if num_steps >= 10 else num_steps
        compute, cache = (list(b) for b in _SHORT_BINS[table][name])
    _truncate(compute, cache, num_steps)
    return _interleave(compute, cache)[:num_steps]


def _interleave(compute: Sequence[int], cache: Sequence[int], limit: int | None = None) -> tuple[int, ...]:
    """Runs of ``compute[0]`` ones, ``cache[0]`` zeros, ``compute[1]`` ones, ...; surplus cache bins follow back to back.
    With ``limit``, only the first ``limit`` entries are built."""
    mask: list[int] = []
    for i in range(max(len(compute), len(cache))):
        for bins, value in ((compute, 1), (cache, 0)):
            if i < len(bins):
                room = bins[i] if limit is None else min(bins[i], limit - len(mask))
                mask += [value] * room
        if limit is not None and len(mask) >= limit:
            break
    return tuple(mask)


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
        mask = _interleave(spec["compute_bins"], spec["cache_bins"], limit=num_steps)  # never longer than the run
        mask = list(mask if len(mask) == num_steps else _resample(mask, num_steps))
    else:
        mask = list(_resample(spec, num_steps))
    mask[0] = mask[-1] = 1
    return tuple(mask)
