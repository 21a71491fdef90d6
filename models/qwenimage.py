"""Cached Qwen-Image transformer: diffusers' ``QwenImageTransformer2DModel`` with step caching in ``forward``."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
# A stock pipeline built from a cached pipeline's components saves ["cached_diffusers.models.<module>", "Cached..."]
# in model_index.json; diffusers loads a component of such a library through the ModelMixin it finds in the module.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.utils.peft_utils import apply_lora_scale

from cached_diffusers.model_mixin import (
    DUAL_STREAM_IO,
    BlockContext,
    BlockIO,
    CachedTransformerMixin,
    block_argument,
    row_gatherer,
)
from cached_diffusers.parallel import context_parallel_group, shard_sequence
from cached_diffusers.patch_tokens import unpack_patch_tokens
from cached_diffusers.spec import ModelCacheSpec

__all__ = [
    "CachedQwenImageTransformer2DModel",
    "QWENIMAGE_MAG_RATIOS",
    "QWENIMAGE_TEACACHE_COEFFICIENTS",
    "qwenimage_latent_grid",
]

QWENIMAGE_TEACACHE_COEFFICIENTS = (-4.5e02, 2.8e02, -4.5e01, 3.2e00, -2.0e-02)
"""TeaCache rescaling polynomial for Qwen-Image, ``[c4, c3, c2, c1, c0]`` (highest order first).

Source: vllm-project/vllm-omni ``vllm_omni/diffusion/cache/teacache/config.py`` (v0.30.0), commented there as "from
ComfyUI-TeaCache". Provenance is unclear: welltop-cn/ComfyUI-TeaCache ``nodes.py`` has no Qwen-Image entry and the
round values look hand-tuned. The polynomial is negative for x < 0.0069 and x > 0.426, hence ``|f|`` in the rule.
"""

QWENIMAGE_MAG_RATIOS = (
    1.0, 1.64062, 1.45312, 1.1875, 1.17188, 1.05469, 1.21094, 1.10938, 1.11719, 1.13281,
    1.11719, 1.07812, 1.07031, 1.08594, 1.08594, 1.07812, 1.03906, 1.04688, 1.07812, 1.07031,
    1.03125, 1.07812, 1.04688, 1.04688, 1.04688, 1.03906, 1.01562, 1.03125, 1.02344, 1.02344,
    1.02344, 1.03906, 1.0, 1.01562, 1.0, 0.99219, 1.00781, 0.98047, 0.95703, 0.96875,
    0.99219, 0.92578, 0.92578, 0.90625, 0.85938, 0.80469, 0.87891, 0.75, 0.60938, 0.55078,
)  # fmt: skip
"""MagCache magnitude ratios for Qwen-Image, 50 steps, true CFG 4.0, 1664x928 (one per step, first is the pad).

