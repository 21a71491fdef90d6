"""BagelTransformer2DModel / CachedBagelTransformer2DModel: the official layout, full-size key lists, step-0 parity
taps against the official implementation's vectors (tests/data/reference/bagel-tiny), and the cached forward."""

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from cached_diffusers import (
    BAGEL_TEACACHE_COEFFICIENTS,
    BagelTransformer2DModel,
    CachedBagelTransformer2DModel,
    DBCacheConfig,
    MagCacheConfig,
    TeaCacheConfig,
)
from cached_diffusers.models.bagel import (
    BAGEL_SKIPPED_PREFIXES,
    bagel_config_from_official,
    diffusers_to_official_key,
    load_official_transformer,
    official_to_diffusers_key,
)
from cached_diffusers.pipelines.bagel import BAGEL_AE_DEFAULTS, make_bagel_vae
from reference import reference_dir

TOL = dict(atol=1e-4, rtol=1e-4)  # the reference README's float32 tolerances


@pytest.fixture(scope="module")
def ref():
    root = reference_dir("bagel-tiny")
    return {
        "root": root,
        "ckpt": root / "checkpoint",
        "expected": load_file(root / "expected.safetensors"),
        "noise": load_file(root / "initial_noise.safetensors"),
        "inputs": json.loads((root / "inputs.json").read_text()),
    }


@pytest.fixture(scope="module")
def loaded(ref):
    model, info = load_official_transformer(ref["ckpt"], vision_start_token_id=309, vision_end_token_id=310)
    return model, info


def report(name, ours, theirs):
    diff = (ours.float() - theirs.float()).abs().max().item()
    print(f"{name}: max abs diff {diff:.3g}")
    return diff


def test_official_tiny_checkpoint_loads_with_zero_missing_and_unexpected_keys(ref, loaded):
    model, info = loaded
    assert info["missing"] == [] and info["unexpected"] == []
    with safe_open(ref["ckpt"] / "ema.safetensors", framework="pt") as handle:
        keys = list(handle.keys())
        skipped = sorted(k for k in keys if k.startswith(BAGEL_SKIPPED_PREFIXES))
        assert sorted(info["skipped"]) == skipped
        assert "language_model.lm_head.weight" in skipped and "vit_pos_embed.pos_embed" in skipped
        assert any(k.startswith("vit_model.") for k in skipped) and any(k.startswith("connector.") for k in skipped)
        state = model.state_dict()
        assert len(state) == len(keys) - len(skipped)
        for key in keys:
            ours = official_to_diffusers_key(key)
            if ours is None:
                continue
            assert diffusers_to_official_key(ours) == key
            assert torch.equal(state[ours], handle.get_tensor(key).float()), key
    # max_latent_size is stored nowhere: inferred from the position table's rows (the loader constant is 64)
    assert model.config.max_latent_size == ref["inputs"]["loader"]["max_latent_size"]
    assert model.config.latent_patch_size == ref["inputs"]["loader"]["latent_patch_size"]


def test_full_size_model_on_meta_matches_the_official_key_list():
    keys = json.loads((reference_dir("keys") / "bagel_ema_keys.json").read_text())
    llm_config = dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, hidden_act="silu",
    )  # fmt: skip
    config = bagel_config_from_official(llm_config, keys["latent_pos_embed.pos_embed"][0])
    assert config["max_latent_size"] == 64
    with init_empty_weights():
        model = BagelTransformer2DModel(**config)
    ours = {diffusers_to_official_key(k): list(v.shape) for k, v in model.state_dict().items()}
    used = {k: v for k, v in keys.items() if not k.startswith(BAGEL_SKIPPED_PREFIXES)}
    skipped = sorted(set(keys) - set(used))
    assert ours == used
    assert len(keys) == 1223 and len(skipped) == len(keys) - len(ours)
    assert sum(torch.Size(s).numel() for s in used.values()) == sum(p.numel() for p in model.parameters())


def test_full_size_autoencoder_matches_the_official_key_list():
    keys = json.loads((reference_dir("keys") / "bagel_ae_keys.json").read_text())
    with init_empty_weights():
        vae = make_bagel_vae(BAGEL_AE_DEFAULTS)
    official = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    converted = convert_ldm_vae_checkpoint(official, vae.config)
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert set(converted) == set(ours)
    for key, value in converted.items():
        assert tuple(value.shape) == ours[key], key
    assert len(keys) == 244


