"""CachedFlux2KleinPipeline and CachedFlux2KleinKVPipeline end to end on the tiny offline FLUX.2 [klein] pipeline."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, Flux2KleinKVPipeline, Flux2KleinPipeline, Flux2Transformer2DModel
from PIL import Image

from cached_diffusers import (
    CachedFlux2KleinKVPipeline,
    CachedFlux2KleinPipeline,
    CachedFlux2Transformer2DModel,
    DBCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
    recommended_klein_cache_config,
)
from cached_diffusers.tools.cli import _pipeline_class_for
from cached_diffusers.policies import relative_l1
from cached_diffusers.tools.tiny import (
    DEFAULT_PROMPTS,
    QWEN3_TOKENIZER_DIR,
    build_tiny_flux2_klein_components,
    build_tiny_flux2_klein_pipeline,
    load_tiny_qwen3_tokenizer,
    save_tiny_flux2_klein_pipeline,
    write_tiny_qwen3_tokenizer,
)

from helpers import record_calls, stop_recording, teacache_reference

SIZE = dict(height=64, width=64)

COEFFICIENTS = (2.0, -3.0, 1.0, 1.0, 0.0)  # a test polynomial (no Klein coefficients exist); |f| is accumulated


def call_kwargs(steps=8, prompt=DEFAULT_PROMPTS[0], seed=0, cfg=True, **overrides):
    kwargs = dict(
        prompt=prompt,
        guidance_scale=4.0 if cfg else 1.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        max_sequence_length=64,  # Klein pads to 512 by default; 64 keeps the tests fast (one test uses 512)
        **SIZE,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_flux2_klein_pipeline(seed=0, pipeline_class=CachedFlux2KleinPipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stock():
    pipe = build_tiny_flux2_klein_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stock_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    return {
        False: save_tiny_flux2_klein_pipeline(root / "klein-base", distilled=False),
        True: save_tiny_flux2_klein_pipeline(root / "klein-distilled", distilled=True),
    }


def modulated_inputs(pipe, kwargs):
    """Block 0's modulated image input per (branch, step), recomputed from the transformer's inputs with plain ops."""
    transformer = pipe.transformer
    seen = {}

    def hook(module, args, kw):
        x, t = kw["hidden_states"], kw["timestep"]
        temb = transformer.time_guidance_embed(t.to(x.dtype) * 1000, None)
        mod = F.linear(F.silu(temb), transformer.double_stream_modulation_img.linear.weight)
        shift, scale = mod.chunk(6, dim=-1)[:2]
        h = F.linear(x, transformer.x_embedder.weight)
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


def front_probes(pipe, kwargs, block=0):
    """Per (branch, step): the image-stream residual of double block ``block`` (the Fn=1 probe), read by a hook."""
    transformer = pipe.transformer
    probes = {}

    def hook(module, args, kw, out):
        step, _ = pipe._denoising_step()
        probes[(transformer.cache_engine._context.name, step)] = (out[1] - kw["hidden_states"]).detach()

    handle = transformer.transformer_blocks[block].register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            latents = pipe(**kwargs).images
    finally:
        handle.remove()
    return probes, latents


def first_block_reference(probes, branches, num_steps, thresh, shared=False, warmup=0):
    """DBCache F1B0's rule replayed: reuse iff the probe changed less than ``thresh`` since the last computed step.

    With ``shared=True`` one reference serves every branch (the faulty shared state), in call order.
    """
    reference, reused = {}, {b: [] for b in branches}
    for step in range(num_steps):
        for branch in branches:
            key = "shared" if shared else branch
            probe = probes[(branch, step)]
            forced = step == 0 or step < warmup or step == num_steps - 1 or key not in reference
            if not forced and relative_l1(probe, reference[key]) < thresh:
                reused[branch].append(step)
            else:
                reference[key] = probe
    return reused


# -- loading and saving --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distilled", [False, True], ids=["base", "distilled"])
def test_from_pretrained_of_a_stock_directory(stock_dirs, distilled):
    path = stock_dirs[distilled]
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is distilled
    assert index["transformer"] == ["diffusers", "Flux2Transformer2DModel"]
    stock = Flux2KleinPipeline.from_pretrained(path)
    config = DBCacheConfig(Fn=1, residual_diff_threshold=0.5, max_warmup_steps=2)
    cached = CachedFlux2KleinPipeline.from_pretrained(path, cache_config=config)
    assert type(cached.transformer) is CachedFlux2Transformer2DModel
    assert cached.cache_config == config
    assert cached.config.is_distilled is distilled  # the parent's optional config argument still comes through
    expected, got = stock.transformer.state_dict(), cached.transformer.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    cached.set_progress_bar_config(disable=True)
    stock.set_progress_bar_config(disable=True)
    cached.cache_config = DBCacheConfig(Fn=1, residual_diff_threshold=0.0, max_warmup_steps=0)  # never reuses
    assert torch.equal(cached(**call_kwargs(steps=3)).images, stock(**call_kwargs(steps=3)).images)
    # CFG (guidance 4.0) on the base variant: two branches; the distilled variant ignores guidance: one
    assert list(cached.cache_stats.branches) == (["cond"] if distilled else ["cond", "uncond"])
    assert _pipeline_class_for(str(path)) is CachedFlux2KleinPipeline


def test_from_pretrained_rejects_klein_teacache_without_coefficients(stock_dirs):
    with pytest.raises(ValueError, match=r"no TeaCache coefficients are known.*FLUX.2 \[klein\].*calibrate=True"):
        CachedFlux2KleinPipeline.from_pretrained(stock_dirs[False], cache_config="teacache")


def test_save_then_load_round_trips(pipe, tmp_path):
    pipe.cache_config = None
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is False
    config = json.loads((tmp_path / "saved" / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "Flux2Transformer2DModel"
    stock = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(stock) is Flux2KleinPipeline and type(stock.transformer) is Flux2Transformer2DModel
    again = CachedFlux2KleinPipeline.from_pretrained(tmp_path / "saved", cache_config="fbcache")
    again.cache_config = None
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    # compared with a stock pipeline loaded the same way: loaded weights are not 64-byte aligned, and CPU BLAS results
    # for the same values can differ in the last bit from those of freshly allocated weights
    for p in (again, stock):
        p.set_progress_bar_config(disable=True)
    assert torch.equal(stock(**call_kwargs(steps=3)).images, again(**call_kwargs(steps=3)).images)


# -- identity when nothing is reused ----------------------------------------------------------------------------------------
def test_uncached_and_never_reusing_runs_equal_the_stock_pipeline(pipe, stock):
    expected = stock(**call_kwargs(steps=5)).images
    pipe.cache_config = None
    assert torch.equal(pipe(**call_kwargs(steps=5)).images, expected)
    for config in (
        TeaCacheConfig(rel_l1_thresh=1e-9, coefficients=COEFFICIENTS),
        DBCacheConfig(Fn=3, Bn=2, residual_diff_threshold=0.0, max_warmup_steps=0),
    ):
        pipe.cache_config = config
        assert torch.equal(pipe(**call_kwargs(steps=5)).images, expected)
        assert pipe.cache_stats.num_reused == 0
        assert pipe.cache_stats.branches["cond"].computed_steps == list(range(5))
        assert pipe.cache_stats.branches["uncond"].computed_steps == list(range(5))
    # the default text length (padded to 512), the distilled variant (no CFG) and a decoded image
    kwargs = dict(steps=3, max_sequence_length=512, cfg=False, output_type="np")
    expected = stock(**call_kwargs(**kwargs)).images
    assert expected.shape == (1, 64, 64, 3)
    assert np.array_equal(pipe(**call_kwargs(**kwargs)).images, expected)


# -- the rules, per branch -------------------------------------------------------------------------------------------------
def test_teacache_reuses_exactly_the_steps_its_rule_selects(pipe):
    steps = 10
    pipe.cache_config = None
    signals = modulated_inputs(pipe, call_kwargs(steps=steps, cfg=False))
    _, values = teacache_reference([signals[("cond", i)] for i in range(steps)], 1.0, COEFFICIENTS)
    thresh = float(np.quantile(values, 0.6)) * 2.0  # from the recorded distances: both outcomes occur
    config = TeaCacheConfig(rel_l1_thresh=thresh, coefficients=COEFFICIENTS)

    pipe.cache_config = config
    signals = modulated_inputs(pipe, call_kwargs(steps=steps))
    stats = pipe.cache_stats
    for branch in ("cond", "uncond"):
        expected, _ = teacache_reference([signals[(branch, i)] for i in range(steps)], thresh, COEFFICIENTS)
        assert stats.branches[branch].reused_steps == expected
    assert 0 < stats.branches["cond"].num_reused < steps - 2
    # the indicator ignores the text: both branches measure the same distances (a state shared between the branches
    # would measure 0 on every uncond call, vllm-omni's fault on Klein) and take the same decisions
    assert stats.branches["cond"].values == stats.branches["uncond"].values
    assert all(v > 0 for v in stats.branches["uncond"].values.values())


def test_cfg_branches_keep_their_own_state(pipe):
    steps = 10
    pipe.cache_config = FirstBlockCacheConfig(residual_diff_threshold=0.0)
    pipe(**call_kwargs(steps=steps))
    diffs = sorted(pipe.cache_stats.branches["cond"].values.values())
    thresh = diffs[len(diffs) // 2] * 1.01  # from the recorded probe changes: about half the tests reuse

    # the probe (block 0's image residual) is computed on every step; replay the rule on the cached run's own probes
    pipe.cache_config = FirstBlockCacheConfig(residual_diff_threshold=thresh)
    probes, _ = front_probes(pipe, call_kwargs(steps=steps))
    stats = pipe.cache_stats
    expected = first_block_reference(probes, ("cond", "uncond"), steps, thresh)
    assert {b: stats.branches[b].reused_steps for b in ("cond", "uncond")} == expected
    assert expected["cond"] and expected["uncond"]
    # a state shared by the branches (cache-dit's Klein adapter, vllm-omni) compares the uncond probe with the same
    # step's cond probe and decides differently: the replay tells the two apart
    assert first_block_reference(probes, ("cond", "uncond"), steps, thresh, shared=True) != expected


def test_reused_calls_add_their_own_branch_residual(pipe):
    """Whole-stack reuse (TeaCache): out = in + the residual of the same branch's last computed step, both streams."""
    pipe.cache_config = TeaCacheConfig(rel_l1_thresh=1e6, coefficients=COEFFICIENTS, max_continuous_cached_steps=2)
    calls = record_calls(pipe)
    try:
        pipe(**call_kwargs(steps=8))
    finally:
        stop_recording(pipe)
    stats = pipe.cache_stats
    assert stats.branches["cond"].reused_steps == stats.branches["uncond"].reused_steps == [1, 2, 4, 5]
    residuals, checked = {}, 0
    for branch, step, reused, streams, out in calls:
        if reused:
            assert all(torch.equal(o, s + r) for o, s, r in zip(out, streams, residuals[branch]))
            checked += 1
        else:
            residuals[branch] = tuple(o - s for o, s in zip(out, streams))
    assert checked == 8
    # the text streams differ between the branches, and so do their residuals: the other branch's would be caught
    assert (residuals["cond"][0] - residuals["uncond"][0]).abs().mean() > 0.01 * residuals["cond"][0].abs().mean()


