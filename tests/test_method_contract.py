"""The method contract: one set of behaviour tests run over registry x model family (``tests/conftest.py``'s
``contract_method`` and ``model_family``). Every registered method, on every family: a never-reusing config is
bit-identical to caching off; each guidance branch keeps its own state and a second generation repeats the first;
the config survives a JSON round trip and copies; a partial schedule (img2img / inpaint) starts computing at its first
executed step; a step callback that changes nothing changes no decision; each sample of a batch gets its own call's
output (a method deciding per sample mixes some step). The families are Qwen-Image, FLUX.2 [klein], BAGEL and
HunyuanImage-3.0 (``conftest.MATRIX_FAMILIES``); a method a family's wiring pattern does not support is refused there
(asserted). CFG-parallel and context-parallel agreement run every registered method in ``test_cfg_parallel.py`` and
``test_context_parallel.py`` (multi-process); the toy method joins them below. A method registered in a test joins
the matrix (:func:`test_a_method_registered_in_a_test_joins_the_matrix`)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch

from cached_diffusers import cache_config_from_dict, make_cache_config
from cached_diffusers.configs import StepCacheConfig, _check_int
from cached_diffusers.policies import CachePolicy, Decision, Gate
from cached_diffusers.registry import Sweep, register_cache_method, unregister_cache_method

from conftest import CONTRACT_STEPS, contract_config, decides_per_sample, matrix_methods, supports
from families import small_working_sizes
from helpers import check_batch_rows

N = CONTRACT_STEPS


# -- a toy method: one config and one policy, registered only inside the test that uses it ------------------------
class ToyPolicy(CachePolicy):
    """Reuse every step except each ``every``-th executed one (the shared guards first)."""

    value_name = ""

    def decide(self, ctx, state, measurement, gate, reason):
        if gate is Gate.COMPUTE:
            return Decision(False, reason)
        if gate is Gate.REUSE:
            return Decision(True, reason)
        return Decision(False, "toy-compute") if ctx.executed % self.config.every == 0 else Decision(True, "toy-reuse")


@dataclass(frozen=True)
class ToyCacheConfig(StepCacheConfig):
    """A toy method for the contract test: compute every ``every``-th step (``every`` >= 1), reuse the others."""

    method: ClassVar[str] = "toy"
    source: ClassVar[str] = "tests/test_method_contract.py"
    policy_class: ClassVar[type] = ToyPolicy
    sweep: ClassVar[Sweep] = Sweep("every", "int", 2, math.inf, values=(2, 3))

    every: int = 2

    def validate(self) -> None:
        super().validate()
        object.__setattr__(self, "every", _check_int(type(self).__name__, "every", self.every, low=1))


# -- the contract ---------------------------------------------------------------------------------------------------
def generate(pipe, case, config, **overrides):
    """One generation with ``config``: ``(images, {branch: [(step, reused, reason), ...]})``."""
    pipe.cache_config = config
    torch.manual_seed(1234)
    with small_working_sizes():
        images = pipe(**case.inputs(steps=N, **overrides)).images
    stats = pipe.cache_stats
    records = {} if stats is None else {b: [(r.step, r.reused, r.reason) for r in s.records] for b, s in stats.branches.items()}
    return images, records


_RUNS: dict[tuple[int, str], tuple[torch.Tensor, dict]] = {}


def first_run(family, config):
    """The first generation of ``family``'s pipeline with ``config`` (kept for the module: several checks compare with
    it, each then runs its own second generation)."""
    key = (id(family.pipe), repr(config))
    if key not in _RUNS:
        _RUNS[key] = generate(family.pipe, family.case, config)
    return _RUNS[key]


def uncached(family):
    return first_run(family, None)[0]


def check_never_reusing_equals_caching_off(method, family):
    config = contract_config(method, family.context).replace(max_cached_steps=0)
    images, records = generate(family.pipe, family.case, config)
    assert records and not any(reused for branch in records.values() for _, reused, _ in branch), records
    assert torch.equal(images, uncached(family))


def check_each_branch_keeps_its_state_and_generations_repeat(method, family):
    config = contract_config(method, family.context)
    images, records = first_run(family, config)
    assert set(records) == set(family.case.branches_with_cfg)
    for branch, decisions in records.items():
        assert [step for step, _, _ in decisions] == list(range(N)), branch
        assert decisions[0][1:] == (False, "first-step"), branch
        assert not decisions[-1][1] or not config.compute_last_step, branch
    assert any(reused for decisions in records.values() for _, reused, _ in decisions), records
    assert torch.isfinite(images).all()
    again, records_again = generate(family.pipe, family.case, config)
    assert records_again == records and torch.equal(again, images)


def check_json_round_trip_and_copies(method, family):
    config = contract_config(method, family.context)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["method"] == method.name
    assert cache_config_from_dict(data) == config
    params = {k: v for k, v in data.items() if k != "method"}
    assert make_cache_config(method.name, **params) == config
    for alias in method.aliases:
        assert make_cache_config(alias, **params) == config
    assert copy.copy(config) == config and copy.deepcopy(config) == config and config.replace() == config


def check_a_partial_schedule_computes_its_first_executed_step(method, family):
    if family.partial_pipe is None:
        pytest.skip(f"{family.name} has no partial-schedule (img2img / inpaint) pipeline")
    config = contract_config(method, family.context)
    images, records = generate(family.partial_pipe, family.partial_case, config, strength=0.6)
    assert torch.isfinite(images).all()
    for branch, decisions in records.items():
        steps = [step for step, _, _ in decisions]
        assert steps == list(range(steps[0], N)) and steps[0] > 0, (branch, steps)
        assert decisions[0][1:] == (False, "first-step"), branch


def check_each_sample_of_a_batch_gets_its_own_output(method, family):
    """Two samples in one call against each alone (``Case.batch_inputs``): a method that decides per sample on this
    model, at a threshold between the samples' values, mixes some step; the others must not mix."""
    case = family.case
    adaptive = decides_per_sample(method) and method.policy_class.indicator_kind not in case.shared_indicators
    with small_working_sizes():
        check_batch_rows(
            family.pipe, method, family.context, lambda: case.batch_inputs(N, (0, 1)),
            [lambda: case.batch_inputs(N, (0,)), lambda: case.batch_inputs(N, (1,))], adaptive=adaptive,
        )  # fmt: skip


