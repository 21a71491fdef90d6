"""Tests of the tiny offline Qwen-Image pipeline (`cached_diffusers.tools.tiny`) and its shipped tokenizer."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from transformers import AutoTokenizer, Qwen2Tokenizer

from cached_diffusers.tools.tiny import (
    DEFAULT_HEIGHT,
    DEFAULT_PROMPTS,
    DEFAULT_WIDTH,
    TOKENIZER_DIR,
    TRANSFORMER_CONFIG,
    build_tiny_qwenimage_components,
    build_tiny_qwenimage_pipeline,
    load_tiny_tokenizer,
    save_tiny_qwenimage_pipeline,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _load_build_script():
    path = REPO_ROOT / "scripts" / "build_tiny_tokenizer.py"
    spec = importlib.util.spec_from_file_location("build_tiny_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generate(pipe, output_type, **kwargs):
    return pipe(
        DEFAULT_PROMPTS[0],
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
        **kwargs,
    ).images


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_qwenimage_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Tokenizer


@pytest.mark.parametrize("tokenizer_class", [Qwen2Tokenizer, AutoTokenizer])
def test_tokenizer_loads_offline(tokenizer_class):
    tokenizer = tokenizer_class.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    assert isinstance(tokenizer, Qwen2Tokenizer)
    assert len(tokenizer) <= 4096
    # Special tokens follow the BPE vocabulary, in Qwen's order.
    special_ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert special_ids == list(range(special_ids[0], special_ids[0] + 3))
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "right"


def test_shipped_tokenizer_matches_build_script(tmp_path):
    script = _load_build_script()
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert script.SPLIT_PATTERN == PRETOKENIZE_REGEX
    script.build_tokenizer(tmp_path)
    shipped = sorted(path.name for path in TOKENIZER_DIR.iterdir())
    assert shipped == ["merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name


@pytest.mark.parametrize("prompt", [DEFAULT_PROMPTS[0], "a purple zebra on the moon", "Übergröße 42 ☃!", " ", ""])
def test_template_prefix_is_dropped_exactly(pipe, prompt):
    tokenizer = pipe.tokenizer
    template, drop_idx = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    assert drop_idx == 34
    prefix, suffix = template.split("{}")
    assert len(tokenizer(prefix).input_ids) == drop_idx

    ids = tokenizer(template.format(prompt)).input_ids
    expected = tokenizer(prompt).input_ids + tokenizer(suffix).input_ids
    assert ids[drop_idx:] == expected
    assert tokenizer.convert_ids_to_tokens(ids[drop_idx - 3 : drop_idx]) == ["<|im_start|>", "user", "Ċ"]


def test_unknown_words_fall_back_to_bytes():
    tokenizer = load_tiny_tokenizer()
    text = "a xylophone-shaped café, 日本 🦒"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert len(ids) > len(text.split())  # unknown words become several byte-level tokens


def test_default_prompt_words_are_single_tokens():
    tokenizer = load_tiny_tokenizer()
    for prompt in DEFAULT_PROMPTS:
        assert len(tokenizer(prompt).input_ids) == len(prompt.split()), prompt


# Components


def _state_dicts(components):
    return {name: components[name].state_dict() for name in ("transformer", "vae", "text_encoder")}


def test_same_seed_gives_identical_weights_and_other_seed_differs():
    first, second = _state_dicts(build_tiny_qwenimage_components(0)), _state_dicts(build_tiny_qwenimage_components(0))
    other = _state_dicts(build_tiny_qwenimage_components(1))
    for name in first:
        assert first[name].keys() == second[name].keys()
        assert all(torch.equal(first[name][key], second[name][key]) for key in first[name]), name
        assert any(
            not torch.equal(first[name][key], other[name][key]) for key in first[name] if first[name][key].numel() > 1
        ), name


def test_build_leaves_global_rng_untouched():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    build_tiny_qwenimage_components(seed=7)
    assert torch.equal(torch.get_rng_state(), state)


def test_transformer_output_depends_on_text_and_timestep(pipe):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16 * 16, TRANSFORMER_CONFIG["in_channels"], generator=generator)
    texts = torch.randn(2, 1, 8, TRANSFORMER_CONFIG["joint_attention_dim"], generator=generator)

    def predict(text, timestep):
        with torch.no_grad():
            return pipe.transformer(
                hidden_states=latents,
                encoder_hidden_states=text,
                encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.long),
                timestep=torch.tensor([timestep]),
                img_shapes=[[(1, 16, 16)]],
                return_dict=False,
            )[0]

    output = predict(texts[0], 0.5)
    assert output.shape == (1, 256, 4 * TRANSFORMER_CONFIG["out_channels"])
    assert output.std() > 0.1
    assert (output - predict(texts[1], 0.5)).abs().max() > 1e-3
    assert (output - predict(texts[0], 0.9)).abs().max() > 1e-3


# Pipeline


def test_pipeline_generates_default_size_image(pipe):
    assert isinstance(pipe, QwenImagePipeline)
    image = _generate(pipe, "np")  # no height / width: the tiny pipeline's default size
    assert image.shape == (1, DEFAULT_HEIGHT, DEFAULT_WIDTH, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0


def test_pipeline_class_and_kwargs_are_forwarded():
    class MyPipeline(QwenImagePipeline):
        def __init__(self, marker=None, **components):
            super().__init__(**components)
            self.marker = marker

    pipe = build_tiny_qwenimage_pipeline(seed=0, pipeline_class=MyPipeline, marker="x")
    assert type(pipe) is MyPipeline and pipe.marker == "x"


def test_save_and_from_pretrained_roundtrip(pipe, tmp_path):
    path = save_tiny_qwenimage_pipeline(tmp_path / "tiny-qwenimage", seed=0)
    model_index = json.loads((Path(path) / "model_index.json").read_text())
    assert model_index["_class_name"] == "QwenImagePipeline"
    libraries = {value[0] for key, value in model_index.items() if not key.startswith("_")}
    assert libraries == {"diffusers", "transformers"}
    assert not list(Path(path).rglob("*.bin"))

    loaded = QwenImagePipeline.from_pretrained(path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder"):
        expected, actual = pipe.components[name].state_dict(), loaded.components[name].state_dict()
        assert expected.keys() == actual.keys(), name
        assert all(torch.equal(expected[key], actual[key]) for key in expected), name

    size = {"height": DEFAULT_HEIGHT, "width": DEFAULT_WIDTH}
    assert torch.equal(_generate(pipe, "latent", **size), _generate(loaded, "latent", **size))
