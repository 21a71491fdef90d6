"""Cached FLUX.2 transformer: diffusers' ``Flux2Transformer2DModel`` with step caching in ``forward``.

Written for FLUX.2 [klein] (``Flux2KleinPipeline``, ``Flux2KleinKVPipeline``); the class is the one every FLUX.2
checkpoint in diffusers uses, so it loads any of them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2KVCache, Flux2Modulation, Flux2Transformer2DModelOutput
from diffusers.utils.peft_utils import apply_lora_scale
# A stock pipeline built from a cached pipeline's components saves ["cached_diffusers.models.<module>", "Cached..."]
# in model_index.json; diffusers loads a component of such a library through the ModelMixin it finds in the module.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from cached_diffusers.model_mixin import (
    DUAL_STREAM_IO,
    BlockContext,
    BlockIO,
    CachedTransformerMixin,
    block_argument,
    row_gatherer,
)
from cached_diffusers.parallel import context_parallel_group, gather_sequence
from cached_diffusers.patch_tokens import unpack_patch_tokens
from cached_diffusers.spec import ModelCacheSpec

__all__ = ["CachedFlux2Transformer2DModel", "FLUX2_CALIBRATION_HINT", "flux2_latent_grid"]

FLUX2_CALIBRATION_HINT = (
    "No TeaCache coefficients and no MagCache ratios are published or calibrated for FLUX.2 [klein] (the FLUX.1 "
    "TeaCache set that other libraries copy is known to be wrong for FLUX.2), so cached-diffusers ships none. "
    "Calibrate on your checkpoint, step count and size: `cached-diffusers calibrate --model <dir> --method teacache` "
    "(or `--method magcache`) writes a cache_config.json; in Python, run with TeaCacheConfig(calibrate=True) or "
    "MagCacheConfig(calibrate=True) and build the config with TeaCacheConfig.from_calibration(pipe.cache_stats) or "
    "MagCacheConfig.from_calibration(pipe.cache_stats). DBCacheConfig and FirstBlockCacheConfig need no calibration."
)
"""The model's ``calibration_hint``: the engine appends it to its error when TeaCache or MagCache is configured
without coefficients or ratios (none exist for Klein)."""


class CachedFlux2Transformer2DModel(CachedTransformerMixin, Flux2Transformer2DModel):
    """``Flux2Transformer2DModel`` whose ``forward`` skips the block stack on steps the cache method reuses.

    Same constructor, config, checkpoints and ``forward`` signature as the parent. The timestep embedding, the three
    shared modulations, ``x_embedder`` / ``context_embedder``, RoPE and the output head (``norm_out``, ``proj_out``)
    run on every call. The cached stack is the double-stream blocks followed by the single-stream blocks, in
    execution order (``num_cache_blocks = num_layers + num_single_layers``; DBCache's ``Fn`` / ``Bn`` count in this
    order). At every span boundary the stack carries two residual streams, image tokens ``(B, L_img, inner_dim)``
    and text tokens ``(B, L_txt, inner_dim)``: at a single-stream block they are the two parts of the joint
    ``[text; image]`` sequence the parent passes it and gets back. So the whole-stack residual is the image tokens of
    the last single block's output minus the ``x_embedder`` output (and the same for text), and a reused step adds
    exactly that residual before the output head: it is never a no-op.

    ``forward`` runs the parent's own ``forward`` (whatever the installed diffusers' is) and caches through the calls
    of its blocks (:class:`~cached_diffusers.model_mixin.BlockCalls`): on a reused step the cached blocks of both
    lists return their inputs untouched (a single-stream block its joint sequence) and the span's last one adds the
    stored residual to each stream.

    TeaCache's indicator is block 0's modulated image input ``(1 + scale_msa) * norm1(h) + shift_msa``, with
    ``(shift_msa, scale_msa)`` from the shared ``double_stream_modulation_img(temb)``. ``temb`` depends on the
    timestep only, so the conditional and unconditional branches see the same indicator.

    KV-cache mode (``Flux2KleinKVPipeline``): ``kv_cache_mode="extract"`` (reference-image tokens prepended to the
    image stream, their K/V stored in a new ``Flux2KVCache``) must run every block and is accepted only at step 0,
    which every cache method computes; in ``"cached"`` mode the blocks only read the KV cache, so skipping them
    leaves it intact.

    No TeaCache coefficients and no MagCache ratios are known for FLUX.2 [klein]: configuring either without
    explicit ones raises ``ValueError`` saying how to calibrate (:data:`FLUX2_CALIBRATION_HINT`).

    Context parallelism (``enable_parallelism(config=ContextParallelConfig(...))``) uses the parent's ``_cp_plan``,
    which shards the token sequence at the model's input: each rank caches the residual of its shard, and every
    decision is taken from statistics summed over the context-parallel group (:mod:`cached_diffusers.parallel`), so
    all ranks take the single-process decisions.

    With ``cache_config=None`` ``forward`` is the parent's.
    """

    cache_spec = ModelCacheSpec(model_name="CachedFlux2Transformer2DModel", calibration_hint=FLUX2_CALIBRATION_HINT)
    cached_block_lists = ("transformer_blocks", "single_transformer_blocks")

    @property
    def num_cache_blocks(self) -> int:
        return len(self.transformer_blocks) + len(self.single_transformer_blocks)

    @apply_lora_scale("joint_attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        timestep: torch.LongTensor = None,
        img_ids: torch.Tensor = None,
        txt_ids: torch.Tensor = None,
        guidance: torch.Tensor = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        kv_cache: Flux2KVCache | None = None,
        kv_cache_mode: str | None = None,
        num_ref_tokens: int = 0,
        ref_fixed_timestep: float = 0.0,
    ) -> torch.Tensor | Flux2Transformer2DModelOutput:
        """The parent's own forward, its block calls intercepted by the cache. Arguments and returns as there.

        Raises:
            ValueError: when caching is on and the denoising step is unknown (see ``cache_context``), or
                ``kv_cache_mode="extract"`` is used at a step other than 0.
        """
        call = functools.partial(
            type(self)._parent_forward,
            self,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            joint_attention_kwargs=joint_attention_kwargs,
            return_dict=return_dict,
            kv_cache=kv_cache,
            kv_cache_mode=kv_cache_mode,
            num_ref_tokens=num_ref_tokens,
            ref_fixed_timestep=ref_fixed_timestep,
        )
        if not self.cache_engine.active:
            return call()
        if kv_cache_mode == "extract" and num_ref_tokens > 0 and self.cache_engine.step_context().step != 0:
            raise ValueError(
                "kv_cache_mode='extract' fills the reference-image KV cache and must run every block, so with caching "
                "on it is accepted only at denoising step 0 (which every cache method computes), as "
                "Flux2KleinKVPipeline calls it"
            )
        # the parent's plan shards the sequence at the model's input: this rank's text length and raw latent shard
        context = BlockContext(
            raw_latent=hidden_states,
            latent_layout=img_ids[0] if img_ids.ndim == 3 else img_ids,
            sequence_group=context_parallel_group(self),
            text_length=encoder_hidden_states.shape[1],
        )
        return self._run_parent_forward(call, context)

    def _block_io(self, context: BlockContext) -> tuple[BlockIO, BlockIO]:
        return FLUX2_DOUBLE_BLOCK_IO, _single_stream_io(context.text_length)

    def _block_indicators(self, args, kwargs, context: BlockContext):
        hidden_states, img_ids = context.raw_latent, context.latent_layout

        def raw_latent(streams) -> torch.Tensor:
            group = context.sequence_group  # the plan shards both at the model's input: gather the whole grid
            return flux2_latent_grid(gather_sequence(hidden_states, group, 1), gather_sequence(img_ids, group, 0))

        if not len(self.transformer_blocks):
            return {"sea_latent": raw_latent}
        temb_mod_img = block_argument(args, kwargs, 2, "temb_mod_img")

        def modulated_input(streams: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            block = self.transformer_blocks[0]
            (shift_msa, scale_msa, _), _ = Flux2Modulation.split(temb_mod_img, 2)
            return (1 + scale_msa) * block.norm1(streams[0]) + shift_msa

        return {"teacache_indicator": modulated_input, "sea_latent": raw_latent}


FLUX2_DOUBLE_BLOCK_IO = dataclasses.replace(
    DUAL_STREAM_IO,
    gather=row_gatherer(
        {"hidden_states": 0, "encoder_hidden_states": 1, "temb_mod_img": 2, "temb_mod_txt": 3},
        opaque={"joint_attention_kwargs": 5},
    ),
)
"""The calls of ``Flux2TransformerBlock(hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt,
image_rotary_emb, joint_attention_kwargs)``: the dual-stream streams and the per-sample arguments a sub-batch call
gathers (both streams ``(B, L, D)``, both modulations ``(B, 1, 6 D)``, or one row shared by the batch). The RoPE
frequencies are shared by the batch; the KV-cache modes' attention kwargs make the call run on the whole batch."""

