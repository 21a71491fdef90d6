"""The exact LeMiCa solver against brute force, and its errors."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cached_diffusers.schedules import path_costs, solve_budgets, solve_lexicographic_minimax


def brute_force(errors, budget):
    """Every path 0 -> N-1 with ``budget`` nodes, the best (sorted-descending costs, path) by enumeration."""
    n = len(errors)
    best = None
    for middle in itertools.combinations(range(1, n - 1), budget - 2):
        path = (0, *middle, n - 1)
        costs = [errors[a][b] for a, b in zip(path, path[1:])]
        if not all(math.isfinite(c) for c in costs):
            continue
        key = (tuple(sorted(costs, reverse=True)), path)
        best = key if best is None or key < best else best
    return best


# Costs from a small set of values make ties frequent (the tie-break is then tested too); inf marks unmeasured edges.
cost = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0]), st.floats(0, 10, allow_nan=False), st.just(math.inf))


@st.composite
def matrices(draw):
    n = draw(st.integers(2, 8))
    errors = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            errors[i][j] = draw(cost)
    return errors


@settings(max_examples=150, deadline=None)
@given(matrices())
def test_the_solver_equals_brute_force_for_every_budget(errors):
    n = len(errors)
    for budget in range(2, n + 1):
        expected = brute_force(errors, budget)
        if expected is None:
            with pytest.raises(ValueError, match="no path of"):
                solve_lexicographic_minimax(errors, budget)
            continue
        path = solve_lexicographic_minimax(errors, budget)
        assert len(path) == budget and path[0] == 0 and path[-1] == n - 1
        assert all(a < b for a, b in zip(path, path[1:]))
        assert path_costs(errors, path) == expected[0]
        assert tuple(path) == expected[1]  # the deterministic tie-break: the smallest path among equal costs


def test_minimax_is_lexicographic_not_a_sum():
    # Two paths of 3 nodes through 1 or 2: costs (5, 0) and (4, 4). Minimax picks the second (largest 4 < 5) although
    # its sum is larger; among equal maxima the second-largest decides.
    errors = np.zeros((4, 4))
    errors[0, 1], errors[1, 3] = 5.0, 0.0
    errors[0, 2], errors[2, 3] = 4.0, 4.0
    errors[0, 3] = math.inf
    assert solve_lexicographic_minimax(errors, 3) == [0, 2, 3]
    errors[0, 1], errors[1, 3] = 4.0, 3.0
    assert solve_lexicographic_minimax(errors, 3) == [0, 1, 3]


def test_full_budget_computes_every_step_and_budgets_are_solved_together():
    errors = np.random.RandomState(0).rand(6, 6)
    assert solve_lexicographic_minimax(errors, 6) == list(range(6))
    solved = solve_budgets(errors, [2, 4])
    assert solved[2] == [0, 5] and len(solved[4]) == 4


@pytest.mark.parametrize(
    "errors, budget, match",
    [
        (np.zeros((3, 3)), 1, r"budget .* must be an integer in \[2, 3\]"),
        (np.zeros((3, 3)), 4, r"budget .* must be an integer in \[2, 3\]"),
        (np.zeros((3, 3)), 2.0, r"budget .* must be an integer"),
        (np.zeros((3, 4)), 2, r"square N x N matrix"),
        (np.full((3, 3), -1.0), 2, r">= 0 or inf"),
        (np.full((3, 3), math.nan), 2, r"NaN or a negative value"),
        (np.triu(np.full((4, 4), math.inf), 2), 2, r"no path of 2 computed steps"),
    ],
)
def test_bad_input_is_one_clear_error(errors, budget, match):
    with pytest.raises(ValueError, match=match):
        solve_lexicographic_minimax(errors, budget)
