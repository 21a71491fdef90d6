"""A tiny, offline, deterministic Qwen-Image text-to-image pipeline.

Every component is a stock diffusers / transformers class at a tiny config, with random weights drawn from a seed:

* ``transformer``: ``diffusers.QwenImageTransformer2DModel`` (:data:`TRANSFORMER_CONFIG`),
* ``vae``: ``diffusers.AutoencoderKLQwenImage`` (:data:`VAE_CONFIG`),
* ``text_encoder``: ``transformers.Qwen2_5_VLForConditionalGeneration`` (:data:`TEXT_ENCODER_CONFIG`),
* ``tokenizer``: ``transformers.Qwen2Tokenizer``, a small byte-level BPE tokenizer shipped in
  ``cached_diffusers/assets/qwen2-tiny-tokenizer`` (built by ``scripts/build_tiny_tokenizer.py``),
* ``scheduler``: ``diffusers.FlowMatchEulerDiscreteScheduler`` with Qwen-Image's settings (:data:`SCHEDULER_CONFIG`).

The module also builds a tiny FLUX.2 [klein] pipeline the same way (:func:`build_tiny_flux2_klein_pipeline`, see the
section at its end).

Nothing is downloaded. The sizes are chosen so that, on a small CPU, the transformer takes most of a generation's
time: it is what a step cache skips. The weights are untrained, so images are noise-like.

Shapes at the default 256 x 256 size (batch size B): the VAE compresses 8x, so latents are (B, 16, 1, 32, 32); the
pipeline packs them into 2x2 patches, (B, 256, 64), the transformer's ``hidden_states`` (and what
``output_type="latent"`` returns). Prompt embeddings are (B, prompt tokens, 64); images are (B, 256, 256, 3) with
``output_type="np"``.

Example::

    import torch
    from cached_diffusers.tools.tiny import DEFAULT_PROMPTS, build_tiny_qwenimage_pipeline

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
    "CONTROLNET_CONFIG",
    "TINY_PROCESSOR_PIXELS",
    "build_tiny_qwenimage_components",
    "build_tiny_qwenimage_controlnet",
    "build_tiny_qwenimage_layered_models",
    "build_tiny_qwenimage_pipeline",
    "build_tiny_qwenimage_processor",
    "load_tiny_tokenizer",
    "save_tiny_qwenimage_pipeline",
]

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "qwen2-tiny-tokenizer"
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


# -- Qwen-Image edit / layered / ControlNet extras ------------------------------------------------------------------
# The edit and layered pipelines also take a ``processor`` (``Qwen2VLProcessor``: the tokenizer plus an image
# processor that cuts the reference image into 14x14 patches for the text encoder's vision tower); the ControlNet
# pipelines take a ``controlnet`` (``QwenImageControlNetModel``).

TINY_PROCESSOR_PIXELS = (56 * 56, 56 * 56 * 4)
"""``(min_pixels, max_pixels)`` of the tiny processor's image processor: a reference image becomes 16 to 64 patches of
14x14, i.e. 4 to 16 image tokens for the text encoder."""

CONTROLNET_CONFIG: dict[str, Any] = {
    **{k: v for k, v in TRANSFORMER_CONFIG.items() if k != "guidance_embeds"},
    "num_layers": 2,
}
"""``QwenImageControlNetModel`` kwargs: the transformer's sizes, 2 blocks (its samples are spread over the 12 blocks)."""


