"""What the planned schedules' calibrations share: the global error of a run's final latents, and the error matrix's
file.

* :func:`final_latents` / :func:`latent_error`: the final latents (``output_type="latent"``, before the VAE) of one
  call, and their relative L1 distance ``sum|x - x_ref| / sum|x_ref|`` from the uncached run's ``x_ref``: the
  *global* error every planned-schedule calibration minimises.
* :func:`save_error_matrix` / :func:`load_error_matrix`: the matrix as JSON with its provenance, so that another
  budget is solved without new runs (:func:`cached_diffusers.schedules.solve_budgets`).

Each method's own calibration lives in its module: LeMiCa's error matrix (:func:`measure_edge_errors`) in
:mod:`cached_diffusers.methods.lemica`, MeanCache's windows (:func:`choose_meancache_windows`) in
:mod:`cached_diffusers.methods.meancache`; ``cached_diffusers.calibration_schedules.measure_edge_errors`` and
``.choose_meancache_windows`` still resolve (module ``__getattr__``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

from .registry import old_path_getattr

__all__ = ["ERROR_MATRIX_SCHEMA", "final_latents", "latent_error", "load_error_matrix", "save_error_matrix"]

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


__getattr__ = old_path_getattr(__name__, "LeMiCa's error matrix and MeanCache's windows")
