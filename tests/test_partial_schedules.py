"""Partial schedules: img2img and inpaint start at a strength-dependent step. The first executed step computes;
warm-up, SCM masks, MagCache's retention and TaylorSeer's interval count from it; the statistics record the absolute
steps that ran."""

import pytest
import torch

from cached_diffusers import (
    DBCacheConfig,
    MagCacheConfig,
    SeaCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
    steps_mask,
)

from conftest import contract_config, matrix_context, short_run_config
from families import CASES_BY_NAME, small_working_sizes

N = 10
STRENGTHS = [0.3, 0.6, 1.0]
SCM_SPEC = {"compute_bins": [1, 1, 1], "cache_bins": [1, 2, 2]}


def executed_steps(pipe, case, config, strength):
    """Run with ``config``; return the absolute steps the parent's loop ran (from its own step callback and its
    scheduler's full schedule, independently of the cache engine) and the cache statistics."""
    timesteps = []

    def callback(pipeline, i, t, callback_kwargs):
        timesteps.append(float(t))
        return callback_kwargs

    pipe.cache_config = config
    with small_working_sizes():
        out = pipe(**case.inputs(steps=N, strength=strength, callback_on_step_end=callback)).images
    assert torch.isfinite(out).all()
    schedule = [float(t) for t in pipe.scheduler.timesteps]
    assert len(schedule) == N
    return [schedule.index(t) for t in timesteps], pipe.cache_stats


def expected_reason(config, executed, num_executed, is_last):
    """What the guards and the method decide at executed step ``executed`` of ``num_executed`` (counted from the
    first executed step), for the deliberately reusing configs below."""
    if executed == 0:
        return "first-step"
    if isinstance(config, TaylorSeerConfig):
        if executed < config.max_warmup_steps:
            return "warmup"
        if is_last:
            return "last-step"
        phase = executed - max(config.max_warmup_steps - 1, 0)
        return "interval" if phase % config.interval == 0 else "forecast"
    if executed < config.max_warmup_steps:
        return "warmup"
    if is_last:
        return "last-step"
    if config.scm_steps_mask is not None:
        return "scm-compute" if steps_mask(config.scm_steps_mask, num_executed)[executed] else "scm-static"
    if isinstance(config, MagCacheConfig) and executed < int(config.mag_retention_ratio * num_executed + 0.5):
        return "retention"
    if isinstance(config, SeaCacheConfig):
        if executed < config.retention_steps:
            return "retention"
        if executed >= num_executed - config.cache_end_steps:
            return "cache-end"
    return None  # the method's own test: reuses with these thresholds


def configs(case):
    coefficients = case.teacache_coefficients
    return {
        "dbcache-warmup": DBCacheConfig(Fn=1, Bn=0, residual_diff_threshold=100.0, max_warmup_steps=3),
        "scm-static": TeaCacheConfig(
            rel_l1_thresh=100.0, coefficients=coefficients, scm_steps_mask=SCM_SPEC, scm_steps_policy="static"
        ),
        "magcache-retention": MagCacheConfig(
            mag_threshold=100.0, mag_max_reused_steps=100, mag_retention_ratio=0.5, mag_ratios=(1.0,) * N
        ),
        "taylorseer": TaylorSeerConfig(order=1, interval=2, max_warmup_steps=1),
        "seacache-retention": SeaCacheConfig(
            threshold=100.0, retention_steps=2, cache_end_steps=2, max_consecutive_cached=0
        ),
    }


@pytest.fixture(scope="module", params=["qwen-img2img", "flux2-klein-inpaint"])
def case_and_pipe(request):
    case = CASES_BY_NAME[request.param]
    pipe = case.cached(**case.components())
    pipe.set_progress_bar_config(disable=True)
    return case, pipe


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize(
    "method", ["dbcache-warmup", "scm-static", "magcache-retention", "taylorseer", "seacache-retention"]
)
def test_guards_count_from_the_first_executed_step(case_and_pipe, method, strength):
    case, pipe = case_and_pipe
    config = configs(case)[method]
    steps, stats = executed_steps(pipe, case, config, strength)
    first = steps[0]
    assert steps == list(range(first, N))
    assert (first == 0) == (strength == 1.0)
    assert stats.first_step == first and stats.num_steps == N
    num_executed = len(steps)
    for branch in ("cond", "uncond"):
        records = stats.branches[branch].records
        assert [r.step for r in records] == steps  # absolute steps of the full schedule
        for e, record in enumerate(records):
            reason = expected_reason(config, e, num_executed, record.step == N - 1)
            if reason is None:
                assert record.reused, (branch, record)
            else:
                assert record.reason == reason, (branch, e, record)
                assert record.reused == (reason in ("scm-static", "forecast"))