_SINGLE_BLOCK_GATHER = row_gatherer(
    {"hidden_states": 0, "encoder_hidden_states": 1, "temb_mod": 2}, opaque={"joint_attention_kwargs": 4}
)
"""The per-sample arguments of ``Flux2SingleTransformerBlock(hidden_states, encoder_hidden_states, temb_mod,
image_rotary_emb, joint_attention_kwargs, split_hidden_states, text_seq_len)``: the joint sequence ``(B, L, D)``
(or both streams), the modulation ``(B, 1, 3 D)``."""


def _single_stream_io(num_txt_tokens: int) -> BlockIO:
    """A single-stream block's calls as the stack's two streams: the parent passes the joint ``[text; image]``
    sequence (``encoder_hidden_states=None``) and gets it back; the streams are its image and text parts."""

    def joint(args, kwargs):
        return block_argument(args, kwargs, 1, "encoder_hidden_states", None) is None

    def split(args, kwargs):
        return bool(block_argument(args, kwargs, 5, "split_hidden_states", False))

    def streams(args, kwargs):
        hidden_states = block_argument(args, kwargs, 0, "hidden_states")
        if joint(args, kwargs):
            return hidden_states[:, num_txt_tokens:], hidden_states[:, :num_txt_tokens]
        return hidden_states, block_argument(args, kwargs, 1, "encoder_hidden_states")

    def result_streams(result, args, kwargs):
        if isinstance(result, tuple):
            return result[1], result[0]
        return result[:, num_txt_tokens:], result[:, :num_txt_tokens]

    def result(streams, args, kwargs):
        if split(args, kwargs):
            return streams[1], streams[0]
        return torch.cat([streams[1], streams[0]], dim=1)

    def passthrough(args, kwargs):
        if joint(args, kwargs) and not split(args, kwargs):
            return block_argument(args, kwargs, 0, "hidden_states")
        return result(streams(args, kwargs), args, kwargs)

    return BlockIO(
        streams=streams, result_streams=result_streams, result=result, passthrough=passthrough, gather=_SINGLE_BLOCK_GATHER
    )


