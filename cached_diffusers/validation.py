"""Value checks shared by the cache configs and the SCM step masks: read-only mappings, and numpy / torch values taken
as the Python numbers and sequences they hold."""

from __future__ import annotations

from collections.abc import Sequence, Set as AbstractSet
from typing import Any, Mapping

__all__ = ["MAX_STEPS", "FrozenDict", "as_scalar", "as_sequence"]

MAX_STEPS = 10_000
"""The most denoising steps a config or a model directory's file may describe (an SCM mask's length or bins, a planned
schedule's ``num_inference_steps``, ``generation_defaults.json``'s ``num_inference_steps``): far above any real run,
and small enough that nothing built from such a number can exhaust memory."""


class FrozenDict(dict):
    """A read-only, hashable ``dict`` for mapping-valued config fields (values must be hashable)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("cache config values are read-only; use config.replace(...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _read_only  # type: ignore[assignment]


def as_scalar(value: Any) -> Any:
    """A numpy scalar, a 0-d numpy array or a 0-d torch tensor as the Python number (or bool) it holds; any other
    value unchanged. Config fields take these as the numbers they are."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)) and type(value).__module__ in (
        "numpy", "torch"
    ):
        return value.item()
    return value


def as_sequence(label: str, value: Any, what: str) -> tuple[Any, ...]:
    """An ordered collection (list, tuple, 1-d numpy array or torch tensor) as a tuple of its items.

    Raises:
        ValueError: naming ``label`` (the field) and ``what`` it must hold, for a string, a mapping, a set or any other
            unordered collection (whose order would be arbitrary), or something that is not a collection.
    """
    if type(value).__module__ in ("numpy", "torch") and getattr(value, "ndim", None) == 1:
        return tuple(value.tolist())
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
        kind = "an unordered " + type(value).__name__ if isinstance(value, (AbstractSet, Mapping)) else type(value).__name__
        raise ValueError(
            f"{label} must be a sequence of {what} (a list, tuple or 1-d array; sets and other unordered collections "
            f"are refused), got {kind} {value!r}"
        )
    return tuple(value)
