"""Differential tests against diffusers 0.42.1's own cache hooks, on the same tiny Qwen-Image weights.

diffusers keys hook state by the pipeline's cache context ("cond" / "uncond"), as we key ours by branch, and neither
First-Block-Cache nor MagCache in diffusers forces the last step: ours runs with ``compute_last_step=False`` to match.
diffusers exposes no statistics, so the peer's reused calls are counted on a Linear inside a middle block, which only
runs when the middle of the stack is computed.
"""

import pytest
import torch
from diffusers import FirstBlockCacheConfig as DiffusersFBC
from diffusers import MagCacheConfig as DiffusersMagCache

from cached_diffusers import CachedQwenImagePipeline, FirstBlockCacheConfig, MagCacheConfig, QWENIMAGE_MAG_RATIOS
from cached_diffusers.tools.tiny import DEFAULT_PROMPTS, build_tiny_qwenimage_pipeline

STEPS = 12


def run_kwargs(seed=0):
    return dict(
        prompt=DEFAULT_PROMPTS[0], negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=STEPS, height=64,
        width=64, generator=torch.Generator().manual_seed(seed), output_type="latent",
    )


@pytest.fixture(scope="module")
def ours():
    pipe = build_tiny_qwenimage_pipeline(seed=0, pipeline_class=CachedQwenImagePipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stock():
    pipe = build_tiny_qwenimage_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_peer(stock, config):
    """Run the stock pipeline with a diffusers cache hook; return latents and reused steps per branch."""
    computed_calls = []
    probe = stock.transformer.transformer_blocks[2].img_mlp.net[2]
    calls = []
    handle_call = stock.transformer.register_forward_pre_hook(lambda *_: calls.append(len(computed_calls)))
    handle_probe = probe.register_forward_hook(lambda *_: computed_calls.append(len(calls)))
    stock.transformer.enable_cache(config)
    try:
        latents = stock(**run_kwargs()).images
    finally:
        stock.transformer.disable_cache()
        handle_call.remove()
        handle_probe.remove()
    ran = set(computed_calls)  # call numbers (1-based) whose middle block ran
    reused = {"cond": [], "uncond": []}
    for call in range(1, len(calls) + 1):
        if call not in ran:
            step, branch = divmod(call - 1, 2)
            reused["cond" if branch == 0 else "uncond"].append(step)
    assert len(calls) == 2 * STEPS
    return latents, reused


def run_ours(ours, config):
    ours.cache_config = config
    latents = ours(**run_kwargs()).images
    stats = ours.cache_stats
    return latents, {b: stats.branches[b].reused_steps for b in ("cond", "uncond")}, stats


def test_first_block_cache_matches_diffusers(ours, stock):
    # thresholds from the probe differences this tiny model records (random weights: large step-to-step changes)
    _, _, stats = run_ours(ours, FirstBlockCacheConfig(residual_diff_threshold=0.0, compute_last_step=False))
    diffs = sorted(stats.branches["cond"].values.values())
    assert len(diffs) == STEPS - 1
    exercised = 0
    for threshold in (diffs[2] * 1.01, diffs[len(diffs) // 2] * 1.01, diffs[-1] * 2):
        peer_latents, peer_reused = run_peer(stock, DiffusersFBC(threshold=threshold))
        latents, reused, _ = run_ours(ours, FirstBlockCacheConfig(residual_diff_threshold=threshold, compute_last_step=False))
        assert reused == peer_reused
        assert torch.equal(latents, peer_latents)
        exercised += 0 < len(reused["cond"]) < STEPS - 1
    assert exercised >= 2  # both outcomes occurred in at least two of the settings


@pytest.mark.parametrize("threshold, max_skip, retention", [(0.06, 2, 0.2), (0.3, 3, 0.1), (1.0, 5, 0.0)])
def test_magcache_matches_diffusers(ours, stock, threshold, max_skip, retention):
    peer_config = DiffusersMagCache(
        threshold=threshold, max_skip_steps=max_skip, retention_ratio=retention, num_inference_steps=STEPS,
        mag_ratios=list(QWENIMAGE_MAG_RATIOS),
    )
    peer_latents, peer_reused = run_peer(stock, peer_config)
    config = MagCacheConfig(
        mag_threshold=threshold, mag_max_reused_steps=max_skip, mag_retention_ratio=retention,
        mag_ratios=QWENIMAGE_MAG_RATIOS, compute_last_step=False,
    )
    latents, reused, _ = run_ours(ours, config)
    assert reused == peer_reused
    assert reused["cond"]  # the setting really skips
    assert torch.equal(latents, peer_latents)


def test_our_default_last_step_rule_is_a_deliberate_difference(ours, stock):
    """diffusers may reuse the final step, which forms the finest detail; ours computes it unless told otherwise."""
    peer_config = DiffusersMagCache(threshold=100.0, max_skip_steps=20, retention_ratio=0.0, num_inference_steps=STEPS,
                                    mag_ratios=list(QWENIMAGE_MAG_RATIOS))
    _, peer_reused = run_peer(stock, peer_config)
    assert peer_reused["cond"] == list(range(1, STEPS))
    _, reused, _ = run_ours(ours, MagCacheConfig(mag_threshold=100.0, mag_max_reused_steps=20, mag_retention_ratio=0.0))
    assert reused["cond"] == list(range(1, STEPS - 1))