def build_tiny_qwenimage_processor(tokenizer: Qwen2Tokenizer | None = None):
    """The ``processor`` of the Qwen-Image edit and layered pipelines: a ``transformers.Qwen2VLProcessor`` built from
    the tiny tokenizer and a PIL ``Qwen2VLImageProcessorPil`` limited to :data:`TINY_PROCESSOR_PIXELS`.

    transformers checks a processor's sub-processor classes by name, and the check of the absent video processor needs
    torchvision (not a dependency); that one check is skipped while the processor is built.

    Raises:
        OSError: if the shipped tokenizer files are missing.
    """
    from unittest import mock

    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    tokenizer = load_tiny_tokenizer() if tokenizer is None else tokenizer
    min_pixels, max_pixels = TINY_PROCESSOR_PIXELS
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    check = Qwen2VLProcessor.check_argument_for_proper_class

    def check_present(self, name, argument):
        return type(argument) if argument is None else check(self, name, argument)

    with mock.patch.object(Qwen2VLProcessor, "check_argument_for_proper_class", check_present):
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_qwenimage_layered_models(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``transformer`` and ``vae`` of ``QwenImageLayeredPipeline`` at tiny size, random weights from ``seed``.

    As in Qwen-Image-Layered: the VAE encodes and decodes RGBA (``input_channels=4``), and the transformer has the
    layer-aware 3D RoPE and the additional timestep condition (``use_layer3d_rope``, ``use_additional_t_cond``);
    otherwise :data:`TRANSFORMER_CONFIG` and :data:`VAE_CONFIG`. The other components are the text-to-image ones plus
    :func:`build_tiny_qwenimage_processor`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(**TRANSFORMER_CONFIG, use_layer3d_rope=True, use_additional_t_cond=True)
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(**{**VAE_CONFIG, "input_channels": 4})
    models = {"transformer": transformer, "vae": vae}
    for model in models.values():
        if model.dtype != dtype:
            model.to(dtype)
        model.eval()
    return models


def build_tiny_qwenimage_controlnet(seed: int = 0, extra_condition_channels: int = 0):
    """A ``diffusers.QwenImageControlNetModel`` (:data:`CONTROLNET_CONFIG`) with random weights from ``seed``.

    Args:
        extra_condition_channels: 0 for ``QwenImageControlNetPipeline``; 4 for ``QwenImageControlNetInpaintPipeline``
            (the packed mask: one channel in 2x2 patches).

    Its zero-initialised output projections are re-drawn from the same seed, so that the untrained controlnet does
    change the transformer's output.
    """
    from diffusers import QwenImageControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = QwenImageControlNetModel(**CONTROLNET_CONFIG, extra_condition_channels=extra_condition_channels)
        with torch.no_grad():
            for module in [*controlnet.controlnet_blocks, controlnet.controlnet_x_embedder]:
                if not module.weight.any():
                    torch.nn.init.normal_(module.weight, std=0.02)
    return controlnet.eval()


# -- FLUX.2 [klein] --------------------------------------------------------------------------------------------------
# A tiny, offline, deterministic Flux2 Klein pipeline built the same way: stock diffusers / transformers classes at
# tiny configs, random weights from a seed.
#
# * ``transformer``: ``diffusers.Flux2Transformer2DModel`` (:data:`FLUX2_KLEIN_TRANSFORMER_CONFIG`; 2 double-stream +
#   4 single-stream blocks, no guidance embedder, as Klein),
# * ``vae``: ``diffusers.AutoencoderKLFlux2`` (:data:`FLUX2_KLEIN_VAE_CONFIG`; 8x compression as in Klein),
# * ``text_encoder``: ``transformers.Qwen3ForCausalLM`` (:data:`FLUX2_KLEIN_TEXT_ENCODER_CONFIG`; 28 layers, so that
#   the pipeline's default ``text_encoder_out_layers=(9, 18, 27)`` works unchanged),
# * ``tokenizer``: ``transformers.Qwen2Tokenizer``, the shipped tiny tokenizer plus Qwen3's ``<think>`` /
#   ``</think>`` tokens and a chat template (``Flux2KleinPipeline`` renders prompts with
#   ``apply_chat_template(..., enable_thinking=False)``), in ``cached_diffusers/assets/qwen3-tiny-tokenizer``
#   (written by :func:`write_tiny_qwen3_tokenizer`),
# * ``scheduler``: ``diffusers.FlowMatchEulerDiscreteScheduler`` with the Klein checkpoints' settings.
#
# Shapes at the default 256 x 256 size: latents (B, 8, 32, 32) are patchified and packed into (B, 256, 32), the
# transformer's ``hidden_states``; prompts are padded to ``max_sequence_length`` (512 by default, as in Klein) and
# embedded as (B, 512, 96) (hidden states of layers 9, 18, 27 of the text encoder, stacked per token).

__all__ += [
    "FLUX2_KLEIN_DEFAULT_HEIGHT",
    "FLUX2_KLEIN_DEFAULT_WIDTH",
    "FLUX2_KLEIN_SCHEDULER_CONFIG",
    "FLUX2_KLEIN_TEMB_GAIN",
    "FLUX2_KLEIN_TEXT_ENCODER_CONFIG",
    "FLUX2_KLEIN_TRANSFORMER_CONFIG",
    "FLUX2_KLEIN_VAE_CONFIG",
    "QWEN3_CHAT_TEMPLATE",
    "QWEN3_TOKENIZER_DIR",
    "build_tiny_flux2_klein_components",
    "build_tiny_flux2_klein_pipeline",
    "load_tiny_qwen3_tokenizer",
    "save_tiny_flux2_klein_pipeline",
    "write_tiny_qwen3_tokenizer",
]

QWEN3_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "qwen3-tiny-tokenizer"
"""The shipped tokenizer of the tiny Flux2 Klein pipeline (written by :func:`write_tiny_qwen3_tokenizer`)."""

QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
"""The part of Qwen3's chat template that plain-text system / user / assistant messages use (no tools, no reasoning
content): ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`` for
``Flux2KleinPipeline``'s single user message with ``enable_thinking=False``, as Qwen3's own template renders it."""

QWEN3_EXTRA_TOKENS = ("<think>", "</think>")
"""Qwen3's thinking markers, added as ordinary (non-special) tokens after the Qwen2.5 special tokens, as in Qwen3."""

FLUX2_KLEIN_TEXT_HIDDEN_SIZE = 32
"""Width of the tiny Qwen3 text encoder (Klein-4B: Qwen3-4B, 2560)."""

FLUX2_KLEIN_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": FLUX2_KLEIN_TEXT_HIDDEN_SIZE,
    "intermediate_size": 64,
    "num_hidden_layers": 28,  # the pipeline stacks the hidden states of layers 9, 18 and 27
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 1024,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
"""``Qwen3Config`` kwargs of the text encoder (Qwen3-4B: 36 layers of 2560, 32 heads of 128, 8 KV heads). The
vocabulary size and the special token ids are taken from the tokenizer."""

FLUX2_KLEIN_LATENT_CHANNELS = 8
"""Channels of the tiny VAE's latents (Klein: 32); the pipeline patchifies them 2x2 into 4x as many."""

FLUX2_KLEIN_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4 * FLUX2_KLEIN_LATENT_CHANNELS,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 3 * FLUX2_KLEIN_TEXT_HIDDEN_SIZE,  # three stacked text-encoder layers
    "axes_dims_rope": (4, 4, 4, 4),  # (T, H, W, L); sums to attention_head_dim
    "guidance_embeds": False,
}
"""``Flux2Transformer2DModel`` kwargs (Klein-4B: 5 + 20 blocks, 24 heads of 128, joint_attention_dim 7680,
in_channels 128, axes_dims_rope (32, 32, 32, 32)); ``mlp_ratio`` 3 and ``rope_theta`` 2000 are the class defaults,
as in Klein."""