def test_consecutive_generations_do_not_leak_state(pipe):
    config = TeaCacheConfig(rel_l1_thresh=1e6, coefficients=COEFFICIENTS, max_continuous_cached_steps=1)
    fresh = build_tiny_flux2_klein_pipeline(seed=0, pipeline_class=CachedFlux2KleinPipeline, cache_config=config)
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


# -- every method of the family ----------------------------------------------------------------------------------------------
CALIBRATED = (1.0, 0.69, 0.79, 1.65, 0.72, 1.1, 0.77, 1.68)  # rounded from MagCacheConfig(calibrate=True) on this model


@pytest.mark.parametrize(
    "config",
    [
        TeaCacheConfig(rel_l1_thresh=1e6, coefficients=COEFFICIENTS, max_continuous_cached_steps=2, enable_taylorseer=True),
        MagCacheConfig(mag_threshold=10.0, mag_retention_ratio=0.0, mag_max_reused_steps=2, mag_ratios=CALIBRATED),
        MagCacheConfig(calibrate=True),
        DBCacheConfig(Fn=2, Bn=1, residual_diff_threshold=10.0, max_warmup_steps=1, max_continuous_cached_steps=2),
        DBCacheConfig(Fn=3, Bn=2, residual_diff_threshold=10.0, max_warmup_steps=0, enable_taylorseer=True, taylorseer_order=2),
        FirstBlockCacheConfig(residual_diff_threshold=10.0, scm_steps_mask="fast", scm_steps_policy="static"),
        TaylorSeerConfig(order=2, interval=3, max_warmup_steps=2),
    ],
    ids=lambda c: c.method,
)
def test_every_method_runs_on_klein_with_per_branch_state(pipe, config):
    pipe.cache_config = config
    latents = pipe(**call_kwargs(steps=8)).images
    assert torch.isfinite(latents).all()
    stats = pipe.cache_stats
    assert set(stats.branches) == {"cond", "uncond"} and stats.num_blocks == 6
    cond, uncond = stats.branches["cond"], stats.branches["uncond"]
    assert cond.computed_steps[0] == 0 and 7 in cond.computed_steps
    if getattr(config, "calibrate", False):
        assert stats.num_reused == 0
        assert len(cond.calibration["mag_ratios"]) == 8 and len(uncond.calibration["mag_ratios"]) == 8
        assert cond.calibration != uncond.calibration  # calibrated per branch
        assert MagCacheConfig.from_calibration(stats).mag_ratios.keys() == {"cond", "uncond"}
    else:
        assert cond.num_reused > 0 and uncond.num_reused > 0
        front_back = getattr(config, "Fn", 0) + getattr(config, "Bn", 0)
        assert cond.blocks_computed == 6 * cond.num_computed + front_back * cond.num_reused


