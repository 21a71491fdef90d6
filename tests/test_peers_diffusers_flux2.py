"""Differential tests against diffusers 0.42.1's own cache hooks on the same tiny FLUX.2 [klein] weights.

diffusers keys hook state by the pipeline's cache context ("cond" / "uncond"), as we key ours by branch, and its
MagCache and TaylorSeer do not force the last step: ours runs with ``compute_last_step=False`` to match. diffusers
exposes no statistics, so the peer's computed calls are counted on Linear layers inside the blocks.

* MagCache: identical reused steps per branch and bit-identical latents. On Flux2 diffusers stores the image part
  (last tokens) of the single-stream tail's ``[text; image]`` output minus the head's image input, and on a skip
  adds it to the image tokens: the residual ours caches.
* First-Block-Cache: diffusers' crashes on Flux2 (its tail returns one joint tensor while the head returned a pair);
  ours is the only one that runs here, and it reproduces its rule per branch.
* TaylorSeer: diffusers forecasts each attention module's output (the MLPs of the double-stream blocks keep running),
  ours the whole stack's residual; the schedules coincide for ``interval`` 1 and 2, and are offset by two steps
  otherwise (diffusers computes ``W + 1 + k * interval`` after a warm-up of ``W`` steps, ours ``W - 1 + k * interval``).
"""

import diffusers
import pytest
import torch
from diffusers import FirstBlockCacheConfig as DiffusersFBC
from diffusers import MagCacheConfig as DiffusersMagCache
from diffusers import TaylorSeerCacheConfig as DiffusersTaylorSeer

from cached_diffusers import CachedFlux2KleinPipeline, FirstBlockCacheConfig, MagCacheConfig, TaylorSeerConfig
from cached_diffusers.tools.tiny import DEFAULT_PROMPTS, build_tiny_flux2_klein_pipeline

from test_flux2_pipeline import first_block_reference, front_probes

# The peer here is diffusers' own hooks on FLUX.2's blocks, which register Flux2TransformerBlock from diffusers 0.42 on
# (0.40 and 0.41: "Model class ... Flux2TransformerBlock not registered"): ours runs on those releases, the peer not.
needs_peer_hooks = pytest.mark.skipif(
    tuple(int(v) for v in diffusers.__version__.split(".")[:2]) < (0, 42),
    reason="diffusers' cache hooks support FLUX.2 blocks from 0.42",
)

STEPS = 12


def run_kwargs(seed=0):
    return dict(
        prompt=DEFAULT_PROMPTS[0], guidance_scale=4.0, num_inference_steps=STEPS, height=64, width=64,
        max_sequence_length=64, generator=torch.Generator().manual_seed(seed), output_type="latent",
    )


