"""Test helpers shared by the pipeline tests: call recording and an independent replay of TeaCache's rule."""

import numpy as np


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