# -- variants and their defaults ---------------------------------------------------------------------------------------------
def test_distilled_variant_runs_one_branch_and_the_recommended_config_leaves_one_step_to_reuse():
    distilled = build_tiny_flux2_klein_pipeline(seed=0, pipeline_class=CachedFlux2KleinPipeline, distilled=True)
    distilled.set_progress_bar_config(disable=True)
    preset = recommended_klein_cache_config(distilled=True)
    assert preset == DBCacheConfig(Fn=1, Bn=0, residual_diff_threshold=0.5, max_warmup_steps=2)
    for config, reason in ((preset, None), (DBCacheConfig(Fn=1, residual_diff_threshold=1e6, max_warmup_steps=2), "below-threshold")):
        distilled.cache_config = config
        distilled(**call_kwargs(steps=4))  # guidance 4.0 is ignored by the distilled variant
        stats = distilled.cache_stats
        assert list(stats.branches) == ["cond"]
        records = stats.branches["cond"].records
        assert [r.reason for r in records][:2] == ["first-step", "warmup"] and records[3].reason == "last-step"
        assert set(stats.branches["cond"].reused_steps) <= {2}  # at most 1 of 4 steps: <= 4 / (3 + 1/6) = 1.26x here
    assert stats.branches["cond"].reused_steps == [2] and records[2].reason == reason


