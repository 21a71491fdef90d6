"""Test cases shared by the pipeline-family tests: each cached pipeline with its stock parent, tiny stock components
and call arguments (reference images, masks and control images built here)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import pkgutil
from typing import Any, Callable
from unittest import mock

import numpy as np
import PIL.Image
import torch
import diffusers

import cached_diffusers as cd
from cached_diffusers.tools.tiny import (
    DEFAULT_PROMPTS,
    build_tiny_flux2_klein_components,
    build_tiny_qwenimage_components,
    build_tiny_qwenimage_controlnet,
    build_tiny_qwenimage_layered_models,
    build_tiny_qwenimage_processor,
)

LINEAR = (0.0, 0.0, 0.0, 1.0, 0.0)
"""TeaCache coefficients f(x) = x, for the FLUX.2 transformer (none shipped)."""

QWEN_SIZE = 64
KLEIN_SIZE = 64


def image(size=QWEN_SIZE, seed=0, mode="RGB"):
    """A random reference image (PIL, ``size`` x ``size``)."""
    channels = len(mode)
    data = np.random.RandomState(seed).randint(0, 256, (size, size, channels), dtype=np.uint8)
    return PIL.Image.fromarray(data, mode=mode)


def mask(size=QWEN_SIZE):
    """A mask (PIL ``L``) whose right half is white (repainted)."""
    data = np.zeros((size, size), dtype=np.uint8)
    data[:, size // 2 :] = 255
    return PIL.Image.fromarray(data, mode="L")


@contextlib.contextmanager
def small_working_sizes(area=QWEN_SIZE * QWEN_SIZE):
    """The Qwen-Image edit and layered pipelines resize their reference image to a fixed area (1024^2, 384^2, 640^2)
    with their module's ``calculate_dimensions``; for tiny CPU tests, the same function at a small area. Applied to
    the stock and the cached pipeline alike (the cached one runs the parent's code)."""
    patches = []
    package = importlib.import_module("diffusers.pipelines.qwenimage")
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        original = getattr(module, "calculate_dimensions", None)
        if original is not None:
            patches.append(mock.patch.object(module, "calculate_dimensions", lambda _area, ratio, f=original: f(area, ratio)))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


@dataclasses.dataclass
class Case:
    name: str
    stock: type
    cached: type
    components: Callable[[], dict[str, Any]]
    inputs: Callable[..., dict[str, Any]]  # inputs(steps, seed, cfg, **overrides)
    branches_with_cfg: tuple[str, ...] = ("cond", "uncond")
    strength: bool = False  # starts at a strength-dependent step
    teacache_coefficients: tuple[float, ...] | None = None  # None: the model's own
    load: Callable[[], Any] | None = None  # builds the cached pipeline itself (a checkpoint), instead of components
    batch: Callable[..., dict[str, Any]] | None = None  # batch(steps, rows); None: :func:`diffusers_batch_inputs`
    shared_indicators: tuple[str, ...] = ()  # indicator kinds alike for every sample of a batch on this model

    def cached_pipeline(self):
        """The cached pipeline of this case: ``load()``, or ``cached(**components())``."""
        return self.load() if self.load is not None else self.cached(**self.components())

    def batch_inputs(self, steps: int, rows: tuple[int, ...]) -> dict[str, Any]:
        """Call arguments for the samples ``rows`` of :data:`BATCH_PROMPTS` (sample ``i``: prompt ``i``, seed ``i``;
        ``rows=(0, 1)`` the batch, ``(i,)`` sample ``i`` alone), latents out, CFG on."""
        return (self.batch or diffusers_batch_inputs)(self, steps, rows)


BATCH_PROMPTS = (DEFAULT_PROMPTS[0], DEFAULT_PROMPTS[2])
"""The two samples of the batch checks (prompts of one token length)."""


def diffusers_batch_inputs(case, steps, rows):
    """:meth:`Case.batch_inputs` of a diffusers pipeline: one prompt and one generator per sample."""
    kwargs = case.inputs(steps=steps)
    prompts = [BATCH_PROMPTS[i] for i in rows]
    generators = [torch.Generator().manual_seed(i) for i in rows]
    kwargs["generator"] = generators[0] if len(rows) == 1 else generators
    kwargs["prompt"] = prompts[0] if len(rows) == 1 else prompts
    if kwargs.get("negative_prompt") is not None and len(rows) > 1:
        kwargs["negative_prompt"] = [" "] * len(rows)
    kwargs["output_type"] = "latent"
    return kwargs


def qwen_components(processor=False, controlnet=None, layered=False):
    def build():
        components = build_tiny_qwenimage_components(0)
        if layered:
            components.update(build_tiny_qwenimage_layered_models(0))
        if processor:
            components["processor"] = build_tiny_qwenimage_processor(components["tokenizer"])
        if controlnet is not None:
            components["controlnet"] = build_tiny_qwenimage_controlnet(0, extra_condition_channels=controlnet)
        return components

    return build


def qwen_inputs(extra: Callable[[], dict[str, Any]], size=True):
    def inputs(steps=4, seed=0, cfg=True, **overrides):
        kwargs = dict(
            prompt=DEFAULT_PROMPTS[0],
            negative_prompt=" " if cfg else None,
            true_cfg_scale=4.0 if cfg else 1.0,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
            **(dict(height=QWEN_SIZE, width=QWEN_SIZE) if size else {}),
            **extra(),
        )
        kwargs.update(overrides)
        return kwargs

    return inputs


def klein_components():
    return build_tiny_flux2_klein_components(0, distilled=False)


def klein_inpaint_inputs(steps=4, seed=0, cfg=True, **overrides):
    kwargs = dict(
        prompt=DEFAULT_PROMPTS[0],
        image=image(KLEIN_SIZE),
        mask_image=mask(KLEIN_SIZE),
        height=KLEIN_SIZE,
        width=KLEIN_SIZE,
        guidance_scale=4.0 if cfg else 1.0,
        num_inference_steps=steps,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    kwargs.update(overrides)
    return kwargs


def flux2_dev_components():
    """FLUX.2 [dev]'s classes at tiny size: the Klein tiny transformer with a guidance embedder (dev is
    guidance-distilled), the Klein VAE; no text encoder (prompts are given as ``prompt_embeds``)."""
    from diffusers import Flux2Transformer2DModel

    from cached_diffusers.tools.tiny import FLUX2_KLEIN_TEMB_GAIN, FLUX2_KLEIN_TRANSFORMER_CONFIG

    components = build_tiny_flux2_klein_components(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = Flux2Transformer2DModel(**{**FLUX2_KLEIN_TRANSFORMER_CONFIG, "guidance_embeds": True})
        with torch.no_grad():
            transformer.time_guidance_embed.timestep_embedder.linear_2.weight.mul_(FLUX2_KLEIN_TEMB_GAIN)
    return {
        "scheduler": components["scheduler"],
        "vae": components["vae"],
        "text_encoder": None,
        "tokenizer": None,
        "transformer": transformer.eval(),
    }


def flux2_dev_inputs(steps=4, seed=0, cfg=True, **overrides):
    from cached_diffusers.tools.tiny import FLUX2_KLEIN_TRANSFORMER_CONFIG

    dim = FLUX2_KLEIN_TRANSFORMER_CONFIG["joint_attention_dim"]
    kwargs = dict(
        prompt_embeds=torch.randn(1, 8, dim, generator=torch.Generator().manual_seed(123)),
        height=KLEIN_SIZE,
        width=KLEIN_SIZE,
        guidance_scale=4.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    kwargs.update(overrides)
    return kwargs


CASES = [
    Case("qwen-txt2img", diffusers.QwenImagePipeline, cd.CachedQwenImagePipeline, qwen_components(),
         qwen_inputs(dict)),
    Case("qwen-img2img", diffusers.QwenImageImg2ImgPipeline, cd.CachedQwenImageImg2ImgPipeline, qwen_components(),
         qwen_inputs(lambda: dict(image=image(), strength=0.6)), strength=True),
    Case("qwen-inpaint", diffusers.QwenImageInpaintPipeline, cd.CachedQwenImageInpaintPipeline, qwen_components(),
         qwen_inputs(lambda: dict(image=image(), mask_image=mask(), strength=0.6)), strength=True),
    Case("qwen-edit", diffusers.QwenImageEditPipeline, cd.CachedQwenImageEditPipeline, qwen_components(True),
         qwen_inputs(lambda: dict(image=image()), size=False)),
    Case("qwen-edit-inpaint", diffusers.QwenImageEditInpaintPipeline, cd.CachedQwenImageEditInpaintPipeline,
         qwen_components(True), qwen_inputs(lambda: dict(image=image(), mask_image=mask(), strength=0.6)),
         strength=True),
    Case("qwen-edit-plus", diffusers.QwenImageEditPlusPipeline, cd.CachedQwenImageEditPlusPipeline,
         qwen_components(True), qwen_inputs(lambda: dict(image=[image(seed=1), image(seed=2)]), size=False)),
    Case("qwen-controlnet", diffusers.QwenImageControlNetPipeline, cd.CachedQwenImageControlNetPipeline,
         qwen_components(controlnet=0), qwen_inputs(lambda: dict(control_image=image(seed=3)))),
    Case("qwen-controlnet-inpaint", diffusers.QwenImageControlNetInpaintPipeline,
         cd.CachedQwenImageControlNetInpaintPipeline, qwen_components(controlnet=4),
         qwen_inputs(lambda: dict(control_image=image(seed=3), control_mask=mask()))),
    Case("qwen-layered", diffusers.QwenImageLayeredPipeline, cd.CachedQwenImageLayeredPipeline,
         qwen_components(True, layered=True), qwen_inputs(lambda: dict(image=image(mode="RGBA"), layers=2), size=False)),
    Case("flux2-dev", diffusers.Flux2Pipeline, cd.CachedFlux2Pipeline, flux2_dev_components, flux2_dev_inputs,
         branches_with_cfg=("cond",), teacache_coefficients=LINEAR),
    Case("flux2-klein", diffusers.Flux2KleinPipeline, cd.CachedFlux2KleinPipeline, klein_components,
         lambda **kw: {k: v for k, v in klein_inpaint_inputs(**kw).items() if k not in ("image", "mask_image")},
         teacache_coefficients=LINEAR),
    Case("flux2-klein-inpaint", diffusers.Flux2KleinInpaintPipeline, cd.CachedFlux2KleinInpaintPipeline,
         klein_components, lambda **kw: klein_inpaint_inputs(**{"strength": 0.6, **kw}), strength=True,
         teacache_coefficients=LINEAR),
]
"""Every cached pipeline whose parent drives a diffusers transformer (BAGEL and HunyuanImage-3 are :data:`OWN_MODEL_CASES`)."""



def bagel_pipeline():
    """The cached BAGEL pipeline of the tiny reference checkpoint (``tests/data/reference/bagel-tiny``)."""
    from reference import reference_dir

    return cd.CachedBagelPipeline.from_pretrained(reference_dir("bagel-tiny") / "checkpoint")


def bagel_inputs(steps=4, seed=0, cfg=True, **overrides):
    """The tiny BAGEL case's call (its reference prompt and size), ``steps`` denoising steps (``num_timesteps =
    steps + 1``), text CFG at every step (``cfg_interval=(0, 1)``) when ``cfg``."""
    import json

    from reference import reference_dir

    inputs = json.loads((reference_dir("bagel-tiny") / "inputs.json").read_text())
    kwargs = dict(
        prompt=inputs["prompt"], height=inputs["height"], width=inputs["width"], num_timesteps=steps + 1,
        timestep_shift=inputs["timestep_shift"], cfg_text_scale=inputs["cfg_text_scale"] if cfg else 1.0,
        cfg_img_scale=1.0, cfg_interval=(0.0, 1.0), generator=torch.Generator().manual_seed(seed), output_type="pt",
    )  # fmt: skip
    kwargs.update(overrides)
    return kwargs


def bagel_batch_inputs(case, steps, rows):
    """:meth:`Case.batch_inputs` of BAGEL: prompt ``i`` is the reference prompt, then with " at night"."""
    prompts = [bagel_inputs()["prompt"] + ("" if i == 0 else " at night") for i in rows]
    generators = [torch.Generator().manual_seed(i) for i in rows]
    return bagel_inputs(steps, prompt=prompts if len(rows) > 1 else prompts[0], generator=generators, output_type="latent")


def hunyuanimage3_batch_inputs(case, steps, rows):
    """:meth:`Case.batch_inputs` of HunyuanImage-3.0: one prompt, sample ``i`` from its own initial noise."""
    shape = hunyuanimage3_inputs()["latents"].shape[1:]
    noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(5))[list(rows)]
    return hunyuanimage3_inputs(steps, latents=noise, num_images_per_prompt=len(rows), output_type="latent")


def hunyuanimage3_pipeline():
    """The cached HunyuanImage-3.0 pipeline of the tiny reference checkpoint, float32."""
    from reference import reference_dir

    return cd.CachedHunyuanImage3Pipeline.from_pretrained(reference_dir("hunyuanimage3-tiny") / "checkpoint", dtype=torch.float32)


def hunyuanimage3_inputs(steps=4, seed=0, cfg=True, **overrides):
    """The tiny HunyuanImage-3.0 case's call (its reference prompt, size and initial noise), ``steps`` steps."""
    import json

    from reference import reference_dir
    from safetensors.torch import load_file

    root = reference_dir("hunyuanimage3-tiny")
    inputs = json.loads((root / "inputs.json").read_text())
    noise = load_file(root / "initial_noise.safetensors")["noise"]
    kwargs = dict(
        prompt=inputs["prompt"], height=inputs["height"], width=inputs["width"], num_inference_steps=steps,
        latents=noise, output_type="pt", **({} if cfg else {"guidance_scale": 1.0}),
    )  # fmt: skip
    kwargs.update(overrides)
    return kwargs


OWN_MODEL_CASES = [
    Case("bagel", None, cd.CachedBagelPipeline, None, bagel_inputs, branches_with_cfg=("gen", "cfg_text"),
         load=bagel_pipeline, batch=bagel_batch_inputs),
    # its TeaCache indicator is the timestep embedding time_embed(t): alike for every sample
    Case("hunyuanimage3", None, cd.CachedHunyuanImage3Pipeline, None, hunyuanimage3_inputs, load=hunyuanimage3_pipeline,
         batch=hunyuanimage3_batch_inputs, shared_indicators=("teacache_indicator",)),
]  # fmt: skip
"""The pipelines of our own models (BAGEL, HunyuanImage-3.0), loaded from the tiny reference checkpoints; no
partial-schedule sibling."""

CASES_BY_NAME = {case.name: case for case in CASES + OWN_MODEL_CASES}