Source: Zehong-Ma/MagCache ``MagCache4QwenImage/magcache_generate.py``, which stores them per call as identical
cond/uncond pairs; this is the per-branch list. With the official setting (threshold 0.06, K 2, retention 0.2) they
imply 37 of 50 steps computed per branch.
"""


class CachedQwenImageTransformer2DModel(CachedTransformerMixin, QwenImageTransformer2DModel):
    """``QwenImageTransformer2DModel`` whose ``forward`` skips the block stack on steps the cache method reuses.

    Same constructor, config, checkpoints and ``forward`` signature as the parent. The embeddings (``img_in``,
    ``txt_norm``/``txt_in``, the timestep embedding, RoPE) and the output head (``norm_out``, ``proj_out``) run on
    every call; the 60 dual-stream blocks are the cached stack, with two residual streams, image tokens
    ``(B, L_img, inner_dim)`` and text tokens ``(B, L_txt, inner_dim)``. TeaCache's indicator is block 0's modulated
    image input ``LN(h) * (1 + scale) + shift`` (shift and scale from ``transformer_blocks[0].img_mod(temb)``), which
    depends on the latents and the timestep only, so the conditional and unconditional branches see the same indicator.

    ``forward`` runs the parent's own ``forward`` (whatever the installed diffusers' is) and caches through the calls
    of its blocks (:class:`~cached_diffusers.model_mixin.BlockCalls`): block 0's call gives TeaCache's indicator and
    the decision; on a reused step the cached blocks return their inputs untouched and the span's last one adds the
    stored residual to the span's input. The ControlNet residuals the parent's loop adds between the blocks are
    part of the stored residual (as the whole stack's output minus its input); the one added after the last block is
    added on every step.

    Context parallelism (``enable_parallelism(config=ContextParallelConfig(...))``): the parent's ``_cp_plan`` shards
    the two streams inside ``transformer_blocks.0``'s forward, after the call the cache sees, so that a stack's
    output would be a shard while its input is the whole sequence. This class's :attr:`_cp_plan` drops that one
    entry and shards both streams in block 0's intercepted call instead
    (:func:`~cached_diffusers.parallel.shard_sequence`, the plan's own splitter), with caching on or off; the rest of
    the parent's plan (the per-block masks and modulation index, RoPE, the gather at ``proj_out``) applies unchanged.
    Each rank then caches the residual of its shard, and every decision is taken from statistics summed over the
    context-parallel group, so all ranks take the single-process decisions.

    With ``cache_config=None`` (and no context parallelism) ``forward`` is the parent's.
    """

    _cp_plan = {
        name: entry
        for name, entry in QwenImageTransformer2DModel._cp_plan.items()
        if name != "transformer_blocks.0"
    }
    """The parent's context-parallel plan without its split of the streams at ``transformer_blocks.0`` (block 0's
    intercepted call shards them before the cached stack instead)."""

    cache_spec = ModelCacheSpec(
        model_name="CachedQwenImageTransformer2DModel",
        teacache_coefficients=QWENIMAGE_TEACACHE_COEFFICIENTS,
        teacache_coefficients_source=(
            "vllm-project/vllm-omni vllm_omni/diffusion/cache/teacache/config.py (v0.30.0), 'from ComfyUI-TeaCache'"
        ),
        mag_ratios=QWENIMAGE_MAG_RATIOS,
        mag_ratios_source="Zehong-Ma/MagCache MagCache4QwenImage/magcache_generate.py (50 steps, true CFG 4.0)",
    )
    cached_block_lists = ("transformer_blocks",)

    @property
    def num_cache_blocks(self) -> int:
        return len(self.transformer_blocks)

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        encoder_hidden_states_mask: torch.Tensor = None,
        timestep: torch.LongTensor = None,
        img_shapes: list[tuple[int, int, int]] | None = None,
        guidance: torch.Tensor = None,
        attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples=None,
        additional_t_cond=None,
        return_dict: bool = True,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """The parent's own forward, its block calls intercepted by the cache. Arguments and returns as there.

        Raises:
            ValueError: when caching is on and the denoising step is unknown (see ``cache_context``).
        """
        call = functools.partial(
            type(self)._parent_forward,
            self,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            timestep=timestep,
            img_shapes=img_shapes,
            guidance=guidance,
            attention_kwargs=attention_kwargs,
            controlnet_block_samples=controlnet_block_samples,
            additional_t_cond=additional_t_cond,
            return_dict=return_dict,
        )
        cp_group = context_parallel_group(self)
        if not self.cache_engine.active and cp_group is None:
            return call()
        # SeaCache's indicator: the whole raw latent, on every rank (the plan shards inside the stack)
        context = BlockContext(raw_latent=hidden_states, latent_layout=img_shapes, sequence_group=cp_group)
        return self._run_parent_forward(call, context)

    def _block_io(self, context: BlockContext) -> tuple[BlockIO]:
        return (QWENIMAGE_BLOCK_IO,)

    def _prepare_first_block_call(self, args, kwargs, context: BlockContext):
        cp_group = context.sequence_group
        if cp_group is None:
            return args, kwargs
        # What the parent's plan does at transformer_blocks.0, done before the stack (see the class docstring).
        for position, name in enumerate(("hidden_states", "encoder_hidden_states")):
            args, kwargs = _replace_argument(args, kwargs, position, name, lambda s: shard_sequence(self, s, dim=1))
        return args, kwargs

    def _block_indicators(self, args, kwargs, context: BlockContext):
        raw_hidden_states, img_shapes, cp_group = context.raw_latent, context.latent_layout, context.sequence_group
        temb = block_argument(args, kwargs, 3, "temb")
        modulate_index = block_argument(args, kwargs, 6, "modulate_index", None)
        if modulate_index is not None and cp_group is not None:
            modulate_index = shard_sequence(self, modulate_index, dim=1)  # this rank's shard, as its tokens

        def modulated_input(streams: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            block = self.transformer_blocks[0]
            img_mod1 = block.img_mod(temb).chunk(2, dim=-1)[0]
            return block._modulate(block.img_norm1(streams[0]), img_mod1, modulate_index)[0]

        def raw_latent(streams) -> torch.Tensor:
            return qwenimage_latent_grid(raw_hidden_states, img_shapes)

        return {"teacache_indicator": modulated_input, "sea_latent": raw_latent}


QWENIMAGE_BLOCK_IO = dataclasses.replace(
    DUAL_STREAM_IO,
    gather=row_gatherer(
        {"hidden_states": 0, "encoder_hidden_states": 1, "encoder_hidden_states_mask": 2, "temb": 3, "modulate_index": 6},
        opaque={"joint_attention_kwargs": 5},
    ),
)
"""The calls of ``QwenImageTransformerBlock(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
image_rotary_emb, joint_attention_kwargs, modulate_index)``: the dual-stream streams, and the per-sample arguments a
sub-batch call gathers: both streams ``(B, L, D)``, the text mask ``(B, L_txt)``, ``temb`` ``(B, D)`` (with
``zero_cond_t``, ``(2B, D)``: ``[temb(t); temb(0)]``, gathered in both halves) and ``modulate_index`` ``(B, L_img)``.
The RoPE frequencies are shared by the batch; attention kwargs holding anything make the call run on the whole batch."""


def _replace_argument(args: tuple, kwargs: dict, position: int, name: str, fn) -> tuple[tuple, dict]:
    if name in kwargs:
        return args, {**kwargs, name: fn(kwargs[name])}
    return args[:position] + (fn(args[position]),) + args[position + 1 :], kwargs


def qwenimage_latent_grid(hidden_states: torch.Tensor, img_shapes) -> torch.Tensor:
    """SeaCache's raw latent of a Qwen-Image call: the generated image's packed tokens unpacked to the VAE grid.

    Args:
        hidden_states: the transformer's input ``(B, L, 4 C)``: 2x2 patches of the ``C``-channel latent, features in
            ``(c, p_row, p_col)`` order (``QwenImagePipeline._pack_latents``), the generated image's tokens first,
            then any conditioning image's (Qwen-Image-Edit).
        img_shapes: the pipeline's ``img_shapes``, per sample a list of ``(frames, h, w)`` token grids (or one such
            list for every sample); the first grid is the generated image's.

    Returns:
        ``(B, C, 2h, 2w)`` for one frame, ``(B, C, frames, 2h, 2w)`` otherwise. Conditioning images (the later
        grids) are left out, as diffusers' SeaCache hook leaves out visual hints that are not part of the output.

    Raises:
        ValueError: when the tokens do not fit the first grid.
    """
    shapes = img_shapes
    while isinstance(shapes, (list, tuple)) and shapes and isinstance(shapes[0], (list, tuple)):
        shapes = shapes[0]
    frames, height, width = (int(v) for v in shapes)
    tokens = hidden_states[:, : frames * height * width]
    if frames == 1:
        return unpack_patch_tokens(tokens, height, width)
    per_frame = tokens.reshape(tokens.shape[0] * frames, height * width, tokens.shape[-1])
    grid = unpack_patch_tokens(per_frame, height, width)
    return grid.reshape(tokens.shape[0], frames, *grid.shape[1:]).transpose(1, 2)
