"""A tiny, offline, deterministic Qwen-Image text-to-image pipeline.

Every component is a stock diffusers / transformers class at a tiny config, with random weights drawn from a seed:

* ``transformer``: ``diffusers.QwenImageTransformer2DModel`` (:data:`TRANSFORMER_CONFIG`),
* ``vae``: ``diffusers.AutoencoderKLQwenImage`` (:data:`VAE_CONFIG`),
* ``text_encoder``: ``transformers.Qwen2_5_VLForConditionalGeneration`` (:data:`TEXT_ENCODER_CONFIG`),
* ``tokenizer``: ``transformers.Qwen2Tokenizer``, a small byte-level BPE tokenizer shipped in
  ``cached_diffusers/assets/qwen2-tiny-tokenizer`` (built by ``scripts/build_tiny_tokenizer.py``),
* ``scheduler``: ``diffusers.FlowMatchEulerDiscreteScheduler`` with Qwen-Image's settings (:data:`SCHEDULER_CONFIG`).

Nothing is downloaded. The sizes are chosen so that, on a small CPU, the transformer takes most of a generation's
time: it is what a step cache skips. The weights are untrained, so images are noise-like.

Shapes at the default 256 x 256 size (batch size B): the VAE compresses 8x, so latents are (B, 16, 1, 32, 32); the
pipeline packs them into 2x2 patches, (B, 256, 64), the transformer's ``hidden_states`` (and what
``output_type="latent"`` returns). Prompt embeddings are (B, prompt tokens, 64); images are (B, 256, 256, 3) with
``output_type="np"``.

Example::

    import torch
    from cached_diffusers.tiny import DEFAULT_PROMPTS, build_tiny_qwenimage_pipeline

    pipe = build_tiny_qwenimage_pipeline(seed=0)
    image = pipe(
        DEFAULT_PROMPTS[0], negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=20,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer


__all__ = [
    "DEFAULT_HEIGHT",
    "DEFAULT_PROMPTS",
    "DEFAULT_WIDTH",
    "SCHEDULER_CONFIG",
    "TEXT_ENCODER_CONFIG",
    "TOKENIZER_DIR",
    "TRANSFORMER_CONFIG",
    "VAE_CONFIG",
    "VAE_SCALE_FACTOR",
    "build_tiny_qwenimage_components",
    "build_tiny_qwenimage_pipeline",
    "load_tiny_tokenizer",
    "save_tiny_qwenimage_pipeline",
]

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "qwen2-tiny-tokenizer"
"""The shipped tokenizer files (``tokenizer.json``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``)."""

TEXT_HIDDEN_SIZE = 64
"""Width of the text encoder's hidden states, the transformer's ``joint_attention_dim`` (Qwen-Image: 3584)."""

LATENT_CHANNELS = 16
"""Channels of the VAE latents (as in Qwen-Image)."""

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "text_config": {
        "hidden_size": TEXT_HIDDEN_SIZE,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        # Qwen2.5-VL uses multimodal RoPE: the head's rotary frequencies (head_dim / 2 = 8 here) are split into
        # temporal / height / width sections. The class default [16, 24, 24] is for head_dim 128, so it has to be
        # given; for text-only input all three position ids are equal and any split gives plain 1D RoPE.
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
    },
    # The vision tower is never run (prompts are text only), but the class always builds one.
    "vision_config": {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": TEXT_HIDDEN_SIZE,
        "fullatt_block_indexes": [0],
    },
    "tie_word_embeddings": False,
}
"""``Qwen2_5_VLConfig`` kwargs of the text encoder. The vocabulary size and the special token ids (``bos``, ``eos``,
``pad``, vision tokens) are taken from the tokenizer when the model is built."""

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 4 * LATENT_CHANNELS,  # 2x2 patches of the VAE latents
    "out_channels": LATENT_CHANNELS,
    "num_layers": 12,
    "attention_head_dim": 32,
    "num_attention_heads": 8,
    "joint_attention_dim": TEXT_HIDDEN_SIZE,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),  # (frame, height, width); sums to attention_head_dim
}
"""``QwenImageTransformer2DModel`` kwargs (Qwen-Image: 60 layers, 24 heads of 128, 3584 text dims)."""

# fmt: off
VAE_CONFIG: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": LATENT_CHANNELS,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],  # 3 downsampling stages: 8x spatial compression, as in Qwen-Image
    # Qwen-Image's per-channel latent statistics (the class defaults), used to unnormalize latents before decoding.
    "latents_mean": [
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ],
    "latents_std": [
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ],
}
# fmt: on
"""``AutoencoderKLQwenImage`` kwargs (Qwen-Image: base_dim 96, num_res_blocks 2, same latent layout)."""

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}
"""``FlowMatchEulerDiscreteScheduler`` kwargs, as in Qwen/Qwen-Image's ``scheduler/scheduler_config.json``."""

VAE_SCALE_FACTOR = 2 ** len(VAE_CONFIG["temperal_downsample"])
"""Spatial compression of the VAE (``QwenImagePipeline.vae_scale_factor``)."""

