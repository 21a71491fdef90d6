"""HunyuanImage-3.0's text-to-image generation path as a diffusers model, and its cached variant.

HunyuanImage-3.0 (Tencent-Hunyuan/HunyuanImage-3.0; Hub ``tencent/HunyuanImage-3.0``) is a decoder-only
mixture-of-experts language model (Hunyuan-A13B style: 32 layers, hidden 4096, 64 experts top-8 plus a shared MLP)
that denoises image latents inside its token stream. Neither diffusers nor transformers has it; this module
re-implements the parts the base model's text-to-image path runs, after the reference implementation
``hunyuan_image_3/hunyuan.py`` (read for facts; no code copied):

* :class:`HunyuanImage3Transformer2DModel`: token embedding ``model.wte``, the decoder layers (fused GQA ``qkv_proj``
  laid out per KV group, RoPE **before** the per-head RMS q/k norms, SDPA with an explicit boolean mask, shared MLP
  plus routed experts with a float32 softmax top-k router renormalised over the top-k), the three timestep
  embedders, the image input block ``patch_embed`` (conv + AdaGN ResBlock) and output block ``final_layer``. There
  is no ``ln_f`` on the image path; ``ln_f`` / ``lm_head`` (text logits) are not built.
* :class:`HunyuanImage3Sequence` and :func:`build_2d_rope` / :func:`build_attention_mask`: the generalised 2-D RoPE
  and the mask (causal text, full attention inside the image block).
* :class:`HunyuanImage3KVCache`: the static KV cache. Step 0 runs the whole sequence (prompt + noisy image) and fills
  it; later steps feed only the ``<timestep>`` and ``<img>`` tokens at their original positions, write their K/V back
  into the same slots and attend over the whole cache.
* :func:`load_official_component`: shard-by-shard loading of the release layout (``config.json``,
  ``model.safetensors.index.json``, ``model-XXXX-of-YYYY.safetensors``), with accelerate device maps.
* :class:`CachedHunyuanImage3Transformer2DModel`: the same model with a cache engine. Its caching is driven by
  :class:`~cached_diffusers.CachedHunyuanImage3Pipeline`'s denoising loop, which skips whole transformer calls.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb, repeat_kv

from cached_diffusers.hub import resolve_dtype
from cached_diffusers.model_mixin import CachedTransformerMixin
from cached_diffusers.spec import WHOLE_CALL, ModelCacheSpec

__all__ = [
    "CachedHunyuanImage3Transformer2DModel",
    "HUNYUANIMAGE3_CACHE_SPEC",
    "HUNYUANIMAGE3_CALIBRATION_HINT",
    "HUNYUANIMAGE3_SKIPPED_KEY_PREFIXES",
    "HUNYUANIMAGE3_TEACACHE_COEFFICIENTS",
    "HunyuanImage3KVCache",
    "HunyuanImage3Sequence",
    "HunyuanImage3Transformer2DModel",
    "HunyuanImage3TransformerOutput",
    "build_2d_rope",
    "build_attention_mask",
    "build_rope_positions",
    "load_official_component",
    "official_transformer_config",
]

HUNYUANIMAGE3_TEACACHE_COEFFICIENTS = (
    1.04117826e02,
    -1.26848482e02,
    5.68168652e01,
    -1.04182570e01,
    6.78098549e-01,
)
"""TeaCache rescaling polynomial for HunyuanImage-3.0, ``[c4, c3, c2, c1, c0]`` (highest order first).