def check_a_callback_that_changes_nothing_changes_no_decision(method, family):
    config = contract_config(method, family.context)
    images, records = first_run(family, config)
    same = generate(family.pipe, family.case, config,
                    callback_on_step_end=lambda p, i, t, tensors: {"latents": tensors["latents"].clone()})
    assert same[1] == records and torch.equal(same[0], images)


CONFIG_CONTRACT = [check_json_round_trip_and_copies]
"""Checks on the config alone (fast)."""

PIPELINE_CONTRACT = [
    check_never_reusing_equals_caching_off,
    check_each_branch_keeps_its_state_and_generations_repeat,
    check_a_partial_schedule_computes_its_first_executed_step,
    check_a_callback_that_changes_nothing_changes_no_decision,
    check_each_sample_of_a_batch_gets_its_own_output,
]
"""Checks that run the family's pipelines (a few seconds each on CPU: marked slow, so the fast set leaves them out;
CI runs them)."""

CONTRACT = CONFIG_CONTRACT + PIPELINE_CONTRACT


@pytest.mark.parametrize(
    "check",
    [pytest.param(c, id=c.__name__.removeprefix("check_")) for c in CONFIG_CONTRACT]
    + [pytest.param(c, id=c.__name__.removeprefix("check_"), marks=pytest.mark.slow) for c in PIPELINE_CONTRACT],
)
def test_method_contract(contract_method, model_family, check):
    run_check(check, contract_method, model_family)


def run_check(check, method, family):
    """``check(method, family)``; a pipeline check of a method whose policy supports no wiring pattern of the family's
    model (DBCache and First-Block-Cache on the whole-call HunyuanImage-3.0) asserts the refusal instead."""
    if check in PIPELINE_CONTRACT and not supports(family.pipe, method):
        with pytest.raises(ValueError, match="supports"):
            family.pipe.cache_config = contract_config(method, family.context)
        assert family.pipe.cache_config is None or family.pipe.cache_config.method != method.name
        return
    check(method, family)


@pytest.mark.parametrize(
    "checks",
    [pytest.param(CONFIG_CONTRACT, id="config"), pytest.param(PIPELINE_CONTRACT, id="pipelines", marks=pytest.mark.slow)],
)
def test_a_method_registered_in_a_test_joins_the_matrix(model_family, checks):
    names = [m.name for m in matrix_methods()]
    assert "toy" not in names
    register_cache_method(ToyCacheConfig)
    try:
        toy = next(m for m in matrix_methods() if m.name == "toy")
        assert toy.config_class is ToyCacheConfig and toy.policy_class is ToyPolicy
        assert [m.name for m in matrix_methods() if m.name != "toy"] == names
        for check in checks:
            try:
                run_check(check, toy, model_family)
            except pytest.skip.Exception:  # not applicable to the family (no partial-schedule pipeline)
                continue
        # the tools see it too: the benchmark's curves, the tuner's knobs, the CLI's --cache list
        from cached_diffusers.tools.bench import sweep_methods
        from cached_diffusers.tools.tune import tunable

        assert "toy" in sweep_methods() and tunable()["toy"].knob == "every"
    finally:
        unregister_cache_method("toy")
    assert "toy" not in [m.name for m in matrix_methods()]


@pytest.mark.slow
def test_a_method_registered_in_a_test_joins_the_parallel_checks():
    """The toy method on two processes: CFG-parallel (each rank's branch as the serial run decided it, the same
    images) and context-parallel (every rank decides and returns as the single process), as every registered method
    in ``test_cfg_parallel.py`` and ``test_context_parallel.py``."""
    import test_cfg_parallel
    import test_context_parallel

    register_cache_method(ToyCacheConfig)
    try:
        toy = next(m for m in matrix_methods() if m.name == "toy")
        test_cfg_parallel.check_cfg_parallel_equals_serial("qwenimage", [toy])
        runs = test_context_parallel.runs_of({"qwen": test_context_parallel.method_configs("qwen", [toy])})
        test_context_parallel.check_every_rank_decides_as_the_single_process(runs, "qwen", "toy")
    finally:
        unregister_cache_method("toy")


def test_the_pattern_error_lists_registered_methods_only():
    """The refusal of a method on an unsupported wiring pattern names the registry's methods that support it: no
    abstract policy, whatever modules happen to be imported."""
    from cached_diffusers import DBCacheConfig, ModelCacheSpec, WHOLE_CALL
    from cached_diffusers.registry import methods_supporting

    import cached_diffusers.planned  # noqa: F401  (once listed its abstract PlannedSchedule)

    spec = ModelCacheSpec(model_name="LoopModel", num_blocks=4, patterns=(WHOLE_CALL,))
    with pytest.raises(ValueError) as error:
        DBCacheConfig(Fn=1).make_policy(spec)
    listed = str(error.value).rsplit(": ", 1)[1].split(", ")
    assert listed == methods_supporting(WHOLE_CALL) and "PlannedSchedule" not in str(error.value)
    assert set(listed) == {m.name for m in matrix_methods() if WHOLE_CALL in m.patterns}
    assert "dbcache" not in listed and "fbcache" not in listed
