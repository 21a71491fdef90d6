"""CachedQwenImageTransformer2DModel against diffusers' QwenImageTransformer2DModel on the same weights."""

import pytest
import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

from cached_diffusers import CachedQwenImageTransformer2DModel, TeaCacheConfig

CONFIG = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=4,
    attention_head_dim=16,
    num_attention_heads=3,
    joint_attention_dim=16,
    axes_dims_rope=(8, 4, 4),
)


def make_pair(**overrides):
    torch.manual_seed(0)
    base = QwenImageTransformer2DModel(**{**CONFIG, **overrides}).eval()
    cached = CachedQwenImageTransformer2DModel(**{**CONFIG, **overrides}).eval()
    cached.load_state_dict(base.state_dict())
    return base, cached


def inputs(step=0, num_steps=4, text_len=7, seed=0, img_shapes=None):
    g = torch.Generator().manual_seed(seed)
    img_shapes = img_shapes or [[(1, 4, 4)]]
    tokens = sum(f * h * w for f, h, w in img_shapes[0])
    noise = torch.randn(1, tokens, 16, generator=g)
    data = torch.randn(1, tokens, 16, generator=g)
    sigma = 1.0 - step / num_steps
    return dict(
        hidden_states=sigma * noise + (1 - sigma) * data,
        encoder_hidden_states=torch.randn(1, text_len, 16, generator=g),
        encoder_hidden_states_mask=torch.ones(1, text_len, dtype=torch.long),
        timestep=torch.tensor([sigma]),
        img_shapes=img_shapes,
        return_dict=False,
    )


@torch.no_grad()
def test_caching_off_is_bit_identical_to_parent():
    base, cached = make_pair()
    assert cached.cache_config is None
    for step in range(3):
        a = base(**inputs(step))[0]
        b = cached(**inputs(step))[0]
        assert torch.equal(a, b)
    out = cached(**{**inputs(), "return_dict": True})
    assert torch.equal(out.sample, base(**inputs())[0])


@pytest.mark.parametrize("overrides, extra", [({}, {}), ({"zero_cond_t": True}, {"img_shapes": [[(1, 4, 4), (1, 2, 2)]]})])
@torch.no_grad()
def test_never_reusing_config_is_bit_identical_to_parent(overrides, extra):
    base, cached = make_pair(**overrides)
    cached.cache_config = TeaCacheConfig(rel_l1_thresh=1e-12)
    controlnet = [torch.randn(1, 16 + (4 if extra else 0), 48) * 0.1 for _ in range(2)]
    for step in range(4):
        for branch, text_len in (("cond", 7), ("uncond", 3)):
            kwargs = inputs(step, text_len=text_len, **extra)
            kwargs["controlnet_block_samples"] = controlnet
            with cached.cache_context(branch, step_index=step, num_inference_steps=4):
                b = cached(**kwargs)[0]
            assert torch.equal(base(**kwargs)[0], b)
    for branch in ("cond", "uncond"):
        assert cached.cache_stats.branches[branch].reused_steps == []
        assert cached.cache_stats.branches[branch].computed_steps == [0, 1, 2, 3]


@torch.no_grad()
def test_reused_step_adds_the_stored_residual_through_the_head():
    base, cached = make_pair()
    cached.cache_config = TeaCacheConfig(rel_l1_thresh=1e6)
    with cached.cache_context("cond", step_index=0, num_inference_steps=4):
        cached(**inputs(0))
    stored = cached.cache_engine._branches["cond"].store.residuals
    first = inputs(0)
    hidden_in = base.img_in(first["hidden_states"])
    text_in = base.txt_in(base.txt_norm(first["encoder_hidden_states"]))
    # the stored residual is the whole stack's output minus its input, both streams
    h, e = hidden_in, text_in
    temb = base.time_text_embed(first["timestep"], hidden_in)
    rope = base.pos_embed(first["img_shapes"], max_txt_seq_len=7, device=h.device)
    for block in base.transformer_blocks:
        e, h = block(h, e, None, temb, rope)
    assert torch.allclose(stored[0], h - hidden_in, atol=1e-6)
    assert torch.allclose(stored[1], e - text_in, atol=1e-6)

    second = inputs(1)
    with cached.cache_context("cond", step_index=1, num_inference_steps=4):
        reused = cached(**second)[0]
    assert cached.cache_stats.branches["cond"].reused_steps == [1]
    hidden_in = base.img_in(second["hidden_states"])
    temb = base.time_text_embed(second["timestep"], hidden_in)
    expected = base.proj_out(base.norm_out(hidden_in + stored[0], temb))
    assert torch.equal(reused, expected)
    no_op = base.proj_out(base.norm_out(hidden_in, temb))
    assert not torch.allclose(reused, no_op, atol=1e-3)  # a reused step is never a no-op


@torch.no_grad()
def test_caching_needs_the_step():
    _, cached = make_pair()
    cached.cache_config = TeaCacheConfig()
    with pytest.raises(ValueError, match=r"caching needs the denoising step"):
        cached(**inputs())


def test_from_base_swaps_class_in_place_and_refuses_other_models():
    base, _ = make_pair()
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    same = CachedQwenImageTransformer2DModel.from_base(base)
    assert same is base and isinstance(base, CachedQwenImageTransformer2DModel)
    assert all(torch.equal(weights[k], v) for k, v in base.state_dict().items())
    assert CachedQwenImageTransformer2DModel.from_base(base) is base
    other = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    )
    with pytest.raises(TypeError, match=r"expects a QwenImageTransformer2DModel, got FluxTransformer2DModel"):
        CachedQwenImageTransformer2DModel.from_base(other)


def test_published_coefficients_are_the_default():
    _, cached = make_pair()
    cached.cache_config = TeaCacheConfig(0.2)
    assert cached.cache_engine._policy.coefficients == (-450.0, 280.0, -45.0, 3.2, -0.02)
