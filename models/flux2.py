"""Cached FLUX.2 transformer: diffusers' ``Flux2Transformer2DModel`` with step caching in ``forward``.

Written for FLUX.2 [klein] (``Flux2KleinPipeline``, ``Flux2KleinKVPipeline``); the class is the one every FLUX.2
checkpoint in diffusers uses, so it loads any of them.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import (
    Flux2KVCache,
    Flux2Modulation,
    Flux2Transformer2DModelOutput,
    _blend_double_block_mods,
    _blend_single_block_mods,
)
from diffusers.utils.peft_utils import apply_lora_scale
# A stock pipeline built from a cached pipeline's components saves ["cached_diffusers.models.<module>", "Cached..."]
# in model_index.json; diffusers loads a component of such a library through the ModelMixin it finds in the module.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from cached_diffusers.model_mixin import CachedTransformerMixin, MirroredForward
from cached_diffusers.parallel import context_parallel_group, gather_sequence
from cached_diffusers.sea import unpack_patch_tokens
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


_PARENT_FORWARD = Flux2Transformer2DModel.forward.__wrapped__
"""The parent's forward without its ``apply_lora_scale`` decorator (ours applies the scale once). Taken here, at
import, as a plain function: TorchDynamo cannot trace ``super().forward.__wrapped__``, and with caching off
``torch.compile(transformer, fullgraph=True)`` traces this call."""

class CachedFlux2Transformer2DModel(CachedTransformerMixin, Flux2Transformer2DModel):
    """``Flux2Transformer2DModel`` whose ``forward`` skips the block stack on steps the cache method reuses.

    Same constructor, config, checkpoints and ``forward`` signature as the parent. The timestep embedding, the three
    shared modulations, ``x_embedder`` / ``context_embedder``, RoPE and the output head (``norm_out``, ``proj_out``)
    run on every call. The cached stack is the double-stream blocks followed by the single-stream blocks, in
    execution order (``num_cache_blocks = num_layers + num_single_layers``; DBCache's ``Fn`` / ``Bn`` count in this
    order). At every span boundary the stack carries two residual streams, image tokens ``(B, L_img, inner_dim)``
    and text tokens ``(B, L_txt, inner_dim)``: a span of single-stream blocks concatenates ``[text; image]`` as the
    parent does and splits the joint sequence back at its end. So the whole-stack residual is the image tokens of
    the last single block's output minus the ``x_embedder`` output (and the same for text), and a reused step adds
    exactly that residual before the output head: it is never a no-op.

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
    mirrored_forward = MirroredForward(
        sha256="d141ddb68f537de00c25bf7833a6acb4c5614a73166c1a1cfda5ef0c08338751",
        diffusers_version="0.42.1",
        file="models/flux2.py",
    )

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
        """The parent's forward, with the block stack run through the cache engine. Arguments and returns as there.

        Raises:
            ValueError: when caching is on and the denoising step is unknown (see ``cache_context``), or
                ``kv_cache_mode="extract"`` is used at a step other than 0.
        """
        if not self.cache_engine.active:
            return _PARENT_FORWARD(
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

        extract = kv_cache_mode == "extract" and num_ref_tokens > 0
        if extract and self.cache_engine.step_context().step != 0:
            raise ValueError(
                "kv_cache_mode='extract' fills the reference-image KV cache and must run every block, so with caching "
                "on it is accepted only at denoising step 0 (which every cache method computes), as "
                "Flux2KleinKVPipeline calls it"
            )
        num_txt_tokens = encoder_hidden_states.shape[1]

        # 1. Timestep embedding and the shared modulations (as in the parent, same ops in the same order).
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
        temb = self.time_guidance_embed(timestep, guidance)

        double_stream_mod_img = self.double_stream_modulation_img(temb)
        double_stream_mod_txt = self.double_stream_modulation_txt(temb)
        single_stream_mod = self.single_stream_modulation(temb)

        if extract:
            num_img_tokens = hidden_states.shape[1]  # includes the reference tokens
            kv_cache = Flux2KVCache(
                num_double_layers=len(self.transformer_blocks), num_single_layers=len(self.single_transformer_blocks)
            )
            kv_cache.num_ref_tokens = num_ref_tokens
            ref_timestep = torch.full_like(timestep, ref_fixed_timestep * 1000)
            ref_temb = self.time_guidance_embed(ref_timestep, guidance)
            ref_double_mod_img = self.double_stream_modulation_img(ref_temb)
            ref_single_mod = self.single_stream_modulation(ref_temb)
            double_stream_mod_img = _blend_double_block_mods(
                double_stream_mod_img, ref_double_mod_img, num_ref_tokens, num_img_tokens
            )

        # 2. Input projections.
        raw_hidden_states = hidden_states  # SeaCache's indicator (this rank's shard under context parallelism)
        hidden_states = self.x_embedder(hidden_states)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)

        # 3. RoPE for [text; image].
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        image_rotary_emb = self.pos_embed(img_ids)
        text_rotary_emb = self.pos_embed(txt_ids)
        concat_rotary_emb = (
            torch.cat([text_rotary_emb[0], image_rotary_emb[0]], dim=0),
            torch.cat([text_rotary_emb[1], image_rotary_emb[1]], dim=0),
        )

        # 4. Attention kwargs with the KV-cache fields, as the parent builds them.
        if kv_cache_mode == "extract":
            kv_attn_kwargs = {
                **(joint_attention_kwargs or {}),
                "kv_cache": None,
                "kv_cache_mode": "extract",
                "num_ref_tokens": num_ref_tokens,
            }
        elif kv_cache_mode == "cached" and kv_cache is not None:
            kv_attn_kwargs = {
                **(joint_attention_kwargs or {}),
                "kv_cache": None,
                "kv_cache_mode": "cached",
                "num_ref_tokens": kv_cache.num_ref_tokens,
            }
        else:
            kv_attn_kwargs = joint_attention_kwargs
        if extract:
            # [txt_mod, ref_mod, img_mod] over the joint sequence of the single-stream blocks
            single_stream_mod = _blend_single_block_mods(
                single_stream_mod, ref_single_mod, num_txt_tokens, num_ref_tokens,
                num_txt_tokens + hidden_states.shape[1],
            )
        if kv_cache_mode is not None:
            kv_attn_kwargs_single = {**kv_attn_kwargs, "num_txt_tokens": num_txt_tokens}
        else:
            kv_attn_kwargs_single = kv_attn_kwargs

        context = _StackContext(
            num_txt_tokens=num_txt_tokens,
            double_stream_mod_img=double_stream_mod_img,
            double_stream_mod_txt=double_stream_mod_txt,
            single_stream_mod=single_stream_mod,
            rotary_emb=concat_rotary_emb,
            kv_attn_kwargs=kv_attn_kwargs,
            kv_attn_kwargs_single=kv_attn_kwargs_single,
            kv_cache=kv_cache if kv_cache_mode is not None else None,
            raw_latents=(raw_hidden_states, img_ids),
        )

        hidden_states, _ = self._run_block_stack(
            (hidden_states, encoder_hidden_states), context, sequence_group=context_parallel_group(self)
        )

        # The image stream still holds the reference tokens in extract mode.
        if extract:
            hidden_states = hidden_states[:, num_ref_tokens:, ...]

        # 7. Output layers.
        hidden_states = self.norm_out(hidden_states, temb)
        output = self.proj_out(hidden_states)

        if kv_cache_mode == "extract":
            if not return_dict:
                return (output, kv_cache)
            return Flux2Transformer2DModelOutput(sample=output, kv_cache=kv_cache)
        if not return_dict:
            return (output,)
        return Flux2Transformer2DModelOutput(sample=output)

    def _cache_indicators(self, context: _StackContext):
        def modulated_input(streams: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            block = self.transformer_blocks[0]
            (shift_msa, scale_msa, _), _ = Flux2Modulation.split(context.double_stream_mod_img, 2)
            return (1 + scale_msa) * block.norm1(streams[0]) + shift_msa

        def raw_latent(streams) -> torch.Tensor:
            hidden_states, img_ids = context.raw_latents
            group = context_parallel_group(self)  # the plan shards both at the model's input: gather the whole grid
            return flux2_latent_grid(gather_sequence(hidden_states, group, 1), gather_sequence(img_ids, group, 0))

        if not len(self.transformer_blocks):
            return {"sea_latent": raw_latent}
        return {"teacache_indicator": modulated_input, "sea_latent": raw_latent}

    def _run_blocks(
        self, start: int, end: int, streams: tuple[torch.Tensor, torch.Tensor], context: _StackContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run blocks ``start .. end - 1`` of the stack (double-stream blocks first) exactly as the parent's loops do.

        ``streams`` is ``(image tokens, text tokens)`` in and out; single-stream blocks run on ``[text; image]``.
        """
        hidden_states, encoder_hidden_states = streams
        num_double = len(self.transformer_blocks)
        kv_cache = context.kv_cache
        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing

        for index in range(start, min(end, num_double)):
            block = self.transformer_blocks[index]
            kv_attn_kwargs = context.kv_attn_kwargs
            if kv_cache is not None:
                kv_attn_kwargs["kv_cache"] = kv_cache.get_double(index)
            if checkpointing:
                encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(
                    block,
                    hidden_states,
                    encoder_hidden_states,
                    context.double_stream_mod_img,
                    context.double_stream_mod_txt,
                    context.rotary_emb,
                    kv_attn_kwargs,
                )
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb_mod_img=context.double_stream_mod_img,
                    temb_mod_txt=context.double_stream_mod_txt,
                    image_rotary_emb=context.rotary_emb,
                    joint_attention_kwargs=kv_attn_kwargs,
                )

        if end <= num_double:
            return hidden_states, encoder_hidden_states

        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        for index in range(max(start, num_double), end):
            single_index = index - num_double
            block = self.single_transformer_blocks[single_index]
            kv_attn_kwargs_single = context.kv_attn_kwargs_single
            if kv_cache is not None:
                kv_attn_kwargs_single["kv_cache"] = kv_cache.get_single(single_index)
            if checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    block,
                    hidden_states,
                    None,
                    context.single_stream_mod,
                    context.rotary_emb,
                    kv_attn_kwargs_single,
                )
            else:
                hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=None,
                    temb_mod=context.single_stream_mod,
                    image_rotary_emb=context.rotary_emb,
                    joint_attention_kwargs=kv_attn_kwargs_single,
                )
        num_txt_tokens = context.num_txt_tokens
        return hidden_states[:, num_txt_tokens:, ...], hidden_states[:, :num_txt_tokens, ...]


class _StackContext:
    """What the blocks of one forward share (modulations, RoPE, attention kwargs, the KV cache)."""

    __slots__ = (
        "num_txt_tokens",
        "double_stream_mod_img",
        "double_stream_mod_txt",
        "single_stream_mod",
        "rotary_emb",
        "kv_attn_kwargs",
        "kv_attn_kwargs_single",
        "kv_cache",
        "raw_latents",
    )

    def __init__(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self, name, value)


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