@pytest.mark.parametrize("strength", [0.3])  # three executed steps of ten (0.6: the contract's slow check)
def test_every_method_computes_the_first_executed_step_and_reuses_later(case_and_pipe, contract_method, strength):
    """Every registered method (:func:`conftest.short_run_config` on the partial schedule's executed steps; a planned
    schedule over the full run): the statistics hold the executed steps only, the first one computed, and some later
    step reused."""
    case, pipe = case_and_pipe
    steps, stats = executed_steps(pipe, case, None, strength)
    num_executed = len(steps)
    context = matrix_context(case.teacache_coefficients, pipe.transformer.num_cache_blocks, num_executed)
    config = short_run_config(contract_method, context, num_executed)
    if contract_method.sweep is not None and contract_method.sweep.kind == "budget":  # a schedule of the full run
        config = contract_config(contract_method, {**context, "num_steps": N}, N)
    steps, stats = executed_steps(pipe, case, config, strength)
    assert steps == list(range(N - num_executed, N)) and steps[0] > 0
    for branch in ("cond", "uncond"):
        records = stats.branches[branch].records
        assert [r.step for r in records] == steps, branch
        assert (records[0].reused, records[0].reason) == (False, "first-step"), branch
    assert any(r.reused for b in stats.branches.values() for r in b.records), contract_method.name


def test_a_partial_schedule_reuses_what_the_full_one_would_from_its_first_step(case_and_pipe):
    """The same config, shifted: at strength < 1 the decision pattern over executed steps is the full schedule's
    pattern over its first steps, as far as the warm-up and the mask go (a TaylorSeer config, purely step-driven)."""
    case, pipe = case_and_pipe
    config = TaylorSeerConfig(order=1, interval=3, max_warmup_steps=2)
    full_steps, full = executed_steps(pipe, case, config, 1.0)
    part_steps, part = executed_steps(pipe, case, config, 0.6)
    n = len(part_steps)
    full_pattern = [r.reused for r in full.branches["cond"].records][: n - 1]
    part_pattern = [r.reused for r in part.branches["cond"].records][: n - 1]
    assert part_pattern == full_pattern and any(part_pattern)


# -- the engine alone, on a model-free block stack ---------------------------------------------------------------------
def drive(engine, first, num_steps):
    """Steps ``first .. num_steps - 1`` of one branch through the engine, as a partial schedule's loop calls it."""
    from test_engine import ToyStack, streams_at

    toy = ToyStack()
    for step in range(first, num_steps):
        with engine.context("cond", step_index=step, num_inference_steps=num_steps):
            engine.run(toy.as_stack(), streams_at(step))
    return engine.stats.branches["cond"].records


def test_magcache_ratios_are_read_at_the_absolute_steps_that_run():
    from cached_diffusers import CacheEngine

    ratios = tuple(1.0 + 0.01 * i for i in range(N))  # distinct per step: a shifted index would change the sums
    engine = CacheEngine()
    engine.config = MagCacheConfig(
        mag_threshold=100.0, mag_max_reused_steps=100, mag_retention_ratio=0.0, mag_ratios=ratios
    )
    first = 6
    records = drive(engine, first, N)
    assert [r.step for r in records] == list(range(first, N)) and engine.stats.first_step == first
    product, error = 1.0, 0.0
    for record in records[1:-1]:  # the first executed step computes, the last by compute_last_step
        product *= ratios[record.step]
        error += abs(1.0 - product)
        assert record.reused and record.value == pytest.approx(error)


def test_taylorseer_forms_its_first_difference_counting_executed_steps():
    from cached_diffusers.residuals import FIRST_DIFFERENCE_STEP, TaylorSeerStore

    def update(store, step):
        store.update(step, (torch.zeros(2),), (torch.full((2,), float(step)),))
        return len(store.factors)

    first = 5
    partial, full = TaylorSeerStore(order=1, first_step=first), TaylorSeerStore(order=1)
    orders = [update(partial, first + e) for e in range(FIRST_DIFFERENCE_STEP + 1)]
    assert orders == [update(full, e) for e in range(FIRST_DIFFERENCE_STEP + 1)]
    assert orders[FIRST_DIFFERENCE_STEP - 1] == 1 and orders[FIRST_DIFFERENCE_STEP] == 2
    # the forecast extrapolates over absolute step distances: residual(step) = step here
    assert torch.allclose(partial.get(first + FIRST_DIFFERENCE_STEP + 2)[0], torch.full((2,), first + 5.0))


def test_a_directly_driven_transformer_starts_a_new_generation_when_steps_go_back():
    from cached_diffusers import CacheEngine

    engine = CacheEngine()
    engine.config = DBCacheConfig(Fn=1, Bn=0, residual_diff_threshold=100.0, max_warmup_steps=2)
    drive(engine, 6, N)
    records = drive(engine, 6, N)  # the same partial schedule again, without reset
    assert [r.step for r in records] == list(range(6, N))
    assert [r.reason for r in records[:2]] == ["first-step", "warmup"]