def test_base_recommended_config_warms_up_and_caps_streaks(pipe):
    preset = recommended_klein_cache_config(distilled=False)
    assert preset == DBCacheConfig(
        Fn=1, Bn=0, residual_diff_threshold=0.12, max_warmup_steps=8, max_continuous_cached_steps=3
    )
    # the preset's guards, with a threshold every test passes: 8 warm-up steps, then at most 3 reused in a row
    pipe.cache_config = dataclasses.replace(preset, residual_diff_threshold=1e6)
    pipe(**call_kwargs(steps=16))
    for branch in ("cond", "uncond"):
        assert pipe.cache_stats.branches[branch].reused_steps == [8, 9, 10, 12, 13, 14]


# -- the KV-cache variant --------------------------------------------------------------------------------------------------
REFERENCE = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))


def kv_pair():
    pipes = []
    for cls in (Flux2KleinKVPipeline, CachedFlux2KleinKVPipeline):
        p = build_tiny_flux2_klein_pipeline(seed=0, pipeline_class=cls, distilled=True)
        p.set_progress_bar_config(disable=True)
        pipes.append(p)
    return pipes


def record_kv(transformer):
    """The reference K/V of the first double block, per call: what "extract" stored and what "cached" calls read."""
    seen = []

    def hook(module, args, kw, out):
        if kw.get("kv_cache_mode") == "extract":
            cache = out[1]
        else:
            cache = kw.get("kv_cache")
        seen.append(None if cache is None else cache.get_double(0).k_ref.clone())

    return seen, transformer.register_forward_hook(hook, with_kwargs=True)


