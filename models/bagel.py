"""BAGEL-7B-MoT's text-to-image generation path as a diffusers model, and its cached subclass.

Neither diffusers nor transformers has BAGEL (ByteDance-Seed/Bagel, arXiv 2505.14683). This module implements the
part of it that text-to-image generation runs, from the facts of the reference implementation
(``modeling/bagel/bagel.py``: ``Bagel.prepare_vae_latent``, ``forward_cache_update_text``, ``_forward_flow``;
``modeling/bagel/qwen2_navit.py``: ``Qwen2MoTDecoderLayer``, ``PackedAttentionMoT``, ``forward_inference``;
``modeling/bagel/modeling_utils.py``: ``TimestepEmbedder``, ``PositionEmbedding``):

* a Qwen2 decoder duplicated into two experts per layer (mixture of transformers, MoT): the *und* expert
  (``q_proj``, ..., ``mlp``, ``input_layernorm``, ...) and the *gen* expert (the same names with ``_moe_gen``), with
  one shared attention (one softmax over all keys), per-head QK RMSNorm applied **before** 1-D rotate-half RoPE
  (theta ``rope_theta``), q/k/v biases and no ``o_proj`` bias;
* the prompt prefill (:meth:`BagelTransformer2DModel.prefill`): every token through the *und* expert, causal
  attention, RoPE positions ``0 .. L-1``; it returns a :class:`BagelKVCache` (keys after ``k_norm`` and RoPE) that
  the denoising calls only read;
* the denoising call (:meth:`BagelTransformer2DModel.forward`): the query ``[<|vision_start|>, h*w latent tokens,
  <|vision_end|>]`` attends with full (non-causal) attention over ``[cached prompt ; query]``; the two marker tokens
  use the *und* expert, the latent tokens the *gen* expert; all query tokens share the RoPE position ``L`` (the
  context length); a latent token's input is ``vae2llm(x_t) + time_embedder(t) + latent_pos_embed[r*M + c]``; the
  velocity is ``llm2vae(norm_moe_gen(h))`` at the latent tokens.

Reused layers: ``Qwen2RMSNorm``, ``Qwen2MLP``, ``Qwen2RotaryEmbedding``, ``apply_rotary_pos_emb`` and ``repeat_kv``
from transformers' Qwen2; diffusers' ``Timesteps`` (cos-first, ``flip_sin_to_cos=True``, ``downscale_freq_shift=0``,
which is BAGEL's ``TimestepEmbedder`` frequency vector) and ``TimestepEmbedding``; diffusers'
``get_2d_sincos_pos_embed`` initialises the latent position table (the checkpoint's table is loaded over it).

Official checkpoint layout (``llm_config.json``, ``ema.safetensors``, ``ae.safetensors``, tokenizer files; see
:func:`load_official_transformer`): the module tree mirrors the official names with ``language_model.model.``
stripped and ``time_embedder.mlp.{0,2}`` named ``time_embedder.linear_{1,2}`` (:func:`official_to_diffusers_key`).
Weights text-to-image never uses are skipped on purpose: :data:`BAGEL_SKIPPED_PREFIXES`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)

from cached_diffusers.model_mixin import BlockContext, CachedTransformerMixin, gather_rows
from cached_diffusers.patch_tokens import unpack_patch_tokens
from cached_diffusers.spec import ModelCacheSpec

__all__ = [
    "BAGEL_CALIBRATION_HINT",
    "BAGEL_SKIPPED_PREFIXES",
    "BAGEL_TEACACHE_COEFFICIENTS",
    "BagelKVCache",
    "BagelTransformer2DModel",
    "CachedBagelTransformer2DModel",
    "bagel_config_from_official",
    "diffusers_to_official_key",
    "load_official_transformer",
    "official_to_diffusers_key",
]

BAGEL_TEACACHE_COEFFICIENTS = (1.33313129e06, -1.68644226e05, 7.95050740e03, -1.63747873e02, 1.26352397e00)
"""TeaCache rescaling polynomial for BAGEL-7B-MoT, ``[c4, c3, c2, c1, c0]`` (highest order first).

