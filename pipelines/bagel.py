"""BAGEL-7B-MoT text-to-image pipelines: ``BagelPipeline`` and its cached subclass ``CachedBagelPipeline``.

The loop follows the reference ``Bagel.generate_image`` (ByteDance-Seed/Bagel ``modeling/bagel/bagel.py``) and
``InterleaveInferencer`` (``inferencer.py``):

* Context per guidance branch, prefilled once per call into a read-only K/V cache: ``"gen"`` = the prompt
  ``[<|im_start|>] + tokens + [<|im_end|>]`` (no chat template, no system prompt); ``"cfg_text"`` = an **empty**
  context (its query sits at RoPE position 0); ``"cfg_img"`` = the prompt again (text-to-image has no input image, so
  this branch reproduces ``"gen"``; its K/V cache is the same tensors, its cache state is its own).
* Schedule: ``num_timesteps = N`` points ``t = linspace(1, 0, N)`` shifted by ``t' = s*t / (1 + (s-1)*t)``
  (``s = timestep_shift``) give ``N - 1`` model steps with Euler updates ``x <- x - v * (t'_i - t'_{i+1})``. This is
  diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s)`` with ``set_timesteps(sigmas=linspace(1, 0, N)[:-1])``; the
  model is fed the raw ``t'_i`` (``scheduler.sigmas[i]``), not x1000.
* CFG interval: at step ``i`` the scales apply if ``cfg_interval[0] < t'_i <= cfg_interval[1]``, else both are 1;
  ``"cfg_text"`` is evaluated iff the applied text scale is > 1, ``"cfg_img"`` iff the applied image scale is > 1 as
  well (the reference also evaluates ``"cfg_img"`` when only the image scale is > 1, but then discards it).
* CFG combine and renorm (reference ``_forward_flow``), with ``v`` / ``v_t`` / ``v_i`` the gen / cfg_text / cfg_img
  velocities and ``s_t`` / ``s_i`` the applied scales, when ``s_t > 1``:
  ``"global"`` / ``"channel"``: ``v_text = v_t + s_t (v - v_t)``; ``v' = v_i + s_i (v_text - v_i)`` if ``s_i > 1``
  else ``v_text``; ``v <- v' * clamp(||v|| / (||v'|| + 1e-8), cfg_renorm_min, 1)`` with Frobenius norms over all
  tokens and channels of each image (``"global"``) or per token over the channels (``"channel"``).
  ``"text_channel"``: ``v_text`` is renormalised per token against ``v`` first, then image CFG, no final renorm.
  The reference takes the ``"global"`` norm over the whole packed batch; here it is per image, which equals the
  reference for every image generated alone (batch size 1, the reference's only case).
* Initial noise: ``randn((h*w, p*p*C))`` per image in float32 on the CPU, in the packed token layout, so
  ``generator=torch.Generator().manual_seed(seed)`` reproduces the reference's ``torch.manual_seed(seed)`` noise.
* Decode: FLUX.1 autoencoder (diffusers ``AutoencoderKL``), ``vae.decode(z / scaling_factor + shift_factor)``, then
  ``clamp(x * 0.5 + 0.5, 0, 1)``.

Steps: ``num_inference_steps`` is the number of model steps (diffusers' meaning, default 49); the reference's
``num_timesteps`` (default 50) may be passed instead and means ``num_inference_steps = num_timesteps - 1``.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Any, Callable, Mapping

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedTokenizerBase

from cached_diffusers.configs import CacheConfig
from cached_diffusers.hub import check_local_path, resolve_dtype
from cached_diffusers.models.bagel import (
    BagelKVCache,
    BagelTransformer2DModel,
    CachedBagelTransformer2DModel,
    load_official_transformer,
)
from cached_diffusers.pipeline_mixin import CachedPipelineMixin

__all__ = [
    "BAGEL_AE_DEFAULTS",
    "BAGEL_BRANCHES",
    "BagelPipeline",
    "CachedBagelPipeline",
    "load_official_vae",
    "pack_latents",
    "unpack_latents",
]

BAGEL_BRANCHES = ("gen", "cfg_text", "cfg_img")
"""Guidance branch names, as the reference names them (conditional, text-unconditional, image-unconditional); the
pipeline wraps each transformer call in ``transformer.cache_context(<branch>)``."""

BAGEL_AE_DEFAULTS = {
    "resolution": 256,
    "in_channels": 3,
    "downsample": 8,
    "ch": 128,
    "out_ch": 3,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "z_channels": 16,
    "scale_factor": 0.3611,
    "shift_factor": 0.1159,
}
"""The FLUX.1 autoencoder hyper-parameters the reference loader hard-codes (``modeling/autoencoder.py``
``AutoEncoderParams`` as built in ``app.py`` / ``inference.ipynb``); an ``ae_params.json`` beside ``ae.safetensors``
(same field names) overrides them, e.g. for a tiny test autoencoder."""

_RENORM_TYPES = ("global", "channel", "text_channel")
_OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def pack_latents(latents: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """``(B, C, H/8, W/8)`` -> packed tokens ``(B, h*w, p*p*C)``: row-major over the ``(h, w)`` grid, channels in
    ``(p_row, p_col, c)`` order (reference ``einsum("chpwq->hwpqc")``).

    Raises:
        ValueError: if the latent sides are not multiples of ``patch_size``.
    """
    batch, channels, height, width = latents.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"latents' sides must be multiples of {patch_size}, got {height}x{width}")
    h, w = height // patch_size, width // patch_size
    x = latents.reshape(batch, channels, h, patch_size, w, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(batch, h * w, patch_size * patch_size * channels)


def unpack_latents(tokens: torch.Tensor, grid: tuple[int, int], patch_size: int = 2) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``(B, h*w, p*p*C)`` -> ``(B, C, h*p, w*p)`` (reference ``"nhwpqc->nchpwq"``)."""
    batch, _, dim = tokens.shape
    h, w = grid
    channels = dim // (patch_size * patch_size)
    x = tokens.reshape(batch, h, w, patch_size, patch_size, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(batch, channels, h * patch_size, w * patch_size)


def load_official_vae(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> AutoencoderKL:
    """The FLUX.1 autoencoder of an official BAGEL directory (``ae.safetensors``, BFL/LDM key names) as diffusers'
    ``AutoencoderKL``.

    Hyper-parameters: :data:`BAGEL_AE_DEFAULTS`, overridden by ``ae_params.json`` when present. Config:
    ``block_out_channels = [ch * m for m in ch_mult]``, ``layers_per_block = num_res_blocks``,
    ``latent_channels = z_channels``, 32 norm groups, no quant convs, mid-block attention,
    ``scaling_factor`` / ``shift_factor`` from the params. Weights are converted by diffusers'
    ``convert_ldm_vae_checkpoint`` and loaded strictly.

    Raises:
        FileNotFoundError: without ``ae.safetensors``.
        ValueError: for params inconsistent with the architecture (``downsample != 2**(len(ch_mult) - 1)``, 3
            channels in and out), or weights that do not load with zero missing and zero unexpected keys.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from cached_diffusers.checkpoints import load_safetensors, read_json_object

    path = os.fspath(path)
    weights = os.path.join(path, "ae.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"ae.safetensors not found in {path}")
    params = dict(BAGEL_AE_DEFAULTS)
    params_file = os.path.join(path, "ae_params.json")
    if os.path.isfile(params_file):
        extra = read_json_object(params_file, "BAGEL autoencoder parameters")
        unknown = sorted(set(extra) - set(params))
        if unknown:
            raise ValueError(f"{params_file}: unknown field(s) {', '.join(unknown)}; known: {', '.join(params)}")
        params.update(extra)
    if params["downsample"] != 2 ** (len(params["ch_mult"]) - 1):
        raise ValueError(
            f"ae params: downsample ({params['downsample']}) must be 2**(len(ch_mult) - 1) = "
            f"{2 ** (len(params['ch_mult']) - 1)}"
        )
    vae = make_bagel_vae(params)
    state = load_safetensors(weights)
    converted = convert_ldm_vae_checkpoint(state, vae.config)
    missing, unexpected = vae.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not load into AutoencoderKL: missing {missing}, unexpected {unexpected}")
    vae = vae.to(device)
    if dtype is not None and dtype != torch.float32:
        vae = vae.to(dtype)
    return vae.eval()


def make_bagel_vae(params: Mapping[str, Any] = BAGEL_AE_DEFAULTS) -> AutoencoderKL:
    """An ``AutoencoderKL`` (random weights) with the architecture of the reference ``AutoEncoder`` for ``params``."""
    blocks = len(params["ch_mult"])
    return AutoencoderKL(
        in_channels=params["in_channels"],
        out_channels=params["out_ch"],
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=[params["ch"] * m for m in params["ch_mult"]],
        layers_per_block=params["num_res_blocks"],
        latent_channels=params["z_channels"],
        norm_num_groups=32,
        sample_size=params["resolution"],
        scaling_factor=params["scale_factor"],
        shift_factor=params["shift_factor"],
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def _is_official_dir(path: Any) -> bool:
    return (
        isinstance(path, (str, os.PathLike))
        and os.path.isfile(os.path.join(path, "llm_config.json"))
        and not os.path.isfile(os.path.join(path, "model_index.json"))
    )


class BagelPipeline(DiffusionPipeline):
    r"""Text-to-image with BAGEL-7B-MoT (ByteDance-Seed/Bagel, arXiv 2505.14683).

    Components: ``transformer`` (:class:`~cached_diffusers.models.bagel.BagelTransformer2DModel`), ``vae`` (the
    FLUX.1 ``AutoencoderKL``), ``tokenizer`` (the Qwen2.5 tokenizer, with ``<|im_start|>``, ``<|im_end|>``,
    ``<|vision_start|>``, ``<|vision_end|>``), ``scheduler`` (``FlowMatchEulerDiscreteScheduler``, official shift 3.0).

    ``BagelPipeline.from_pretrained(path)`` reads an official BAGEL directory (``llm_config.json``,
    ``ema.safetensors``, ``ae.safetensors``, tokenizer files; see :meth:`from_official`) or a diffusers-format
    directory written by ``save_pretrained``.

    Raises:
        ValueError: if the tokenizer lacks a special token or its marker ids differ from the transformer's config.
    """

    model_cpu_offload_seq = "transformer->vae"
    _callback_tensor_inputs = ["latents", "velocity", "v_gen", "v_cfg_text", "v_cfg_img"]

    def __init__(
        self,
        transformer: BagelTransformer2DModel,
        vae: AutoencoderKL,
        tokenizer: PreTrainedTokenizerBase,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, tokenizer=tokenizer, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=16)
        if tokenizer is not None:
            ids = {}
            for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"):
                index = tokenizer.convert_tokens_to_ids(token)
                if index is None or index == tokenizer.unk_token_id:
                    raise ValueError(f"the tokenizer has no {token} token, which BAGEL's prompt layout needs")
                ids[token] = index
            self._bos_id, self._eos_id = ids["<|im_start|>"], ids["<|im_end|>"]
            if transformer is not None:
                config = transformer.config
                markers = (ids["<|vision_start|>"], ids["<|vision_end|>"])
                if markers != (config.vision_start_token_id, config.vision_end_token_id):
                    raise ValueError(
                        f"the tokenizer's <|vision_start|>/<|vision_end|> ids {markers} differ from the transformer "
                        f"config's vision_start_token_id/vision_end_token_id "
                        f"{(config.vision_start_token_id, config.vision_end_token_id)}"
                    )

    # -- loading ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """An official BAGEL directory (``llm_config.json`` and no ``model_index.json``) goes to
        :meth:`from_official`; anything else loads as a diffusers pipeline (``DiffusionPipeline.from_pretrained``).

        Raises:
            FileNotFoundError: naming the path, when it looks local (not ``namespace/name``) and does not exist.
        """
        check_local_path(pretrained_model_name_or_path)
        if _is_official_dir(pretrained_model_name_or_path):
            return cls.from_official(pretrained_model_name_or_path, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_official(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device_map: str | torch.device | None = None,
        timestep_shift: float = 3.0,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ):
        """Load an official BAGEL checkpoint directory (the layout of ``ByteDance-Seed/BAGEL-7B-MoT``).

        Reads ``llm_config.json`` and ``ema.safetensors`` (:func:`~cached_diffusers.models.bagel.load_official_transformer`:
        zero missing / unexpected generation-path keys; the vision tower, connector, ``vit_pos_embed`` and ``lm_head``
        are skipped on purpose and listed in ``pipe.transformer.loading_info["skipped"]``), ``ae.safetensors`` (+
        ``ae_params.json`` when present; :func:`load_official_vae`) and the tokenizer files (``AutoTokenizer``).
        ``max_latent_size`` is inferred from ``latent_pos_embed.pos_embed``. Files the reference loader does not read
        (``config.json``, ``preprocessor_config.json``, ``vit_config.json``) are not required.

        Args:
            path: the directory.
            dtype: dtype of the transformer and the autoencoder (default float32; ``torch.bfloat16`` on a GPU).
            device_map: one device for every weight (e.g. ``"cuda"``), default the CPU.
            timestep_shift: the scheduler's shift (official 3.0), the default of ``__call__``'s ``timestep_shift``.
            torch_dtype: deprecated name of ``dtype`` (warns, as diffusers 0.42 does).
            **kwargs: passed to the pipeline's constructor (``cache_config`` for :class:`CachedBagelPipeline`).

        Raises:
            FileNotFoundError: for a missing directory or file; ValueError: for weights that do not match, an unknown
            keyword, or both ``dtype`` and ``torch_dtype``.
        """
        from transformers import AutoTokenizer

        from cached_diffusers.checkpoints import check_tokenizer_files

        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "transformer", "vae", "tokenizer", "scheduler"}
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ValueError(
                f"{cls.__name__}.from_pretrained of an official BAGEL directory takes dtype, device_map, "
                f"timestep_shift{''.join(', ' + a for a in sorted(accepted))}; got unknown {', '.join(unknown)}"
            )
        dtype = resolve_dtype(dtype, torch_dtype)
        if isinstance(device_map, dict):
            raise ValueError("device_map must be one device (e.g. 'cuda') for an official BAGEL directory")
        device = device_map if device_map is not None else "cpu"
        check_tokenizer_files(path)
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(path))
        vae = load_official_vae(path, dtype=dtype, device=device)
        markers = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
        transformer, info = load_official_transformer(
            path,
            dtype=dtype,
            device=device,
            latent_channels=vae.config.latent_channels,
            vision_start_token_id=markers[0],
            vision_end_token_id=markers[1],
        )
        transformer.loading_info = info
        scheduler = FlowMatchEulerDiscreteScheduler(shift=timestep_shift)
        return cls(transformer=transformer, vae=vae, tokenizer=tokenizer, scheduler=scheduler, **kwargs)

    # -- inputs ----------------------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        """``[<|im_start|>] + tokenizer.encode(prompt) + [<|im_end|>]`` (reference ``prepare_prompts``)."""
        return [self._bos_id] + self.tokenizer.encode(prompt, add_special_tokens=False) + [self._eos_id]

    def prepare_contexts(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompt ids ``(B, L)`` and their mask ``(B, L)`` (1 at real tokens)."""
        rows = [self.prompt_ids(p) for p in prompts]
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids.to(device), mask.to(device)

    def check_inputs(self, height, width, num_steps, timestep_shift, cfg_text_scale, cfg_img_scale, cfg_interval,
                     cfg_renorm_type, cfg_renorm_min, output_type, latents, batch):  # fmt: skip
        size = self.transformer.config.max_latent_size * 16
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value % 16 or not 16 <= value <= size:
                raise ValueError(f"{name} must be a multiple of 16 in [16, {size}] (16 * max_latent_size), got {value!r}")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1 (num_timesteps >= 2), got {num_steps!r}")
        if not (isinstance(timestep_shift, (int, float)) and math.isfinite(timestep_shift) and timestep_shift > 0):
            raise ValueError(f"timestep_shift must be a finite number > 0, got {timestep_shift!r}")
        for name, value in (("cfg_text_scale", cfg_text_scale), ("cfg_img_scale", cfg_img_scale)):
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number (> 1 enables that guidance), got {value!r}")
        if (
            not hasattr(cfg_interval, "__len__")
            or len(cfg_interval) != 2
            or not all(isinstance(v, (int, float)) for v in cfg_interval)
            or not 0.0 <= cfg_interval[0] <= cfg_interval[1] <= 1.0
        ):
            raise ValueError(f"cfg_interval must be two numbers 0 <= low <= high <= 1, got {cfg_interval!r}")
        if cfg_renorm_type not in _RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {', '.join(_RENORM_TYPES)}, got {cfg_renorm_type!r}")
        if not (isinstance(cfg_renorm_min, (int, float)) and 0.0 <= cfg_renorm_min <= 1.0):
            raise ValueError(f"cfg_renorm_min must be a number in [0, 1], got {cfg_renorm_min!r}")
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(_OUTPUT_TYPES)}, got {output_type!r}")
        if latents is not None:
            channels = self.transformer.config.latent_channels
            expected = (batch, channels, height // 8, width // 8)
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents must have the shape (B, C, H/8, W/8) = {expected}, got {tuple(latents.shape)}")

    @staticmethod
    def combine_guidance(
        v: torch.Tensor,
        v_text: torch.Tensor | None,
        v_img: torch.Tensor | None,
        text_scale: float,
        img_scale: float,
        renorm_type: str = "global",
        renorm_min: float = 0.0,
    ) -> torch.Tensor:
        """The reference CFG combine and renorm (``Bagel._forward_flow``) on ``(B, N, C)`` velocities.

        ``text_scale <= 1`` returns ``v``. ``v_img`` is used only when ``img_scale > 1``. See the module docstring.
        """
        if text_scale <= 1.0:
            return v
        v_text_cfg = v_text + text_scale * (v - v_text)
        if renorm_type == "text_channel":
            scale = (v.norm(dim=-1, keepdim=True) / (v_text_cfg.norm(dim=-1, keepdim=True) + 1e-8)).clamp(
                min=renorm_min, max=1.0
            )
            v_text_cfg = v_text_cfg * scale
            return v_img + img_scale * (v_text_cfg - v_img) if img_scale > 1.0 else v_text_cfg
        combined = v_img + img_scale * (v_text_cfg - v_img) if img_scale > 1.0 else v_text_cfg
        if renorm_type == "global":
            norm_v = v.flatten(1).norm(dim=1)[:, None, None]
            norm_c = combined.flatten(1).norm(dim=1)[:, None, None]
        else:  # "channel"
            norm_v = v.norm(dim=-1, keepdim=True)
            norm_c = combined.norm(dim=-1, keepdim=True)
        scale = (norm_v / (norm_c + 1e-8)).clamp(min=renorm_min, max=1.0)
        return combined * scale

    # -- the call --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int | None = None,
        num_timesteps: int | None = None,
        timestep_shift: float | None = None,
        cfg_text_scale: float = 4.0,
        cfg_img_scale: float = 1.0,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        cfg_renorm_type: str = "global",
        cfg_renorm_min: float = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        r"""Generate images from text.

        Args:
            prompt (`str` or `list[str]`): the prompt(s).
            height, width (`int`, defaults to 1024): image size in pixels, multiples of 16, at most
                ``16 * max_latent_size`` (1024 for the release).
            num_inference_steps (`int`, *optional*): model steps (default 49). Give this or ``num_timesteps``.
            num_timesteps (`int`, *optional*): the reference's name: schedule points including ``t = 0``; the
                pipeline runs ``num_timesteps - 1`` steps (reference default 50 -> 49 steps).
            timestep_shift (`float`, *optional*): schedule shift ``s`` (> 0); default the scheduler's (3.0).
            cfg_text_scale (`float`, defaults to 4.0): text guidance; > 1 evaluates the ``"cfg_text"`` branch.
            cfg_img_scale (`float`, defaults to 1.0): image guidance; > 1 (with ``cfg_text_scale > 1``) evaluates the
                ``"cfg_img"`` branch, which for text-to-image equals ``"gen"``, so it only rescales text guidance
                (effective text scale ``1 + s_i (s_t - 1)``) at the cost of a third call per step. 1.0 is the
                reference notebook's text-to-image setting; the reference inferencer defaults to 1.5.
            cfg_interval (`tuple[float, float]`, defaults to ``(0.4, 1.0)``): guidance applies where
                ``low < t <= high``; outside it only ``"gen"`` runs.
            cfg_renorm_type (`str`, defaults to ``"global"``): ``"global"``, ``"channel"`` or ``"text_channel"``.
            cfg_renorm_min (`float`, defaults to 0.0, range [0, 1]): lower clamp of the renorm factor.
            num_images_per_prompt (`int`, defaults to 1).
            generator (`torch.Generator` or list, *optional*): draws the initial noise on the CPU in float32 in the
                packed layout, so ``torch.Generator().manual_seed(seed)`` reproduces the reference's ``seed``.
            latents (`torch.Tensor` of shape `(B, 16, H/8, W/8)`, *optional*): the initial noise instead of drawing it.
            output_type (`str`, defaults to ``"pil"``): ``"pil"``, ``"np"``, ``"pt"`` (``[0, 1]``), or ``"latent"``
                (the final latents ``(B, 16, H/8, W/8)``, before the autoencoder).
            return_dict (`bool`, defaults to `True`): return an ``ImagePipelineOutput``, else a tuple.
            callback_on_step_end: ``fn(pipe, step, timestep, tensors) -> dict`` after each step, with ``tensors``
                from ``callback_on_step_end_tensor_inputs``: ``"latents"`` (after the update, packed ``(B, N, 64)``),
                ``"velocity"`` (the combined velocity), ``"v_gen"``, ``"v_cfg_text"``, ``"v_cfg_img"`` (``None``
                where that branch did not run). A returned ``"latents"`` replaces the latents.

        Returns:
            `ImagePipelineOutput` (``images``) or ``(images,)``.

        Raises:
            ValueError: for an input outside its range (the message names it), or both / neither of
                ``num_inference_steps`` and ``num_timesteps`` inconsistent.
        """
        if num_inference_steps is not None and num_timesteps is not None and num_timesteps != num_inference_steps + 1:
            raise ValueError(
                f"num_timesteps ({num_timesteps}) must be num_inference_steps + 1 ({num_inference_steps + 1}); give one"
            )
        if num_inference_steps is None:
            if num_timesteps is not None and (not isinstance(num_timesteps, int) or num_timesteps < 2):
                raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
            num_inference_steps = num_timesteps - 1 if num_timesteps is not None else 49
        if timestep_shift is None:
            timestep_shift = self.scheduler.config.shift
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        unknown = sorted(set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs))
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got {unknown}"
            )
        self.check_inputs(height, width, num_inference_steps, timestep_shift, cfg_text_scale, cfg_img_scale,
                          cfg_interval, cfg_renorm_type, cfg_renorm_min, output_type, latents, batch)  # fmt: skip

        device = self._execution_device
        transformer = self.transformer
        patch = transformer.config.latent_patch_size
        grid = (height // 16, width // 16)

        # 1. Schedule (N = steps + 1 points, terminal 0 appended by the scheduler).
        previous_shift = self.scheduler.shift
        self.scheduler.set_shift(float(timestep_shift))
        try:
            # float32 linspace, as the reference's torch.linspace: the shifted sigmas then equal its schedule exactly
            sigmas = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float32)[:-1].numpy()
            self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        finally:
            self.scheduler.set_shift(previous_shift)
        timesteps = self.scheduler.timesteps
        schedule = self.scheduler.sigmas  # float32, the model's t per step, plus the terminal 0

        # 2. Which branches run where.
        low, high = float(cfg_interval[0]), float(cfg_interval[1])
        in_interval = [bool(schedule[i] > low) and bool(schedule[i] <= high) for i in range(num_inference_steps)]
        text_used = cfg_text_scale > 1.0 and any(in_interval)
        img_used = text_used and cfg_img_scale > 1.0

        # 3. Per-branch prompt K/V caches (read-only while denoising).
        ids, mask = self.prepare_contexts(prompts, device)
        caches: dict[str, BagelKVCache] = {"gen": transformer.prefill(ids, mask)}
        if text_used:
            caches["cfg_text"] = transformer.prefill(ids[:, :0], mask[:, :0])
        if img_used:
            caches["cfg_img"] = caches["gen"]  # text-to-image: the image-CFG context is the prompt again

        # 4. Initial noise, packed (B, h*w, p*p*C), float32.
        if latents is None:
            shape = (batch, grid[0] * grid[1], patch * patch * transformer.config.latent_channels)
            tokens = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        else:
            tokens = pack_latents(latents.float().cpu(), patch)
        tokens = tokens.to(device)

        # 5. Denoising loop. Under CFG-parallel (CachedBagelPipeline.enable_cfg_parallel) the branches of a step run
        # on ranks 0, 1, 2 of the group; `cfg_round` is told each step's branches (only "gen" outside cfg_interval).
        cfg_round = self.__dict__.get("_cfg_parallel_call")
        if cfg_round is not None and cfg_round.cfg.world_size != 1 + text_used + img_used:
            raise ValueError(
                f"CFG-parallel on {cfg_round.cfg.world_size} ranks needs {cfg_round.cfg.world_size} guidance branches, "
                f"but this call evaluates {1 + text_used + img_used} ('gen'{', cfg_text' if text_used else ''}"
                f"{', cfg_img' if img_used else ''}): 2 ranks need cfg_text_scale > 1 and cfg_img_scale <= 1, 3 ranks "
                f"cfg_text_scale > 1 and cfg_img_scale > 1 (with cfg_interval covering some step)"
            )

        def call(branch: str, step: int, t: torch.Tensor) -> torch.Tensor:
            with transformer.cache_context(branch, step_index=step, num_inference_steps=num_inference_steps):
                return transformer(tokens, t, kv_cache=caches[branch], latent_grid=grid, return_dict=False)[0]

        with self.progress_bar(total=num_inference_steps) as progress:
            for i, timestep in enumerate(timesteps):
                t = schedule[i].expand(batch)
                text_scale = float(cfg_text_scale) if in_interval[i] else 1.0
                img_scale = float(cfg_img_scale) if in_interval[i] else 1.0
                names = ["gen"] + ["cfg_text"] * (text_scale > 1.0) + ["cfg_img"] * (text_scale > 1.0 and img_scale > 1.0)
                if cfg_round is not None:
                    cfg_round.expect(names)
                # every branch's call first, then the float32 copies: a CFG-parallel placeholder is filled at the last
                outputs = [call(name, i, t) for name in names]
                v_gen, v_cfg_text, v_cfg_img = [o.float() for o in outputs] + [None] * (3 - len(outputs))
                velocity = self.combine_guidance(
                    v_gen, v_cfg_text, v_cfg_img, text_scale, img_scale, cfg_renorm_type, float(cfg_renorm_min)
                )
                tokens = self.scheduler.step(velocity, timestep, tokens, return_dict=False)[0]
                if callback_on_step_end is not None:
                    values = {"latents": tokens, "velocity": velocity, "v_gen": v_gen, "v_cfg_text": v_cfg_text,
                              "v_cfg_img": v_cfg_img}  # fmt: skip
                    callback_kwargs = {name: values[name] for name in callback_on_step_end_tensor_inputs}
                    result = callback_on_step_end(self, i, timestep, callback_kwargs) or {}
                    tokens = result.get("latents", tokens)
                progress.update()

        # 6. Decode.
        latents = unpack_latents(tokens, grid, patch)
        if output_type == "latent":
            image = latents
        else:
            vae = self.vae
            z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
            decoded = vae.decode(z, return_dict=False)[0]
            image = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