def test_kv_pipeline_caches_without_corrupting_the_reference_kv_cache():
    stock, cached = kv_pair()

    def kwargs(seed=0):
        out = call_kwargs(steps=4, image=REFERENCE, seed=seed)
        del out["guidance_scale"]  # the KV pipeline has no CFG and no such argument
        return out

    stock_kv, handle = record_kv(stock.transformer)
    expected = stock(**kwargs()).images
    handle.remove()
    assert cached.transformer.transformer_blocks[0].attn.processor.__class__.__name__ == "Flux2KVAttnProcessor"
    cached.cache_config = None
    assert torch.equal(cached(**kwargs()).images, expected)
    cached.cache_config = DBCacheConfig(Fn=1, residual_diff_threshold=0.0, max_warmup_steps=0)
    assert torch.equal(cached(**kwargs()).images, expected)

    cached.cache_config = DBCacheConfig(Fn=1, residual_diff_threshold=1e6, max_warmup_steps=0)
    seen, handle = record_kv(cached.transformer)
    got = cached(**kwargs()).images
    handle.remove()
    records = cached.cache_stats.branches["cond"].records
    assert list(cached.cache_stats.branches) == ["cond"]
    # step 0 extracts (always computed); step 1 cannot reuse step 0's residual (it spans the reference tokens)
    assert [r.reason for r in records] == ["first-step", "no-residual", "below-threshold", "last-step"]
    # the K/V extracted at step 0 is the stock run's and every later call reads it unchanged
    assert len(seen) == 4 and all(torch.equal(k, stock_kv[0]) for k in seen)
    assert 0 < (got - expected).abs().mean() < 0.5 * (expected - cached(**kwargs(seed=1)).images).abs().mean()


def test_kv_pipeline_from_a_stock_directory_and_without_reference_image(tmp_path):
    stock = Flux2KleinKVPipeline(**build_tiny_flux2_klein_components(seed=0, distilled=True))
    stock.save_pretrained(tmp_path / "kv")
    cached = CachedFlux2KleinKVPipeline.from_pretrained(tmp_path / "kv", cache_config="fbcache")
    assert type(cached.transformer) is CachedFlux2Transformer2DModel
    assert _pipeline_class_for(str(tmp_path / "kv")) is CachedFlux2KleinKVPipeline
    cached.set_progress_bar_config(disable=True)
    cached.cache_config = TeaCacheConfig(rel_l1_thresh=1e6, coefficients=COEFFICIENTS)
    kwargs = call_kwargs(steps=4)
    del kwargs["guidance_scale"]
    cached(**kwargs)
    assert cached.cache_stats.branches["cond"].reused_steps == [1, 2]


# -- the tiny builder and its tokenizer -------------------------------------------------------------------------------------
def test_shipped_qwen3_tokenizer_matches_its_writer_and_renders_qwen3_prompts(tmp_path):
    write_tiny_qwen3_tokenizer(tmp_path)
    shipped = sorted(p.name for p in QWEN3_TOKENIZER_DIR.iterdir())
    assert shipped == sorted(p.name for p in tmp_path.iterdir())
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (QWEN3_TOKENIZER_DIR / name).read_bytes(), name
    tokenizer = load_tiny_qwen3_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a red cat"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == "<|im_start|>user\na red cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    assert tokens[:6] == ["<|im_start|>", "user", "Ċ", "a", "Ġred", "Ġcat"] and "<think>" in tokens


def test_tiny_builder_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = build_tiny_flux2_klein_components(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_tiny_flux2_klein_components(seed=0)
    c = build_tiny_flux2_klein_components(seed=1)
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb, sc = a[name].state_dict(), b[name].state_dict(), c[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].numel() > 1)
    assert a["is_distilled"] is False and build_tiny_flux2_klein_components(distilled=True)["is_distilled"] is True


def test_tiny_pipeline_generates_its_default_size(pipe):
    pipe.cache_config = None
    image = pipe(prompt=DEFAULT_PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (256, 256)
