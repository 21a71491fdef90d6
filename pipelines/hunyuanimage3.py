"""Cached HunyuanImage-3.0 text-to-image pipeline, with step caching in its denoising loop.

The loop follows the reference ``HunyuanImage3Text2ImagePipeline`` (``hunyuan_image_3/hunyuan_image_3_pipeline.py``)
and ``HunyuanImage3ForCausalMM.generate_image`` (``hunyuan_image_3/hunyuan.py``) of Tencent-Hunyuan/HunyuanImage-3.0,
re-implemented on diffusers' classes: ``FlowMatchEulerDiscreteScheduler`` with the official shift and explicit sigmas,
``VaeImageProcessor``, ``DiffusionPipeline``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedTokenizerFast

from cached_diffusers.checkpoints import check_tokenizer_files, read_json_object
from cached_diffusers.configs import CacheConfig, resolve_cache_config
from cached_diffusers.engine import DEFAULT_BRANCH, computing_rows
from cached_diffusers.hub import CACHE_CONFIG_NAME, read_cache_config, resolve_dtype
from cached_diffusers.models.hunyuanimage3 import (
    HUNYUANIMAGE3_CACHE_SPEC,
    CachedHunyuanImage3Transformer2DModel,
    HunyuanImage3KVCache,
    HunyuanImage3Sequence,
    HunyuanImage3Transformer2DModel,
    is_official_checkpoint,
)
from cached_diffusers.models.hunyuanimage3_vae import AutoencoderKLHunyuanImage3
from cached_diffusers.pipeline_mixin import CachedPipelineMixin

__all__ = ["CachedHunyuanImage3Pipeline", "build_t2i_input_ids", "resolution_buckets", "snap_to_bucket"]

logger = logging.get_logger(__name__)

_UNSET = object()


def resolution_buckets(base_size: int, step: int | None = None) -> list[tuple[int, int]]:
    """The official size buckets ``(height, width)``, sorted by ``h / w`` (reference ``ResolutionGroup``).

    ``(base, base)`` plus the pairs reached by repeatedly adding ``step`` (default ``base // 16``) to one side and
    subtracting it from the other, within ``[base/2, 2 base]``: 33 buckets; ``(base, base)`` is index 16.
    """
    step = base_size // 16 if step is None else step
    low, high = base_size // 2, base_size * 2
    buckets = [(base_size, base_size)]
    for sign in (1, -1):
        h = w = base_size
        while not ((sign > 0 and h >= high and w <= low) or (sign < 0 and h <= low and w >= high)):
            h = min(h + step, high) if sign > 0 else max(h - step, low)
            w = max(w - step, low) if sign > 0 else min(w + step, high)
            buckets.append((h, w))
    return sorted(buckets, key=lambda hw: hw[0] / hw[1])


def snap_to_bucket(height: int, width: int, base_size: int) -> tuple[int, tuple[int, int]]:
    """``(ratio index k, (height, width))`` of the bucket whose ``h / w`` is nearest to ``height / width``
    (first one on ties, as ``numpy.argmin``); ``k`` selects the ``<img_ratio_k>`` token."""
    buckets = resolution_buckets(base_size)
    ratios = np.array([h / w for h, w in buckets])
    index = int(np.argmin(np.abs(ratios - height / width)))
    return index, buckets[index]


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (tokenizer.unk_token_id is not None and token_id == tokenizer.unk_token_id):
        raise ValueError(f"the tokenizer has no {token!r} token, which HunyuanImage-3.0 text-to-image needs")
    return token_id


def build_t2i_input_ids(
    tokenizer, prompts: list[str], base_size: int, ratio_index: int, grid: tuple[int, int], with_uncond: bool
) -> tuple[torch.Tensor, int, int]:
    """Token ids of the base model's ``pretrain`` text-to-image template, no system prompt.

    Row per prompt: ``<|startoftext|> + prompt + <boi> <img_size_{base}> <img_ratio_{k}> <timestep> + <img> * h*w +
    <eoi>`` (no EOS). With ``with_uncond`` the unconditional rows follow the conditional ones: the same sequence with
    every prompt token replaced by ``<cfg>`` (same length), as the reference tokenizer wrapper builds them.

    Returns:
        ``(input_ids (rows, L) int64, image_start, timestep_index)``.

    Raises:
        ValueError: if the tokenizer lacks a special token, or the prompts tokenize to different lengths (one
            sequence layout is shared by the batch; call the pipeline once per prompt length).
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _token_id(tokenizer, "<|startoftext|>")
    ids = {name: _token_id(tokenizer, name) for name in ("<boi>", "<eoi>", "<img>", "<cfg>", "<timestep>")}
    size = _token_id(tokenizer, f"<img_size_{base_size}>")
    ratio = _token_id(tokenizer, f"<img_ratio_{ratio_index}>")
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    lengths = {len(e) for e in encoded}
    if len(lengths) != 1:
        raise ValueError(
            f"all prompts of one call must tokenize to the same length (one sequence layout per batch); got lengths "
            f"{[len(e) for e in encoded]}: call the pipeline separately per prompt"
        )
    image = [ids["<img>"]] * (grid[0] * grid[1])
    suffix = [ids["<boi>"], size, ratio, ids["<timestep>"]] + image + [ids["<eoi>"]]
    rows = [[bos] + e + suffix for e in encoded]
    if with_uncond:
        rows += [[bos] + [ids["<cfg>"]] * len(e) + suffix for e in encoded]
    image_start = 1 + len(encoded[0]) + 4
    return torch.tensor(rows, dtype=torch.long), image_start, image_start - 1


class CachedHunyuanImage3Pipeline(CachedPipelineMixin, DiffusionPipeline):
    r"""HunyuanImage-3.0 (base) text-to-image with step caching in the denoising loop.

    ``CachedHunyuanImage3Pipeline.from_pretrained(release_dir, cache_config=...)`` loads the official release layout
    (``config.json``, ``generation_config.json``, sharded safetensors with their index, tokenizer files); see
    :meth:`from_pretrained`.

    The loop (reference ``HunyuanImage3Text2ImagePipeline.__call__``): the batch holds the conditional rows and, with
    CFG (``guidance_scale > 1``), the unconditional rows (prompt tokens replaced by ``<cfg>``), predicted in **one**
    transformer call. Step 0 runs the whole sequence and fills the static KV cache; steps >= 1 feed only the
    ``<timestep>`` and ``<img>`` tokens. ``pred = uncond + guidance_scale * (cond - uncond)`` (no rescale, no
    interval) and ``x <- x + (sigma_{i+1} - sigma_i) * pred`` with ``sigma = shift*s / (1 + (shift - 1)*s)``,
    ``s = linspace(1, 0, N + 1)``.

    Caching (``cache_config``): hook-style block skipping does not fit a forward that also maintains a KV cache, so
    the loop caches whole transformer calls (the whole-call pattern, ``docs/development.md``): per denoising step the
    transformer's ``cache_engine`` decides for every CFG branch (``"cond"``, ``"uncond"``, each with its own state),
    one batched call runs the branches that compute and their predictions are committed (the cached quantity is the
    branch's velocity prediction itself), and the other branches recall theirs:

    * step 0 is always computed (it also builds the KV cache);
    * a reused branch calls no transformer: its prediction is the last computed one (TeaCache, MagCache), or a
      Taylor forecast of it (TaylorSeer, ``enable_taylorseer``);
    * when both branches compute, they run in one batched call, exactly as without caching; when they disagree, the
      transformer runs only on the computing branch's rows (a batch of ``B`` rows instead of ``2B``), writing only
      their KV-cache rows.

    KV-cache consistency: prompt K/V are written at step 0 and never change (causal attention: they do not see the
    image). Every computed step rewrites the ``<timestep>`` and ``<img>`` K/V of the rows it computes, in every layer,
    before attending, and the image queries cannot see ``<eoi>`` (masked). So the K/V left stale in a branch's rows by
    its reused steps are overwritten before they could be read: a computed step gives the same prediction as it would
    with every earlier step computed, and a configuration that never reuses is bit-identical to caching off.

    TeaCache's indicator is ``time_embed(t)``, on which the published coefficients were fitted
    (:data:`~cached_diffusers.models.hunyuanimage3.HUNYUANIMAGE3_TEACACHE_COEFFICIENTS`); it depends on the timestep
    only, so both branches take the same decisions. MagCache needs ratios calibrated per branch
    (``MagCacheConfig(calibrate=True)``); TaylorSeer and SCM masks need nothing. DBCache and First-Block-Cache raise
    ``ValueError`` when configured (they need a per-block probe on every step).

    Args:
        transformer: :class:`~cached_diffusers.models.hunyuanimage3.HunyuanImage3Transformer2DModel` (turned into the
            cached class in place).
        vae: :class:`~cached_diffusers.models.hunyuanimage3_vae.AutoencoderKLHunyuanImage3`.
        scheduler: ``FlowMatchEulerDiscreteScheduler`` (its ``shift`` is set per call to ``flow_shift``).
        tokenizer: ``PreTrainedTokenizerFast`` with the HunyuanImage-3.0 special tokens.
        default_num_inference_steps, default_guidance_scale, default_flow_shift: defaults of ``__call__``
            (``generation_config.json``'s ``diff_infer_steps``, ``diff_guidance_scale``, ``flow_shift``).
        cache_config: the cache method (``None`` or ``"none"``: no caching); ``pipe.cache_config`` between calls.
    """

    model_cpu_offload_seq = "transformer->vae"
    _callback_tensor_inputs = ["latents", "noise_pred", "pred_cond", "pred_uncond"]
    cached_transformer_class = CachedHunyuanImage3Transformer2DModel

    def __init__(
        self,
        transformer: HunyuanImage3Transformer2DModel,
        vae: AutoencoderKLHunyuanImage3,
        scheduler: FlowMatchEulerDiscreteScheduler,
        tokenizer: PreTrainedTokenizerFast,
        default_num_inference_steps: int = 50,
        default_guidance_scale: float = 5.0,
        default_flow_shift: float = 3.0,
        cache_config: CacheConfig | Mapping[str, Any] | str | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler, tokenizer=tokenizer)
        self.register_to_config(
            default_num_inference_steps=default_num_inference_steps,
            default_guidance_scale=default_guidance_scale,
            default_flow_shift=default_flow_shift,
        )
        self.vae_scale_factor = vae.config.ffactor_spatial if vae is not None else 16
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._init_cache(cache_config)

    # -- loading -----------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        cache_config: Any = _UNSET,
        dtype: torch.dtype | str | None = None,
        device_map: str | Mapping[str, Any] | None = None,
        max_memory: Mapping[Any, Any] | None = None,
        device: torch.device | str | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        torch_dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> CachedHunyuanImage3Pipeline:
        """Load a local HunyuanImage-3.0 release directory (base text-to-image checkpoint).

        The transformer and the VAE decoder are read shard by shard from ``model.safetensors.index.json`` (see
        :func:`~cached_diffusers.models.hunyuanimage3.load_official_component`: zero missing and zero unexpected keys,
        the unused vision tower, ``lm_head``, ``model.ln_f`` and ``vae.encoder`` skipped and listed in
        ``pipe.transformer.loading_info`` / ``pipe.vae.loading_info``); the tokenizer with
        ``PreTrainedTokenizerFast.from_pretrained`` (the release's remote code is never needed); the call defaults
        from ``generation_config.json``.

        Args:
            cache_config: the cache method; when not passed, ``cache_config.json`` in the directory (if any) is used.
                Checked before any weight is loaded.
            dtype: weights' dtype (default the checkpoint's ``torch_dtype`` field, bfloat16 for the release;
                routers stay float32).
            device_map: accelerate device map for the transformer (``"auto"``, ``"balanced"``, ... or a dict; GPUs
                and ``"cpu"`` offload), with ``max_memory``; the VAE goes to the first GPU of the map.
            device: without ``device_map``, where to load everything (default CPU).
            config_overrides: transformer config changes (e.g. ``{"num_hidden_layers": 2}`` for a reduced-depth
                smoke test; the other layers are not loaded).
            torch_dtype: deprecated name of ``dtype`` (warns, as diffusers 0.42 does).

        Raises:
            FileNotFoundError: naming the path, when it does not exist.
            ValueError: for a path that is not a release directory, an unsupported generation config (only
                ``bot_task="image"``, ``sequence_template="pretrain"`` without system prompt is implemented), an
                invalid cache config (or ``cache_config.json``), DBCache / First-Block-Cache, or unknown keyword
                arguments.
        """
        if kwargs:
            raise ValueError(
                f"unsupported from_pretrained argument(s) {sorted(kwargs)}; supported: cache_config, dtype, "
                "device_map, max_memory, device, config_overrides"
            )
        dtype = resolve_dtype(dtype, torch_dtype)
        directory = Path(pretrained_model_name_or_path)
        if not directory.exists():
            raise FileNotFoundError(f"no such HunyuanImage-3.0 release directory: {os.fspath(directory)!r}")
        if (directory / "config.json").is_file():
            read_json_object(directory / "config.json", "HunyuanImage-3.0 config")  # names the file if unreadable
        if not is_official_checkpoint(directory):
            raise ValueError(
                f"{directory} is not a HunyuanImage-3.0 release directory (config.json with architectures "
                "['HunyuanImage3ForCausalMM'] and sharded safetensors); download tencent/HunyuanImage-3.0 first"
            )
        if cache_config is _UNSET:
            path = directory / CACHE_CONFIG_NAME
            cache_config = read_cache_config(path) if path.is_file() else None
        cache_config = resolve_cache_config(cache_config)
        if cache_config is not None:
            cache_config.make_policy(HUNYUANIMAGE3_CACHE_SPEC)  # refused before any weight loads, as on assignment
        generation = _generation_defaults(directory)
        transformer = HunyuanImage3Transformer2DModel.from_official_checkpoint(
            directory, dtype=dtype, device_map=device_map, max_memory=max_memory, device=device,
            config_overrides=config_overrides,
        )
        vae_device = device
        if device_map is not None:
            vae_device = next((d for d in transformer.hf_device_map.values() if str(d) != "cpu"), "cpu")
            vae_device = f"cuda:{vae_device}" if isinstance(vae_device, int) else vae_device
        vae = AutoencoderKLHunyuanImage3.from_official_checkpoint(directory, dtype=dtype, device=vae_device)
        check_tokenizer_files(directory)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=generation["flow_shift"])
        return cls(
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            tokenizer=tokenizer,
            default_num_inference_steps=generation["diff_infer_steps"],
            default_guidance_scale=generation["diff_guidance_scale"],
            default_flow_shift=generation["flow_shift"],
            cache_config=cache_config,
        )

    def save_pretrained(self, *args: Any, **kwargs: Any):
        """Not supported: the release directory is this pipeline's checkpoint format.

        To make a cache config travel with a release directory, write it beside the weights with
        ``cached_diffusers.hub.save_cache_config(pipe.cache_config, release_dir)``; :meth:`from_pretrained` reads it.

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError(
            "CachedHunyuanImage3Pipeline loads the HunyuanImage-3.0 release layout and does not write another one; "
            "use cached_diffusers.hub.save_cache_config(pipe.cache_config, release_dir) to store the cache config "
            "beside the release weights"
        )

    @property
    def _execution_device(self) -> torch.device:
        device_map = getattr(self.transformer, "hf_device_map", None)
        if device_map:
            main = next((d for d in device_map.values() if str(d) != "cpu"), "cpu")
            return torch.device(f"cuda:{main}" if isinstance(main, int) else main)
        return super()._execution_device

    # -- the call ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        flow_shift: float | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        r"""Generate images.

        Args:
            prompt: one prompt or a list; prompts of one call must have the same token length.
            height, width: requested size in pixels (default ``image_base_size``, 1024 for the release). As the
                reference, the size snaps to the size bucket with the nearest ``h / w`` (:func:`resolution_buckets`,
                33 buckets from ``base/2`` to ``2 base`` per side); a warning is logged when that changes it.
            num_inference_steps: denoising steps = transformer evaluations (default ``diff_infer_steps``), >= 1.
            guidance_scale: CFG scale (default ``diff_guidance_scale``, 5.0); CFG runs when > 1.
            flow_shift: the schedule's shift (default ``flow_shift`` of ``generation_config.json``, 3.0), > 0.
            num_images_per_prompt: images per prompt, >= 1.
            seed: draws the initial noise with ``torch.Generator(execution device).manual_seed(seed)`` in bfloat16,
                as the reference (so a seed gives different noise on CPU and GPU). Exclusive with ``generator``.
            generator: alternatively, generator(s) for ``randn_tensor`` (noise drawn in bfloat16 too).
            latents: the initial noise ``(B, C, H/16, W/16)`` (unpacked latent layout, ``B`` = prompts x images per
                prompt), used as is in float32.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (images in [0, 1]) or ``"latent"`` (final latents).
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).
            callback_on_step_end: ``fn(pipe, i, t, callback_kwargs) -> dict`` after each step; tensors named in
                ``callback_on_step_end_tensor_inputs`` (``latents``: the updated latents; ``noise_pred``: the guided
                prediction; ``pred_cond`` / ``pred_uncond``: the branch predictions, reused ones included). A returned
                ``"latents"`` replaces the latents.

        Returns:
            ``ImagePipelineOutput(images)`` or ``(images,)``.

        Raises:
            ValueError: naming the argument, for invalid values (see the ranges above), a ``latents`` shape that does
                not match the snapped size, or both ``seed`` and ``generator``.
        """
        config = self.config
        num_inference_steps = config.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = config.default_guidance_scale if guidance_scale is None else guidance_scale
        flow_shift = config.default_flow_shift if flow_shift is None else flow_shift
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if isinstance(flow_shift, bool) or not isinstance(flow_shift, (int, float)) or not flow_shift > 0:
            raise ValueError(f"flow_shift must be a number > 0, got {flow_shift!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, got {sorted(unknown)}"
            )
        base = self.transformer.config.image_base_size
        height = base if height is None else height
        width = base if width is None else width
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        ratio_index, (height_b, width_b) = snap_to_bucket(height, width, base)
        if (height_b, width_b) != (height, width):
            logger.warning(
                f"HunyuanImage-3.0 generates at its size buckets: {height}x{width} (HxW) snaps to {height_b}x{width_b} "
                f"(bucket <img_ratio_{ratio_index}>, nearest h/w ratio)"
            )
        factor = self.vae_scale_factor
        grid = (height_b // factor, width_b // factor)
        batch = len(prompts) * num_images_per_prompt
        do_cfg = guidance_scale > 1.0
        device = self._execution_device
        channels = self.transformer.config.latent_channels

        input_ids, image_start, timestep_index = build_t2i_input_ids(
            self.tokenizer, [p for p in prompts for _ in range(num_images_per_prompt)], base, ratio_index, grid, do_cfg
        )
        sequence = HunyuanImage3Sequence.build(
            input_ids, image_start, grid, timestep_index, self.transformer.config.attention_head_dim,
            self.transformer.config.rope_theta,
        )

        shape = (batch, channels, *grid)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"latents must have shape {shape} (B, C, H/16, W/16) for {height_b}x{width_b}, got {tuple(latents.shape)}"
                )
            latents = latents.to(device=device, dtype=torch.float32)
        else:
            if seed is not None:
                generator = torch.Generator(device=device).manual_seed(seed)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.bfloat16).float()

        self.scheduler.set_shift(float(flow_shift))
        sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        timesteps = self.scheduler.timesteps

        rows = 2 * batch if do_cfg else batch
        kv_cache = HunyuanImage3KVCache(rows, sequence.seq_len)
        branch_rows = {DEFAULT_BRANCH: slice(0, batch)}  # the conditional (or only) branch, "cond"
        if do_cfg:
            branch_rows["uncond"] = slice(batch, 2 * batch)
        self._num_timesteps = len(timesteps)

        with self.cache_generation(callback_on_step_end) as callback_on_step_end, self.progress_bar(
            total=num_inference_steps
        ) as progress_bar:
            for i, t in enumerate(timesteps):
                preds = self._predict(i, num_inference_steps, t, latents, sequence, kv_cache, branch_rows)
                pred_cond = preds[DEFAULT_BRANCH]
                pred_uncond = preds.get("uncond")
                noise_pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond) if do_cfg else pred_cond
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {"latents": latents, "noise_pred": noise_pred, "pred_cond": pred_cond, "pred_uncond": pred_uncond}
                    outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                    latents = outputs.pop("latents", latents)
                progress_bar.update()

        if output_type == "latent":
            images = latents
        else:
            vae = self.vae
            z = latents / vae.config.scaling_factor
            if vae.config.shift_factor:
                z = z + vae.config.shift_factor
            decoded = vae.decode(z.unsqueeze(2).to(vae.device), return_dict=False)[0][:, :, -1]
            images = self.image_processor.postprocess(decoded.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # -- one denoising step -------------------------------------------------------------------------------------------
    def _run_transformer(self, i, t, latents, sequence, kv_cache, rows: slice) -> torch.Tensor:
        """One transformer call on the contiguous batch rows ``rows`` of the ``[cond rows; uncond rows]`` batch (a
        branch, both, or, with per-sample decisions, the span of the samples that compute); float32 predictions."""
        n = rows.stop - rows.start
        b = latents.shape[0]
        if rows.start == 0 and n == b:
            latent_input = latents
        else:
            latent_input = torch.cat([latents] * -(-rows.stop // b))[rows]
        timestep = t.expand(n)
        output = self.transformer(
            latent_input, timestep, sequence.rows(rows), kv_cache=kv_cache.rows(rows), full_sequence=(i == 0)
        )
        return output.sample.float()

    def _predict(self, i, num_steps, t, latents, sequence, kv_cache, branch_rows) -> dict[str, torch.Tensor]:
        """The velocity prediction of every branch at step ``i``: ``{"cond": (B, C, h, w), "uncond": ...}`` float32.

        Without caching: one call on all rows. With caching (whole-call caching, the engine's two-phase step): the
        engine decides for every branch (in the order cond, uncond); the branches that compute run in **one**
        transformer call on their rows and their predictions are committed (the cached quantity is the prediction
        itself, in token layout ``(B, h*w, C)``); the others recall their stored (or forecast) prediction and call no
        transformer.

        With per-sample decisions (``batch_decisions="per_sample"``, batch > 1) the call runs on the contiguous
        span of the rows whose samples compute; each branch commits its computing samples' rows and recalls the
        others' (each sample's prediction is then its own call's).

        Raises:
            RuntimeError: if step 0 does not compute every branch (it fills the KV cache of every row).
        """
        engine = self.transformer.cache_engine
        branches = list(branch_rows)
        all_rows = slice(0, branch_rows[branches[-1]].stop)
        if not engine.active:
            pred = self._run_transformer(i, t, latents, sequence, kv_cache, all_rows)
            return {b: pred[r] for b, r in branch_rows.items()}

        b, c, h, w = latents.shape
        embedded: list[torch.Tensor] = []

        def indicator() -> torch.Tensor:
            # TeaCache's indicator: time_embed(t), the AdaGN conditioning of patch_embed (the published fit's input);
            # computed at most once per step (it depends on the timestep only, so every branch shares it)
            if not embedded:
                embedder = self.transformer.time_embed
                timestep = t.reshape(1).expand(b).to(embedder.mlp[0].weight.device)
                embedded.append(embedder(timestep).float())
            return embedded[0]

        # SeaCache's indicator: the raw latent (B, C, h, w) entering the transformer (already on its grid)
        indicators = {"teacache_indicator": indicator, "sea_latent": latents}
        decisions = {
            branch: engine.decide(branch, i, num_steps, inputs=(latents,), indicator=indicators) for branch in branches
        }
        computing = [branch for branch in branches if not decisions[branch].reuse]
        samples = {branch: computing_rows(decisions[branch], b) for branch in computing}
        preds: dict[str, torch.Tensor] = {}
        if computing:
            first, last = branch_rows[computing[0]].start, branch_rows[computing[-1]].start
            rows = slice(first + samples[computing[0]][0], last + samples[computing[-1]][-1] + 1)
            if i == 0 and rows != all_rows:
                raise RuntimeError("denoising step 0 must compute every branch (it fills the KV cache)")
            pred = self._run_transformer(i, t, latents, sequence, kv_cache, rows)
            for branch in computing:
                start = branch_rows[branch].start - rows.start
                index = torch.tensor(samples[branch], dtype=torch.long, device=pred.device)
                if len(samples[branch]) == b:
                    computed = pred[start : start + b]
                else:
                    computed = pred.index_select(0, index + start)
                if len(samples[branch]) == b:
                    preds[branch] = computed
                engine.commit((computed.flatten(2).transpose(1, 2),), branch=branch)
                if len(samples[branch]) < b:  # some samples of this branch reuse: scatter the two
                    (recalled,) = engine.recall(branch=branch)
                    others = torch.tensor(decisions[branch].reusing, dtype=torch.long, device=pred.device)
                    recalled = recalled.transpose(1, 2).reshape(len(others), c, h, w).to(computed.dtype)
                    merged = torch.empty((b, c, h, w), dtype=computed.dtype, device=computed.device)
                    preds[branch] = merged.index_copy_(0, index, computed).index_copy_(0, others, recalled)
        for branch in branches:
            if decisions[branch].reuse:
                (recalled,) = engine.recall(branch=branch)
                preds[branch] = recalled.transpose(1, 2).reshape(b, c, h, w)
        return {branch: preds[branch] for branch in branches}


def _generation_defaults(directory: Path) -> dict[str, Any]:
    """``diff_infer_steps``, ``diff_guidance_scale``, ``flow_shift`` of ``generation_config.json`` (release defaults
    50 / 5.0 / 3.0 when the file is absent), after checking that it describes the implemented template."""
    path = directory / "generation_config.json"
    data = read_json_object(path, "generation config") if path.is_file() else {}
    expected = {"bot_task": "image", "sequence_template": "pretrain", "use_system_prompt": "None"}
    for name, value in expected.items():
        if name in data and data[name] != value:
            raise ValueError(
                f"{path}: {name}={data[name]!r} is not supported; CachedHunyuanImage3Pipeline implements the base "
                f"model's text-to-image template ({', '.join(f'{k}={v!r}' for k, v in expected.items())})"
            )
    return {
        "diff_infer_steps": int(data.get("diff_infer_steps", 50)),
        "diff_guidance_scale": float(data.get("diff_guidance_scale", 5.0)),
        "flow_shift": float(data.get("flow_shift", 3.0)),
    }
