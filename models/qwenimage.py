"""Cached Qwen-Image transformer: diffusers' ``QwenImageTransformer2DModel`` with step caching in ``forward``."""

from __future__ import annotations

from math import prod
from typing import Any

import numpy as np
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
# A stock pipeline built from a cached pipeline's components saves ["cached_diffusers.models.<module>", "Cached..."]
# in model_index.json; diffusers loads a component of such a library through the ModelMixin it finds in the module.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask
from diffusers.utils.peft_utils import apply_lora_scale

from cached_diffusers.model_mixin import CachedTransformerMixin, MirroredForward
from cached_diffusers.parallel import context_parallel_group, shard_sequence
from cached_diffusers.sea import unpack_patch_tokens
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


_PARENT_FORWARD = QwenImageTransformer2DModel.forward.__wrapped__
"""The parent's forward without its ``apply_lora_scale`` decorator (ours applies the scale once). Taken here, at
import, as a plain function: TorchDynamo cannot trace ``super().forward.__wrapped__``, and with caching off
``torch.compile(transformer, fullgraph=True)`` traces this call."""

class CachedQwenImageTransformer2DModel(CachedTransformerMixin, QwenImageTransformer2DModel):
    """``QwenImageTransformer2DModel`` whose ``forward`` skips the block stack on steps the cache method reuses.

    Same constructor, config, checkpoints and ``forward`` signature as the parent. The embeddings (``img_in``,
    ``txt_norm``/``txt_in``, the timestep embedding, RoPE) and the output head (``norm_out``, ``proj_out``) run on
    every call; the 60 dual-stream blocks are the cached stack, with two residual streams, image tokens
    ``(B, L_img, inner_dim)`` and text tokens ``(B, L_txt, inner_dim)``. TeaCache's indicator is block 0's modulated
    image input ``LN(h) * (1 + scale) + shift`` (shift and scale from ``transformer_blocks[0].img_mod(temb)``), which
    depends on the latents and the timestep only, so the conditional and unconditional branches see the same indicator.

    Context parallelism (``enable_parallelism(config=ContextParallelConfig(...))``): the parent's ``_cp_plan`` shards
    the two streams at the input of ``transformer_blocks.0``, inside the cached stack, so that a stack's output would
    be a shard while its input is the whole sequence. This class's :attr:`_cp_plan` drops that one entry and its
    ``forward`` shards both streams itself before the stack (:func:`~cached_diffusers.parallel.shard_sequence`, the
    plan's own splitter), with caching on or off; the rest of the parent's plan (the per-block masks and modulation
    index, RoPE, the gather at ``proj_out``) applies unchanged. Each rank then caches the residual of its shard, and
    every decision is taken from statistics summed over the context-parallel group, so all ranks take the
    single-process decisions.

    With ``cache_config=None`` (and no context parallelism) ``forward`` is the parent's.
    """

    _cp_plan = {
        name: entry
        for name, entry in QwenImageTransformer2DModel._cp_plan.items()
        if name != "transformer_blocks.0"
    }
    """The parent's context-parallel plan without its split of the streams at ``transformer_blocks.0`` (``forward``
    shards them before the cached stack instead)."""

    cache_spec = ModelCacheSpec(
        model_name="CachedQwenImageTransformer2DModel",
        teacache_coefficients=QWENIMAGE_TEACACHE_COEFFICIENTS,
        teacache_coefficients_source=(
            "vllm-project/vllm-omni vllm_omni/diffusion/cache/teacache/config.py (v0.30.0), 'from ComfyUI-TeaCache'"
        ),
        mag_ratios=QWENIMAGE_MAG_RATIOS,
        mag_ratios_source="Zehong-Ma/MagCache MagCache4QwenImage/magcache_generate.py (50 steps, true CFG 4.0)",
    )
    mirrored_forward = MirroredForward(
        sha256="a80c88db6acadbebc3ac929b2ff511994fe2fc9b5f122713a5d0440e00a73501",
        diffusers_version="0.42.1",
        file="models/qwenimage.py",
    )

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
        """The parent's forward, with the block stack run through the cache engine. Arguments and returns as there.

        Raises:
            ValueError: when caching is on and the denoising step is unknown (see ``cache_context``).
        """
        cp_group = context_parallel_group(self)
        if not self.cache_engine.active and cp_group is None:
            return _PARENT_FORWARD(
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

        raw_hidden_states = hidden_states
        hidden_states = self.img_in(hidden_states)
        timestep = timestep.to(hidden_states.dtype)
        modulate_index = None
        if self.zero_cond_t:
            timestep = torch.cat([timestep, timestep * 0], dim=0)
            modulate_index = torch.tensor(
                [[0] * prod(sample[0]) + [1] * sum(prod(s) for s in sample[1:]) for sample in img_shapes],
                device=timestep.device,
                dtype=torch.int,
            )
        encoder_hidden_states = self.txt_in(self.txt_norm(encoder_hidden_states))
        text_seq_len, _, encoder_hidden_states_mask = compute_text_seq_len_from_mask(
            encoder_hidden_states, encoder_hidden_states_mask
        )
        if guidance is None:
            temb = self.time_text_embed(timestep, hidden_states, additional_t_cond)
        else:
            guidance = guidance.to(hidden_states.dtype) * 1000
            temb = self.time_text_embed(timestep, guidance, hidden_states, additional_t_cond)
        image_rotary_emb = self.pos_embed(img_shapes, max_txt_seq_len=text_seq_len, device=hidden_states.device)

        block_kwargs = {
            "encoder_hidden_states_mask": encoder_hidden_states_mask,
            "temb": temb,
            "image_rotary_emb": image_rotary_emb,
            "joint_attention_kwargs": attention_kwargs,
            "modulate_index": modulate_index,
        }

        streams = (hidden_states, encoder_hidden_states)
        indicator_modulate_index = modulate_index
        if cp_group is not None:
            # What the parent's plan does at transformer_blocks.0, done before the stack (see the class docstring).
            streams = tuple(shard_sequence(self, s, dim=1) for s in streams)
            if modulate_index is not None:
                indicator_modulate_index = shard_sequence(self, modulate_index, dim=1)
        raw_latents = (raw_hidden_states, img_shapes)  # SeaCache's indicator: the whole raw latent, on every rank
        context = (block_kwargs, controlnet_block_samples, indicator_modulate_index, raw_latents)
        hidden_states, _ = self._run_block_stack(streams, context, sequence_group=cp_group)

        if self.zero_cond_t:
            temb = temb.chunk(2, dim=0)[0]
        output = self.proj_out(self.norm_out(hidden_states, temb))
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def _cache_indicators(self, context):
        block_kwargs, _, modulate_index, (raw_hidden_states, img_shapes) = context  # modulate_index: this rank's shard

        def modulated_input(streams: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            block = self.transformer_blocks[0]
            img_mod1 = block.img_mod(block_kwargs["temb"]).chunk(2, dim=-1)[0]
            return block._modulate(block.img_norm1(streams[0]), img_mod1, modulate_index)[0]

        def raw_latent(streams) -> torch.Tensor:
            return qwenimage_latent_grid(raw_hidden_states, img_shapes)

        return {"teacache_indicator": modulated_input, "sea_latent": raw_latent}

    def _run_blocks(
        self, start: int, end: int, streams: tuple[torch.Tensor, torch.Tensor], context
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``transformer_blocks[start:end]`` on ``(image tokens, text tokens)`` exactly as the parent's loop does.

        ``context`` is ``(block_kwargs, controlnet_block_samples, indicator_modulate_index, raw_latents)`` of this
        forward.
        """
        block_kwargs, controlnet_block_samples = context[:2]
        hidden_states, encoder_hidden_states = streams
        for index in range(start, end):
            block = self.transformer_blocks[index]
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(
                    block,
                    hidden_states,
                    encoder_hidden_states,
                    block_kwargs["encoder_hidden_states_mask"],
                    block_kwargs["temb"],
                    block_kwargs["image_rotary_emb"],
                    block_kwargs["joint_attention_kwargs"],
                    block_kwargs["modulate_index"],
                )
            else:
                encoder_hidden_states, hidden_states = block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, **block_kwargs)
            if controlnet_block_samples is not None:
                interval = int(np.ceil(len(self.transformer_blocks) / len(controlnet_block_samples)))
                hidden_states = hidden_states + controlnet_block_samples[index // interval]
        return hidden_states, encoder_hidden_states


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
