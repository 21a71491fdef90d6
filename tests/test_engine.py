"""The engine on a model-free block stack: decisions, residual reuse, per-branch state, guards."""

import dataclasses

import pytest
import torch

from cached_diffusers import (
    BlockStack,
    CacheEngine,
    DBCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from cached_diffusers.engine import DEFAULT_BRANCH
from cached_diffusers.policies import polyval, relative_l1
from cached_diffusers.spec import BLOCK_STACK, WHOLE_CALL, ModelCacheSpec
from conftest import matrix_context, matrix_methods, short_run_config

IDENTITY = (0.0, 0.0, 0.0, 1.0, 0.0)  # f(x) = x: the accumulator is the plain sum of relative L1 distances


class ToyStack:
    """Four 'blocks' acting on (image, text) streams; counts block executions."""

    num_blocks = 4

    def __init__(self):
        self.blocks_run = 0

    def run_blocks(self, start, end, streams):
        image, text = streams
        for index in range(start, end):
            self.blocks_run += 1
            image = image * 1.1 + 0.1 * (index + 1) + 0.01 * text.mean()
            text = text * 0.9 - 0.05
        return image, text

    def as_stack(self):
        # SeaCache's raw latent: the image stream seen as a one-channel (6 x 3) grid
        indicators = {"teacache_indicator": lambda s: s[0] * 2.0, "sea_latent": lambda s: s[0][:, None]}
        return BlockStack(self.num_blocks, self.run_blocks, indicators)


def streams_at(step, scale=0.01, seed=0):
    """Inputs that drift by ``scale`` per step (a negative scale flips the sign every step: large changes)."""
    g = torch.Generator().manual_seed(seed)
    offset = scale * step if scale >= 0 else -scale * (-1) ** step
    image = torch.randn(1, 6, 3, generator=g) + offset
    text = torch.randn(1, 2, 3, generator=g)
    return image, text


def run_generation(engine, toy, num_steps, branches=("cond",), scales=None):
    outputs = {b: [] for b in branches}
    for step in range(num_steps):
        for b in branches:
            scale = (scales or {}).get(b, 0.01)
            with engine.context(b, step_index=step, num_inference_steps=num_steps):
                outputs[b].append(engine.run(toy.as_stack(), streams_at(step, scale)))
    return outputs


def test_no_config_runs_everything_without_a_step():
    engine, toy = CacheEngine(), ToyStack()
    out = engine.run(toy.as_stack(), streams_at(0))
    assert toy.blocks_run == 4
    expected = ToyStack().run_blocks(0, 4, streams_at(0))
    assert all(torch.equal(a, b) for a, b in zip(out, expected))


def test_active_engine_needs_the_step():
    engine = CacheEngine()
    engine.config = TeaCacheConfig(0.5, coefficients=IDENTITY)
    with pytest.raises(ValueError, match=r"caching needs the denoising step"):
        engine.run(ToyStack().as_stack(), streams_at(0))
    with engine.context("cond", step_index=5, num_inference_steps=5):
        with pytest.raises(ValueError, match=r"step_index must be in \[0, num_inference_steps=5\), got 5"):
            engine.run(ToyStack().as_stack(), streams_at(0))


def test_step_source_fills_what_the_context_lacks():
    engine = CacheEngine()
    engine.config = TeaCacheConfig(0.5, coefficients=IDENTITY)
    with engine.step_source(lambda: (0, 3)), engine.context("uncond"):
        engine.run(ToyStack().as_stack(), streams_at(0))
    assert engine.stats.num_steps == 3
    assert list(engine.stats.branches) == ["uncond"]


def test_teacache_rule_and_exact_residual_reuse():
    engine, toy = CacheEngine(), ToyStack()
    engine.config = TeaCacheConfig(0.05, coefficients=IDENTITY)
    num_steps = 8
    outputs = run_generation(engine, toy, num_steps)["cond"]
    stats = engine.stats.branches["cond"]

    # Independent replay of the rule on the same indicators.
    expected_reused, accumulated, previous, last_residual = [], 0.0, None, None
    for step in range(num_steps):
        inputs = streams_at(step)
        indicator = inputs[0] * 2.0
        if step in (0, num_steps - 1):
            accumulated, reuse = 0.0, False
        else:
            accumulated += abs(relative_l1(indicator, previous))
            reuse = accumulated < 0.05
            if not reuse:
                accumulated = 0.0
        previous = indicator
        if reuse:
            expected_reused.append(step)
            # a reused step adds the stored residual exactly once
            assert all(torch.equal(o, i + r) for o, i, r in zip(outputs[step], inputs, last_residual))
        else:
            full = ToyStack().run_blocks(0, 4, inputs)
            assert all(torch.equal(o, f) for o, f in zip(outputs[step], full))
            last_residual = tuple(f - i for f, i in zip(full, inputs))

    assert stats.reused_steps == expected_reused
    assert 0 < len(expected_reused) < num_steps - 2  # both outcomes exercised
    assert stats.computed_steps == sorted(set(range(num_steps)) - set(expected_reused))
    assert toy.blocks_run == 4 * len(stats.computed_steps)
    assert set(stats.values) <= set(range(1, num_steps - 1))


def test_branches_decide_independently():
    engine, toy = CacheEngine(), ToyStack()
    engine.config = TeaCacheConfig(0.2, coefficients=IDENTITY)
    scales = {"cond": 0.001, "uncond": -1.0}
    outputs = run_generation(engine, toy, 8, branches=("cond", "uncond"), scales=scales)
    cond, uncond = engine.stats.branches["cond"], engine.stats.branches["uncond"]
    assert cond.reused_steps == [1, 2, 3, 4, 5, 6]
    assert uncond.reused_steps == []
    # every reused cond step adds cond's own step-0 residual, although uncond computed (and stored) in between
    first = streams_at(0, scales["cond"])
    residual = tuple(o - i for o, i in zip(ToyStack().run_blocks(0, 4, first), first))
    for step in cond.reused_steps:
        inputs = streams_at(step, scales["cond"])
        assert all(torch.equal(o, i + r) for o, i, r in zip(outputs["cond"][step], inputs, residual))


def test_guards():
    def reused(**guards):
        engine, toy = CacheEngine(), ToyStack()
        engine.config = TeaCacheConfig(100.0, coefficients=IDENTITY, **guards)
        run_generation(engine, toy, 10)
        return engine.stats.branches["cond"].reused_steps

    assert reused() == list(range(1, 9))
    assert reused(compute_last_step=False) == list(range(1, 10))
    assert reused(max_warmup_steps=4) == list(range(4, 9))
    assert reused(max_cached_steps=3) == [1, 2, 3]
    assert reused(max_continuous_cached_steps=2) == [1, 2, 4, 5, 7, 8]


def test_shape_change_forces_compute_and_records_reason():
    engine, toy = CacheEngine(), ToyStack()
    engine.config = TeaCacheConfig(100.0, coefficients=IDENTITY)
    with engine.context("cond", step_index=0, num_inference_steps=4):
        engine.run(toy.as_stack(), streams_at(0))
    with engine.context("cond", step_index=1, num_inference_steps=4):
        image, text = streams_at(1)
        engine.run(toy.as_stack(), (image[:, :4], text))
    record = engine.stats.branches["cond"].records[-1]
    assert not record.reused and record.reason == "no-residual"


def test_direct_use_starts_a_new_generation_at_step_zero():
    engine, toy = CacheEngine(), ToyStack()
    engine.config = TeaCacheConfig(100.0, coefficients=IDENTITY)
    run_generation(engine, toy, 5)
    run_generation(engine, toy, 3)
    stats = engine.stats
    assert stats.num_steps == 3
    assert [r.step for r in stats.branches["cond"].records] == [0, 1, 2]


def test_missing_indicator_and_missing_coefficients_are_clear_errors():
    engine = CacheEngine(ModelCacheSpec(model_name="ToyModel"))
    with pytest.raises(ValueError, match=r"no TeaCache coefficients are known for ToyModel"):
        engine.config = TeaCacheConfig(0.2)
    engine.config = TeaCacheConfig(0.2, coefficients=IDENTITY)
    with engine.context("cond", step_index=0, num_inference_steps=2):
        with pytest.raises(ValueError, match=r"needs the 'teacache_indicator' indicator, which ToyModel does not"):
            engine.run(BlockStack(4, ToyStack().run_blocks), streams_at(0))


def test_polyval_and_relative_l1():
    assert polyval((1.0, -2.0, 3.0), 2.0) == 3.0
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([2.0, -2.0])
    assert relative_l1(a, b) == pytest.approx(1.0 / 4.0)
    assert relative_l1(torch.zeros(2), torch.zeros(2)) == 0.0


# -- the two-phase API: decide, then commit or recall ------------------------------------------------------------------
def composed_generation(engine, toy, num_steps, branches, scales):
    """The block-stack step written out with decide / commit / recall instead of ``run``."""
    outputs = {b: [] for b in branches}
    for step in range(num_steps):
        for b in branches:
            streams = streams_at(step, scales[b])
            policy = engine.current.policy
            front, back = policy.front_blocks, policy.back_blocks
            span_in = toy.run_blocks(0, front, streams) if front else streams
            if policy.indicator_kind == "front_residual":
                indicator = span_in[0] - streams[0]
            else:  # the stack's indicator of the method's kind, computed only when the method needs it
                kind = policy.indicator_kind or "teacache_indicator"
                indicator = lambda s=streams, k=kind: toy.as_stack().indicators[k](s)  # noqa: E731
            decision = engine.decide(
                b, step, num_steps, inputs=span_in, indicator=indicator, num_blocks=4, pattern=BLOCK_STACK
            )
            if decision.reuse:
                span_out = tuple(s + r for s, r in zip(span_in, engine.recall(branch=b)))
            else:
                span_out = toy.run_blocks(front, 4 - back, span_in)
                engine.commit(tuple(o - s for o, s in zip(span_out, span_in)), span_out, branch=b)
            outputs[b].append(toy.run_blocks(4 - back, 4, span_out) if back else span_out)
    return outputs


def composition_configs():
    """Every registered method (:func:`conftest.short_run_config` on the toy stack's 4 blocks and 12 steps), each
    method calibrated from runs (``calibrate=True``), and TeaCache with the TaylorSeer calibrator."""
    context = matrix_context(IDENTITY, 4, 12)
    calibrating = {**context, "mag_ratios": None}  # calibration measures the ratios
    params = [pytest.param(short_run_config(m, context, 12), id=m.name) for m in matrix_methods()]
    params += [
        pytest.param(short_run_config(m, calibrating, 12).replace(calibrate=True), id=f"{m.name}-calibrate")
        for m in matrix_methods()
        if m.calibration == "runs"
    ]
    taylorseer = TeaCacheConfig(0.5, coefficients=IDENTITY, enable_taylorseer=True, taylorseer_order=2)
    return params + [pytest.param(taylorseer, id="teacache+taylorseer")]


@pytest.mark.parametrize("config", composition_configs())
def test_run_is_the_composition_of_decide_commit_recall(config):
    scales = {"cond": 0.01, "uncond": 0.05}
    results = []
    for drive in (run_generation, composed_generation):
        engine, toy = CacheEngine(ModelCacheSpec(num_blocks=4)), ToyStack()
        engine.config = config
        if drive is run_generation:
            outputs = run_generation(engine, toy, 12, branches=tuple(scales), scales=scales)
        else:
            outputs = composed_generation(engine, toy, 12, tuple(scales), scales)
        results.append((outputs, engine.stats.to_dict(), toy.blocks_run))
    (run_out, run_stats, run_blocks), (composed_out, composed_stats, composed_blocks) = results
    assert composed_stats == run_stats and composed_blocks == run_blocks
    for b in scales:
        for a, c in zip(run_out[b], composed_out[b]):
            assert all(torch.equal(x, y) for x, y in zip(a, c))
    if not getattr(config, "calibrate", False):
        assert run_stats["num_reused"] > 0, "the config must reuse some steps for the comparison to mean something"


def test_whole_call_step_stores_and_recalls_the_prediction_itself():
    engine = CacheEngine(ModelCacheSpec(patterns=(WHOLE_CALL,)))
    engine.config = TeaCacheConfig(100.0, coefficients=IDENTITY)
    latents = torch.randn(1, 4, 2, 2)
    predictions = []
    for step in range(4):
        decision = engine.decide("cond", step, 4, inputs=(latents,), indicator=torch.full((1, 3), 1.0 + step))
        if decision.reuse:
            (prediction,) = engine.recall(branch="cond")
            assert torch.equal(prediction, predictions[-1])  # the committed tensor, unchanged (no zero stream added)
        else:
            prediction = torch.randn(1, 4, 2, 2)
            engine.commit((prediction,), branch="cond")
        predictions.append(prediction)
    record = engine.stats.branches["cond"]
    assert record.computed_steps == [0, 3] and record.reused_steps == [1, 2]
    assert record.blocks_computed == 2  # a whole call counts as one block


def test_two_phase_misuse_is_a_clear_error():
    engine = CacheEngine(ModelCacheSpec(num_blocks=4))
    image, text = streams_at(0)
    with pytest.raises(RuntimeError, match="caching is off"):
        engine.decide("cond", 0, 4, inputs=(image,))
    engine.config = TeaCacheConfig(100.0, coefficients=IDENTITY)
    with pytest.raises(RuntimeError, match=r"CacheEngine.commit: branch 'cond' has no pending decision"):
        engine.commit((image,), branch="cond")
    with pytest.raises(RuntimeError, match=r"CacheEngine.recall: branch 'cond' has no pending decision"):
        engine.recall(branch="cond")
    decision = engine.decide("cond", 0, 4, inputs=(image,), indicator=image)
    assert not decision.reuse and decision.reason == "first-step"
    with pytest.raises(RuntimeError, match=r"branch 'cond' was decided at step 0 and neither committed nor recalled"):
        engine.decide("cond", 0, 4, inputs=(image,), indicator=image)
    with pytest.raises(RuntimeError, match=r"compute at step 0 \(first-step\), so there is nothing to recall"):
        engine.recall(branch="cond")
    engine.commit((image * 0.5,), branch="cond")  # the misuse left the decision pending
    with pytest.raises(RuntimeError, match="has no pending decision"):
        engine.commit((image,), branch="cond")  # one commit per decision
    assert engine.decide("cond", 1, 4, inputs=(image,), indicator=image).reuse
    with pytest.raises(RuntimeError, match=r"decided to reuse at step 1 \(below-threshold\); call recall\(\) instead"):
        engine.commit((image,), branch="cond")
    assert torch.equal(engine.recall(branch="cond")[0], image * 0.5)  # the step-0 prediction, as committed
    with pytest.raises(ValueError, match=r"needs the 'teacache_indicator' indicator, which this model does not"):
        engine.decide("cond", 2, 4, inputs=(image,))
    # the default branch: the cache context's name, else DEFAULT_BRANCH, for decide, commit and recall alike
    with engine.context("uncond", step_index=0, num_inference_steps=4):
        engine.decide(inputs=(image,), indicator=image)
        engine.commit((image,))
    assert engine.decide(step_index=3, num_inference_steps=4, inputs=(image,), indicator=image).reason == "last-step"
    engine.commit((image,))
    assert DEFAULT_BRANCH == "cond"  # the name diffusers' loops give their conditional (or only) branch
    assert set(engine.stats.branches) == {"cond", "uncond"}
    records = [(r.step, r.reason) for r in engine.stats.branches["cond"].records]
    assert records == [(0, "first-step"), (1, "below-threshold"), (3, "last-step")]


def test_a_failed_block_span_leaves_no_pending_decision():
    engine = CacheEngine(ModelCacheSpec(num_blocks=4))
    engine.config = TeaCacheConfig(100.0, coefficients=IDENTITY)

    def failing(start, end, streams):
        raise MemoryError("out of memory")

    with engine.context("cond", step_index=0, num_inference_steps=4):
        with pytest.raises(MemoryError):
            engine.run(BlockStack(4, failing, {"teacache_indicator": lambda s: s[0]}), streams_at(0))
        out = engine.run(ToyStack().as_stack(), streams_at(0))  # decides anew, no "decided twice"
    assert len(out) == 2 and engine.stats.branches["cond"].computed_steps == [0]


def test_the_policy_states_the_patterns_a_method_supports():
    whole_call = ModelCacheSpec(model_name="LoopModel", num_blocks=1, patterns=(WHOLE_CALL,))
    for config in (DBCacheConfig(Fn=1, Bn=0), FirstBlockCacheConfig()):
        with pytest.raises(ValueError, match=rf"{type(config).__name__} \(method '{config.method}'\) supports only the "
                           r"'block_stack' wiring pattern .*LoopModel caches whole transformer calls .*'whole_call'"):
            CacheEngine(whole_call).config = config
    for config in (TeaCacheConfig(coefficients=IDENTITY), MagCacheConfig(mag_ratios=[1.0, 0.9]), TaylorSeerConfig()):
        CacheEngine(whole_call).config = config  # these support both patterns
    # a block-stack model driven through decide as a whole call: refused with the same message
    engine = CacheEngine(ModelCacheSpec(model_name="StackModel", num_blocks=4))
    engine.config = DBCacheConfig(Fn=1, Bn=0)
    with pytest.raises(ValueError, match=r"supports only the 'block_stack' wiring pattern.*StackModel caches whole"):
        engine.decide("cond", 0, 4, inputs=streams_at(0))


def test_model_cache_spec_is_frozen_typed_and_checked():
    with pytest.raises(TypeError, match="teacache_coefficent"):
        ModelCacheSpec(teacache_coefficent=IDENTITY)  # a typo is an error, not a silently missing default
    spec = ModelCacheSpec(teacache_coefficients=[1, 2, 3, 4, 5], teacache_coefficients_source="test")
    assert spec.teacache_coefficients == (1.0, 2.0, 3.0, 4.0, 5.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_blocks = 3
    for kwargs, field in (
        (dict(num_blocks=0), "num_blocks"),
        (dict(num_blocks=True), "num_blocks"),
        (dict(teacache_coefficients=(1.0, 2.0), teacache_coefficients_source="x"), "teacache_coefficients"),
        (dict(teacache_coefficients=IDENTITY), "teacache_coefficients_source"),
        (dict(mag_ratios="1.0", mag_ratios_source="x"), "mag_ratios"),
        (dict(mag_ratios=(1.0,), mag_ratios_source="x"), "mag_ratios"),
        (dict(mag_ratios=(1.0, 0.9)), "mag_ratios_source"),
        (dict(patterns=()), "patterns"),
        (dict(patterns=("hooks",)), "patterns"),
    ):
        with pytest.raises(ValueError, match=rf"ModelCacheSpec\.{field}"):
            ModelCacheSpec(**kwargs)
    with pytest.raises(TypeError, match="takes a ModelCacheSpec, got dict"):
        CacheEngine({"num_blocks": 4})
    assert ModelCacheSpec(patterns=WHOLE_CALL).patterns == (WHOLE_CALL,)
