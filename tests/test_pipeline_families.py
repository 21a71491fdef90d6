"""Every cached pipeline of the Qwen-Image and FLUX.2 transformers against its stock diffusers parent, on tiny stock
components: the parent's API, caching off bit-identical, reuse per branch with each branch's own residual."""

import inspect

import pytest
import torch

from cached_diffusers import DBCacheConfig, TeaCacheConfig
from cached_diffusers.model_mixin import CachedTransformerMixin

from families import CASES, small_working_sizes
from helpers import record_calls, stop_recording

IDS = [case.name for case in CASES]


def flat(images):
    """A pipeline's ``images`` (a tensor, or a list of tensors for the layered pipeline) as one float tensor."""
    if isinstance(images, torch.Tensor):
        return images.float()
    return torch.cat([flat(i).flatten() for i in images])


def run(pipe, case, **overrides):
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(1234)  # QwenImageControlNetInpaintPipeline samples the control latents from the global RNG
    with small_working_sizes():
        return flat(pipe(**case.inputs(**overrides)).images)


def reusing_config(case):
    """A TeaCache config that reuses most steps after the first (threshold far above the signals)."""
    return TeaCacheConfig(rel_l1_thresh=50.0, coefficients=case.teacache_coefficients)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_parents_api(case):
    parent_call, cached_call = case.stock.__call__, case.cached.__call__
    assert inspect.signature(cached_call) == inspect.signature(parent_call)
    assert cached_call.__doc__ == parent_call.__doc__
    assert case.cached.__call__ is not parent_call  # the cache lifecycle wraps it
    parent_init = list(inspect.signature(case.stock.__init__).parameters.values())
    cached_init = list(inspect.signature(case.cached.__init__).parameters.values())
    assert cached_init[:-1] == parent_init
    assert cached_init[-1].name == "cache_config" and cached_init[-1].default is None
    assert issubclass(case.cached, case.stock)
    assert case.cached._callback_tensor_inputs == case.stock._callback_tensor_inputs


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_caching_off_is_bit_identical_and_reuse_keeps_each_branch_state(case):
    stock = case.stock(**case.components())
    expected = run(stock, case)

    cached = case.cached.from_pipe(stock)
    assert type(stock.transformer) is case.stock(**case.components()).transformer.__class__  # source unchanged
    assert isinstance(cached.transformer, CachedTransformerMixin)
    assert cached.cache_config is None
    assert torch.equal(run(cached, case), expected)
    assert torch.equal(run(stock, case), expected)

    cached.cache_config = reusing_config(case)
    calls = record_calls(cached)
    try:
        reused = run(cached, case)
    finally:
        stop_recording(cached)
    stats = cached.cache_stats
    assert tuple(stats.branches) == case.branches_with_cfg
    assert torch.isfinite(reused).all() and not torch.equal(reused, expected)
    residuals = {}
    for branch in case.branches_with_cfg:
        records = stats.branches[branch].records
        steps = [r.step for r in records]
        assert steps == list(range(stats.first_step, stats.num_steps))
        assert not records[0].reused and records[0].reason == "first-step"
        assert stats.branches[branch].num_reused > 0
    for branch, step, was_reused, streams, out in calls:
        if was_reused:
            for o, s, r in zip(out, streams, residuals[branch]):
                torch.testing.assert_close(o - s, r, atol=1e-5, rtol=1e-5)
        else:
            residuals[branch] = tuple(o - s for o, s in zip(out, streams))
    if len(case.branches_with_cfg) == 2:
        assert not torch.allclose(residuals["cond"][0], residuals["uncond"][0])  # a swap would be seen

    cached.cache_config = None
    assert torch.equal(run(cached, case), expected)