FLUX2_KLEIN_TEMB_GAIN = 20.0
"""Factor applied to the transformer's ``time_guidance_embed.timestep_embedder.linear_2`` weights after the class's
default initialization. With the default initialization the timestep embedding is about 0.09 in magnitude, so every
modulation (shift, scale, gate) is about 0.03: the blocks then change the image tokens by about 1.5 % and the
untrained transformer is nearly the linear map ``proj_out(norm_out(x_embedder(x)))``, so caching would be invisible
in its outputs. With this gain the modulations are O(1), as in trained FLUX models, and the block stack's residual
is about as large as its input."""

FLUX2_KLEIN_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),  # 4 levels: 8x spatial compression, as in Klein
    "layers_per_block": 1,
    "latent_channels": FLUX2_KLEIN_LATENT_CHANNELS,
    "norm_num_groups": 4,
    "sample_size": 256,
}
"""``AutoencoderKLFlux2`` kwargs (Klein: block_out_channels (128, 256, 512, 512), 2 layers per block, 32 latent
channels, 32 groups)."""

FLUX2_KLEIN_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "shift_terminal": None,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}
"""``FlowMatchEulerDiscreteScheduler`` kwargs of the FLUX.2 [klein] checkpoints. The pipeline passes its own
``mu`` (``compute_empirical_mu``) with ``sigmas = linspace(1, 1/N, N)``, so only the dynamic exponential shift
matters."""

