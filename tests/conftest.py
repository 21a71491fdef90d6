"""Shared pytest configuration: the ``slow`` marker (tests over 4 s, multi-process, notebooks, long hypothesis runs;
``-m "not slow"`` leaves them out: the fast set) and the method-contract matrix (registry x model family), as
diffusers' tester mixins share one set of tests over models.

* ``contract_method``: parametrised over :func:`matrix_methods`, every method of the registry (``"none"`` excluded),
  so a method registered with ``@register_cache_method`` gets the whole matrix.
* ``model_family``: one cached pipeline per model family (:data:`MATRIX_FAMILIES`), with its partial-schedule
  (img2img / inpaint) sibling, built once per module.
* :func:`contract_config`: a config of a method that reuses some steps and computes others, derived from the method's
  registry entry alone (its ``sweep``), so a new method needs no entry here; :func:`short_run_config` (its warm-up cut
  to the first step, for short and partial schedules), :func:`probe_config` / :func:`threshold_config` (a threshold
  below every decision value, a threshold between the samples' values) for the methods that
  :func:`decides_per_sample`, :func:`mixing_config` (a bisection over the sweep's range until every branch reuses
  and computes), :func:`supports` (whether a pipeline's wiring pattern runs a method).

The test files iterate :func:`matrix_methods` (or ``contract_method``) rather than keep lists of methods.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

CONTRACT_STEPS = 6
"""Denoising steps of the contract runs."""

MATRIX_FAMILIES = {
    "qwenimage": ("qwen-txt2img", "qwen-img2img"),
    "flux2-klein": ("flux2-klein", "flux2-klein-inpaint"),
    "bagel": ("bagel", None),
    "hunyuanimage3": ("hunyuanimage3", None),
}
"""Model family -> (the text-to-image case, the partial-schedule case or ``None``) of ``tests/families.py``."""


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
    """A model family of the matrix: its cached text-to-image pipeline and case, its partial-schedule sibling (``None``
    where the family has none: BAGEL, HunyuanImage-3.0), and what a method's config may need from the model
    (``coefficients``, ``mag_ratios``, ``num_blocks``)."""

    name: str
    case: Any
    pipe: Any
    partial_case: Any
    partial_pipe: Any
    context: dict[str, Any]


@pytest.fixture(scope="module", params=list(MATRIX_FAMILIES))
def model_family(request):
    from families import CASES_BY_NAME

    full, partial = (CASES_BY_NAME.get(name) for name in MATRIX_FAMILIES[request.param])
    pipe = full.cached_pipeline()
    if partial is None:
        partial_pipe = None
    elif partial.components is full.components:
        partial_pipe = partial.cached.from_pipe(pipe)
    else:
        partial_pipe = partial.cached_pipeline()
    for p in (pipe, partial_pipe):
        if p is not None:
            p.set_progress_bar_config(disable=True)
    context = matrix_context(full.teacache_coefficients, pipe.transformer.num_cache_blocks)
    return Family(request.param, full, pipe, partial, partial_pipe, context)


def matrix_context(coefficients, num_blocks: int, num_steps: int = CONTRACT_STEPS) -> dict[str, Any]:
    """What :func:`contract_config` and :func:`threshold_config` may need from a model: its TeaCache
    ``coefficients`` (``None``: the model's published ones), flat MagCache ``mag_ratios`` (MagCache reuses once its
    retention is over), its cached ``num_blocks`` and the run's ``num_steps``."""
    return {"coefficients": coefficients, "mag_ratios": (1.0,) * num_steps, "num_blocks": num_blocks, "num_steps": num_steps}


def contract_config(method, context: dict[str, Any], num_steps: int = CONTRACT_STEPS):
    """A config of ``method`` (a registry entry) that reuses some steps and computes others on a tiny model: a
    threshold at the top of its sweep's range, an integer knob at its largest default value, or a planned schedule
    computing the first, middle and last steps; a method without a sweep runs its defaults."""
    cls, sweep = method.config_class, method.sweep
    if sweep is None:
        return cls()
    if sweep.kind == "budget":
        return cls(computed_steps=sorted({0, num_steps // 2, num_steps - 1}), num_inference_steps=num_steps)
    value = sweep.high if sweep.kind == "log" and math.isfinite(sweep.high) else max(sweep.values or (sweep.low,))
    return cls.sweep_config(value, **context)


def short_run_config(method, context: dict[str, Any], num_steps: int = CONTRACT_STEPS):
    """:func:`contract_config` with its warm-up cut to the first step (which computes anyway), so that it reuses
    some steps even of a short or partial schedule (three executed steps of img2img at ``strength=0.6``)."""
    return contract_config(method, context, num_steps).replace(max_warmup_steps=1)


def decides_per_sample(method) -> bool:
    """Whether ``method`` decides from each sample's own data: its policy measures an indicator
    (``policy_class.indicator_kind``), so the samples of a batch may decide differently. The others (MagCache's
    ratios, TaylorSeer's interval, the planned schedules) decide alike for every sample by construction."""
    return method.policy_class.indicator_kind is not None


def threshold_config(method, value: float, context: dict[str, Any]):
    """The config of a method that :func:`decides_per_sample` at its sweep knob ``value`` (the registry's
    ``sweep_config``), warm-up off so that every step after the first decides by the threshold."""
    return method.config_class.sweep_config(value, **context).replace(max_warmup_steps=0)


def probe_config(method, context: dict[str, Any]):
    """A :func:`threshold_config` far below the method's sweep range (``sweep.low * 1e-9``): it never reuses, and it
    records the method's decision value at every tested step of every sample."""
    return threshold_config(method, method.sweep.low * 1e-9, context)


def supports(pipe, method) -> bool:
    """Whether ``method``'s policy supports a wiring pattern of ``pipe``'s transformer (its ``cache_spec.patterns``);
    the others are refused at configuration time (DBCache and First-Block-Cache on the whole-call
    HunyuanImage-3.0)."""
    return bool(set(method.patterns) & set(pipe.transformer.cache_spec.patterns))


def mixing_config(method, context: dict[str, Any], reused_by_branch, num_steps: int = CONTRACT_STEPS, tries: int = 24):
    """A config of ``method`` under which every guidance branch reuses some step and computes some step between its
    first and last one, so that a check comparing two ways of running it sees both decisions.

    ``reused_by_branch(config)`` runs one generation and returns ``{branch: [reused, ...]}`` (one flag per step).
    A threshold method (``sweep.kind == "log"``) is searched by geometric bisection between its sweep's ``low`` and
    ``high`` (as the tools tune a knob), warm-up off (:func:`threshold_config`): too high reuses every middle step, too low
    reuses none. The other methods run :func:`short_run_config`. Returns the config found (the caller asserts the
    decisions; the last one tried when the search fails)."""

    def mixed(flags):
        reused, middle = any(flags), flags[1:-1]
        return (reused and any(not f for f in middle)), reused

    sweep = method.sweep
    if sweep is None or sweep.kind != "log":
        return short_run_config(method, context, num_steps)
    low, high = sweep.low, sweep.high
    config = None
    for _ in range(tries):
        value = math.sqrt(low * high) if config is not None else high
        config = threshold_config(method, value, context)
        results = [mixed(flags) for flags in reused_by_branch(config).values()]
        if all(ok for ok, _ in results):
            return config
        if all(reused for _, reused in results):  # every middle step reused somewhere: lower the threshold
            high = value
        else:
            low = value
    return config
