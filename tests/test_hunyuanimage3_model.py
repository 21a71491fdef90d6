"""HunyuanImage-3.0 model pieces against the official implementation's tiny reference case, loading, key lists.

Reference vectors: ``tests/data/reference/hunyuanimage3-tiny`` (its README describes every tensor); full-size key list:
``tests/data/reference/keys/hunyuan3_keys.json``. Tolerances are the README's suggestions for float32.
"""

import json
import shutil

import pytest
import safetensors
import torch
from accelerate import init_empty_weights
from reference import reference_dir
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

import cached_diffusers.models.hunyuanimage3 as hy
from cached_diffusers.models.hunyuanimage3 import (
    HUNYUANIMAGE3_SKIPPED_KEY_PREFIXES,
    HunyuanImage3KVCache,
    HunyuanImage3Sequence,
    HunyuanImage3Transformer2DModel,
    official_transformer_config,
)
from cached_diffusers.models.hunyuanimage3_vae import AutoencoderKLHunyuanImage3
from cached_diffusers.pipelines.hunyuanimage3 import build_t2i_input_ids, resolution_buckets, snap_to_bucket

REF = reference_dir("hunyuanimage3-tiny")
CKPT = REF / "checkpoint"
ATOL = RTOL = 1e-4


def report(name, ours, theirs):
    diff = (ours.double() - theirs.double()).abs().max().item()
    print(f"{name}: max abs diff {diff:.3e}")
    return diff


@pytest.fixture(scope="module")
def expected():
    return load_file(REF / "expected.safetensors")


@pytest.fixture(scope="module")
def inputs():
    return json.loads((REF / "inputs.json").read_text())


@pytest.fixture(scope="module")
def transformer():
    return HunyuanImage3Transformer2DModel.from_pretrained(CKPT, dtype=torch.float32)


