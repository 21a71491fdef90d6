"""CachedQwenImagePipeline end to end on the tiny offline Qwen-Image pipeline."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, QwenImagePipeline, QwenImageTransformer2DModel

from cached_diffusers import (
    CachedQwenImagePipeline,
    CachedQwenImageTransformer2DModel,
    DBCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    SeaCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from cached_diffusers.tools.tiny import DEFAULT_PROMPTS, build_tiny_qwenimage_pipeline, save_tiny_qwenimage_pipeline

from helpers import record_calls, stop_recording, teacache_reference

SIZE = dict(height=64, width=64)

COEFFICIENTS = (-4.5e02, 2.8e02, -4.5e01, 3.2e00, -2.0e-02)


def call_kwargs(steps=8, prompt=DEFAULT_PROMPTS[0], seed=0, cfg=True, **overrides):
    kwargs = dict(
        prompt=prompt,
        negative_prompt=" " if cfg else None,
        true_cfg_scale=4.0 if cfg else 1.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **SIZE,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_qwenimage_pipeline(seed=0, pipeline_class=CachedQwenImagePipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory):
    return save_tiny_qwenimage_pipeline(tmp_path_factory.mktemp("stock") / "tiny-qwenimage")


def modulated_inputs(pipe, kwargs):
    """Block 0's modulated image input per (branch, step), recomputed from the transformer's inputs with plain ops."""
    transformer = pipe.transformer
    block = transformer.transformer_blocks[0]
    seen = {}

    def hook(module, args, kw):
        x, t = kw["hidden_states"], kw["timestep"]
        h = F.linear(x, transformer.img_in.weight, transformer.img_in.bias)
        temb = transformer.time_text_embed(t.to(h.dtype), h)
        shift, scale = block.img_mod[1](F.silu(temb))[:, : 2 * h.shape[-1]].chunk(2, dim=-1)
        m = F.layer_norm(h, (h.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        step, _ = pipe._denoising_step()
        seen[(transformer.cache_engine._context.name, step)] = m.double().numpy()

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**kwargs)
    finally:
        handle.remove()
    return seen


def test_from_pretrained_of_a_stock_directory(stock_dir):
    index = json.loads((stock_dir / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    stock = QwenImagePipeline.from_pretrained(stock_dir)
    cached = CachedQwenImagePipeline.from_pretrained(stock_dir, cache_config=TeaCacheConfig(rel_l1_thresh=0.3))
    assert type(cached.transformer) is CachedQwenImageTransformer2DModel
    assert cached.cache_config == TeaCacheConfig(rel_l1_thresh=0.3)
    expected = stock.transformer.state_dict()
    got = cached.transformer.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_from_pretrained_rejects_a_bad_cache_config(stock_dir):
    with pytest.raises(ValueError, match=r"unknown cache method 'fastest'"):
        CachedQwenImagePipeline.from_pretrained(stock_dir, cache_config="fastest")


def test_save_then_load_round_trips(pipe, tmp_path):
    pipe.cache_config = None
    pipe.save_pretrained(tmp_path / "saved")
    again = CachedQwenImagePipeline.from_pretrained(tmp_path / "saved", cache_config="teacache")
    again.set_progress_bar_config(disable=True)
    assert type(again.transformer) is CachedQwenImageTransformer2DModel
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    again.cache_config = None
    # compare with a stock pipeline loaded the same way (freshly built and loaded weights may sit at different
    # memory alignments, which can change the last bit of CPU matmuls)
    loaded_stock = QwenImagePipeline.from_pretrained(tmp_path / "saved")
    loaded_stock.set_progress_bar_config(disable=True)
    assert torch.equal(loaded_stock(**call_kwargs(steps=3)).images, again(**call_kwargs(steps=3)).images)
    # the saved directory names only diffusers' classes and stays loadable by stock diffusers
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    config = json.loads((tmp_path / "saved" / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "QwenImageTransformer2DModel"
    stock = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(stock) is QwenImagePipeline and type(stock.transformer) is QwenImageTransformer2DModel


def test_uncached_and_never_reusing_runs_equal_the_stock_pipeline(pipe):
    stock = build_tiny_qwenimage_pipeline(seed=0)
    stock.set_progress_bar_config(disable=True)
    expected = stock(**call_kwargs(steps=5)).images
    pipe.cache_config = None
    assert torch.equal(pipe(**call_kwargs(steps=5)).images, expected)
    pipe.cache_config = TeaCacheConfig(rel_l1_thresh=1e-9)
    assert torch.equal(pipe(**call_kwargs(steps=5)).images, expected)
    assert pipe.cache_stats.num_reused == 0
    assert pipe.cache_stats.branches["cond"].computed_steps == list(range(5))
    assert pipe.cache_stats.branches["uncond"].computed_steps == list(range(5))


def test_teacache_reuses_exactly_the_steps_its_rule_selects(pipe):
    steps = 12
    pipe.cache_config = None
    signals = modulated_inputs(pipe, call_kwargs(steps=steps, cfg=False))
    _, values = teacache_reference([signals[("cond", i)] for i in range(steps)], 1.0, COEFFICIENTS)
    thresh = float(np.quantile(values, 0.6)) * 2.0  # from the recorded distances: both outcomes occur
    config = TeaCacheConfig(rel_l1_thresh=thresh)

    pipe.cache_config = config
    signals = modulated_inputs(pipe, call_kwargs(steps=steps))
    for branch in ("cond", "uncond"):
        expected, _ = teacache_reference([signals[(branch, i)] for i in range(steps)], thresh, COEFFICIENTS)
        assert pipe.cache_stats.branches[branch].reused_steps == expected
    assert 0 < pipe.cache_stats.branches["cond"].num_reused < steps - 2

    pipe.cache_config = None
    uncached = pipe(**call_kwargs(steps=steps)).images
    other_seed = pipe(**call_kwargs(steps=steps, seed=1)).images
    pipe.cache_config = config
    cached = pipe(**call_kwargs(steps=steps)).images
    assert pipe.cache_stats.num_reused > 0
    error = (cached - uncached).abs().mean()
    assert 0 < error < 0.1 * (other_seed - uncached).abs().mean()


def test_cfg_branches_keep_their_own_state(pipe):
    pipe.cache_config = TeaCacheConfig(rel_l1_thresh=1e6, max_continuous_cached_steps=2)
    calls = record_calls(pipe)
    try:
        pipe(**call_kwargs(steps=8, prompt="a red cat sitting on a blue chair"))
    finally:
        stop_recording(pipe)
    stats = pipe.cache_stats
    assert set(stats.branches) == {"cond", "uncond"}
    # the indicator ignores the text, so separate states take the same decisions
    assert stats.branches["cond"].reused_steps == stats.branches["uncond"].reused_steps == [1, 2, 4, 5]
    residuals, checked = {}, 0
    for branch, step, reused, streams, out in calls:
        if reused:
            assert all(torch.equal(o, s + r) for o, s, r in zip(out, streams, residuals[branch]))
            checked += 1
        else:
            residuals[branch] = tuple(o - s for o, s in zip(out, streams))
    assert checked == 8
    # the two branches' residuals differ, so reusing the other branch's would have been caught above
    assert not torch.allclose(residuals["cond"][0], residuals["uncond"][0])


def test_consecutive_generations_do_not_leak_state(pipe):
    config = TeaCacheConfig(rel_l1_thresh=1e6, max_continuous_cached_steps=1)
    fresh = build_tiny_qwenimage_pipeline(seed=0, pipeline_class=CachedQwenImagePipeline, cache_config=config)
    fresh.set_progress_bar_config(disable=True)
    second = call_kwargs(steps=5, prompt=DEFAULT_PROMPTS[1], height=96, width=64)
    expected = fresh(**second).images

    pipe.cache_config = config
    pipe(**call_kwargs(steps=7, prompt=DEFAULT_PROMPTS[2]))
    got = pipe(**call_kwargs(steps=5, prompt=DEFAULT_PROMPTS[1], height=96, width=64)).images
    assert torch.equal(got, expected)
    assert pipe.cache_stats.num_steps == 5
    assert [r.step for r in pipe.cache_stats.branches["cond"].records] == list(range(5))
    assert pipe.cache_stats.branches["cond"].reused_steps == [1, 3]


def test_cache_config_can_be_read_and_replaced_between_calls(pipe):
    pipe.cache_config = {"method": "teacache", "rel_l1_thresh": 0.5}
    assert pipe.cache_config == TeaCacheConfig(0.5)
    assert pipe.transformer.cache_config is pipe.cache_config
    pipe.cache_config = "none"
    assert pipe.cache_config is None
    with pytest.raises(ValueError, match=r"rel_l1_thresh must be a finite number > 0"):
        pipe.cache_config = {"method": "teacache", "rel_l1_thresh": -1}
    assert pipe.cache_config is None


def test_pil_output_and_stats_without_cfg(pipe):
    pipe.cache_config = TeaCacheConfig(rel_l1_thresh=1e6)
    image = pipe(**call_kwargs(steps=4, cfg=False, output_type="pil")).images[0]
    assert image.size == (64, 64)
    assert list(pipe.cache_stats.branches) == ["cond"]
    assert pipe.cache_stats.branches["cond"].reused_steps == [1, 2]


@pytest.mark.parametrize(
    "config",
    [
        TeaCacheConfig(rel_l1_thresh=1e6, max_continuous_cached_steps=2, enable_taylorseer=True),
        MagCacheConfig(mag_threshold=10.0, mag_retention_ratio=0.0, mag_max_reused_steps=2),
        MagCacheConfig(calibrate=True),
        DBCacheConfig(Fn=2, Bn=1, residual_diff_threshold=10.0, max_warmup_steps=1, max_continuous_cached_steps=2),
        DBCacheConfig(Fn=1, Bn=0, residual_diff_threshold=10.0, max_warmup_steps=0, enable_taylorseer=True, taylorseer_order=2),
        FirstBlockCacheConfig(residual_diff_threshold=10.0, scm_steps_mask="fast", scm_steps_policy="static"),
        TaylorSeerConfig(order=2, interval=3, max_warmup_steps=2),
        SeaCacheConfig(threshold=10.0),
    ],
    ids=lambda c: c.method,
)
def test_every_method_runs_on_qwenimage_with_per_branch_state(pipe, config):
    pipe.cache_config = config
    latents = pipe(**call_kwargs(steps=8)).images
    assert torch.isfinite(latents).all()
    stats = pipe.cache_stats
    assert set(stats.branches) == {"cond", "uncond"}
    cond, uncond = stats.branches["cond"], stats.branches["uncond"]
    assert cond.computed_steps[0] == 0 and 7 in cond.computed_steps
    if getattr(config, "calibrate", False):
        assert stats.num_reused == 0
        assert len(cond.calibration["mag_ratios"]) == 8 and len(uncond.calibration["mag_ratios"]) == 8
    else:
        assert cond.num_reused > 0 and uncond.num_reused > 0
        per_block = pipe.transformer.num_cache_blocks
        front_back = getattr(config, "Fn", 0) + getattr(config, "Bn", 0)
        assert cond.blocks_computed == per_block * cond.num_computed + front_back * cond.num_reused