@pytest.fixture(scope="module")
def ours():
    pipe = build_tiny_flux2_klein_pipeline(seed=0, pipeline_class=CachedFlux2KleinPipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stock():
    pipe = build_tiny_flux2_klein_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def uncached(stock):
    return stock(**run_kwargs()).images


def run_peer(stock, config, probe):
    """Run the stock pipeline with a diffusers hook; return latents and the steps per branch where ``probe`` ran."""
    calls, ran = [], []
    handle_call = stock.transformer.register_forward_pre_hook(lambda *_: calls.append(len(calls)))
    handle_probe = probe.register_forward_hook(lambda *_: ran.append(len(calls) - 1))
    stock.transformer.enable_cache(config)
    try:
        latents = stock(**run_kwargs()).images
    finally:
        stock.transformer.disable_cache()
        handle_call.remove()
        handle_probe.remove()
    assert len(calls) == 2 * STEPS  # sequential CFG: cond, then uncond, per step
    computed = {"cond": sorted({c // 2 for c in ran if c % 2 == 0}), "uncond": sorted({c // 2 for c in ran if c % 2 == 1})}
    return latents, computed


def run_ours(ours, config):
    ours.cache_config = config
    latents = ours(**run_kwargs()).images
    stats = ours.cache_stats
    return latents, {b: stats.branches[b].computed_steps for b in ("cond", "uncond")}, stats


@pytest.fixture(scope="module")
def calibrated(ours):
    """MagCache ratios of this model from our calibration run (diffusers takes one list for every context: cond's)."""
    _, _, stats = run_ours(ours, MagCacheConfig(calibrate=True))
    return tuple(stats.branches["cond"].calibration["mag_ratios"])


@needs_peer_hooks
@pytest.mark.parametrize("threshold, max_skip, retention", [(0.06, 2, 0.2), (0.3, 3, 0.1), (1.0, 5, 0.0)])
def test_magcache_matches_diffusers(ours, stock, calibrated, threshold, max_skip, retention):
    peer_config = DiffusersMagCache(
        threshold=threshold, max_skip_steps=max_skip, retention_ratio=retention, num_inference_steps=STEPS,
        mag_ratios=list(calibrated),
    )
    # a middle block: it runs only when the stack is computed
    peer_latents, peer_computed = run_peer(stock, peer_config, stock.transformer.single_transformer_blocks[1].attn.to_out)
    config = MagCacheConfig(
        mag_threshold=threshold, mag_max_reused_steps=max_skip, mag_retention_ratio=retention, mag_ratios=calibrated,
        compute_last_step=False,
    )
    latents, computed, _ = run_ours(ours, config)
    assert computed == peer_computed
    assert len(computed["cond"]) < STEPS  # the setting really skips
    assert torch.equal(latents, peer_latents)


@needs_peer_hooks
def test_diffusers_first_block_cache_crashes_on_flux2(stock):
    with pytest.raises(TypeError, match=r"unsupported operand type\(s\) for -: 'Tensor' and 'list'"):
        run_peer(stock, DiffusersFBC(threshold=0.5), stock.transformer.single_transformer_blocks[1].attn.to_out)


def test_our_first_block_cache_runs_on_klein_and_follows_its_rule(ours, uncached):
    run_ours(ours, FirstBlockCacheConfig(residual_diff_threshold=0.0))
    diffs = sorted(ours.cache_stats.branches["cond"].values.values())
    exercised = 0
    for threshold in (diffs[2] * 1.01, diffs[len(diffs) // 2] * 1.01, diffs[-1] * 2):
        # the front block runs on every step: replay the rule on the probes of the cached run itself
        ours.cache_config = FirstBlockCacheConfig(residual_diff_threshold=threshold)
        probes, latents = front_probes(ours, run_kwargs())
        stats = ours.cache_stats
        expected = first_block_reference(probes, ("cond", "uncond"), STEPS, threshold)
        assert {b: stats.branches[b].reused_steps for b in ("cond", "uncond")} == expected
        assert torch.isfinite(latents).all() and (stats.num_reused == 0) == torch.equal(latents, uncached)
        exercised += 0 < len(expected["cond"]) < STEPS - 2
    assert exercised >= 2  # both outcomes occurred in at least two of the settings


@needs_peer_hooks
@pytest.mark.parametrize("interval, warmup, order", [(2, 3, 1), (2, 2, 2), (3, 3, 1)])
def test_taylorseer_schedules_and_outputs_against_diffusers(ours, stock, uncached, interval, warmup, order):
    peer_config = DiffusersTaylorSeer(
        cache_interval=interval, disable_cache_before_step=warmup, max_order=order, taylor_factors_dtype=torch.float32
    )
    # an attention projection of a double block: the module diffusers forecasts
    peer_latents, peer_computed = run_peer(stock, peer_config, stock.transformer.transformer_blocks[1].attn.to_q)
    latents, computed, _ = run_ours(
        ours, TaylorSeerConfig(order=order, interval=interval, max_warmup_steps=warmup, compute_last_step=False)
    )
    warm = list(range(warmup))
    assert peer_computed["cond"] == peer_computed["uncond"] == warm + list(range(warmup + 1, STEPS, interval))
    assert computed["cond"] == computed["uncond"] == warm[:-1] + list(range(warmup - 1, STEPS, interval))
    if interval <= 2:
        assert computed == peer_computed
    # different granularity (attention outputs vs the whole stack's residual): comparable, not equal, errors
    ours_error = (latents - uncached).abs().mean()
    peer_error = (peer_latents - uncached).abs().mean()
    assert ours_error > 0 and peer_error > 0 and not torch.equal(latents, peer_latents)
    assert 0.5 < ours_error / peer_error < 2.0  # recorded: 0.30 / 0.33, 0.16 / 0.16, 0.24 / 0.30