FLUX2_KLEIN_VAE_SCALE_FACTOR = 2 ** (len(FLUX2_KLEIN_VAE_CONFIG["block_out_channels"]) - 1)
"""Spatial compression of the tiny VAE (``Flux2KleinPipeline.vae_scale_factor``); one token per 16 x 16 pixels."""

FLUX2_KLEIN_DEFAULT_HEIGHT = 256
FLUX2_KLEIN_DEFAULT_WIDTH = 256
"""Default image size of the tiny pipeline: (256 / 16)^2 = 256 image tokens (``Flux2KleinPipeline``: 1024 x 1024)."""


def write_tiny_qwen3_tokenizer(
    output_dir: str | os.PathLike = QWEN3_TOKENIZER_DIR, source_dir: str | os.PathLike = TOKENIZER_DIR
) -> Path:
    """Writes the tiny Qwen3-style tokenizer: the Qwen2 tokenizer in ``source_dir`` (the shipped one by default) plus
    :data:`QWEN3_EXTRA_TOKENS` and :data:`QWEN3_CHAT_TEMPLATE` (in ``tokenizer_config.json``).

    Deterministic: writing again gives byte-identical files (the shipped copy in :data:`QWEN3_TOKENIZER_DIR` is
    this function's output).

    Returns:
        ``output_dir`` as a ``Path`` (created if missing).
    """
    import json
    import shutil

    from tokenizers import AddedToken, Tokenizer

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_file(str(Path(source_dir) / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in QWEN3_EXTRA_TOKENS])
    tokenizer.save(str(output_dir / "tokenizer.json"), pretty=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(Path(source_dir) / name, output_dir / name)
    config = json.loads((Path(source_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))
    for token in QWEN3_EXTRA_TOKENS:
        config["added_tokens_decoder"][str(tokenizer.token_to_id(token))] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": False,
        }
    config["chat_template"] = QWEN3_CHAT_TEMPLATE
    with open(output_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    return output_dir


def load_tiny_qwen3_tokenizer() -> Qwen2Tokenizer:
    """Loads the tiny pipeline's tokenizer from :data:`QWEN3_TOKENIZER_DIR`, without network access.

    Returns:
        A ``transformers.Qwen2Tokenizer`` (the class Klein checkpoints name) with a Qwen3 chat template.

    Raises:
        OSError: if the tokenizer files are missing.
    """
    return Qwen2Tokenizer.from_pretrained(QWEN3_TOKENIZER_DIR, local_files_only=True)


def _flux2_klein_text_encoder_config(tokenizer: Qwen2Tokenizer):
    from transformers import Qwen3Config

    return Qwen3Config(
        **FLUX2_KLEIN_TEXT_ENCODER_CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_flux2_klein_components(seed: int = 0, distilled: bool = False) -> dict[str, Any]:
    """Builds the components of the tiny FLUX.2 [klein] pipeline with random weights drawn from ``seed``.

    Each model is initialized by its class's own initialization from the CPU random generator seeded with ``seed``
    inside ``torch.random.fork_rng``: the same seed gives bit-identical weights and the caller's global random state
    is left as it was.

    Args:
        seed: seed of the weights.
        distilled: the value of the pipeline's ``is_distilled`` config flag (``True``: the 4-step distilled variant,
            which runs without CFG whatever ``guidance_scale``; ``False``: the base variant, CFG when
            ``guidance_scale > 1``). The weights do not depend on it.

    The transformer's timestep-embedding output layer is scaled by :data:`FLUX2_KLEIN_TEMB_GAIN` after its default
    initialization, so that the untrained blocks do real work (O(1) modulations).

    Returns:
        The keyword arguments of ``Flux2KleinPipeline``: ``"scheduler"``, ``"vae"``, ``"text_encoder"``,
        ``"tokenizer"``, ``"transformer"`` (models on CPU, float32, eval mode) and ``"is_distilled"``.

    Raises:
        OSError: if the shipped tokenizer files are missing.
    """
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    tokenizer = load_tiny_qwen3_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(**FLUX2_KLEIN_TRANSFORMER_CONFIG)
        with torch.no_grad():
            transformer.time_guidance_embed.timestep_embedder.linear_2.weight.mul_(FLUX2_KLEIN_TEMB_GAIN)
        torch.manual_seed(seed)
        vae = AutoencoderKLFlux2(**FLUX2_KLEIN_VAE_CONFIG)
        torch.manual_seed(seed)
        text_encoder = Qwen3ForCausalLM(_flux2_klein_text_encoder_config(tokenizer))
    for model in (transformer, vae, text_encoder):
        model.eval()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX2_KLEIN_SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
        "is_distilled": bool(distilled),
    }


def build_tiny_flux2_klein_pipeline(
    seed: int = 0, pipeline_class: type | None = None, distilled: bool = False, **pipeline_kwargs: Any
):
    """Builds the tiny FLUX.2 [klein] pipeline.

    Args:
        seed: seed of the weights (see :func:`build_tiny_flux2_klein_components`).
        pipeline_class: the pipeline class to instantiate, ``diffusers.Flux2KleinPipeline`` by default; it is called
            with the components and ``is_distilled`` as keyword arguments (``Flux2KleinKVPipeline`` and the cached
            classes take the same).
        distilled: the ``is_distilled`` flag (the 4-step distilled variant, no CFG).
        **pipeline_kwargs: further keyword arguments of ``pipeline_class`` (e.g. ``cache_config``).

    Returns:
        A ``pipeline_class`` instance on CPU whose default image size is :data:`FLUX2_KLEIN_DEFAULT_HEIGHT` x
        :data:`FLUX2_KLEIN_DEFAULT_WIDTH` (``Flux2KleinPipeline`` otherwise defaults to 1024 x 1024).

    Raises:
        OSError: if the shipped tokenizer files are missing.
        TypeError: if ``pipeline_class`` does not accept the components or ``pipeline_kwargs``.
    """
    from diffusers import Flux2KleinPipeline

    pipeline_class = Flux2KleinPipeline if pipeline_class is None else pipeline_class
    pipe = pipeline_class(**build_tiny_flux2_klein_components(seed, distilled=distilled), **pipeline_kwargs)
    pipe.default_sample_size = FLUX2_KLEIN_DEFAULT_HEIGHT // FLUX2_KLEIN_VAE_SCALE_FACTOR
    return pipe


def save_tiny_flux2_klein_pipeline(path: str | os.PathLike, seed: int = 0, distilled: bool = False):
    """Saves the tiny ``Flux2KleinPipeline`` as an ordinary diffusers directory (safetensors weights).

    ``Flux2KleinPipeline.from_pretrained(path)`` loads it back offline; its ``model_index.json`` names only diffusers
    and transformers classes and holds ``is_distilled``. Pass ``height`` and ``width`` when calling the loaded
    pipeline: it defaults to 1024 x 1024.

    Returns:
        ``path``, as given.

    Raises:
        OSError: if the shipped tokenizer files are missing or ``path`` cannot be written.
    """
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(**build_tiny_flux2_klein_components(seed, distilled=distilled))
    pipe.save_pretrained(path, safe_serialization=True)
    return path