Source: vllm-project/vllm-omni ``vllm_omni/diffusion/cache/teacache/config.py`` (PR #1927): "polyfit on 3920 data
points (80 prompts x 49 steps)", fitted with the relative L1 change of ``time_embed(t)`` (the AdaGN conditioning
vector of ``patch_embed``) as the indicator, over x in about 0.12-0.54. The indicator depends on the timestep only,
so the pattern of reused steps is a function of the schedule (step count, shift), not of the prompt. The polynomial decreases
up to x ~ 0.17 (minimum 0.013): only meaningful on the fitted range.
"""

HUNYUANIMAGE3_CALIBRATION_HINT = (
    "No MagCache ratios are published for HunyuanImage-3.0: run once with MagCacheConfig(calibrate=True) through "
    "CachedHunyuanImage3Pipeline and build the config with MagCacheConfig.from_calibration(pipe.cache_stats) (the "
    "ratios are those of the whole transformer output per CFG branch). TeaCache ships vllm-omni's coefficients "
    "(HUNYUANIMAGE3_TEACACHE_COEFFICIENTS); TaylorSeerConfig and SCM step masks need no calibration. DBCache and "
    "First-Block-Cache do not apply (the loop skips whole transformer calls)."
)
"""The model's ``calibration_hint``, appended to the engine's error when a method lacks model data."""

HUNYUANIMAGE3_SKIPPED_KEY_PREFIXES: Mapping[str, str] = {
    "vision_model.": "SigLIP2 vision tower (image understanding / conditioning, not text-to-image)",
    "vision_aligner.": "projector of the vision tower",
    "lm_head.": "text logits (only for text generation and the 'auto' image-size prediction)",
    "model.ln_f.": "final norm of the text path (the image path has no ln_f)",
    "vae.encoder.": "VAE encoder (image conditioning only)",
}
"""Checkpoint key prefixes deliberately not loaded for text-to-image, with the reason. ``vae.decoder.*`` is loaded
into :class:`~cached_diffusers.models.hunyuanimage3_vae.AutoencoderKLHunyuanImage3`, everything else into
:class:`HunyuanImage3Transformer2DModel`."""


# -- sequence geometry: 2-D RoPE and attention mask ----------------------------------------------------------------------
def build_rope_positions(seq_len: int, image_start: int, grid: tuple[int, int]) -> torch.Tensor:
    """``(y, x)`` rotary position of every token of a sequence with one ``h x w`` image block.

    Text token ``i`` gets ``(i, i)``; image token ``(r, c)`` of the block starting at ``L = image_start`` gets
    ``y = L + floor((h*w - h)/2) + r`` and ``x = L + floor((h*w - w)/2) + c``; tokens after the block continue at
    ``L + h*w`` (reference: ``build_2d_rope`` in ``hunyuan_image_3/hunyuan.py``, after https://kexue.fm/archives/10352).

    Returns:
        ``(seq_len, 2)`` int64, columns ``(y, x)``.

    Raises:
        ValueError: if the image block does not fit in ``seq_len``.
    """
    h, w = grid
    end = image_start + h * w
    if image_start < 0 or h < 1 or w < 1 or end > seq_len:
        raise ValueError(f"image block [{image_start}, {end}) of grid {grid} does not fit a sequence of {seq_len}")
    text_before = torch.arange(image_start)
    beta_y, beta_x = image_start + (w * h - h) / 2, image_start + (w * h - w) / 2
    rows = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
    image_y = (beta_y + rows).reshape(-1).long()
    image_x = (beta_x + cols).reshape(-1).long()
    text_after = torch.arange(end, seq_len)
    y = torch.cat([text_before, image_y, text_after])
    x = torch.cat([text_before, image_x, text_after])
    return torch.stack([y, x], dim=1)


def build_2d_rope(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables of the generalised 2-D RoPE for ``(y, x)`` positions.

    ``theta_j = theta^(-2j/head_dim)`` for ``j < head_dim/2``; the angle vector is ``[y*theta_0, x*theta_1,
    y*theta_2, x*theta_3, ...]`` (even frequencies follow y, odd ones x) concatenated with itself, the rotate-half
    convention of :func:`transformers.models.llama.modeling_llama.apply_rotary_pos_emb`.

    Args:
        positions: ``(L, 2)`` integer ``(y, x)`` positions (:func:`build_rope_positions`).
        head_dim: attention head size, a multiple of 4.

    Returns:
        ``(cos, sin)``, each ``(L, head_dim)`` float32.

    Raises:
        ValueError: if ``head_dim`` is not a multiple of 4.
    """
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 for the 2-D RoPE, got {head_dim}")
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = freqs.reshape(1, head_dim // 4, 2)
    angles = (positions.float().unsqueeze(1) * freqs).reshape(positions.shape[0], head_dim // 2).repeat(1, 2)
    return torch.cos(angles), torch.sin(angles)


def build_attention_mask(seq_len: int, image_start: int, image_len: int) -> torch.Tensor:
    """Boolean ``(L, L)`` mask, ``True`` = may attend: causal (lower triangle) OR both tokens in the image block.

    The ``<timestep>`` token before the image is causal (sees the prompt, not the image); image tokens see the prompt,
    ``<timestep>`` and each other; ``<eoi>`` after the block is causal. Reference:
    ``_prepare_attention_mask_for_generation`` in ``hunyuan_image_3/hunyuan.py``.
    """
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    mask[image_start : image_start + image_len, image_start : image_start + image_len] = True
    return mask


@dataclass
class HunyuanImage3Sequence:
    """One text-to-image token sequence layout, shared by every batch row (rows differ only in their token ids).

    Attributes:
        input_ids: ``(B, L)`` int64 token ids of the full sequence (``<img>`` placeholders included).
        image_start: index of the first ``<img>`` token.
        grid: ``(h, w)`` image token grid (latent ``H/16 x W/16`` with ``patch_size=1``).
        timestep_index: index of the ``<timestep>`` token (the last one before the image block).
        attention_mask: ``(L, L)`` bool (:func:`build_attention_mask`).
        rope_cos, rope_sin: ``(L, head_dim)`` float32 (:func:`build_2d_rope`).
    """

    input_ids: torch.Tensor
    image_start: int
    grid: tuple[int, int]
    timestep_index: int
    attention_mask: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    @classmethod
    def build(
        cls, input_ids: torch.Tensor, image_start: int, grid: tuple[int, int], timestep_index: int, head_dim: int,
        rope_theta: float = 10000.0,
    ) -> HunyuanImage3Sequence:
        """Build the mask and RoPE tables for ``input_ids`` ``(B, L)``.

        Raises:
            ValueError: if the image block does not fit, or ``timestep_index`` is not before it.
        """
        seq_len = input_ids.shape[1]
        if not 0 <= timestep_index < image_start:
            raise ValueError(f"timestep_index ({timestep_index}) must be before image_start ({image_start})")
        positions = build_rope_positions(seq_len, image_start, grid)
        cos, sin = build_2d_rope(positions, head_dim, rope_theta)
        mask = build_attention_mask(seq_len, image_start, grid[0] * grid[1])
        return cls(input_ids, image_start, tuple(grid), timestep_index, mask, cos, sin)

    @property
    def image_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def query_positions(self, full_sequence: bool) -> torch.Tensor:
        """Positions fed to the model: ``arange(L)`` at step 0, ``[timestep_index] + image positions`` later."""
        if full_sequence:
            return torch.arange(self.seq_len)
        image = torch.arange(self.image_start, self.image_start + self.image_len)
        return torch.cat([torch.tensor([self.timestep_index]), image])

    def rows(self, rows: slice) -> HunyuanImage3Sequence:
        """The same layout for a contiguous subset of the batch rows."""
        return HunyuanImage3Sequence(
            self.input_ids[rows], self.image_start, self.grid, self.timestep_index, self.attention_mask,
            self.rope_cos, self.rope_sin,
        )


class HunyuanImage3KVCache:
    """Static per-layer K/V cache of one generation, ``(B, num_key_value_heads, L, head_dim)`` per layer.

    Slots are written in place at the query positions (``index_copy_`` along the sequence axis, as the reference
    ``HunyuanStaticCache``) and every attention reads the whole cache. Storage is created on the first write of each
    layer with the keys' dtype and device (so layers on different GPUs keep their cache beside them). A view of a
    contiguous row range (:meth:`rows`) shares the storage: a call that computes only one CFG branch writes only that
    branch's rows.

    Args:
        batch_size: rows of the full batch (e.g. ``2 * B`` with CFG: cond rows then uncond rows).
        seq_len: ``L``, the full sequence length.
    """

    def __init__(self, batch_size: int, seq_len: int, _storage: dict | None = None, _rows: slice | None = None):
        self.batch_size, self.seq_len = batch_size, seq_len
        self._storage: dict[int, tuple[torch.Tensor, torch.Tensor]] = {} if _storage is None else _storage
        self._rows = slice(0, batch_size) if _rows is None else _rows

    def rows(self, rows: slice) -> HunyuanImage3KVCache:
        """A view of rows ``rows`` (a slice of this view's rows)."""
        start, stop, step = rows.indices(self._rows.stop - self._rows.start)
        if step != 1 or stop <= start:
            raise ValueError(f"rows must be a non-empty contiguous slice, got {rows}")
        base = self._rows.start
        return HunyuanImage3KVCache(self.batch_size, self.seq_len, self._storage, slice(base + start, base + stop))

    @property
    def num_rows(self) -> int:
        return self._rows.stop - self._rows.start

    def is_filled(self, layer: int) -> bool:
        return layer in self._storage

    def update(
        self, layer: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``keys``/``values`` ``(rows, kv_heads, len(positions), head_dim)`` at ``positions``; return the
        whole cache of these rows, ``(rows, kv_heads, L, head_dim)`` each.

        Raises:
            ValueError: on a row-count mismatch, or a partial write into a layer whose cache was never filled.
        """
        if keys.shape[0] != self.num_rows:
            raise ValueError(f"the KV cache view has {self.num_rows} rows, got keys for {keys.shape[0]}")
        if layer not in self._storage:
            if positions.numel() != self.seq_len or self.num_rows != self.batch_size:
                raise ValueError(
                    "the KV cache must be filled by a full-sequence call over every row (denoising step 0) before "
                    "calls that feed only the timestep and image tokens"
                )
            shape = (self.batch_size, keys.shape[1], self.seq_len, keys.shape[3])
            self._storage[layer] = (
                torch.zeros(shape, dtype=keys.dtype, device=keys.device),
                torch.zeros(shape, dtype=values.dtype, device=values.device),
            )
        key_cache, value_cache = self._storage[layer]
        key_rows, value_rows = key_cache[self._rows], value_cache[self._rows]
        positions = positions.to(key_cache.device)
        key_rows.index_copy_(2, positions, keys.to(key_cache.dtype))
        value_rows.index_copy_(2, positions, values.to(value_cache.dtype))
        return key_rows, value_rows


# -- building blocks ---------------------------------------------------------------------------------------------------
class HunyuanImage3TimestepEmbedder(nn.Module):
    """``Linear(256, D) -> GELU (exact) -> Linear(D, D)`` on the 256-wide ``[cos, sin]`` sinusoid of ``t`` with
    frequencies ``exp(-ln(10000) k / 128)`` (diffusers' ``get_timestep_embedding(flip_sin_to_cos=True,
    downscale_freq_shift=0)``, identical to the reference's GLIDE ``timestep_embedding``). ``t`` is sigma x 1000."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t``: ``(N,)`` -> ``(N, D)`` in the weights' dtype."""
        freq = get_timestep_embedding(
            t.reshape(-1), self.frequency_embedding_size, flip_sin_to_cos=True, downscale_freq_shift=0
        )
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class HunyuanImage3ResBlock(nn.Module):
    """2-D ResBlock with adaptive GroupNorm (ADM/GLIDE style), as the reference ``ResBlock``:
    ``h = conv(SiLU(GN(x)))``; ``(scale, shift) = Linear(SiLU(emb))`` (scale first);
    ``h = conv(Dropout(SiLU(GN(h) * (1 + scale) + shift)))``; output ``skip(x) + h`` (1x1-conv skip when the width
    changes). GroupNorm has 32 groups, eps 1e-5."""

    def __init__(self, in_channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[..., None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1.0 + scale) + shift
        h = self.out_layers[1:](h)
        return self.skip_connection(x) + h


class HunyuanImage3PatchEmbed(nn.Module):
    """Image input block (reference ``UNetDown``, ``patch_size=1``): ``Conv3x3(C_lat -> hidden_dim)`` then an AdaGN
    ResBlock to the model width, flattened row-major to tokens ``(B, h*w, D)``."""

    def __init__(self, in_channels: int, emb_channels: int, hidden_channels: int, out_channels: int):
        super().__init__()
        self.model = nn.ModuleList(
            [
                nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
                HunyuanImage3ResBlock(hidden_channels, emb_channels, out_channels),
            ]
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.model[1](self.model[0](x), emb)
        return x.flatten(2).transpose(1, 2)


class HunyuanImage3FinalLayer(nn.Module):
    """Image output block (reference ``UNetUp``, ``patch_size=1``, ``out_norm=True``): tokens ``(B, h*w, D)`` back to
    ``(B, D, h, w)``, an AdaGN ResBlock to ``hidden_dim``, then GroupNorm -> SiLU -> ``Conv3x3(hidden_dim -> C_lat)``."""

    def __init__(self, in_channels: int, emb_channels: int, hidden_channels: int, out_channels: int):
        super().__init__()
        self.model = nn.ModuleList(
            [
                HunyuanImage3ResBlock(in_channels, emb_channels, hidden_channels),
                nn.Sequential(
                    nn.GroupNorm(32, hidden_channels), nn.SiLU(), nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
                ),
            ]
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, _, d = x.shape
        x = x.transpose(1, 2).reshape(b, d, grid[0], grid[1])
        return self.model[1](self.model[0](x, emb))


class HunyuanImage3MLP(nn.Module):
    """SwiGLU MLP with a fused ``gate_and_up_proj``: output ``[x1 | x2]``, result ``down_proj(x1 * silu(x2))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_and_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.gate_and_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(x1 * F.silu(x2))


class HunyuanImage3TopKGate(nn.Module):
    """Router ``wg`` (``Linear(D, E)``, no bias). Logits, softmax and top-k are computed in float32 whatever the
    weights' dtype (the reference creates ``wg`` in float32 and casts its input to float32)."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(T, D)`` -> float32 routing probabilities ``(T, E)``."""
        return F.softmax(F.linear(x.float(), self.wg.weight.float()), dim=-1)


class HunyuanImage3MoE(nn.Module):
    """Shared MLP plus top-k routed experts: ``shared_mlp(x) + sum_{e in topk} w_e * expert_e(x)``.

    Routing (reference ``topkgating``, no capacity drops at inference): softmax over the experts in float32, top-k;
    with ``norm_topk_prob`` the k weights are divided by their sum (clamped at float32 eps), else multiplied by
    ``routed_scaling_factor``. Tokens are grouped per expert (one sort, one host sync) and the weighted expert
    outputs are accumulated in float32.
    """

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, num_shared_expert: int,
        use_shared_mlp: bool, norm_topk_prob: bool, routed_scaling_factor: float, bias: bool = False,
    ):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        if use_shared_mlp:
            self.shared_mlp = HunyuanImage3MLP(hidden_size, intermediate_size * num_shared_expert, bias)
        self.gate = HunyuanImage3TopKGate(hidden_size, num_experts)
        self.experts = nn.ModuleList(
            [HunyuanImage3MLP(hidden_size, intermediate_size, bias) for _ in range(num_experts)]
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(T, D)`` -> (weights ``(T, k)`` float32, expert indices ``(T, k)`` int64)."""
        probs = self.gate(x)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps)
        else:
            weights = weights * self.routed_scaling_factor
        return weights, experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        weights, experts = self.route(x)
        flat_experts = experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        token_of = order // self.top_k
        weight_of = weights.reshape(-1)[order]
        combined = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for index, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of[start : start + count]
            out = self.experts[index](x[tokens])
            combined.index_add_(0, tokens, out.float() * weight_of[start : start + count, None])
            start += count
        out = combined.to(hidden_states.dtype).reshape(shape)
        if hasattr(self, "shared_mlp"):
            out = self.shared_mlp(hidden_states) + out
        return out


class HunyuanImage3Attention(nn.Module):
    """GQA self-attention with a fused ``qkv_proj`` laid out per KV group: reshape to ``(kv_heads, q_per_kv + 2,
    head_dim)`` = the group's query heads, then its key, then its value. RoPE is applied before the per-head RMS
    norms ``query_layernorm`` / ``key_layernorm``; scale ``1/sqrt(head_dim)``; boolean mask (``True`` attends)."""

    def __init__(self, layer_index: int, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 eps: float, use_qk_norm: bool, bias: bool = False):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})")
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.groups = num_heads // num_kv_heads
        self.qkv_proj = nn.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.use_qk_norm = use_qk_norm
        if use_qk_norm:
            self.query_layernorm = LlamaRMSNorm(head_dim, eps=eps)
            self.key_layernorm = LlamaRMSNorm(head_dim, eps=eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
        kv_cache: HunyuanImage3KVCache | None,
    ) -> torch.Tensor:
        b, length, _ = x.shape
        qkv = self.qkv_proj(x).reshape(b, length, self.num_kv_heads, self.groups + 2, self.head_dim)
        q, k, v = torch.split(qkv, [self.groups, 1, 1], dim=3)
        q = q.reshape(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, positions, k, v)
            q = q.to(k.dtype)
        k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.device))
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


class HunyuanImage3DecoderLayer(nn.Module):
    """Pre-norm decoder layer: ``x + attn(RMSNorm(x))``, then ``+ mlp(RMSNorm(.))`` (MoE or dense)."""

    def __init__(self, layer_index: int, config: Mapping[str, Any]):
        super().__init__()
        c = config
        hidden = c["hidden_size"]
        self.input_layernorm = LlamaRMSNorm(hidden, eps=c["rms_norm_eps"])
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=c["rms_norm_eps"])
        self.self_attn = HunyuanImage3Attention(
            layer_index, hidden, c["num_attention_heads"], c["num_key_value_heads"], c["attention_head_dim"],
            c["rms_norm_eps"], c["use_qk_norm"], c["attention_bias"],
        )
        per_layer = lambda v: v if isinstance(v, int) else v[layer_index]  # noqa: E731
        if c["num_experts"] > 1 and layer_index >= c["moe_layer_num_skipped"]:
            self.mlp = HunyuanImage3MoE(
                hidden, c["num_experts"], per_layer(c["moe_topk"]), per_layer(c["moe_intermediate_size"]),
                per_layer(c["num_shared_expert"]), c["use_mixed_mlp_moe"], c["norm_topk_prob"],
                c["routed_scaling_factor"], c["mlp_bias"],
            )
        else:
            self.mlp = HunyuanImage3MLP(hidden, c["intermediate_size"], c["mlp_bias"])

    def forward(self, x, cos, sin, mask, positions, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, positions, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class HunyuanImage3Backbone(nn.Module):
    """``model.*`` of the checkpoint: ``wte`` and ``layers`` (``ln_f`` is text-only and not built)."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.wte = nn.Embedding(config["vocab_size"], config["hidden_size"])
        self.layers = nn.ModuleList(
            [HunyuanImage3DecoderLayer(i, config) for i in range(config["num_hidden_layers"])]
        )


@dataclass
class HunyuanImage3TransformerOutput(BaseOutput):
    """Output of :class:`HunyuanImage3Transformer2DModel`.

    Attributes:
        sample: ``(B, latent_channels, h, w)`` predicted velocity (flow matching, ``noise - data``).
        last_hidden_state: ``(B, L_q, D)`` backbone output of the fed tokens (no ``ln_f``), when requested.
        inputs_embeds: ``(B, L_q, D)`` input embeddings of the fed tokens, when requested.
    """

    sample: torch.Tensor
    last_hidden_state: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None


_UNSUPPORTED = {
    "hidden_act": ("silu",),
    "img_proj_type": ("unet",),
    "patch_size": (1,),
    "norm_type": ("rms", "hf_rms"),
    "use_mla": (False,),
    "use_cla": (False,),
    "group_limited_greedy": (False,),
    "add_classification_head": (False,),
    "use_rotary_pos_emb": (True,),
}


class HunyuanImage3Transformer2DModel(ModelMixin, ConfigMixin):
    r"""The text-to-image generation path of HunyuanImage-3.0 (``HunyuanImage3ForCausalMM``), as a diffusers model.

    Parameter names are the release checkpoint's (``model.wte``, ``model.layers.{i}.*``, ``patch_embed.*``,
    ``final_layer.*``, ``timestep_emb.*``, ``time_embed.*``, ``time_embed_2.*``), so the official shards load without
    renaming; :data:`HUNYUANIMAGE3_SKIPPED_KEY_PREFIXES` lists what is deliberately not built. Config field names
    are the official ``config.json`` names (``latent_channels`` is ``config["vae"]["latent_channels"]``).

    One forward is one denoising evaluation for every batch row (the reference batches the CFG branches as rows
    ``[cond..., uncond...]``):

    * ``full_sequence=True`` (denoising step 0): the whole sequence. ``<img>`` rows are replaced by
      ``patch_embed(latents, time_embed(t))`` (row-major), the ``<timestep>`` row by ``timestep_emb(t)``; every
      layer's K/V fills ``kv_cache`` (when given).
    * ``full_sequence=False`` (steps >= 1): only ``[<timestep>] + <img> * h*w`` at their original positions; their K/V
      are written into the cache slots and attention runs over the whole cache (prompt K/V from step 0).

    The prediction is ``final_layer(image hidden states, time_embed_2(t))``.

    Args:
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, attention_head_dim,
        rms_norm_eps, rope_theta, num_experts, moe_topk, moe_intermediate_size, num_shared_expert, use_mixed_mlp_moe,
        moe_layer_num_skipped, norm_topk_prob, routed_scaling_factor, intermediate_size, attention_bias, mlp_bias,
        use_qk_norm, patch_embed_hidden_dim, latent_channels, image_base_size, image_token_id: as in the official
        ``config.json`` (per-layer lists allowed for ``moe_topk``, ``moe_intermediate_size``, ``num_shared_expert``).

    Raises:
        ValueError: for inconsistent sizes (GroupNorm needs ``hidden_size`` and ``patch_embed_hidden_dim`` to be
            multiples of 32, the 2-D RoPE a ``head_dim`` multiple of 4; per-layer lists need one entry per layer).
    """

    _no_split_modules = ["HunyuanImage3DecoderLayer"]
    _keep_in_fp32_modules = ["wg"]

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 133120,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        attention_head_dim: int = 128,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        num_experts: int = 64,
        moe_topk: int | Sequence[int] = 8,
        moe_intermediate_size: int | Sequence[int] = 3072,
        num_shared_expert: int | Sequence[int] = 1,
        use_mixed_mlp_moe: bool = True,
        moe_layer_num_skipped: int = 0,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        intermediate_size: int = 3072,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        use_qk_norm: bool = True,
        patch_embed_hidden_dim: int = 1024,
        latent_channels: int = 32,
        image_base_size: int = 1024,
        image_token_id: int = 128006,
    ):
        super().__init__()
        for name in ("moe_topk", "moe_intermediate_size", "num_shared_expert"):
            value = locals()[name]
            if not isinstance(value, int) and len(value) != num_hidden_layers:
                raise ValueError(f"{name} must be an int or a list of num_hidden_layers={num_hidden_layers} ints")
        if hidden_size % 32 or patch_embed_hidden_dim % 32:
            raise ValueError(
                f"hidden_size ({hidden_size}) and patch_embed_hidden_dim ({patch_embed_hidden_dim}) must be multiples "
                "of 32 (GroupNorm with 32 groups)"
            )
        if attention_head_dim % 4:
            raise ValueError(f"attention_head_dim must be a multiple of 4 (2-D RoPE), got {attention_head_dim}")
        config = dict(self.config)
        self.model = HunyuanImage3Backbone(config)
        self.timestep_emb = HunyuanImage3TimestepEmbedder(hidden_size)
        self.time_embed = HunyuanImage3TimestepEmbedder(hidden_size)
        self.time_embed_2 = HunyuanImage3TimestepEmbedder(hidden_size)
        self.patch_embed = HunyuanImage3PatchEmbed(latent_channels, hidden_size, patch_embed_hidden_dim, hidden_size)
        self.final_layer = HunyuanImage3FinalLayer(hidden_size, hidden_size, patch_embed_hidden_dim, latent_channels)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        sequence: HunyuanImage3Sequence,
        kv_cache: HunyuanImage3KVCache | None = None,
        full_sequence: bool = True,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> HunyuanImage3TransformerOutput | tuple[torch.Tensor]:
        """One denoising evaluation.

        Args:
            latents: ``(B, latent_channels, h, w)`` noisy latents (any float dtype; cast to the weights' dtype).
            timestep: ``(B,)`` or scalar, sigma x 1000 in [0, 1000].
            sequence: the token layout (:class:`HunyuanImage3Sequence`) with ``B`` rows of ``input_ids``.
            kv_cache: the generation's cache (a view of these ``B`` rows); required when ``full_sequence=False``.
            full_sequence: ``True`` at denoising step 0 (whole sequence), ``False`` afterwards.
            output_hidden_states: also return the fed tokens' input embeddings and last hidden states.

        Returns:
            :class:`HunyuanImage3TransformerOutput` (or ``(sample,)``); ``sample`` has the dtype of the weights.

        Raises:
            ValueError: on shape mismatches between ``latents``, ``sequence`` and ``kv_cache``, or
                ``full_sequence=False`` without a filled ``kv_cache``.
        """
        b, channels, h, w = latents.shape
        if channels != self.config.latent_channels or (h, w) != tuple(sequence.grid):
            raise ValueError(
                f"latents must have shape (B, {self.config.latent_channels}, {sequence.grid[0]}, {sequence.grid[1]}) "
                f"for this sequence, got {tuple(latents.shape)}"
            )
        if sequence.input_ids.shape[0] != b:
            raise ValueError(f"sequence has {sequence.input_ids.shape[0]} rows but latents have {b}")
        if kv_cache is not None and kv_cache.num_rows != b:
            raise ValueError(f"kv_cache view has {kv_cache.num_rows} rows but latents have {b}")
        if not full_sequence and kv_cache is None:
            raise ValueError("full_sequence=False feeds only the image tokens and needs the kv_cache filled at step 0")
        dtype = self.model.wte.weight.dtype
        device = self.model.wte.weight.device
        timestep = timestep.reshape(-1).expand(b) if timestep.numel() == 1 else timestep.reshape(b)
        timestep = timestep.to(device)
        image_tokens = self.patch_embed(latents.to(device=device, dtype=dtype), self.time_embed(timestep))
        timestep_token = self.timestep_emb(timestep)
        positions = sequence.query_positions(full_sequence).to(device)
        if full_sequence:
            embeds = self.model.wte(sequence.input_ids.to(device))
            start = sequence.image_start
            embeds[:, start : start + sequence.image_len] = image_tokens.to(embeds.dtype)
            embeds[:, sequence.timestep_index] = timestep_token.to(embeds.dtype)
        else:
            embeds = torch.cat([timestep_token[:, None].to(image_tokens.dtype), image_tokens], dim=1)
        cos = sequence.rope_cos.to(device)[positions][None]
        sin = sequence.rope_sin.to(device)[positions][None]
        mask = sequence.attention_mask.to(device)[positions][None, None]
        hidden = embeds
        for layer in self.model.layers:
            hidden = layer(hidden, cos, sin, mask, positions, kv_cache)
        if full_sequence:
            image_hidden = hidden[:, sequence.image_start : sequence.image_start + sequence.image_len]
        else:
            image_hidden = hidden[:, 1:]
        image_hidden = image_hidden.to(self.final_layer.model[1][2].weight.device)
        emb = self.time_embed_2(timestep.to(self.time_embed_2.mlp[0].weight.device))
        sample = self.final_layer(image_hidden, emb, sequence.grid)
        if not return_dict:
            return (sample,)
        if output_hidden_states:
            return HunyuanImage3TransformerOutput(sample=sample, last_hidden_state=hidden, inputs_embeds=embeds)
        return HunyuanImage3TransformerOutput(sample=sample)

    # -- loading ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_official_checkpoint(
        cls,
        directory: str | os.PathLike,
        dtype: torch.dtype | str | None = None,
        device_map: str | Mapping[str, Any] | None = None,
        max_memory: Mapping[Any, Any] | None = None,
        device: torch.device | str | None = None,
        output_loading_info: bool = False,
        config_overrides: Mapping[str, Any] | None = None,
        torch_dtype: torch.dtype | str | None = None,
    ):
        """Build from a release directory (``config.json``) and load its weights shard by shard.

        See :func:`load_official_component`; ``config_overrides`` changes config fields before building (e.g.
        ``{"num_hidden_layers": 2}`` for a reduced-depth model: the layers beyond are then skipped, not loaded).
        ``torch_dtype`` is the deprecated name of ``dtype`` (warns, as diffusers 0.42 does).
        """
        return load_official_component(
            cls, directory, component="transformer", dtype=dtype, device_map=device_map,
            max_memory=max_memory, device=device, output_loading_info=output_loading_info,
            config_overrides=config_overrides, torch_dtype=torch_dtype,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """A release directory (``config.json`` naming ``HunyuanImage3ForCausalMM`` + sharded safetensors) loads
        through :meth:`from_official_checkpoint` (keyword arguments ``dtype``, ``device_map``, ``max_memory``,
        ``device``, ``output_loading_info``, ``config_overrides``); any other path through diffusers'
        ``ModelMixin.from_pretrained`` (a directory written by ``save_pretrained``)."""
        if is_official_checkpoint(pretrained_model_name_or_path):
            return cls.from_official_checkpoint(pretrained_model_name_or_path, *args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


# -- loading the release layout ------------------------------------------------------------------------------------------
OFFICIAL_ARCHITECTURE = "HunyuanImage3ForCausalMM"


def is_official_checkpoint(path: Any) -> bool:
    """Whether ``path`` is a local release directory (``config.json`` naming ``HunyuanImage3ForCausalMM``)."""
    config = Path(str(path)) / "config.json"
    if not config.is_file():
        return False
    try:
        return OFFICIAL_ARCHITECTURE in json.loads(config.read_text()).get("architectures", [])
    except (ValueError, AttributeError):
        return False


def official_transformer_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`HunyuanImage3Transformer2DModel` kwargs from a release ``config.json`` dict.

    Raises:
        ValueError: for options of the release config this implementation does not support (another activation,
            MLA/CLA attention, group-limited routing, ``patch_size != 1``, a non-"custom" RoPE, ...), naming the field.
    """
    for name, allowed in _UNSUPPORTED.items():
        if name in config and config[name] not in allowed:
            raise ValueError(f"config.json field {name}={config[name]!r} is not supported (supported: {allowed})")
    rope_type = (config.get("rope_scaling") or {}).get("type", "custom")
    if rope_type != "custom":
        raise ValueError(f"config.json field rope_scaling.type={rope_type!r} is not supported (supported: 'custom')")
    names = [
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "attention_head_dim", "rms_norm_eps", "rope_theta", "num_experts", "moe_topk", "moe_intermediate_size",
        "num_shared_expert", "use_mixed_mlp_moe", "moe_layer_num_skipped", "norm_topk_prob", "routed_scaling_factor",
        "intermediate_size", "attention_bias", "mlp_bias", "use_qk_norm", "patch_embed_hidden_dim", "image_base_size",
        "image_token_id",
    ]
    kwargs = {name: config[name] for name in names if name in config}
    if "attention_head_dim" not in kwargs:
        kwargs["attention_head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    kwargs["latent_channels"] = config["vae"]["latent_channels"]
    return kwargs


def _vae_config(config: Mapping[str, Any]) -> dict[str, Any]:
    vae = dict(config["vae"])
    known = {
        "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block", "ffactor_spatial",
        "ffactor_temporal", "sample_size", "sample_tsize", "scaling_factor", "shift_factor",
        "downsample_match_channel", "upsample_match_channel",
    }
    return {k: v for k, v in vae.items() if k in known}


def _resolve_dtype(dtype: Any, config: Mapping[str, Any]) -> torch.dtype:
    value = dtype if dtype is not None else config.get("torch_dtype", "float32")
    if isinstance(value, str):
        value = "bfloat16" if value == "auto" else value
        value = getattr(torch, value.replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (or its name, e.g. 'bfloat16'), got {dtype!r}")
    return value


def _checkpoint_name(component: str, key: str) -> str | None:
    """The module parameter name a checkpoint key loads into for ``component``, or ``None`` if it is not its key."""
    if component == "vae":
        return key[len("vae."):] if key.startswith("vae.decoder.") else None
    return None if key.startswith("vae.") else key


def load_official_component(
    cls,
    directory: str | os.PathLike,
    component: str,
    dtype: torch.dtype | str | None = None,
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: Mapping[Any, Any] | None = None,
    device: torch.device | str | None = None,
    output_loading_info: bool = False,
    config_overrides: Mapping[str, Any] | None = None,
    torch_dtype: torch.dtype | str | None = None,
):
    """Build ``cls`` (the transformer or the VAE decoder) on the meta device and load it from a release directory.

    Weights are read tensor by tensor from the shards listed in ``model.safetensors.index.json`` (or a single
    ``model.safetensors``) with ``safetensors.safe_open``, cast, and placed directly on their device with accelerate's
    ``set_module_tensor_to_device``: no full state dict and no second copy is ever held. Only the shards holding this
    component's keys are opened. Routers (``*.mlp.gate.wg.weight``) stay float32.

    Args:
        component: ``"transformer"`` (every key except ``vae.*`` and the skipped prefixes) or ``"vae"``
            (``vae.decoder.*``).
        dtype: weights' dtype; default the checkpoint's ``torch_dtype`` field (``bfloat16`` for the release).
        device_map: accelerate device map for a model that does not fit one device: ``"auto"``, ``"balanced"``,
            ``"balanced_low_0"``, ``"sequential"`` (computed with ``infer_auto_device_map``, decoder layers never
            split, ``max_memory`` honoured) or an explicit ``{module_name: device}`` dict. Entries may be GPUs or
            ``"cpu"`` (offloaded: accelerate's hooks move them to the execution device on use); ``"disk"`` is refused.
            The model is then dispatched with ``accelerate.dispatch_model``.
        device: without ``device_map``, the single device to load onto (default CPU).
        output_loading_info: also return ``{"missing_keys", "unexpected_keys", "mismatched_keys", "skipped_keys"}``
            (``skipped_keys``: ``{prefix: [keys]}`` of the deliberately unused groups and the other component's keys).
        config_overrides: config fields to change before building.
        torch_dtype: deprecated name of ``dtype`` (warns, as diffusers 0.42 does).

    Raises:
        FileNotFoundError: if ``config.json`` or the weights are missing.
        ValueError: for missing, unexpected or mis-shaped keys of this component, an unsupported config, or a
            ``"disk"`` entry in the device map.
    """
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from cached_diffusers.checkpoints import get_tensor, open_safetensors, read_json_object

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: expected a HunyuanImage-3.0 release directory")
    config = read_json_object(config_path, "HunyuanImage-3.0 config")
    dtype = _resolve_dtype(resolve_dtype(dtype, torch_dtype), config)
    kwargs = official_transformer_config(config) if component == "transformer" else _vae_config(config)
    kwargs.update(config_overrides or {})
    if component == "transformer":
        layers = kwargs["num_hidden_layers"]
        for name in ("moe_topk", "moe_intermediate_size", "num_shared_expert"):
            value = kwargs.get(name)
            if isinstance(value, list) and len(value) > layers and "num_hidden_layers" in (config_overrides or {}):
                kwargs[name] = value[:layers]  # reduced depth: the per-layer lists of the first layers
    with init_empty_weights():
        model = cls(**kwargs)
    expected = dict(model.state_dict())
    keep_fp32 = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())

    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        index = read_json_object(index_path, "safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index_path}: 'weight_map' must be an object mapping tensor names to file names")
    elif (directory / "model.safetensors").is_file():
        with open_safetensors(directory / "model.safetensors") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise FileNotFoundError(f"no model.safetensors.index.json or model.safetensors in {directory}")

    if device_map is not None and device is not None:
        raise ValueError("pass either device_map or device, not both")
    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise ValueError(
                f"device_map must be 'auto', 'balanced', 'balanced_low_0', 'sequential' or a dict, got {device_map!r}"
            )
        device_map = infer_auto_device_map(
            model, max_memory=max_memory, no_split_module_classes=list(cls._no_split_modules or []), dtype=dtype,
        )
    if device_map is not None:
        device_map = dict(device_map)
        if any(str(d) == "disk" for d in device_map.values()):
            raise ValueError("device_map entries 'disk' are not supported; use GPUs and 'cpu' (CPU offload)")

    def target_device(name: str):
        if device_map is None:
            return torch.device(device) if device is not None else torch.device("cpu")
        parts = name.split(".")
        for i in range(len(parts), -1, -1):
            prefix = ".".join(parts[:i])
            if prefix in device_map:
                return device_map[prefix]
        raise ValueError(f"device_map places no module containing {name}")

    skipped: dict[str, list[str]] = defaultdict(list)
    unexpected, mismatched, loaded = [], [], set()
    by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key, filename in weight_map.items():
        skip = next((p for p in HUNYUANIMAGE3_SKIPPED_KEY_PREFIXES if key.startswith(p)), None)
        if skip is not None:
            skipped[skip].append(key)
            continue
        name = _checkpoint_name(component, key)
        if name is None:
            skipped["other component"].append(key)
            continue
        if name not in expected:
            if config_overrides and _is_beyond_overridden_depth(name, kwargs):
                skipped["layers beyond num_hidden_layers (config_overrides)"].append(key)
                continue
            unexpected.append(key)
            continue
        by_file[filename].append((key, name))
    if unexpected:
        raise ValueError(
            f"{len(unexpected)} unexpected checkpoint key(s) for {cls.__name__}: {sorted(unexpected)[:20]}"
        )
    for filename in sorted(by_file):
        shard = directory / filename
        with open_safetensors(shard, device="cpu") as f:
            present = set(f.keys())
            for key, name in by_file[filename]:
                if key not in present:
                    raise ValueError(f"{shard}: tensor {key!r}, listed for this file in {index_path.name}, is not in it")
                tensor = get_tensor(f, key, shard)
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    mismatched.append((key, tuple(tensor.shape), tuple(expected[name].shape)))
                    continue
                target = torch.float32 if any(f".{m}." in f".{name}" for m in keep_fp32) else dtype
                set_module_tensor_to_device(model, name, target_device(name), value=tensor, dtype=target)
                loaded.add(name)
                del tensor
    missing = sorted(set(expected) - loaded)
    if mismatched or missing:
        raise ValueError(
            f"loading {cls.__name__} from {directory}: {len(missing)} missing key(s) {missing[:20]}, "
            f"{len(mismatched)} mis-shaped key(s) {mismatched[:20]}"
        )
    model.eval()
    if device_map is not None:
        model.hf_device_map = device_map
        main = next((d for d in device_map.values() if str(d) not in ("cpu",)), "cpu")
        dispatch_model(model, device_map=device_map, main_device=main)
    model.register_to_config(_name_or_path=str(directory))
    info = {
        "missing_keys": missing,
        "unexpected_keys": unexpected,
        "mismatched_keys": mismatched,
        "skipped_keys": dict(skipped),
    }
    model.loading_info = info
    if output_loading_info:
        return model, info
    return model


def _is_beyond_overridden_depth(name: str, kwargs: Mapping[str, Any]) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and int(parts[2]) >= kwargs["num_hidden_layers"]


# -- the cached model ----------------------------------------------------------------------------------------------------
HUNYUANIMAGE3_CACHE_SPEC = ModelCacheSpec(
    model_name="CachedHunyuanImage3Transformer2DModel",
    num_blocks=1,
    teacache_coefficients=HUNYUANIMAGE3_TEACACHE_COEFFICIENTS,
    teacache_coefficients_source="vllm-project/vllm-omni vllm_omni/diffusion/cache/teacache/config.py (PR #1927)",
    calibration_hint=HUNYUANIMAGE3_CALIBRATION_HINT,
    patterns=(WHOLE_CALL,),
)
"""HunyuanImage-3.0's cache spec: whole-call caching (one "block": the transformer call), TeaCache coefficients
fitted on ``time_embed(t)``. The pipeline checks a config against it before loading any weight."""


class CachedHunyuanImage3Transformer2DModel(CachedTransformerMixin, HunyuanImage3Transformer2DModel):
    """:class:`HunyuanImage3Transformer2DModel` with a cache engine, for :class:`~cached_diffusers.CachedHunyuanImage3Pipeline`.

    The forward also maintains a KV cache, so block-level hooks do not fit: the caching lives in the pipeline's
    denoising loop (whole-call caching, :data:`~cached_diffusers.spec.WHOLE_CALL`), and this model only owns the
    engine (``cache_config``, ``cache_stats``, per-branch state). The cached quantity is the transformer's velocity
    prediction itself, in token layout ``(B, h*w, latent_channels)`` (one "block": ``num_cache_blocks == 1``): on a
    reused step the loop calls no transformer at all and the branch recalls its last computed prediction (or, with
    TaylorSeer, a forecast of it). TeaCache's indicator is ``time_embed(t)``
    (:data:`HUNYUANIMAGE3_TEACACHE_COEFFICIENTS` were fitted on it).

    The spec (:data:`HUNYUANIMAGE3_CACHE_SPEC`) declares the whole-call pattern only, so methods whose policy needs a
    block stack (DBCache and First-Block-Cache: they measure the first blocks' residual at every step) are refused
    by the policy when configured (``ValueError``).

    Its ``forward`` is the parent's (no caching inside).
    """

    cache_spec = HUNYUANIMAGE3_CACHE_SPEC

    @property
    def num_cache_blocks(self) -> int:
        return 1
