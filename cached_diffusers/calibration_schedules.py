"""Calibration of the planned schedules: LeMiCa's error matrix and MeanCache's windows, measured on a pipeline.

* :func:`measure_edge_errors`: LeMiCa's DAG edge costs (Gao et al., NeurIPS 2025, arXiv 2511.00090). For every edge
  ``i -> j`` with ``2 <= j - i <= max_span``, a run computes every step except ``i+1 .. j-1`` (which reuse the
  residual of step ``i``, :class:`~cached_diffusers.configs.LeMiCaConfig`), and ``E[i, j]`` is the relative L1
  distance ``sum|x - x_ref| / sum|x_ref|`` of its final latents ``x`` (``output_type="latent"``, before the VAE)
  from the uncached run's ``x_ref``, averaged over the calibration prompts: the *global* error that this one gap
  causes. ``E[i, i+1] = 0`` (nothing reused); longer edges than ``max_span`` are not measured (``inf``), which bounds
  the cost to about ``N * (max_span - 1)`` runs per prompt.
* :func:`choose_meancache_windows`: MeanCache's averaging window per gap of a schedule (Gao et al., ICLR 2026, arXiv
  2601.19961; the official schedules pick one of 1..6 per gap, UnicomAI/MeanCache). One pass over the gaps in order:
  each candidate window is tried on the full schedule with the windows chosen so far, and kept if it lowers the same
  global error; window 1 (plain reuse, LeMiCa's rule) is the start.
* :func:`save_error_matrix` / :func:`load_error_matrix`: the matrix as JSON with its provenance, so that another
  budget is solved without new runs (:func:`cached_diffusers.schedules.solve_budgets`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .configs import LeMiCaConfig, MeanCacheConfig

__all__ = [
    "ERROR_MATRIX_SCHEMA",
    "choose_meancache_windows",
    "final_latents",
    "latent_error",
    "load_error_matrix",
    "measure_edge_errors",
    "save_error_matrix",
]

ERROR_MATRIX_SCHEMA = "cached-diffusers-error-matrix/1"


def latent_error(latents: Any, reference: Any) -> float:
    """``sum|latents - reference| / sum|reference|`` in float64 (0.0 when both are all zeros, inf when only the
    reference is)."""
    a = np.asarray(latents, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    denominator = np.abs(b).sum()
    numerator = np.abs(a - b).sum()
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return float(numerator / denominator)


def final_latents(pipe, prompt: str, call_kwargs: Mapping[str, Any], seed: int, config) -> np.ndarray:
    """The final latents (``output_type="latent"``) of one call of ``pipe`` with cache config ``config``."""
    import torch

    pipe.cache_config = config
    generator = torch.Generator(device="cpu").manual_seed(seed)
    output = pipe(prompt=prompt, generator=generator, output_type="latent", **call_kwargs)
    images = output.images
    return images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images, dtype=np.float32)


class _Replay:
    """Record a pipeline's transformer outputs per ``(branch, step)`` on the uncached run, and replay them for the
    steps before ``start`` of a later run with the same prompt and seed: those steps are computed identically (the
    cache reuses only after ``start``), so replaying them changes nothing but the time. Installed as an instance
    ``forward`` of the transformer; removed by :meth:`close`."""

    def __init__(self, transformer) -> None:
        self.transformer = transformer
        self.forward = transformer.forward  # the bound class method
        self.outputs: dict[tuple[str, int], Any] = {}
        self.recording = False
        self.start = 0
        transformer.forward = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ctx = self.transformer.cache_engine.step_context()
        key = (ctx.branch, ctx.step)
        if not self.recording and ctx.step < self.start and key in self.outputs:
            return self.outputs[key]
        output = self.forward(*args, **kwargs)
        if self.recording:
            self.outputs[key] = output
        return output

    def close(self) -> None:
        self.transformer.__dict__.pop("forward", None)


def _check_span(max_span: int, num_steps: int) -> int:
    if isinstance(max_span, bool) or not isinstance(max_span, int) or max_span < 2:
        raise ValueError(f"max_span must be an integer >= 2 (the longest edge measured, in steps), got {max_span!r}")
    return min(max_span, num_steps - 1)


def measure_edge_errors(
    pipe,
    prompts: Sequence[str],
    call_kwargs: Mapping[str, Any],
    num_steps: int,
    *,
    max_span: int = 8,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> np.ndarray:
    """LeMiCa's edge-cost matrix ``E`` (``N x N``, float64) of ``pipe`` at ``num_steps`` steps.

    Args:
        pipe: a cached pipeline (its cache config is restored at the end).
        prompts: calibration prompts (prompt ``p`` runs with seed ``seed + p``).
        call_kwargs: the other call arguments (size, CFG, negative prompt, ...); ``num_inference_steps`` is set here.
        num_steps: ``N``.
        max_span: longest edge measured; longer edges are ``inf``.
        progress: called with a line now and then.

    Returns:
        ``E`` with ``E[i, j]`` for ``i < j`` as in the module docstring; 0 on and below the diagonal.

    Raises:
        ValueError: no prompts, ``num_steps < 3`` or ``max_span < 2``.
    """
    if not prompts:
        raise ValueError("measure_edge_errors needs at least one calibration prompt")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 3:
        raise ValueError(f"num_steps must be an integer >= 3 (an edge needs a reused step), got {num_steps!r}")
    span = _check_span(max_span, num_steps)
    say = progress or (lambda line: None)
    kwargs = {**call_kwargs, "num_inference_steps": num_steps}
    original = pipe.cache_config
    errors = np.full((num_steps, num_steps), math.inf)
    errors[np.tril_indices(num_steps)] = 0.0
    for i in range(num_steps - 1):
        errors[i, i + 1] = 0.0
    edges = [(i, j) for i in range(num_steps) for j in range(i + 2, min(i + span, num_steps - 1) + 1)]
    replay = _Replay(pipe.transformer)
    try:
        references, recorded = [], []
        for k, p in enumerate(prompts):
            replay.outputs, replay.recording = {}, True
            references.append(final_latents(pipe, p, kwargs, seed + k, None))
            recorded.append(replay.outputs)
        replay.recording = False
        values = np.zeros((len(prompts), len(edges)))
        for k, p in enumerate(prompts):
            replay.outputs = recorded[k]
            for n, (i, j) in enumerate(edges):
                # Steps before i are computed as in the uncached run: replayed. Step i is computed for real (the
                # first step the cache sees), i+1 .. j-1 reuse its residual, j .. N-1 are computed.
                replay.start = i
                steps = [s for s in range(num_steps) if not i < s < j]
                config = LeMiCaConfig(computed_steps=steps, num_inference_steps=num_steps)
                values[k, n] = latent_error(final_latents(pipe, p, kwargs, seed + k, config), references[k])
                if (n + 1) % 25 == 0 or n + 1 == len(edges):
                    say(f"prompt {k + 1}/{len(prompts)}: edges measured {n + 1}/{len(edges)}")
        for n, (i, j) in enumerate(edges):
            errors[i, j] = float(values[:, n].mean())
    finally:
        replay.close()
        pipe.cache_config = original
    return errors


def choose_meancache_windows(
    pipe,
    prompts: Sequence[str],
    call_kwargs: Mapping[str, Any],
    computed_steps: Sequence[int],
    *,
    candidates: Sequence[int] = (1, 2, 4),
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[tuple[int, ...], float, float]:
    """MeanCache's window per gap of ``computed_steps`` (see the module docstring) and the resulting global error.

    Returns:
        ``(windows, error, plain_error)``: one window per gap (``len(computed_steps) - 1``), the mean relative L1 error
        of the final latents of the schedule with them, and with window 1 everywhere (LeMiCa's plain reuse).

    Raises:
        ValueError: no prompts, or a candidate outside ``[1, 6]`` (from :class:`MeanCacheConfig`).
    """
    if not prompts:
        raise ValueError("choose_meancache_windows needs at least one calibration prompt")
    steps = tuple(int(s) for s in computed_steps)
    num_steps = steps[-1] + 1
    kwargs = {**call_kwargs, "num_inference_steps": num_steps}
    say = progress or (lambda line: None)
    original = pipe.cache_config
    try:
        references = [final_latents(pipe, p, kwargs, seed + k, None) for k, p in enumerate(prompts)]

        def error_of(windows: tuple[int, ...]) -> float:
            config = MeanCacheConfig(computed_steps=steps, num_inference_steps=num_steps, windows=windows)
            return float(np.mean([
                latent_error(final_latents(pipe, p, kwargs, seed + k, config), references[k])
                for k, p in enumerate(prompts)
            ]))

        windows = [1] * (len(steps) - 1)
        best = plain = error_of(tuple(windows))
        for gap in range(len(steps) - 1):
            if steps[gap + 1] - steps[gap] < 2:
                continue  # nothing reused in this gap
            for window in candidates:
                if window == windows[gap]:
                    continue
                trial = tuple(windows[:gap] + [window] + windows[gap + 1:])
                error = error_of(trial)
                if error < best:
                    best, windows = error, list(trial)
            say(f"gap {steps[gap]} -> {steps[gap + 1]}: window {windows[gap]} (error {best:.4g})")
    finally:
        pipe.cache_config = original
    return tuple(windows), best, plain


def save_error_matrix(path: str | os.PathLike, errors: np.ndarray, provenance: Mapping[str, Any]) -> str:
    """Write ``errors`` (``inf`` as ``null``) and ``provenance`` to ``path`` as JSON; return the path."""
    matrix = [[None if not math.isfinite(v) else float(v) for v in row] for row in np.asarray(errors, dtype=float)]
    record = {"schema": ERROR_MATRIX_SCHEMA, "num_inference_steps": len(matrix), **provenance, "errors": matrix}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return str(path)


def load_error_matrix(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """``(errors, provenance)`` from a file written by :func:`save_error_matrix`.

    Raises:
        ValueError: naming the file, when it is not such a file or its matrix is not square.
    """
    with open(path, encoding="utf-8") as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error})") from None
    if not isinstance(record, dict) or record.get("schema") != ERROR_MATRIX_SCHEMA or "errors" not in record:
        raise ValueError(f"{path}: not an error matrix written by `cached-diffusers calibrate` ({ERROR_MATRIX_SCHEMA})")
    rows = record.pop("errors")
    # an infinite error is null here; "inf" (how the tools' records write infinities) is read too
    errors = np.array([[math.inf if v is None else float(v) for v in row] for row in rows], dtype=float)
    if errors.ndim != 2 or errors.shape[0] != errors.shape[1]:
        raise ValueError(f"{path}: the error matrix must be square, got shape {errors.shape}")
    return errors, record