Source: vllm-project/vllm-omni ``vllm_omni/diffusion/cache/teacache/config.py`` (its comment "Using Qwen's
coefficients" is stale: the numbers differ from its Qwen-Image set). No official (ali-vilab/TeaCache) set exists for
BAGEL. Caveats: vllm-omni's estimator runs only the conditional branch, so the fit reflects the ``gen`` branch; the
indicator is the packed query entering layer 0 (2 marker embeddings + latent-token inputs), as here; the polynomial is
only meaningful on the fitted band x ~ 0.01-0.05 (minimum 0.024 at x ~ 0.024, f(0.1) ~ 29), so any step whose
indicator moves by 7 % or more is computed.
"""

BAGEL_CALIBRATION_HINT = (
    "No MagCache ratios are published for BAGEL-7B-MoT. Calibrate on your checkpoint and step count: run the pipeline "
    "with MagCacheConfig(calibrate=True) and build the config with MagCacheConfig.from_calibration(pipe.cache_stats) "
    "(each guidance branch, gen / cfg_text / cfg_img, gets its own ratios); `cached-diffusers calibrate` does the same. "
    "TeaCache ships vllm-omni's BAGEL coefficients; DBCacheConfig, FirstBlockCacheConfig and TaylorSeerConfig need no "
    "calibration."
)
"""The model's ``calibration_hint``: appended to the error raised when MagCache is configured without ratios."""

BAGEL_SKIPPED_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed.", "language_model.lm_head.")
"""Prefixes of the ``ema.safetensors`` keys that text-to-image never uses and the loader skips on purpose: the SigLIP
vision tower (``vit_model.*``), its MLP connector (``connector.*``) and position table (``vit_pos_embed.pos_embed``),
all for image understanding and editing, and the language-model head (``language_model.lm_head.weight``, text
generation / think mode only)."""

_OFFICIAL_PREFIX = "language_model.model."
_TIME_EMBEDDER_NAMES = (("time_embedder.mlp.0.", "time_embedder.linear_1."), ("time_embedder.mlp.2.", "time_embedder.linear_2."))


def official_to_diffusers_key(key: str) -> str | None:
    """Map an ``ema.safetensors`` key to this model's state-dict key; ``None`` for a key in :data:`BAGEL_SKIPPED_PREFIXES`.

    ``language_model.model.X`` -> ``X``; ``time_embedder.mlp.0.*`` / ``.mlp.2.*`` -> ``time_embedder.linear_1.*`` /
    ``.linear_2.*``; ``vae2llm.*``, ``llm2vae.*`` and ``latent_pos_embed.pos_embed`` keep their names. Other keys are
    returned unchanged (and then reported as unexpected by the loader).
    """
    if key.startswith(BAGEL_SKIPPED_PREFIXES):
        return None
    if key.startswith(_OFFICIAL_PREFIX):
        return key[len(_OFFICIAL_PREFIX) :]
    for official, ours in _TIME_EMBEDDER_NAMES:
        if key.startswith(official):
            return ours + key[len(official) :]
    return key


def diffusers_to_official_key(key: str) -> str:
    """Inverse of :func:`official_to_diffusers_key`."""
    for official, ours in _TIME_EMBEDDER_NAMES:
        if key.startswith(ours):
            return official + key[len(ours) :]
    if key.startswith(("time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed.")):
        return key
    return _OFFICIAL_PREFIX + key


@dataclass
class BagelKVCache:
    """The prompt K/V cache of one guidance branch: filled once by :meth:`BagelTransformer2DModel.prefill`, then only
    read by the denoising calls (``forward`` never writes to it, so a skipped layer or step cannot corrupt it).

    Attributes:
        keys: per layer, ``(B, num_key_value_heads, L, head_dim)``, after ``k_norm`` and RoPE.
        values: per layer, ``(B, num_key_value_heads, L, head_dim)``.
        key_mask: ``(B, L)`` bool, ``True`` at real (non-padding) context tokens; ``None`` when every row is full.
        lengths: ``(B,)`` int64, the context length of each row = the RoPE position of that row's query tokens.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_mask: torch.Tensor | None
    lengths: torch.Tensor

    @property
    def context_length(self) -> int:
        """``L``, the padded context length (0 for an empty context)."""
        return self.keys[0].shape[2] if self.keys else 0


class BagelLatentPositionEmbedding(nn.Module):
    """BAGEL's fixed 2-D sin-cos table for the latent tokens (reference ``PositionEmbedding``), ``(M*M, D)``.

    Row ``r*M + c`` is grid cell (row ``r``, column ``c``); the first half of the channels encodes the column and the
    second half the row, each as ``[sin, cos]`` of ``10000^(-k/(D/4))`` (MAE's ``get_2d_sincos_pos_embed``). Stored as a
    parameter with ``requires_grad=False``, as in the checkpoint, and loaded from it.
    """

    def __init__(self, max_latent_size: int, hidden_size: int):
        super().__init__()
        table = get_2d_sincos_pos_embed(hidden_size, max_latent_size, base_size=max_latent_size, output_type="pt")
        self.pos_embed = nn.Parameter(table.to(torch.get_default_dtype()), requires_grad=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class BagelMoTAttention(nn.Module):
    """Shared attention of one MoT layer: und and gen projections and QK-norms, one softmax over all keys."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = hidden // heads
        self.num_heads, self.num_key_value_heads = heads, kv_heads
        self.num_key_value_groups = heads // kv_heads
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(hidden, heads * self.head_dim, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(hidden, kv_heads * self.head_dim, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(hidden, kv_heads * self.head_dim, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(heads * self.head_dim, hidden, bias=False))
            setattr(self, f"q_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps))

    def project(self, x: torch.Tensor, expert: str, cos: torch.Tensor, sin: torch.Tensor):
        """``(B, S, D)`` -> q ``(B, H, S, hd)``, k and v ``(B, H_kv, S, hd)`` with ``expert`` ``""`` (und) or
        ``"_moe_gen"`` (gen); QK-norm before RoPE."""
        batch, length, _ = x.shape
        q = getattr(self, f"q_proj{expert}")(x).view(batch, length, -1, self.head_dim)
        k = getattr(self, f"k_proj{expert}")(x).view(batch, length, -1, self.head_dim)
        v = getattr(self, f"v_proj{expert}")(x).view(batch, length, -1, self.head_dim)
        q = getattr(self, f"q_norm{expert}")(q).transpose(1, 2)
        k = getattr(self, f"k_norm{expert}")(k).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v.transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool):
        """Softmax attention (scale ``1/sqrt(head_dim)``, GQA by head repetition); returns ``(B, S, H*hd)``."""
        k = repeat_kv(k, self.num_key_value_groups)
        v = repeat_kv(v, self.num_key_value_groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return out.transpose(1, 2).flatten(2)


class BagelMoTDecoderLayer(nn.Module):
    """One Qwen2 MoT decoder layer (reference ``Qwen2MoTDecoderLayer``): und and gen experts, shared attention."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.self_attn = BagelMoTAttention(config)
        self.mlp = Qwen2MLP(config)
        self.mlp_moe_gen = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward_und(self, hidden_states, cos, sin, mask):
        """Prefill: every token through the und expert, causal. Returns ``(hidden_states, (k, v))``."""
        attn = self.self_attn
        q, k, v = attn.project(self.input_layernorm(hidden_states), "", cos, sin)
        out = attn.attend(q, k, v, mask, causal=True)
        hidden_states = hidden_states + attn.o_proj(out)
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, (k, v)

    def forward_gen(self, latents, markers, cos, sin, past_key, past_value, mask):
        """Denoising query: latent tokens ``(B, N, D)`` through gen, marker tokens ``(B, 2, D)`` through und, full
        attention over ``[context ; latents ; markers]``. Returns the two streams."""
        attn = self.self_attn
        num_latents = latents.shape[1]
        q_l, k_l, v_l = attn.project(self.input_layernorm_moe_gen(latents), "_moe_gen", cos, sin)
        q_m, k_m, v_m = attn.project(self.input_layernorm(markers), "", cos, sin)
        q = torch.cat([q_l, q_m], dim=2)
        k = torch.cat([past_key, k_l, k_m], dim=2)
        v = torch.cat([past_value, v_l, v_m], dim=2)
        out = attn.attend(q, k, v, mask, causal=False)
        latents = latents + attn.o_proj_moe_gen(out[:, :num_latents])
        markers = markers + attn.o_proj(out[:, num_latents:])
        latents = latents + self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(latents))
        markers = markers + self.mlp(self.post_attention_layernorm(markers))
        return latents, markers


class BagelTransformer2DModel(ModelMixin, ConfigMixin, CacheMixin):
    r"""The generation path of BAGEL-7B-MoT (ByteDance-Seed/Bagel): a Qwen2 mixture-of-transformers backbone that
    denoises packed FLUX.1 latent tokens against a per-branch prompt K/V cache.

    Args:
        vocab_size (`int`, defaults to 152064): rows of ``embed_tokens``.
        hidden_size (`int`, defaults to 3584): ``D``.
        intermediate_size (`int`, defaults to 18944): SwiGLU width of both experts' MLPs.
        num_hidden_layers (`int`, defaults to 28): MoT decoder layers (the cached block stack).
        num_attention_heads (`int`, defaults to 28), num_key_value_heads (`int`, defaults to 4): GQA heads;
            ``head_dim = D / num_attention_heads``.
        hidden_act (`str`, defaults to ``"silu"``), rms_norm_eps (`float`, defaults to 1e-6),
        rope_theta (`float`, defaults to 1e6), max_position_embeddings (`int`, defaults to 32768):
            as in the Qwen2.5-7B ``llm_config.json``.
        max_latent_size (`int`, defaults to 64): ``M``, the latent token grid's largest side; the position table has
            ``M*M`` rows and images are at most ``16*M`` pixels per side. Not stored in the official checkpoint:
            inferred from the table's row count (:func:`bagel_config_from_official`).
        latent_patch_size (`int`, defaults to 2): ``p``; a latent token is a ``p x p`` patch of ``latent_channels``.
        latent_channels (`int`, defaults to 16): the FLUX.1 autoencoder's latent channels.
        timestep_embedding_dim (`int`, defaults to 256): width of the sinusoidal timestep features.
        vision_start_token_id (`int`, defaults to 151652), vision_end_token_id (`int`, defaults to 151653):
            the marker tokens around the latent tokens (Qwen2.5 ``<|vision_start|>`` / ``<|vision_end|>``).

    Two calls: :meth:`prefill` fills one guidance branch's :class:`BagelKVCache` from its context tokens, and
    :meth:`forward` runs one denoising step of one branch against it.
    """

    _supports_gradient_checkpointing = False
    _no_split_modules = ["BagelMoTDecoderLayer"]
    _keys_to_ignore_on_load_unexpected = None

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 152064,
        hidden_size: int = 3584,
        intermediate_size: int = 18944,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 28,
        num_key_value_heads: int = 4,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1e6,
        max_position_embeddings: int = 32768,
        max_latent_size: int = 64,
        latent_patch_size: int = 2,
        latent_channels: int = 16,
        timestep_embedding_dim: int = 256,
        vision_start_token_id: int = 151652,
        vision_end_token_id: int = 151653,
    ):
        super().__init__()
        if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads}), and "
                f"num_attention_heads by num_key_value_heads ({num_key_value_heads})"
            )
        qwen2 = Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            hidden_act=hidden_act,
            rms_norm_eps=rms_norm_eps,
            max_position_embeddings=max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        )
        patch_dim = latent_patch_size**2 * latent_channels
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(BagelMoTDecoderLayer(qwen2) for _ in range(num_hidden_layers))
        self.norm = Qwen2RMSNorm(hidden_size, eps=rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(hidden_size, eps=rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(qwen2)
        self.time_proj = Timesteps(timestep_embedding_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedder = TimestepEmbedding(timestep_embedding_dim, hidden_size, act_fn="silu")
        self.vae2llm = nn.Linear(patch_dim, hidden_size)
        self.llm2vae = nn.Linear(hidden_size, patch_dim)
        self.latent_pos_embed = BagelLatentPositionEmbedding(max_latent_size, hidden_size)

    # -- helpers ------------------------------------------------------------------------------------------------
    def latent_position_ids(self, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
        """Rows of the latent position table for an ``height x width`` token grid, row-major: ``r*M + c``, ``(h*w,)``.

        Raises:
            ValueError: if the grid exceeds ``max_latent_size`` on a side.
        """
        size = self.config.max_latent_size
        if not (1 <= height <= size and 1 <= width <= size):
            raise ValueError(
                f"the latent token grid must be between 1x1 and {size}x{size} (max_latent_size), got {height}x{width}: "
                f"images are at most {16 * size} pixels per side"
            )
        rows = torch.arange(height, device=device)[:, None] * size
        return (rows + torch.arange(width, device=device)[None, :]).flatten()

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        cos, sin = self.rotary_emb(torch.empty(0, dtype=dtype, device=positions.device), positions)
        return cos, sin

    # -- prefill -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BagelKVCache:
        """Fill one branch's prompt K/V cache (reference ``forward_cache_update_text``; mode "und", causal).

        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): context tokens, right-padded; ``L`` may be 0 (the
                text-unconditional branch's empty context).
            attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): 1 at real tokens, 0 at padding (which must
                be on the right); ``None`` means every token is real.

        Returns:
            `BagelKVCache`: keys (after ``k_norm`` and RoPE at positions ``0 .. L-1``) and values of every layer.

        Raises:
            ValueError: for a mask of another shape or with padding that is not on the right.
        """
        batch, length = input_ids.shape
        device, dtype = self.embed_tokens.weight.device, self.dtype
        input_ids = input_ids.to(device)
        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                    f"{tuple(attention_mask.shape)}"
                )
            key_mask = attention_mask.to(device=device).bool()
            if (key_mask[:, 1:] & ~key_mask[:, :-1]).any():
                raise ValueError("attention_mask must be right-padded (ones then zeros in every row)")
            lengths = key_mask.sum(dim=1)
            if bool(key_mask.all()):
                key_mask = None
        else:
            lengths = torch.full((batch,), length, dtype=torch.long, device=device)
        kv_shape = (batch, self.config.num_key_value_heads, 0, self.config.hidden_size // self.config.num_attention_heads)
        if length == 0:
            empty = [torch.empty(kv_shape, device=device, dtype=dtype) for _ in self.layers]
            return BagelKVCache(keys=empty, values=list(empty), key_mask=None, lengths=lengths.long())

        positions = torch.arange(length, device=device)[None].expand(batch, -1)
        cos, sin = self._rope(positions, dtype)
        mask = None
        if key_mask is not None:
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            mask = (causal[None] & key_mask[:, None, :])[:, None]
        hidden_states = self.embed_tokens(input_ids)
        keys, values = [], []
        for layer in self.layers:
            hidden_states, (k, v) = layer.forward_und(hidden_states, cos, sin, mask)
            keys.append(k)
            values.append(v)
        return BagelKVCache(keys=keys, values=values, key_mask=key_mask, lengths=lengths.long())

    # -- denoising call ----------------------------------------------------------------------------------------
    def embed_query(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, latent_grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The query streams entering layer 0: latent tokens ``(B, N, D)`` and the two marker tokens ``(B, 2, D)``.

        Latent token: ``vae2llm(x_t) + time_embedder(t) + latent_pos_embed[r*M + c]``; markers:
        ``embed_tokens([vision_start, vision_end])``.
        """
        batch, num_tokens, channels = hidden_states.shape
        height, width = latent_grid
        patch_dim = self.config.latent_patch_size**2 * self.config.latent_channels
        if channels != patch_dim or num_tokens != height * width:
            raise ValueError(
                f"hidden_states must be packed latent tokens (B, {height}*{width}, {patch_dim}) for latent_grid "
                f"{latent_grid}, got {tuple(hidden_states.shape)}"
            )
        device = hidden_states.device
        timestep = torch.as_tensor(timestep, device=device).reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(batch)
        if timestep.numel() != batch:
            raise ValueError(f"timestep must be a scalar or have one value per batch row ({batch}), got {timestep.numel()}")
        dtype = self.dtype
        t_features = self.time_proj(timestep.float()).to(dtype)
        temb = self.time_embedder(t_features)
        pos = self.latent_pos_embed(self.latent_position_ids(height, width, device=device))
        latents = self.vae2llm(hidden_states.to(dtype)) + temb[:, None, :] + pos[None].to(dtype)
        marker_ids = torch.tensor(
            [self.config.vision_start_token_id, self.config.vision_end_token_id], device=device
        )
        markers = self.embed_tokens(marker_ids)[None].expand(batch, -1, -1)
        return latents, markers

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        kv_cache: BagelKVCache,
        latent_grid: tuple[int, int],
        return_dict: bool = True,
        output_hidden_states: bool = False,
    ) -> Transformer2DModelOutput | tuple:
        r"""One denoising call of one guidance branch (reference ``Bagel._forward_flow``).

        Args:
            hidden_states (`torch.Tensor` of shape `(B, h*w, p*p*C)`): packed latent tokens ``x_t`` (token order
                row-major over the ``(h, w)`` grid, channel order ``(p_row, p_col, c)``).
            timestep (`torch.Tensor` of shape `()` or `(B,)`): the raw flow time ``t`` in ``[0, 1]`` (1 = noise;
                **not** x1000).
            kv_cache (`BagelKVCache`): the branch's prompt cache from :meth:`prefill` (read only).
            latent_grid (`tuple[int, int]`): ``(h, w)``, the token grid (``H/16``, ``W/16``).
            return_dict (`bool`, defaults to `True`): return a ``Transformer2DModelOutput``.
            output_hidden_states (`bool`, defaults to `False`): also return the final-normed hidden states of the
                query in packed order ``[<|vision_start|>, latents, <|vision_end|>]``, ``(B, N+2, D)``, and the input
                sequence of layer 0 in the same order (debugging and parity taps); as ``sample, hidden, inputs``.

        Returns:
            `Transformer2DModelOutput` whose ``sample`` is the velocity ``(B, h*w, p*p*C)`` = ``llm2vae`` of the
            latent tokens' final hidden states, or a tuple.

        Raises:
            ValueError: for hidden states that do not match ``latent_grid``, a grid larger than ``max_latent_size``,
                a ``kv_cache`` of another batch size, or (caching on) an unknown denoising step.
        """
        batch = hidden_states.shape[0]
        if kv_cache.lengths.shape[0] != batch:
            raise ValueError(f"kv_cache holds {kv_cache.lengths.shape[0]} rows, hidden_states {batch}")
        latents, markers = self.embed_query(hidden_states, timestep, latent_grid)
        inputs = (latents, markers)
        num_query = latents.shape[1] + markers.shape[1]
        # Every query token sits at RoPE position L (the branch's context length): one cos/sin row, broadcast.
        cos, sin = self._rope(kv_cache.lengths.to(latents.device)[:, None], latents.dtype)
        mask = None
        if kv_cache.key_mask is not None:
            query_mask = torch.ones(batch, num_query, dtype=torch.bool, device=latents.device)
            mask = torch.cat([kv_cache.key_mask, query_mask], dim=1)[:, None, None, :]
        context = BlockContext(
            raw_latent=hidden_states, latent_layout=latent_grid, rope=(cos, sin), kv_cache=kv_cache, attention_mask=mask
        )
        latents, markers = self._run_block_stack((latents, markers), context)
        latents = self.norm_moe_gen(latents)
        velocity = self.llm2vae(latents)
        if output_hidden_states:
            markers = self.norm(markers)
            hidden = torch.cat([markers[:, :1], latents, markers[:, 1:]], dim=1)
            packed_inputs = torch.cat([inputs[1][:, :1], inputs[0], inputs[1][:, 1:]], dim=1)
            return velocity, hidden, packed_inputs
        if not return_dict:
            return (velocity,)
        return Transformer2DModelOutput(sample=velocity)

    def _run_blocks(self, start: int, end: int, streams, context: BlockContext):
        """Run decoder layers ``start .. end - 1`` on the query streams ``(latents, markers)``, with the forward's
        RoPE, prompt K/V cache and attention mask (``context``)."""
        (cos, sin), kv_cache, mask = context.rope, context.kv_cache, context.attention_mask
        latents, markers = streams
        for index in range(start, end):
            latents, markers = self.layers[index].forward_gen(
                latents, markers, cos, sin, kv_cache.keys[index], kv_cache.values[index], mask
            )
        return latents, markers

    def _run_block_stack(self, streams, context: BlockContext):
        return self._run_blocks(0, len(self.layers), streams, context)


class CachedBagelTransformer2DModel(CachedTransformerMixin, BagelTransformer2DModel):
    """``BagelTransformer2DModel`` whose denoising ``forward`` skips decoder layers on steps the cache method reuses.

    Same constructor, config, checkpoints and ``forward`` as the parent. The query embedding (``vae2llm``, the
    timestep embedding, ``latent_pos_embed``, the marker embeddings) and the head (``norm`` / ``norm_moe_gen``,
    ``llm2vae``) run on every call; the ``num_hidden_layers`` MoT decoder layers are the cached stack, with two
    residual streams at every span boundary: the latent tokens ``(B, h*w, D)`` (the image stream: DBCache's probe is
    its residual over the ``Fn`` front layers) and the two marker tokens ``(B, 2, D)``. A reused step adds each
    stream's stored residual to the query entering the stack.

    TeaCache's indicator is the whole packed query entering layer 0 (markers and latent tokens), as in vllm-omni (an LLM
    has no AdaLN modulation); the shipped coefficients are :data:`BAGEL_TEACACHE_COEFFICIENTS`. No MagCache ratios are
    published: MagCache without ``mag_ratios`` raises ``ValueError`` saying how to calibrate
    (:data:`BAGEL_CALIBRATION_HINT`).

    :meth:`prefill` never goes through the cache engine: it is not a denoising step, consumes no step counters, and
    the K/V caches it fills are only read by ``forward``, so skipping layers never corrupts them. Each guidance branch
    (the pipeline's ``cache_context("gen" | "cfg_text" | "cfg_img")``) keeps its own cache state.

    With ``cache_config=None`` ``forward`` is the parent's.
    """

    cache_spec = ModelCacheSpec(
        model_name="CachedBagelTransformer2DModel",
        teacache_coefficients=BAGEL_TEACACHE_COEFFICIENTS,
        teacache_coefficients_source="vllm-project/vllm-omni vllm_omni/diffusion/cache/teacache/config.py",
        calibration_hint=BAGEL_CALIBRATION_HINT,
    )

    @property
    def num_cache_blocks(self) -> int:
        return len(self.layers)

    def _context_rows(self, context: BlockContext, rows: torch.Tensor) -> BlockContext:
        """This forward's ``context`` for the sub-batch ``rows`` (a mixed per-sample step runs the cached layers on
        the computing samples only): the query RoPE rows ``cos``/``sin`` ``(B, 1, head_dim)``, the branch's prompt
        K/V cache (``(B, kv_heads, L, head_dim)`` per layer, its key mask and lengths) and the attention mask
        ``(B, 1, 1, L + N)`` at ``rows``."""
        (cos, sin), kv_cache = context.rope, context.kv_cache
        batch = kv_cache.lengths.shape[0]
        cache = BagelKVCache(
            keys=[gather_rows(k, rows, batch, "kv_cache.keys") for k in kv_cache.keys],
            values=[gather_rows(v, rows, batch, "kv_cache.values") for v in kv_cache.values],
            key_mask=gather_rows(kv_cache.key_mask, rows, batch, "kv_cache.key_mask"),
            lengths=gather_rows(kv_cache.lengths, rows, batch, "kv_cache.lengths"),
        )
        return dataclasses.replace(
            context,
            rope=(gather_rows(cos, rows, batch, "cos"), gather_rows(sin, rows, batch, "sin")),
            kv_cache=cache,
            attention_mask=gather_rows(context.attention_mask, rows, batch, "mask"),
        )

    def _cache_indicators(self, context: BlockContext):
        hidden_states, (height, width) = context.raw_latent, context.latent_layout
        patch = self.config.latent_patch_size

        def raw_latent(streams) -> torch.Tensor:
            # x_t: (B, h*w, p*p*C) tokens, features (p_row, p_col, c), unpacked to the VAE grid (B, C, h*p, w*p)
            return unpack_patch_tokens(hidden_states, height, width, patch, channel_last=True)

        return {"teacache_indicator": _packed_query, "sea_latent": raw_latent}


def _packed_query(streams) -> torch.Tensor:
    """BAGEL's TeaCache indicator: the query entering layer 0, latents then markers ``(B, h*w + 2, D)``."""
    return torch.cat(streams, dim=1)


# -- the official checkpoint layout --------------------------------------------------------------------------------


def bagel_config_from_official(
    llm_config: Mapping[str, Any],
    latent_pos_rows: int,
    latent_patch_size: int = 2,
    latent_channels: int = 16,
    vision_start_token_id: int = 151652,
    vision_end_token_id: int = 151653,
) -> dict[str, Any]:
    """The :class:`BagelTransformer2DModel` config for an official ``llm_config.json``.

    Args:
        llm_config: the parsed ``llm_config.json`` (Qwen2 field names).
        latent_pos_rows: rows of ``latent_pos_embed.pos_embed`` in ``ema.safetensors``; ``max_latent_size`` is its
            square root (the official loader hard-codes 64 and stores it nowhere; vllm-omni infers it the same way).
        latent_patch_size, latent_channels: the official loader constants (2) and the AE's ``z_channels`` (16).
        vision_start_token_id, vision_end_token_id: the tokenizer's ``<|vision_start|>`` / ``<|vision_end|>`` ids.

    Raises:
        ValueError: if ``latent_pos_rows`` is not a perfect square or a required field is missing.
    """
    size = math.isqrt(int(latent_pos_rows))
    if size * size != latent_pos_rows or size == 0:
        raise ValueError(
            f"latent_pos_embed.pos_embed has {latent_pos_rows} rows, which is not max_latent_size**2 for an integer "
            "max_latent_size"
        )
    required = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "rms_norm_eps",
    )  # fmt: skip
    missing = [name for name in required if name not in llm_config]
    if missing:
        raise ValueError(f"llm_config.json lacks the field(s) {', '.join(missing)}")
    rope = llm_config.get("rope_parameters") or {}
    return dict(
        vocab_size=int(llm_config["vocab_size"]),
        hidden_size=int(llm_config["hidden_size"]),
        intermediate_size=int(llm_config["intermediate_size"]),
        num_hidden_layers=int(llm_config["num_hidden_layers"]),
        num_attention_heads=int(llm_config["num_attention_heads"]),
        num_key_value_heads=int(llm_config["num_key_value_heads"]),
        hidden_act=str(llm_config.get("hidden_act", "silu")),
        rms_norm_eps=float(llm_config["rms_norm_eps"]),
        rope_theta=float(llm_config.get("rope_theta", rope.get("rope_theta", 1e6))),
        max_position_embeddings=int(llm_config.get("max_position_embeddings", 32768)),
        max_latent_size=size,
        latent_patch_size=latent_patch_size,
        latent_channels=latent_channels,
        vision_start_token_id=vision_start_token_id,
        vision_end_token_id=vision_end_token_id,
    )


def load_official_transformer(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    model_class: type[BagelTransformer2DModel] = BagelTransformer2DModel,
    latent_channels: int = 16,
    vision_start_token_id: int = 151652,
    vision_end_token_id: int = 151653,
) -> tuple[BagelTransformer2DModel, dict[str, list[str]]]:
    """Build the model from an official BAGEL directory (``llm_config.json`` + ``ema.safetensors``).

    The model is created on the meta device and every tensor is copied from the file straight to ``device`` in
    ``dtype`` (default float32), one tensor at a time, so no second copy of the weights is held.

    Args:
        path: the checkpoint directory.
        dtype: dtype of the weights (the file is bfloat16; ``None`` -> float32, as diffusers loads).
        device: where the weights go.
        model_class: the class to build (e.g. :class:`CachedBagelTransformer2DModel`).
        latent_channels, vision_start_token_id, vision_end_token_id: see :func:`bagel_config_from_official`.

    Returns:
        ``(model, info)`` with ``info = {"missing": [...], "unexpected": [...], "skipped": [...]}`` in official key
        names; ``skipped`` lists the keys under :data:`BAGEL_SKIPPED_PREFIXES`.

    Raises:
        FileNotFoundError: if ``llm_config.json`` or ``ema.safetensors`` is missing.
        ValueError: if any generation-path weight is missing from the file, the file has a key the model does not
            know (outside the skipped prefixes), or a shape differs.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from cached_diffusers.checkpoints import get_shape, get_tensor, open_safetensors, read_json_object

    path = os.fspath(path)
    for name in ("llm_config.json", "ema.safetensors"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{name} not found in {path}: not an official BAGEL checkpoint directory")
    llm_config = read_json_object(os.path.join(path, "llm_config.json"), "BAGEL language-model config")
    dtype = dtype or torch.float32
    weights = os.path.join(path, "ema.safetensors")
    with open_safetensors(weights, device="cpu") as handle:
        keys = list(handle.keys())
        if "latent_pos_embed.pos_embed" not in keys:
            raise ValueError(f"{weights} has no latent_pos_embed.pos_embed, which max_latent_size is inferred from")
        rows = get_shape(handle, "latent_pos_embed.pos_embed", weights)[0]
        config = bagel_config_from_official(
            llm_config,
            rows,
            latent_channels=latent_channels,
            vision_start_token_id=vision_start_token_id,
            vision_end_token_id=vision_end_token_id,
        )
        with init_empty_weights():
            model = model_class(**config)
        expected = dict(model.state_dict())
        skipped, unexpected, seen = [], [], set()
        for key in keys:
            ours = official_to_diffusers_key(key)
            if ours is None:
                skipped.append(key)
                continue
            if ours not in expected:
                unexpected.append(key)
                continue
            shape = tuple(get_shape(handle, key, weights))
            if shape != tuple(expected[ours].shape):
                raise ValueError(
                    f"{weights}: tensor {key!r} has shape {shape} in the file, {tuple(expected[ours].shape)} in the model"
                )
            set_module_tensor_to_device(model, ours, device, value=get_tensor(handle, key, weights), dtype=dtype)
            seen.add(ours)
    missing = [diffusers_to_official_key(k) for k in expected if k not in seen]
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match the BAGEL generation path: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    # Non-persistent buffers (RoPE inverse frequencies) are built on the CPU by `init_empty_weights`: move them.
    model.rotary_emb.to(device)
    model.eval()
    return model, {"missing": missing, "unexpected": unexpected, "skipped": skipped}
