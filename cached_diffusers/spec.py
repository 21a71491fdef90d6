"""What a cached model tells the cache engine about itself: a frozen, typed :class:`ModelCacheSpec`.

Every cached model class sets ``cache_spec``; the engine hands it to ``CacheConfig.make_policy(spec)``, so that a
policy finds the model's TeaCache coefficients, MagCache ratios and block count by attribute (a misspelt field is a
``TypeError`` at class definition, not a silently missing default).

The two wiring patterns a model can use (see ``docs/development.md``, "Wiring a model"):

* :data:`BLOCK_STACK`: the model's ``forward`` hands the engine its block stack (``CacheEngine.run``); the engine
  may run some blocks on every step (DBCache's ``Fn`` / ``Bn``) and caches the residual of the span between.
* :data:`WHOLE_CALL`: the denoising loop decides per guidance branch and skips whole transformer calls
  (``CacheEngine.decide`` / ``commit`` / ``recall``); the cached quantity is the transformer's prediction itself.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BLOCK_STACK", "PATTERNS", "WHOLE_CALL", "ModelCacheSpec"]

BLOCK_STACK = "block_stack"
"""Wiring pattern: block-stack caching inside the model's ``forward`` (Qwen-Image, FLUX.2, BAGEL)."""

WHOLE_CALL = "whole_call"
"""Wiring pattern: whole-call caching in the denoising loop (HunyuanImage-3.0)."""

PATTERNS = (BLOCK_STACK, WHOLE_CALL)
"""Every wiring pattern, in the order above."""


def _floats(owner: str, name: str, values: object) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{owner}.{name} must be a sequence of floats or None, got {values!r}")
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}.{name} must be a sequence of floats or None, got {values!r}") from None


@dataclass(frozen=True)
class ModelCacheSpec:
    """A cached model's cache-relevant facts, read by the policies (``CacheConfig.make_policy(spec)``).

    Attributes:
        model_name: the model's name in error messages (e.g. ``"CachedQwenImageTransformer2DModel"``).
        num_blocks: blocks of the cached stack (``>= 1``; what DBCache's ``Fn`` + ``Bn`` must stay below), or
            ``None`` when unknown (the engine then checks at the first call); a whole-call model has one block.
        teacache_coefficients: TeaCache's rescaling polynomial ``[c4, c3, c2, c1, c0]`` (highest order first, 5
            floats) for this model's indicator, or ``None`` (TeaCache then needs ``TeaCacheConfig.coefficients``).
        teacache_coefficients_source: where the coefficients come from (paper, repository and file); required with
            ``teacache_coefficients``.
        mag_ratios: MagCache's per-step magnitude ratios (one float per step of the calibrated schedule, at least 2),
            or ``None``.
        mag_ratios_source: where the ratios come from; required with ``mag_ratios``.
        calibration_hint: how to calibrate this model, appended to the error raised when a method lacks its data.
        patterns: the wiring patterns the model uses (:data:`BLOCK_STACK`, :data:`WHOLE_CALL`); a method whose policy
            supports none of them is refused when configured.

    Raises:
        ValueError: naming the field, for a ``num_blocks < 1``, coefficients that are not 5 floats, ratios that are
            not at least 2 floats, a missing source, or an empty or unknown pattern.
    """

    model_name: str = "this model"
    num_blocks: int | None = None
    teacache_coefficients: tuple[float, ...] | None = None
    teacache_coefficients_source: str = ""
    mag_ratios: tuple[float, ...] | None = None
    mag_ratios_source: str = ""
    calibration_hint: str = ""
    patterns: tuple[str, ...] = (BLOCK_STACK,)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.num_blocks is not None and (
            isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 1
        ):
            raise ValueError(f"{owner}.num_blocks must be an integer >= 1 or None, got {self.num_blocks!r}")
        if self.teacache_coefficients is not None:
            coefficients = _floats(owner, "teacache_coefficients", self.teacache_coefficients)
            if len(coefficients) != 5:
                raise ValueError(
                    f"{owner}.teacache_coefficients must be 5 floats [c4, c3, c2, c1, c0], got {len(coefficients)}"
                )
            if not self.teacache_coefficients_source:
                raise ValueError(f"{owner}.teacache_coefficients_source must name where the coefficients come from")
            object.__setattr__(self, "teacache_coefficients", coefficients)
        if self.mag_ratios is not None:
            ratios = _floats(owner, "mag_ratios", self.mag_ratios)
            if len(ratios) < 2:
                raise ValueError(f"{owner}.mag_ratios must have at least 2 entries (one per step), got {len(ratios)}")
            if not self.mag_ratios_source:
                raise ValueError(f"{owner}.mag_ratios_source must name where the ratios come from")
            object.__setattr__(self, "mag_ratios", ratios)
        patterns = (self.patterns,) if isinstance(self.patterns, str) else tuple(self.patterns)
        unknown = [p for p in patterns if p not in PATTERNS]
        if not patterns or unknown:
            raise ValueError(
                f"{owner}.patterns must be a non-empty subset of {PATTERNS}, got {self.patterns!r}"
            )
        object.__setattr__(self, "patterns", patterns)