def test_latent_position_table_init_equals_the_checkpoint_table(ref, loaded):
    model, _ = loaded
    fresh = BagelTransformer2DModel(**{**model.config, "num_hidden_layers": 1})
    table = fresh.latent_pos_embed.pos_embed
    assert not model.latent_pos_embed.pos_embed.requires_grad
    # the file holds the same sin-cos table rounded to bfloat16
    torch.testing.assert_close(table.to(torch.bfloat16).float(), model.latent_pos_embed.pos_embed, atol=0, rtol=0)
    grid = ref["inputs"]["derived"]["token_grid_hw"]
    assert torch.equal(model.latent_position_ids(*grid), ref["expected"]["latent_pos_ids"])


def test_step0_taps_match_the_official_implementation(ref, loaded):
    model, _ = loaded
    expected, noise = ref["expected"], ref["noise"]
    ids = expected["prompt_input_ids"][None]
    grid = tuple(ref["inputs"]["derived"]["token_grid_hw"])
    with torch.no_grad():
        caches = {"gen": model.prefill(ids), "cfg_text": model.prefill(ids[:, :0]), "cfg_img": model.prefill(ids)}
        lengths = torch.stack([caches[b].lengths[0] for b in ("gen", "cfg_text", "cfg_img")])
        assert torch.equal(lengths, expected["kv_cache_lens"])
        for branch in ("gen", "cfg_text", "cfg_img"):
            # every query token sits at RoPE position L of its branch
            assert torch.equal(caches[branch].lengths.expand(26), expected[f"{branch}_query_rope_position_ids"])
        t = expected["timesteps"][0]
        v, hidden, inputs = model(noise["noise_tokens"][None], t, caches["gen"], grid, output_hidden_states=True)
        assert report("step0_gen_llm_input", inputs[0], expected["step0_gen_llm_input"]) < 1e-4
        assert report("step0_gen_llm_output", hidden[0], expected["step0_gen_llm_output"]) < 1e-4
        assert report("v_gen[0]", v[0], expected["v_gen"][0]) < 1e-4
        v_text, hidden_text, _ = model(noise["noise_tokens"][None], t, caches["cfg_text"], grid, output_hidden_states=True)
        assert report("step0_cfg_text_llm_output", hidden_text[0], expected["step0_cfg_text_llm_output"]) < 1e-4
        assert report("v_cfg_text[0]", v_text[0], expected["v_cfg_text"][0]) < 1e-4
        # the markers in the packed query are <|vision_start|> and <|vision_end|>
        markers = model.embed_tokens(expected["query_text_ids"])
        assert torch.equal(inputs[0, expected["query_text_indexes"]], markers)


def test_padded_batch_equals_each_prompt_alone(loaded):
    model, _ = loaded
    torch.manual_seed(0)
    short, long = torch.randint(0, 300, (5,)), torch.randint(0, 300, (9,))
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0, :5], ids[1] = short, long
    mask = torch.zeros(2, 9, dtype=torch.long)
    mask[0, :5], mask[1] = 1, 1
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        batched = model(x, torch.tensor([0.7, 0.3]), model.prefill(ids, mask), (2, 3)).sample
        alone0 = model(x[:1], torch.tensor(0.7), model.prefill(short[None]), (2, 3)).sample
        alone1 = model(x[1:], torch.tensor(0.3), model.prefill(long[None]), (2, 3)).sample
    torch.testing.assert_close(batched, torch.cat([alone0, alone1]), atol=1e-5, rtol=1e-5)


def cached_copy(model):
    cached = CachedBagelTransformer2DModel(**model.config)
    cached.load_state_dict(model.state_dict())
    return cached.eval()


def run_steps(model, ids, x, steps=4, branch="gen"):
    outs = []
    with torch.no_grad():
        cache = model.prefill(ids)
        for i in range(steps):
            t = torch.tensor(1.0 - i / steps)
            if isinstance(model, CachedBagelTransformer2DModel):
                with model.cache_context(branch, step_index=i, num_inference_steps=steps):
                    outs.append(model(x, t, cache, (2, 3)).sample)
            else:
                outs.append(model(x, t, cache, (2, 3)).sample)
            x = x - 0.2 * outs[-1]
    return outs, cache