def flux2_latent_grid(hidden_states: torch.Tensor, img_ids: torch.Tensor) -> torch.Tensor:
    """SeaCache's raw latent of a FLUX.2 call: the generated image's tokens unpacked to the VAE grid ``(B, C, 2h, 2w)``.

    Args:
        hidden_states: the transformer's input ``(B, L, 4 C)``: the patchified latent (2x2 patches, features in
            ``(c, p_row, p_col)`` order, ``Flux2Pipeline._patchify_latents``) packed as tokens, possibly with
            reference-image tokens (Klein editing, the KV pipeline's extract call).
        img_ids: ``(L, 4)`` or ``(B, L, 4)`` token coordinates ``(t, h, w, l)``; the generated image has the smallest
            ``t`` (0; reference images 10, 20, ...), and its ``(h, w)`` place each token on the grid.

    Raises:
        ValueError: when the generated image's tokens do not fill a rectangular grid.
    """
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    ids = ids.to(device=hidden_states.device, dtype=torch.long)
    generated = ids[:, 0] == ids[:, 0].min()
    rows, cols = ids[generated, 1], ids[generated, 2]
    rows, cols = rows - rows.min(), cols - cols.min()
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    if int(generated.sum()) != height * width:
        raise ValueError(f"FLUX.2 image ids do not form a {height}x{width} grid for SeaCache's latent")
    order = torch.argsort(rows * width + cols)
    tokens = hidden_states[:, generated][:, order]
    return unpack_patch_tokens(tokens, height, width)
