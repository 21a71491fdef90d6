"""The engine on a model-free block stack: decisions, residual reuse, per-branch state, guards."""

import pytest
import torch

from cached_diffusers import BlockStack, CacheEngine, TeaCacheConfig
from cached_diffusers.policies import polyval, relative_l1

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
        return BlockStack(self.num_blocks, self.run_blocks, {"modulated_input": lambda s: s[0] * 2.0})


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

    # Independent replay of the rule on the same signals.
    expected_reused, accumulated, previous, last_residual = [], 0.0, None, None
    for step in range(num_steps):
        inputs = streams_at(step)
        signal = inputs[0] * 2.0
        if step in (0, num_steps - 1):
            accumulated, reuse = 0.0, False
        else:
            accumulated += abs(relative_l1(signal, previous))
            reuse = accumulated < 0.05
            if not reuse:
                accumulated = 0.0
        previous = signal
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
    assert set(stats.signals) <= set(range(1, num_steps - 1))


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


def test_missing_signal_and_missing_coefficients_are_clear_errors():
    engine = CacheEngine({"model_name": "ToyModel"})
    with pytest.raises(ValueError, match=r"no TeaCache coefficients are known for ToyModel"):
        engine.config = TeaCacheConfig(0.2)
    engine.config = TeaCacheConfig(0.2, coefficients=IDENTITY)
    with engine.context("cond", step_index=0, num_inference_steps=2):
        with pytest.raises(ValueError, match=r"needs the 'modulated_input' signal, which ToyModel does not provide"):
            engine.run(BlockStack(4, ToyStack().run_blocks), streams_at(0))


def test_polyval_and_relative_l1():
    assert polyval((1.0, -2.0, 3.0), 2.0) == 3.0
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([2.0, -2.0])
    assert relative_l1(a, b) == pytest.approx(1.0 / 4.0)
    assert relative_l1(torch.zeros(2), torch.zeros(2)) == 0.0