@pytest.mark.parametrize(
    "config",
    [None, TeaCacheConfig(rel_l1_thresh=1e-9), DBCacheConfig(Fn=1, Bn=0, residual_diff_threshold=0.0, max_warmup_steps=0)],
)
def test_caching_off_and_never_reusing_are_bit_identical_to_the_base_model(loaded, config):
    model, _ = loaded
    cached = cached_copy(model)
    cached.cache_config = config
    ids = torch.tensor([[301, 64, 266, 302]])
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(1))
    base, _ = run_steps(model, ids, x)
    ours, _ = run_steps(cached, ids, x)
    for a, b in zip(base, ours):
        assert torch.equal(a, b)
    if config is not None:
        assert cached.cache_stats.branches["gen"].reused_steps == []


def test_reused_steps_leave_the_kv_cache_untouched_and_add_the_stored_residual(loaded):
    model, _ = loaded
    cached = cached_copy(model)
    cached.cache_config = TeaCacheConfig(rel_l1_thresh=1e9, compute_last_step=False)  # reuse every step after 0
    ids = torch.tensor([[301, 64, 266, 302]])
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = cached.prefill(ids)
    before = [k.clone() for k in cache.keys] + [v.clone() for v in cache.values]
    engine, calls, run = cached.cache_engine, [], cached.cache_engine.run

    def recording(stack, streams):
        out = run(stack, streams)
        calls.append((streams, out))
        return out

    engine.run = recording
    try:
        with torch.no_grad():
            for i in range(3):
                with cached.cache_context("gen", step_index=i, num_inference_steps=3):
                    cached(x * (1 - 0.1 * i), torch.tensor(1.0 - 0.3 * i), cache, (2, 3))
    finally:
        del engine.run
    assert cached.cache_stats.branches["gen"].reused_steps == [1, 2]
    for old, new in zip(before, cache.keys + cache.values):
        assert torch.equal(old, new)
    residual = tuple(o - s for o, s in zip(calls[0][1], calls[0][0]))
    for streams, out in calls[1:]:
        for s, o, r in zip(streams, out, residual):
            assert torch.equal(o, s + r)


def test_teacache_uses_the_published_bagel_coefficients_and_magcache_asks_for_calibration(loaded):
    model, _ = loaded
    cached = cached_copy(model)
    cached.cache_config = TeaCacheConfig()
    assert cached.cache_engine._policy.coefficients == BAGEL_TEACACHE_COEFFICIENTS
    with pytest.raises(ValueError, match="No MagCache ratios are published for BAGEL"):
        cached.cache_config = MagCacheConfig()
    cached.cache_config = MagCacheConfig(mag_ratios=[1.0, 0.99, 0.98])
    cached.cache_config = MagCacheConfig(calibrate=True)
    with pytest.raises(ValueError, match="Fn"):
        cached.cache_config = DBCacheConfig(Fn=2, Bn=0)  # the tiny model has 2 layers: nothing left to cache


def test_bad_inputs_raise_errors_naming_the_field(loaded):
    model, _ = loaded
    cache = model.prefill(torch.tensor([[301, 302]]))
    with pytest.raises(ValueError, match="latent token grid"):
        model(torch.randn(1, 65 * 2, 64), torch.tensor(0.5), cache, (65, 2))
    with pytest.raises(ValueError, match="hidden_states must be packed"):
        model(torch.randn(1, 6, 32), torch.tensor(0.5), cache, (2, 3))
    with pytest.raises(ValueError, match="kv_cache holds"):
        model(torch.randn(2, 6, 64), torch.tensor(0.5), cache, (2, 3))
    with pytest.raises(ValueError, match="right-padded"):
        model.prefill(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="not max_latent_size"):
        bagel_config_from_official({}, 4095)
    cached = cached_copy(model)
    cached.cache_config = TeaCacheConfig()
    with pytest.raises(ValueError, match="denoising step"):
        cached(torch.randn(1, 6, 64), torch.tensor(0.5), cache, (2, 3))
