"""Test helpers shared by the pipeline tests: call recording, an independent replay of TeaCache's rule, and the
batch-invariance check (a batched call against each sample's own call) of ``test_batch_invariance.py`` and the
method contract."""

import math

import numpy as np

from conftest import probe_config, short_run_config, threshold_config

BATCH_TOLERANCE = 1e-4
"""Largest difference between a sample of a batched call and its own call (float32, CPU)."""


def record_calls(pipe):
    """Record, per transformer call, the branch, the step, the decision and the stack's input and output streams.

    Returns the list the records are appended to; :func:`stop_recording` restores the transformer.
    """
    transformer = pipe.transformer
    engine = transformer.cache_engine
    calls = []
    if transformer.cached_block_lists:  # the diffusers models: the parent's forward, its block calls intercepted
        from cached_diffusers.model_mixin import BlockCalls

        class Recording(BlockCalls):
            def call(self, index, block, args, kwargs):
                result = super().call(index, block, args, kwargs)
                if self.policy is not None and index == self.num_blocks - 1:
                    out = self._io(index).result_streams(result, args, kwargs)
                    record = engine.stats.branches[self.ctx.branch].records[-1]
                    calls.append((self.ctx.branch, self.ctx.step, record.reused, self.stack_in, out))
                return result

        transformer.__dict__["_block_calls_type"] = Recording
        return calls
    run = engine.run

    def recording_run(stack, streams):
        out = run(stack, streams)
        ctx = engine.step_context()
        record = engine.stats.branches[ctx.branch].records[-1]
        calls.append((ctx.branch, ctx.step, record.reused, streams, out))
        return out

    engine.run = recording_run
    return calls


def stop_recording(pipe):
    """Undo :func:`record_calls`."""
    pipe.transformer.__dict__.pop("_block_calls_type", None)
    pipe.transformer.cache_engine.__dict__.pop("run", None)


def teacache_reference(signals, thresh, coefficients, compute_last_step=True):
    """TeaCache's rule (arXiv 2411.19108, accumulating |f|, first and last step computed) replayed with numpy.

    Returns the reused step indices and the rescaled distances ``|f(d)|`` of the tested steps.
    """
    f = np.poly1d(coefficients)
    reused, accumulated, previous, values = [], 0.0, None, []
    for i, m in enumerate(signals):
        if i == 0 or (compute_last_step and i == len(signals) - 1):
            accumulated = 0.0
        else:
            d = np.abs(m - previous).mean() / np.abs(previous).mean()
            values.append(abs(f(d)))
            accumulated += abs(f(d))
            if accumulated < thresh:
                reused.append(i)
            else:
                accumulated = 0.0
        previous = m
    return reused, values


def threshold_between(samples, method) -> float:
    """The geometric mean of the lowest and highest of the samples' decision values at the first step where they
    differ (half the highest when the lowest is 0)."""
    for step in sorted({s for sample in samples for s in sample.values}):
        values = [s.values.get(step) for s in samples]
        if None in values:
            continue
        low, high = min(values), max(values)
        if high > low * (1 + 1e-3) and high > 0:
            return math.sqrt(low * high) if low > 0 else high / 2
    raise AssertionError(f"the samples' {method} values never differ: {[s.values for s in samples]}")


def first_branch_threshold(stats, method) -> float:
    """A threshold between the samples' decision values (:func:`threshold_between`) of a probe run's statistics (its
    first branch), checking that the probe reused nothing."""
    samples = next(iter(stats.branches.values())).samples
    assert not any(s.reused_steps for s in samples), [s.reused_steps for s in samples]  # the probe never reuses
    return threshold_between(samples, method)


def check_batch_rows(pipe, method, context, batched_kwargs, alone_kwargs, adaptive=True):
    """``method``'s (a registry entry) batched call against each sample's own call (``alone_kwargs[i]``): with
    ``adaptive``, at a threshold between the samples' values of a probe run (some step must mix); otherwise with the
    contract's reusing config, :func:`conftest.short_run_config` (no step may mix). Each sample's latents must be
    its own call's within :data:`BATCH_TOLERANCE` (float32, CPU) and its reused steps those of its own call."""
    if adaptive:
        pipe.cache_config = probe_config(method, context)
        pipe(**batched_kwargs())
        config = threshold_config(method, first_branch_threshold(pipe.cache_stats, method.name), context)
    else:
        config = short_run_config(method, context, num_steps=context["num_steps"])
    pipe.cache_config = config
    batched = pipe(**batched_kwargs()).images.float()
    branches = dict(pipe.cache_stats.branches)
    mixed = any(len({tuple(s.reused_steps) for s in b.samples}) > 1 for b in branches.values())
    assert mixed == adaptive, {n: [s.reused_steps for s in b.samples] for n, b in branches.items()}
    assert any(s.num_reused for b in branches.values() for s in b.samples)
    for row, kwargs in enumerate(alone_kwargs):
        alone = pipe(**kwargs()).images.float()
        difference = (batched[row] - alone[0]).abs().max().item()
        assert difference <= BATCH_TOLERANCE, f"sample {row}: max abs difference {difference:.3g}"
        for name, branch in pipe.cache_stats.branches.items():
            assert branches[name].samples[row].reused_steps == branch.reused_steps, (name, row)