DEFAULT_HEIGHT = 256
DEFAULT_WIDTH = 256
"""Default image size: (256 / 8 / 2)^2 = 256 image tokens per transformer forward. On 2 CPU cores, 20 steps with true
CFG (40 transformer forwards) take about 2.4 s, 85-90 % of it in the transformer."""

DEFAULT_PROMPTS = [
    "a red cat sitting on a blue chair",
    "a small yellow bird flying over a green field",
    "a white castle on a hill at sunset",
    "three orange balloons in a bright blue sky",
]
"""Short prompts whose words are all single tokens of the shipped tokenizer."""


def load_tiny_tokenizer() -> Qwen2Tokenizer:
    """Loads the shipped tokenizer from :data:`TOKENIZER_DIR`, without network access.

    Returns:
        A ``transformers.Qwen2Tokenizer`` (about 2k tokens) with ``<|endoftext|>`` as pad token and ``<|im_end|>`` as
        end-of-sequence token. The chat-template prefix of ``QwenImagePipeline`` is 34 tokens, as with Qwen's own
        tokenizer.

    Raises:
        OSError: if the tokenizer files are missing (e.g. the package was installed without its data files).
    """
    return Qwen2Tokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)


def _text_encoder_config(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    """:data:`TEXT_ENCODER_CONFIG` completed with the tokenizer's vocabulary size and special token ids."""
    token_ids = {
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
    }
    text_config = {
        **TEXT_ENCODER_CONFIG["text_config"],
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return Qwen2_5_VLConfig(
        **{**TEXT_ENCODER_CONFIG, "text_config": text_config},
        **{name: tokenizer.convert_tokens_to_ids(token) for name, token in token_ids.items()},
    )


def build_tiny_qwenimage_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Builds the components of the tiny Qwen-Image pipeline with random weights drawn from ``seed``.

    Each model is initialized by its class's own initialization, from the CPU random generator seeded with ``seed``
    inside ``torch.random.fork_rng``: the same seed gives bit-identical weights, and the caller's global random
    state is left as it was.

    Args:
        seed: seed of the weights.
        dtype: floating point dtype of the three models.

    Returns:
        A dict with keys ``"scheduler"``, ``"vae"``, ``"text_encoder"``, ``"tokenizer"``, ``"transformer"``, the
        keyword arguments of ``QwenImagePipeline``. The models are on CPU, in eval mode.

    Raises:
        OSError: if the shipped tokenizer files are missing.
    """
    tokenizer = load_tiny_tokenizer()
    # Default initializations throughout: none of these classes zero-initializes a layer (no zero `proj_out` or
    # modulation), so the untrained transformer's output is O(1) and depends on the text and the timestep.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(**TRANSFORMER_CONFIG)
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(**VAE_CONFIG)
        torch.manual_seed(seed)
        text_encoder = Qwen2_5_VLForConditionalGeneration(_text_encoder_config(tokenizer))
    models = {"vae": vae, "text_encoder": text_encoder, "transformer": transformer}
    for model in models.values():
        if model.dtype != dtype:
            model.to(dtype)
        model.eval()
    return {"scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), "tokenizer": tokenizer, **models}


def build_tiny_qwenimage_pipeline(seed: int = 0, pipeline_class: type | None = None, **pipeline_kwargs: Any):
    """Builds the tiny Qwen-Image pipeline.

    Args:
        seed: seed of the weights (see :func:`build_tiny_qwenimage_components`).
        pipeline_class: the pipeline class to instantiate, ``diffusers.QwenImagePipeline`` by default; it is called
            with the five components as keyword arguments.
        **pipeline_kwargs: further keyword arguments of ``pipeline_class``.

    Returns:
        A ``pipeline_class`` instance on CPU. Its default image size is :data:`DEFAULT_HEIGHT` x :data:`DEFAULT_WIDTH`
        (``QwenImagePipeline`` otherwise defaults to 1024 x 1024).

    Raises:
        OSError: if the shipped tokenizer files are missing.
        TypeError: if ``pipeline_class`` does not accept the components or ``pipeline_kwargs``.
    """
    pipeline_class = QwenImagePipeline if pipeline_class is None else pipeline_class
    pipe = pipeline_class(**build_tiny_qwenimage_components(seed), **pipeline_kwargs)
    pipe.default_sample_size = DEFAULT_HEIGHT // VAE_SCALE_FACTOR
    return pipe


def save_tiny_qwenimage_pipeline(path: str | os.PathLike, seed: int = 0) -> str | os.PathLike:
    """Saves the tiny ``QwenImagePipeline`` as an ordinary diffusers directory (safetensors weights).

    ``QwenImagePipeline.from_pretrained(path)`` loads it back offline. Its ``model_index.json`` names only diffusers
    and transformers classes. Pass ``height`` and ``width`` when calling the loaded pipeline: it defaults to
    1024 x 1024.

    Args:
        path: directory to write (created if missing; existing files of the same names are overwritten).
        seed: seed of the weights.

    Returns:
        ``path``, as given.

    Raises:
        OSError: if the shipped tokenizer files are missing or ``path`` cannot be written.
    """
    pipe = QwenImagePipeline(**build_tiny_qwenimage_components(seed))
    pipe.save_pretrained(path, safe_serialization=True)
    return path
