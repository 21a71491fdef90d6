"""Shared pytest configuration: the ``slow`` marker (tests over 4 s, multi-process, notebooks, long hypothesis runs;
``-m "not slow"`` leaves them out: the fast set) and the method-contract matrix (registry x model family), as
diffusers' tester mixins share one set of tests over models.

* ``contract_method``: parametrised over :func:`matrix_methods`, every method of the registry (``"none"`` excluded),
  so a method registered with ``@register_cache_method`` gets the whole matrix.
* ``model_family``: one cached pipeline per model family (:data:`MATRIX_FAMILIES`), with its partial-schedule
  (img2img / inpaint) sibling, built once per module.
* :func:`contract_config`: a config of a method that reuses some steps and computes others, derived from the method's
  registry entry alone (its ``sweep``), so a new method needs no entry here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

CONTRACT_STEPS = 6
"""Denoising steps of the contract runs."""

MATRIX_FAMILIES = {"qwenimage": ("qwen-txt2img", "qwen-img2img"), "flux2-klein": ("flux2-klein", "flux2-klein-inpaint")}
"""Model family -> (the text-to-image case, the partial-schedule case) of ``tests/families.py``."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than 4 s, starts several processes, runs notebooks or long hypothesis sequences (deselect with -m 'not slow')")


def matrix_methods():
    """Every registered method that caches (the registry's ``cache_methods(enabled=True)``), in listing order."""
    from cached_diffusers.registry import cache_methods

    return cache_methods(enabled=True)


def pytest_generate_tests(metafunc):
    if "contract_method" in metafunc.fixturenames:
        methods = matrix_methods()
        metafunc.parametrize("contract_method", methods, ids=[m.name for m in methods])


@dataclasses.dataclass
class Family:
    """A model family of the matrix: its cached text-to-image pipeline and case, its partial-schedule sibling, and
    what a method's config may need from the model (``coefficients``, ``mag_ratios``, ``num_blocks``)."""

    name: str
    case: Any
    pipe: Any
    partial_case: Any
    partial_pipe: Any
    context: dict[str, Any]


@pytest.fixture(scope="module", params=list(MATRIX_FAMILIES))
def model_family(request):
    from families import CASES_BY_NAME

    full, partial = (CASES_BY_NAME[name] for name in MATRIX_FAMILIES[request.param])
    pipe = full.cached(**full.components())
    partial_pipe = partial.cached.from_pipe(pipe) if partial.components is full.components else partial.cached(
        **partial.components()
    )
    for p in (pipe, partial_pipe):
        p.set_progress_bar_config(disable=True)
    context = {
        "coefficients": full.teacache_coefficients,  # None: the model's published ones
        "mag_ratios": (1.0,) * CONTRACT_STEPS,  # flat ratios: MagCache reuses once its retention is over
        "num_blocks": pipe.transformer.num_cache_blocks,
        "num_steps": CONTRACT_STEPS,
    }
    return Family(request.param, full, pipe, partial, partial_pipe, context)


def contract_config(method, context: dict[str, Any], num_steps: int = CONTRACT_STEPS):
    """A config of ``method`` (a registry entry) that reuses some steps and computes others on a tiny model: a
    threshold at the top of its sweep's range, an integer knob at its largest default value, or a planned schedule
    computing the first, middle and last steps; a method without a sweep runs its defaults."""
    cls, sweep = method.config_class, method.sweep
    if sweep is None:
        return cls()
    if sweep.kind == "budget":
        return cls(computed_steps=(0, num_steps // 2, num_steps - 1), num_inference_steps=num_steps)
    value = sweep.high if sweep.kind == "log" and math.isfinite(sweep.high) else max(sweep.values or (sweep.low,))
    return cls.sweep_config(value, **context)