class CachedBagelPipeline(CachedPipelineMixin, BagelPipeline):
    """:class:`BagelPipeline` whose transformer skips cached steps, with one cache state per guidance branch.

    ``CachedBagelPipeline.from_pretrained(path, cache_config=...)`` loads an official BAGEL directory or a
    diffusers-format one (``save_pretrained`` writes ``model_index.json`` naming :class:`BagelPipeline` and
    ``BagelTransformer2DModel``, plus ``cache_config.json`` when caching is on) and turns the transformer into a
    :class:`~cached_diffusers.models.bagel.CachedBagelTransformer2DModel` in place. Every call starts from a clean
    cache state; each transformer call runs inside ``transformer.cache_context(branch, step_index=i,
    num_inference_steps=n)`` with ``branch`` in :data:`BAGEL_BRANCHES`, so ``"gen"``, ``"cfg_text"`` and ``"cfg_img"``
    each keep their own state and residuals. A branch not evaluated at a step (outside ``cfg_interval``) records
    nothing there and its state does not advance; its next evaluated step compares against its own last one. The
    prompt prefill is not a step and never passes through the cache. Afterwards ``pipe.cache_stats`` holds per-branch
    statistics. ``pipe.enable_cfg_parallel()`` runs ``"gen"``, ``"cfg_text"`` (and ``"cfg_img"``) on ranks 0, 1 (and 2)
    of a ``torch.distributed`` group: 2 ranks need ``cfg_text_scale > 1``, 3 ranks also ``cfg_img_scale > 1``; steps
    outside ``cfg_interval`` run ``"gen"`` alone on rank 0 (``docs/multi-gpu.md``).

    Args:
        transformer, vae, tokenizer, scheduler: as for :class:`BagelPipeline`.
        cache_config (`CacheConfig`, `dict`, method name or `None`, defaults to `None`): the cache method.

    Raises:
        ValueError: for an invalid ``cache_config``, or MagCache without ratios (none are published for BAGEL).
    """

    cached_transformer_class = CachedBagelTransformer2DModel
    cfg_parallel_sizes = (2, 3)  # "gen" and "cfg_text", plus "cfg_img" with image guidance

    def _cfg_parallel_problem(self, check_parent_loop) -> None:
        # Its own loop declares each step's branches to the CFG-parallel round ("gen" alone outside cfg_interval,
        # computed on rank 0 while the others wait): no parent loop to check.
        return None

    def __init__(
        self,
        transformer: BagelTransformer2DModel,
        vae: AutoencoderKL,
        tokenizer: PreTrainedTokenizerBase,
        scheduler: FlowMatchEulerDiscreteScheduler,
        cache_config: CacheConfig | Mapping[str, Any] | str | None = None,
    ):
        super().__init__(transformer=transformer, vae=vae, tokenizer=tokenizer, scheduler=scheduler)
        self._init_cache(cache_config)
