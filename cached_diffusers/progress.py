"""What a cached generation reports while and after it runs: the progress bar's postfix and a one-call summary."""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from typing import Any, TextIO

import numpy as np

from .configs import CacheConfig
from .stats import CacheStats

__all__ = ["config_repr", "progress_postfix", "summary"]


def progress_postfix(stats: CacheStats) -> str:
    """The progress bar's postfix: steps reused so far out of steps run, per guidance branch.

    ``"reused cond 3/7, uncond 3/7"``; ``""`` before the first transformer call.
    """
    parts = [f"{b.branch} {b.num_reused}/{b.num_calls}" for b in stats.branches.values()]
    return "reused " + ", ".join(parts) if parts else ""


def config_repr(config: CacheConfig | None) -> str:
    """``TeaCacheConfig(rel_l1_thresh=0.3)``: the config's class with only the fields that differ from the defaults."""
    if config is None:
        return "None (no caching)"
    changed = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        if value != default:
            shown = list(value) if isinstance(value, tuple) else value
            changed.append(f"{f.name}={shown!r}")
    return f"{type(config).__name__}({', '.join(changed)})"


def _stats_and_config(obj: Any) -> tuple[CacheStats, CacheConfig | None, str]:
    if isinstance(obj, CacheStats):
        return obj, None, "CacheStats"
    transformer = getattr(obj, "transformer", None)
    if transformer is not None and hasattr(transformer, "cache_stats"):
        owner = f"{type(obj).__name__}.transformer ({type(transformer).__name__})"
        if hasattr(obj, "cache_stats") and hasattr(obj, "cache_config"):  # a cached pipeline: its own last call
            return obj.cache_stats, obj.cache_config, owner
        return transformer.cache_stats, transformer.cache_config, owner
    if hasattr(obj, "cache_stats") and hasattr(obj, "cache_config"):
        return obj.cache_stats, obj.cache_config, type(obj).__name__
    raise TypeError(f"summary expects a cached pipeline, a cached transformer or CacheStats, got {type(obj).__name__}")


def _quantiles(values: list[float]) -> list[str]:
    if not values:
        return ["-"] * 6
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return ["inf"] * 6
    qs = np.quantile(finite, [0.0, 0.25, 0.5, 0.75, 0.95, 1.0])
    return [f"{q:.4g}" for q in qs]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def summary(obj: Any, *, file: TextIO | None = None, details: bool = True) -> CacheStats:
    """Print the cache statistics of the last generation, per guidance branch, and return them.

    In the spirit of cache-dit's ``cache_dit.summary(pipe)``: the config, the saving in transformer blocks, then a
    table per branch with computed and reused steps and the distribution (min, 25/50/75/95th percentile, max) of the
    method's decision value (TeaCache: accumulated distance; DBCache: the probe's relative change; MagCache:
    accumulated error), to choose a threshold from one run. With ``details`` (default) also the reused step indices
    and why steps were computed.

    Args:
        obj: a cached pipeline, a cached transformer, or a :class:`~cached_diffusers.CacheStats`.
        file: where to print (default ``sys.stdout``).
        details: print the per-branch reused steps and compute reasons.

    Returns:
        The :class:`~cached_diffusers.CacheStats` that was summarised.
    """
    stats, config, owner = _stats_and_config(obj)
    out = sys.stdout if file is None else file
    lines = [f"cached-diffusers summary: {owner}"]
    if config is not None or stats.method != "none":
        lines.append(f"  config: {config_repr(config) if config is not None else stats.method}")
    if not stats.branches:
        lines.append("  no cached transformer call recorded (caching off, or no generation yet)")
        print("\n".join(lines), file=out)
        return stats
    fraction = stats.block_fraction
    saving = f", transformer blocks run: {100 * fraction:.1f}% of uncached" if fraction is not None else ""
    if fraction:
        saving += f" ({1 / fraction:.2f}x fewer)"
    lines.append(f"  steps: {stats.num_steps}, blocks per step: {stats.num_blocks}{saving}")
    if stats.value_name:
        lines.append(f"  decision value: {stats.value_name}")
    rows = [["branch", "computed", "reused", "reused %", "min", "p25", "p50", "p75", "p95", "max"]]
    for b in stats.branches.values():
        calls = b.num_calls
        share = f"{100 * b.num_reused / calls:.1f}%" if calls else "-"
        rows.append([b.branch, str(b.num_computed), str(b.num_reused), share, *_quantiles(list(b.values.values()))])
    lines.extend("  " + line for line in _table(rows))
    if details:
        for b in stats.branches.values():
            reasons = Counter(r.reason for r in b.records if not r.reused)
            why = ", ".join(f"{reason} {count}" for reason, count in reasons.items())
            lines.append(f"  {b.branch}: reused steps {b.reused_steps}; computed because: {why or '-'}")
    print("\n".join(lines), file=out)
    return stats
