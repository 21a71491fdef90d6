"""Planned compute schedules: the exact lexicographic-minimax path over the step DAG (LeMiCa).

LeMiCa (Gao et al., "LeMiCa: Lexicographic Minimax Path Caching for Efficient Diffusion-Based Video Generation",
NeurIPS 2025, arXiv 2511.00090; UnicomAI/LeMiCa) plans which denoising steps to compute once, offline:

* the nodes of a DAG are the steps ``0 .. N-1``; an edge ``i -> j`` (``i < j``) means "compute steps ``i`` and ``j``
  and reuse at the steps in between";
* its cost ``E[i, j]`` is the *global* error that this one gap causes: the distance of the final output of a run that
  computes every step except ``i+1 .. j-1`` from the final output of the uncached run (measured over calibration
  prompts; :mod:`cached_diffusers.calibration_schedules` measures it). An edge ``i -> i+1`` reuses nothing: cost 0;
* a schedule with a budget of ``B`` computed steps is a path ``0 = s_0 < s_1 < ... < s_{B-1} = N-1`` (the first and
  the last step are always computed) and LeMiCa picks the path whose edge costs are *lexicographically minimax*:
  the path minimising the largest edge cost, among those the second largest, and so on.

Precisely, :func:`solve_lexicographic_minimax` minimises, over every path from step 0 to step ``N-1`` with exactly
``B`` nodes, the vector ``sorted((E[s_k, s_{k+1}] for k in range(B-1)), reverse=True)`` in lexicographic order.
Two paths whose sorted cost vectors are equal are equally good; the solver then returns the one that is
lexicographically smallest as a list of steps (a deterministic tie-break).

The solver is exact dynamic programming over ``(node, nodes used)``: for multisets of equal size, adding the same
costs to both keeps their order (the order is decided by the largest value whose multiplicities differ), so the best
path to ``(j, k)`` extends to the best path through ``(j, k)``. ``O(N^2 B)`` vector comparisons of length ``< B``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["MISSING_EDGE", "path_costs", "solve_lexicographic_minimax", "solve_budgets"]

MISSING_EDGE = math.inf
"""Cost of an edge that was not measured (e.g. longer than the calibration's ``max_span``): never on a solved path."""


def _as_matrix(errors: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    matrix = np.asarray(errors, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise ValueError(f"errors must be a square N x N matrix with N >= 2, got shape {matrix.shape}")
    upper = matrix[np.triu_indices(matrix.shape[0], k=1)]
    if np.isnan(upper).any() or (upper < 0).any():
        raise ValueError("errors[i][j] (i < j) must be >= 0 or inf (not measured); got NaN or a negative value")
    return matrix


def _check_budget(budget: int, num_steps: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not 2 <= budget <= num_steps:
        raise ValueError(
            f"budget (computed steps, first and last included) must be an integer in [2, {num_steps}], got {budget!r}"
        )
    return int(budget)


def path_costs(errors: Sequence[Sequence[float]] | np.ndarray, path: Sequence[int]) -> tuple[float, ...]:
    """The edge costs of ``path`` sorted from largest to smallest: the quantity the solver minimises."""
    matrix = _as_matrix(errors)
    return tuple(sorted((float(matrix[a, b]) for a, b in zip(path[:-1], path[1:])), reverse=True))


def solve_lexicographic_minimax(errors: Sequence[Sequence[float]] | np.ndarray, budget: int) -> list[int]:
    """The computed steps of the lexicographic-minimax path with exactly ``budget`` computed steps.

    Args:
        errors: ``N x N`` array; ``errors[i][j]`` for ``i < j`` is the edge cost (>= 0, ``inf`` = not allowed). The
            diagonal and lower triangle are ignored.
        budget: computed steps ``B``, in ``[2, N]`` (steps 0 and ``N-1`` included).

    Returns:
        The ``B`` computed steps, increasing, from 0 to ``N-1``.

    Raises:
        ValueError: for a malformed matrix or budget, or when every path with ``B`` nodes uses an ``inf`` edge
            (too few edges were measured for so small a budget).
    """
    matrix = _as_matrix(errors)
    n = matrix.shape[0]
    budget = _check_budget(budget, n)
    # best[k][j]: (sorted-descending costs, path) of the best path from 0 to j with k + 1 nodes.
    best: list[dict[int, tuple[tuple[float, ...], tuple[int, ...]]]] = [{0: ((), (0,))}]
    for k in range(1, budget):
        layer: dict[int, tuple[tuple[float, ...], tuple[int, ...]]] = {}
        # Node j can still reach N-1 with the remaining budget - 1 - k edges only if j <= N-1 - (budget-1-k).
        last = n - 1 - (budget - 1 - k)
        for j in range(k, last + 1):
            candidate = None
            for i, (costs, path) in best[k - 1].items():
                if i >= j or not math.isfinite(matrix[i, j]):
                    continue
                key = (tuple(sorted(costs + (float(matrix[i, j]),), reverse=True)), path + (j,))
                if candidate is None or key < candidate:
                    candidate = key
            if candidate is not None:
                layer[j] = candidate
        best.append(layer)
    if n - 1 not in best[budget - 1]:
        raise ValueError(
            f"no path of {budget} computed steps from step 0 to step {n - 1} uses only measured edges: measure longer "
            f"edges (a larger max_span) or choose a larger budget"
        )
    return list(best[budget - 1][n - 1][1])


def solve_budgets(errors: Sequence[Sequence[float]] | np.ndarray, budgets: Sequence[int]) -> dict[int, list[int]]:
    """``{budget: computed steps}`` for each budget (see :func:`solve_lexicographic_minimax`)."""
    return {int(b): solve_lexicographic_minimax(errors, b) for b in budgets}
