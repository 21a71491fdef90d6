"""CachedFlux2Transformer2DModel against diffusers' Flux2Transformer2DModel on the same weights."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import Flux2Transformer2DModel, QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

from cached_diffusers import (
    CachedFlux2Transformer2DModel,
    DBCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    SeaCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from cached_diffusers.policies import relative_l1
from cached_diffusers.tools.tiny import FLUX2_KLEIN_TEMB_GAIN

IDENTITY = (0.0, 0.0, 0.0, 1.0, 0.0)  # f(x) = x
NUM_DOUBLE, NUM_SINGLE = 2, 4
CONFIG = dict(
    patch_size=1,
    in_channels=8,
    num_layers=NUM_DOUBLE,
    num_single_layers=NUM_SINGLE,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=16,
    axes_dims_rope=(4, 4, 4, 4),
    guidance_embeds=False,
)


def make_pair(kv_processors=False):
    torch.manual_seed(0)
    base = Flux2Transformer2DModel(**CONFIG).eval()
    with torch.no_grad():  # O(1) modulations, as in the tiny pipeline (see cached_diffusers.tools.tiny.FLUX2_KLEIN_TEMB_GAIN)
        base.time_guidance_embed.timestep_embedder.linear_2.weight.mul_(FLUX2_KLEIN_TEMB_GAIN)
    cached = CachedFlux2Transformer2DModel(**CONFIG).eval()
    cached.load_state_dict(base.state_dict())
    if kv_processors:
        for model in (base, cached):
            for block in model.transformer_blocks:
                block.attn.set_processor(Flux2KVAttnProcessor())
            for block in model.single_transformer_blocks:
                block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return base, cached


def grid_ids(height, width, t=0):
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(height), torch.arange(width), torch.arange(1))


def inputs(step=0, num_steps=4, text_len=7, seed=0, batch=1, ref_tokens=0):
    """Transformer kwargs at ``step``: 4x4 image tokens (plus ``ref_tokens`` reference tokens in front)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 16, 8, generator=g)
    data = torch.randn(batch, 16, 8, generator=g)
    text = torch.randn(batch, text_len, 16, generator=g)
    sigma = 1.0 - step / num_steps
    hidden = sigma * noise + (1 - sigma) * data
    img_ids = grid_ids(4, 4)
    if ref_tokens:
        hidden = torch.cat([torch.randn(batch, ref_tokens, 8, generator=torch.Generator().manual_seed(99)), hidden], 1)
        img_ids = torch.cat([grid_ids(2, ref_tokens // 2, t=10), img_ids], 0)
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_len))
    return dict(
        hidden_states=hidden,
        encoder_hidden_states=text,
        timestep=torch.full((batch,), sigma),
        img_ids=img_ids.unsqueeze(0).expand(batch, -1, -1),
        txt_ids=txt_ids.unsqueeze(0).expand(batch, -1, -1),
        guidance=None,
        return_dict=False,
    )


@torch.no_grad()
def test_caching_off_is_bit_identical_to_parent():
    base, cached = make_pair()
    assert cached.cache_config is None
    assert cached.num_cache_blocks == NUM_DOUBLE + NUM_SINGLE
    for step in range(3):
        assert torch.equal(base(**inputs(step))[0], cached(**inputs(step))[0])
    out = cached(**{**inputs(), "return_dict": True})
    assert torch.equal(out.sample, base(**inputs())[0])


NEVER_REUSING = [
    TeaCacheConfig(rel_l1_thresh=1e-12, coefficients=IDENTITY),
    DBCacheConfig(Fn=1, Bn=1, residual_diff_threshold=0.0, max_warmup_steps=0),  # spans: double | double+singles | single
    DBCacheConfig(Fn=2, Bn=0, residual_diff_threshold=0.0, max_warmup_steps=0),  # boundary between the two stacks
    DBCacheConfig(Fn=3, Bn=2, residual_diff_threshold=0.0, max_warmup_steps=0),  # boundaries inside the single stack
    TaylorSeerConfig(interval=1, max_warmup_steps=0),
    SeaCacheConfig(threshold=0.0),
]


@pytest.mark.parametrize("config", NEVER_REUSING, ids=lambda c: f"{c.method}-F{getattr(c, 'Fn', 0)}B{getattr(c, 'Bn', 0)}")
@torch.no_grad()
def test_never_reusing_config_is_bit_identical_to_parent(config):
    base, cached = make_pair()
    cached.cache_config = config
    for step in range(4):
        for branch, text_len in (("cond", 7), ("uncond", 3)):
            kwargs = inputs(step, text_len=text_len, batch=2)
            with cached.cache_context(branch, step_index=step, num_inference_steps=4):
                got = cached(**kwargs)[0]
            assert torch.equal(base(**kwargs)[0], got)
    for branch in ("cond", "uncond"):
        assert cached.cache_stats.branches[branch].computed_steps == [0, 1, 2, 3]


@torch.no_grad()
def test_kv_cache_modes_are_bit_identical_when_never_reusing():
    """Flux2KleinKVPipeline's modes: "extract" (reference tokens in front, K/V stored) at step 0, "cached" after."""
    base, cached = make_pair(kv_processors=True)
    cached.cache_config = DBCacheConfig(Fn=3, Bn=1, residual_diff_threshold=0.0, max_warmup_steps=0)
    first = dict(inputs(0, ref_tokens=4), kv_cache_mode="extract", num_ref_tokens=4, ref_fixed_timestep=0.0)
    expected, base_kv = base(**first)
    with cached.cache_context("cond", step_index=0, num_inference_steps=3):
        got, kv = cached(**first)
    assert torch.equal(expected, got) and got.shape[1] == 16
    assert kv.num_ref_tokens == 4
    for a, b in zip(base_kv.double_block_caches + base_kv.single_block_caches, kv.double_block_caches + kv.single_block_caches):
        assert torch.equal(a.k_ref, b.k_ref) and torch.equal(a.v_ref, b.v_ref)
    for step in (1, 2):
        later = dict(inputs(step, num_steps=3), kv_cache=kv, kv_cache_mode="cached")
        with cached.cache_context("cond", step_index=step, num_inference_steps=3):
            got = cached(**later)[0]
        assert torch.equal(base(**{**later, "kv_cache": base_kv})[0], got)
    # step 0's residual spans the reference tokens too, so step 1 cannot reuse it
    assert [r.reason for r in cached.cache_stats.branches["cond"].records] == ["first-step", "no-residual", "last-step"]


@torch.no_grad()
def test_extract_mode_is_refused_after_step_0():
    _, cached = make_pair(kv_processors=True)
    cached.cache_config = TeaCacheConfig(rel_l1_thresh=1e6, coefficients=IDENTITY)
    kwargs = dict(inputs(0, ref_tokens=4), kv_cache_mode="extract", num_ref_tokens=4)
    with cached.cache_context("cond", step_index=1, num_inference_steps=3):
        with pytest.raises(ValueError, match=r"kv_cache_mode='extract'.*only at denoising step 0"):
            cached(**kwargs)


def whole_stack(model, kwargs):
    """The parent's block loops run by hand: (x_embedder output, context_embedder output, stack image and text out)."""
    temb = model.time_guidance_embed(kwargs["timestep"] * 1000, None)
    mod_img, mod_txt = model.double_stream_modulation_img(temb), model.double_stream_modulation_txt(temb)
    mod_single = model.single_stream_modulation(temb)
    h = model.x_embedder(kwargs["hidden_states"])
    e = model.context_embedder(kwargs["encoder_hidden_states"])
    img_rope, txt_rope = model.pos_embed(kwargs["img_ids"][0]), model.pos_embed(kwargs["txt_ids"][0])
    rope = tuple(torch.cat([t, i], dim=0) for t, i in zip(txt_rope, img_rope))
    h_in, e_in = h, e
    for block in model.transformer_blocks:
        e, h = block(h, e, mod_img, mod_txt, rope)
    joint = torch.cat([e, h], dim=1)
    for block in model.single_transformer_blocks:
        joint = block(joint, None, mod_single, rope)
    n = e.shape[1]
    return h_in, e_in, joint[:, n:], joint[:, :n], temb


@torch.no_grad()
def test_reused_step_adds_the_stored_residual_through_the_head():
    base, cached = make_pair()
    cached.cache_config = TeaCacheConfig(rel_l1_thresh=1e6, coefficients=IDENTITY)
    with cached.cache_context("cond", step_index=0, num_inference_steps=4):
        cached(**inputs(0))
    stored = cached.cache_engine._branches["cond"].store.residuals
    h_in, e_in, h_out, e_out, _ = whole_stack(base, inputs(0))
    # the stored residual is the image tokens after the single-stream stack minus the x_embedder output (and text)
    assert stored[0].shape == h_in.shape and stored[1].shape == e_in.shape
    assert torch.allclose(stored[0], h_out - h_in, atol=1e-5)
    assert torch.allclose(stored[1], e_out - e_in, atol=1e-5)

    second = inputs(1)
    with cached.cache_context("cond", step_index=1, num_inference_steps=4):
        reused = cached(**second)[0]
    assert cached.cache_stats.branches["cond"].reused_steps == [1]
    h_in, _, _, _, temb = whole_stack(base, second)
    expected = base.proj_out(base.norm_out(h_in + stored[0], temb))
    assert torch.equal(reused, expected)
    no_op = base.proj_out(base.norm_out(h_in, temb))  # what a skip that drops the residual would give
    assert (reused - no_op).abs().mean() > 0.3 * no_op.abs().mean()


@torch.no_grad()
def test_teacache_signal_is_block_0_modulated_image_input():
    _, cached = make_pair()
    cached.cache_config = TeaCacheConfig(rel_l1_thresh=1e6, coefficients=IDENTITY)
    signals = []
    for step in range(2):
        kwargs = inputs(step)
        # plain ops: temb -> SiLU -> Linear, first (shift, scale) of 6 chunks, LayerNorm without affine (eps 1e-6)
        temb = cached.time_guidance_embed(kwargs["timestep"] * 1000, None)
        shift, scale = F.linear(F.silu(temb), cached.double_stream_modulation_img.linear.weight).chunk(6, dim=-1)[:2]
        h = F.linear(kwargs["hidden_states"], cached.x_embedder.weight)
        signals.append(F.layer_norm(h, (h.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
        with cached.cache_context("cond", step_index=step, num_inference_steps=4):
            cached(**kwargs)
    expected = relative_l1(signals[1], signals[0])
    assert cached.cache_stats.branches["cond"].values[1] == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_dbcache_counts_blocks_in_execution_order():
    """Fn=3, Bn=2 on 2 double + 4 single blocks: a reused step runs double 0, 1, single 0 and singles 2, 3."""
    _, cached = make_pair()
    cached.cache_config = DBCacheConfig(Fn=3, Bn=2, residual_diff_threshold=1e6, max_warmup_steps=0)
    blocks = list(cached.transformer_blocks) + list(cached.single_transformer_blocks)
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    probes = []
    handles.append(blocks[0].register_forward_pre_hook(lambda m, a, kw: probes.append([kw["hidden_states"]]), with_kwargs=True))
    # the probe is the image part of single block 0's output (joint [text; image]) minus the stack's image input
    handles.append(blocks[2].register_forward_hook(lambda m, a, o: probes[-1].append(o[:, 7:])))
    try:
        for step in range(3):
            ran.clear()
            with cached.cache_context("cond", step_index=step, num_inference_steps=3):
                cached(**inputs(step, num_steps=3, text_len=7))
            if step == 1:
                assert ran == [0, 1, 2, 4, 5]
    finally:
        for h in handles:
            h.remove()
    stats = cached.cache_stats.branches["cond"]
    assert stats.reused_steps == [1] and [r.blocks_computed for r in stats.records] == [6, 5, 6]
    front = [out - x for x, out in probes]
    assert stats.values[1] == pytest.approx(relative_l1(front[1], front[0]), rel=1e-5)


@torch.no_grad()
def test_caching_needs_the_step():
    _, cached = make_pair()
    cached.cache_config = FirstBlockCacheConfig()
    with pytest.raises(ValueError, match=r"caching needs the denoising step"):
        cached(**inputs())


@pytest.mark.parametrize(
    "value, method",
    [
        (TeaCacheConfig(), "TeaCache"),
        ("teacache", "TeaCache"),
        ({"method": "magcache"}, "MagCache"),
        (MagCacheConfig(), "MagCache"),
    ],
)
def test_no_klein_coefficients_or_ratios_is_an_error_that_says_how_to_calibrate(value, method):
    _, cached = make_pair()
    cached.cache_config = "fbcache"
    with pytest.raises(ValueError) as error:
        cached.cache_config = value
    message = str(error.value)
    assert f"no {method} {'coefficients' if method == 'TeaCache' else 'ratios'} are known for CachedFlux2" in message
    assert "MagCacheConfig(calibrate=True)" in message and "MagCacheConfig.from_calibration(pipe.cache_stats)" in message
    assert "cached-diffusers calibrate --model <dir> --method teacache" in message and "FLUX.1" in message
    assert "TeaCacheConfig.from_calibration(pipe.cache_stats)" in message
    assert cached.cache_config == FirstBlockCacheConfig()  # unchanged
    # other errors are not rewritten
    with pytest.raises(ValueError, match=r"rel_l1_thresh must be a finite number > 0") as other:
        cached.cache_config = {"method": "teacache", "rel_l1_thresh": -1}
    assert "calibrate" not in str(other.value)


def test_explicit_coefficients_ratios_and_calibration_are_accepted():
    _, cached = make_pair()
    cached.cache_config = TeaCacheConfig(coefficients=IDENTITY)
    cached.cache_config = MagCacheConfig(mag_ratios=[1.0, 0.9, 1.1])
    cached.cache_config = MagCacheConfig(calibrate=True)
    cached.cache_config = TeaCacheConfig(calibrate=True)
    assert cached.cache_engine.spec.teacache_coefficients is None and cached.cache_engine.spec.mag_ratios is None


def test_from_base_swaps_class_in_place_and_refuses_other_models():
    base, _ = make_pair()
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    assert CachedFlux2Transformer2DModel.from_base(base) is base
    assert type(base) is CachedFlux2Transformer2DModel
    assert all(torch.equal(weights[k], v) for k, v in base.state_dict().items())
    other = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=1,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    )
    with pytest.raises(TypeError, match=r"expects a Flux2Transformer2DModel, got QwenImageTransformer2DModel"):
        CachedFlux2Transformer2DModel.from_base(other)