@pytest.fixture(scope="module")
def sequence(inputs):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(CKPT)
    config = json.loads((CKPT / "config.json").read_text())
    ratio, (h, w) = snap_to_bucket(inputs["height"], inputs["width"], config["image_base_size"])
    ids, start, ts = build_t2i_input_ids(tokenizer, [inputs["prompt"]], config["image_base_size"], ratio, (h // 16, w // 16), True)
    return HunyuanImage3Sequence.build(ids, start, (h // 16, w // 16), ts, config["attention_head_dim"], config["rope_theta"])


def test_sequence_ids_masks_positions_and_rope(sequence, expected):
    assert torch.equal(sequence.input_ids, expected["input_ids"])
    image_mask = torch.zeros_like(sequence.input_ids)
    image_mask[:, sequence.image_start : sequence.image_start + sequence.image_len] = 1
    assert torch.equal(image_mask, expected["image_mask"])
    assert (expected["timestep_token_index"] == sequence.timestep_index).all()
    full_mask = sequence.attention_mask[None, None].expand(2, 1, -1, -1).to(torch.uint8)
    assert torch.equal(full_mask, expected["attention_mask"])
    positions = hy.build_rope_positions(sequence.seq_len, sequence.image_start, sequence.grid)
    assert torch.equal(positions, expected["rope_positions_yx"])
    assert report("rope_cos", sequence.rope_cos, expected["rope_cos"][0]) <= 1e-6
    assert report("rope_sin", sequence.rope_sin, expected["rope_sin"][0]) <= 1e-6
    query = sequence.query_positions(full_sequence=False)
    assert torch.equal(query.expand(2, -1), expected["step1_position_ids"])
    assert torch.equal(sequence.input_ids[:, query], expected["step1_input_ids"])
    step1_mask = sequence.attention_mask[query][None, None].expand(2, 1, -1, -1).to(torch.uint8)
    assert torch.equal(step1_mask, expected["step1_attention_mask"])


def test_size_buckets():
    buckets = resolution_buckets(1024)
    assert len(buckets) == 33 and buckets[16] == (1024, 1024)
    assert buckets[0] == (512, 2048) and buckets[-1] == (2048, 512)
    assert snap_to_bucket(1024, 1024, 1024) == (16, (1024, 1024))
    assert snap_to_bucket(80, 48, 64) == (20, (80, 48))
    assert snap_to_bucket(1000, 1030, 1024)[1] == (1024, 1024)


def test_step0_embeddings_hidden_states_and_prediction(transformer, sequence, expected):
    noise = load_file(REF / "initial_noise.safetensors")["noise"]
    t = expected["timesteps"][0]
    cache = HunyuanImage3KVCache(2, sequence.seq_len)
    out = transformer(torch.cat([noise, noise]), t.expand(2), sequence, kv_cache=cache, output_hidden_states=True)
    assert report("step0_inputs_embeds", out.inputs_embeds, expected["step0_inputs_embeds"]) <= ATOL
    torch.testing.assert_close(out.last_hidden_state, expected["step0_last_hidden_state"], atol=ATOL, rtol=RTOL)
    report("step0_last_hidden_state", out.last_hidden_state, expected["step0_last_hidden_state"])
    pred_cond, pred_uncond = out.sample.chunk(2)
    torch.testing.assert_close(pred_cond, expected["pred_cond"][0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(pred_uncond, expected["pred_uncond"][0], atol=ATOL, rtol=RTOL)
    # step 1 from the cache (only timestep + image tokens fed) against the reference's step-1 predictions
    latents1 = expected["latents_per_step"][1]
    out1 = transformer(torch.cat([latents1, latents1]), expected["timesteps"][1].expand(2), sequence, kv_cache=cache,
                       full_sequence=False)
    torch.testing.assert_close(out1.sample[:1], expected["pred_cond"][1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out1.sample[1:], expected["pred_uncond"][1], atol=ATOL, rtol=RTOL)
    report("pred_cond[1] (cached step)", out1.sample[:1], expected["pred_cond"][1])
    # a cached step on identical inputs reproduces a full-sequence step
    fresh = transformer(torch.cat([latents1, latents1]), expected["timesteps"][1].expand(2), sequence)
    assert report("cached vs full-sequence step", out1.sample, fresh.sample) <= 1e-5


def test_kv_cache_needs_step0_and_rows_are_views(transformer, sequence):
    latents = torch.randn(2, 16, *sequence.grid)
    with pytest.raises(ValueError, match="full_sequence=False"):
        transformer(latents, torch.tensor(500.0), sequence, full_sequence=False)
    with pytest.raises(ValueError, match="filled by a full-sequence call"):
        transformer(latents, torch.tensor(500.0), sequence, kv_cache=HunyuanImage3KVCache(2, sequence.seq_len),
                    full_sequence=False)
    with pytest.raises(ValueError, match="latents must have shape"):
        transformer(latents[:, :, :2], torch.tensor(500.0), sequence)
    cache = HunyuanImage3KVCache(2, sequence.seq_len)
    transformer(latents, torch.tensor(900.0), sequence, kv_cache=cache)
    before = [k.clone() for k, _ in cache._storage.values()]
    one = transformer(latents[1:], torch.tensor(700.0), sequence.rows(slice(1, 2)), kv_cache=cache.rows(slice(1, 2)),
                      full_sequence=False)
    for (k, _), old in zip(cache._storage.values(), before):
        assert torch.equal(k[0], old[0])  # the other row's cache is untouched
        assert not torch.equal(k[1], old[1])
    both = transformer(latents, torch.tensor(700.0), sequence, kv_cache=cache, full_sequence=False)
    assert (one.sample - both.sample[1:]).abs().max() <= 1e-5


def test_vae_decoder(expected):
    vae = AutoencoderKLHunyuanImage3.from_official_checkpoint(CKPT, dtype=torch.float32)
    frames = vae.decode(expected["vae_decode_input"], return_all_frames=True).sample
    assert report("decoder_output_all_frames", frames, expected["decoder_output_all_frames"]) <= ATOL
    decoded = vae.decode(expected["vae_decode_input"]).sample[:, :, -1]
    assert report("decoded", decoded, expected["decoded"]) <= ATOL
    with pytest.raises(ValueError, match="z must have shape"):
        vae.decode(expected["vae_decode_input"][:, :8])


def test_loading_zero_missing_unexpected_and_skipped_list():
    model, info = HunyuanImage3Transformer2DModel.from_pretrained(CKPT, dtype=torch.bfloat16, output_loading_info=True)
    vae, vae_info = AutoencoderKLHunyuanImage3.from_official_checkpoint(CKPT, output_loading_info=True)
    index = json.loads((CKPT / "model.safetensors.index.json").read_text())["weight_map"]
    for i in (info, vae_info):
        assert i["missing_keys"] == [] and i["unexpected_keys"] == [] and i["mismatched_keys"] == []
    prefixes = set(HUNYUANIMAGE3_SKIPPED_KEY_PREFIXES)
    assert set(info["skipped_keys"]) == prefixes | {"other component"}
    assert set(info["skipped_keys"]["other component"]) == {k for k in index if k.startswith("vae.decoder.")}
    assert {k for keys in info["skipped_keys"].values() for k in keys} | set(model.state_dict()) == set(index)
    assert set(vae.state_dict()) == {k[len("vae."):] for k in index if k.startswith("vae.decoder.")}
    # every parameter equals the file; bf16 weights, float32 routers
    files = {}
    for name, param in model.state_dict().items():
        f = index[name]
        files.setdefault(f, load_file(CKPT / f))
        assert torch.equal(param, files[f][name].to(param.dtype)), name
        assert param.dtype == (torch.float32 if name.endswith("mlp.gate.wg.weight") else torch.bfloat16), name
    assert files[index["model.layers.0.mlp.gate.wg.weight"]]["model.layers.0.mlp.gate.wg.weight"].dtype == torch.float32


def test_loading_is_shard_by_shard(monkeypatch):
    """Each needed tensor is read once and placed before the next is read; skipped groups are never read."""
    events = []
    real_open = safetensors.safe_open

    class RecordingOpen:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            events.append(("read", key))
            return self.inner.get_tensor(key)

    import accelerate.utils

    real_set = accelerate.utils.set_module_tensor_to_device

    def recording_set(module, name, *args, **kwargs):
        events.append(("set", name))
        return real_set(module, name, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", RecordingOpen)
    monkeypatch.setattr(accelerate.utils, "set_module_tensor_to_device", recording_set)
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("whole-shard load"))
    model = HunyuanImage3Transformer2DModel.from_pretrained(CKPT, dtype=torch.float32)
    reads = [k for kind, k in events if kind == "read"]
    assert len(reads) == len(set(reads)) == len(model.state_dict())
    assert not any(k.startswith(tuple(HUNYUANIMAGE3_SKIPPED_KEY_PREFIXES)) or k.startswith("vae.") for k in reads)
    kinds = [kind for kind, _ in events]
    assert kinds == ["read", "set"] * len(reads)  # never two tensors read before the first is placed


def test_device_map_and_bad_inputs(tmp_path, transformer, sequence):
    mapped = HunyuanImage3Transformer2DModel.from_pretrained(
        CKPT, dtype=torch.float32, device_map="auto", max_memory={"cpu": "1GiB"}
    )
    assert set(map(str, mapped.hf_device_map.values())) == {"cpu"}
    latents = torch.randn(2, 16, *sequence.grid)
    assert torch.equal(mapped(latents, torch.tensor(800.0), sequence).sample, transformer(latents, torch.tensor(800.0), sequence).sample)
    explicit = {"model": "cpu", "timestep_emb": "cpu", "time_embed": "cpu", "time_embed_2": "cpu", "patch_embed": "cpu",
                "final_layer": "cpu"}
    HunyuanImage3Transformer2DModel.from_pretrained(CKPT, dtype=torch.float32, device_map=explicit)
    with pytest.raises(ValueError, match="disk"):
        HunyuanImage3Transformer2DModel.from_pretrained(CKPT, device_map={**explicit, "final_layer": "disk"})
    with pytest.raises(ValueError, match="device_map must be"):
        HunyuanImage3Transformer2DModel.from_pretrained(CKPT, device_map="everywhere")
    # unsupported config fields are named
    broken = tmp_path / "ckpt"
    shutil.copytree(CKPT, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        HunyuanImage3Transformer2DModel.from_pretrained(broken)
    # a checkpoint with an unknown key fails loudly
    (broken / "config.json").write_text(json.dumps({**config, "num_experts": 3, "moe_topk": [2, 2]}))
    with pytest.raises(ValueError, match="unexpected checkpoint key"):
        HunyuanImage3Transformer2DModel.from_pretrained(broken)
    # reduced depth by config override: the other layers are skipped, not unexpected
    small, info = HunyuanImage3Transformer2DModel.from_pretrained(
        CKPT, config_overrides={"num_hidden_layers": 1}, output_loading_info=True
    )
    assert len(small.model.layers) == 1 and info["skipped_keys"]["layers beyond num_hidden_layers (config_overrides)"]


def full_size_release_config():
    """The release's config values (README section 7 of the reference case, notes section 5.10)."""
    config = json.loads((CKPT / "config.json").read_text())
    layers = 32
    config.update(
        vocab_size=133120, hidden_size=4096, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
        attention_head_dim=128, num_experts=64, moe_topk=[8] * layers, moe_intermediate_size=[3072] * layers,
        num_shared_expert=[1] * layers, patch_embed_hidden_dim=1024, image_base_size=1024, image_token_id=128006,
    )
    config["vae"] = {**config["vae"], "latent_channels": 32, "block_out_channels": [128, 256, 512, 1024, 1024],
                     "layers_per_block": 2}
    return config


def test_full_size_meta_model_matches_official_key_list():
    official = json.loads((reference_dir("keys") / "hunyuan3_keys.json").read_text())
    config = full_size_release_config()
    with init_empty_weights():
        transformer = HunyuanImage3Transformer2DModel(**official_transformer_config(config))
        vae = AutoencoderKLHunyuanImage3(**hy._vae_config(config))
    ours = {k: list(v.shape) for k, v in transformer.state_dict().items()}
    ours.update({f"vae.{k}": list(v.shape) for k, v in vae.state_dict().items()})
    skipped = tuple(HUNYUANIMAGE3_SKIPPED_KEY_PREFIXES)
    theirs = {k: v for k, v in official.items() if not k.startswith(skipped)}
    assert len(official) == 5150
    assert sorted(set(ours) - set(theirs)) == [] and sorted(set(theirs) - set(ours)) == []
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}
    assert all(any(k.startswith(p) for k in official) for p in skipped)  # every skipped group exists in the release
    params = sum(v.numel() for v in transformer.state_dict().values())
    print(f"full-size generation-path transformer: {len(ours)} keys, {params / 1e9:.2f} B parameters")
