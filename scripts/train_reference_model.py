"""Train the reference models: small text-to-image pipelines that draw Noto Color Emoji glyphs from their names.

Two architectures, each with its stock diffusers / transformers classes at small configs:

* ``--architecture qwenimage`` (the default, the embedded default model of ``cached-diffusers demo`` and ``bench``):
  ``QwenImagePipeline`` with a frozen, randomly initialised ``Qwen2_5_VLForConditionalGeneration`` text encoder, an
  ``AutoencoderKLQwenImage`` (4x spatial compression, 16 latent channels) and a ``QwenImageTransformer2DModel``;
* ``--architecture flux2-klein``: ``Flux2KleinPipeline`` (base variant, CFG) with a frozen random
  ``Qwen3ForCausalLM`` text encoder (hidden states of layers 9, 18, 27, prompts padded to
  :data:`cached_diffusers.tools.reference_model.KLEIN_MAX_SEQUENCE_LENGTH` tokens), an ``AutoencoderKLFlux2`` (4x, 16
  channels, patchified 2x2 and batch-normalised as the pipeline expects) and a ``Flux2Transformer2DModel``.

Both tokenizers are Qwen2-style byte-level BPE trained offline on the prompt template and the captions' words. The
autoencoder is trained first (L1 + MSE reconstruction, KL weight 1e-6), then the transformer with rectified flow (flow
matching: ``x_t = (1 - t) x_0 + t * noise``, target ``noise - x_0``, t from a logit-normal, as in Esser et al. 2024,
"Scaling Rectified Flow Transformers", SD3) on the normalised latents, with 10 % of the captions replaced by the
negative / empty prompt so that CFG works, and an EMA of the weights (decay 0.999). Data: a seeded random subset of
512 glyphs of :func:`cached_diffusers.tools.reference_model.render_emoji_dataset` (needs Debian's
``fonts-noto-color-emoji``), each captioned with its lower-cased Unicode name.

Everything is seeded. The script writes the pipeline (diffusers layout, safetensors) to ``--output`` and the
rendered training set to ``--dataset-output``, then measures the nearest-training-image top-1 of uncached
generations on the fixed evaluation prompts and writes it to ``<output>/training_report.json``. Usage (from the
repository root; on a 2-core CPU the defaults take about 50 minutes per model, one thread each)::

    apt-get install fonts-noto-color-emoji
    python scripts/train_reference_model.py                                  # Qwen-Image
    python scripts/train_reference_model.py --architecture flux2-klein       # FLUX.2 [klein]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from build_tiny_tokenizer import build_tokenizer  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen3ForCausalLM  # noqa: E402

from cached_diffusers.tools import reference_model as ref  # noqa: E402
from cached_diffusers.hub import GENERATION_DEFAULTS_NAME  # noqa: E402
from cached_diffusers.tools.timing import Stopwatch  # noqa: E402
from cached_diffusers.tools.tiny import (  # noqa: E402
    FLUX2_KLEIN_SCHEDULER_CONFIG,
    SCHEDULER_CONFIG,
    _flux2_klein_text_encoder_config,
    _text_encoder_config,
    write_tiny_qwen3_tokenizer,
)

LATENT_CHANNELS = 16

VAE_CONFIG = {
    "base_dim": 16,
    "z_dim": LATENT_CHANNELS,
    "dim_mult": [1, 2, 4],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, False],  # 2 downsampling stages: 4x spatial compression
}
"""``AutoencoderKLQwenImage`` kwargs; ``latents_mean``/``latents_std`` are measured on the training set."""

TRANSFORMER_CONFIG = {
    "patch_size": 2,
    "in_channels": 4 * LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "num_layers": 8,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),
}
"""``QwenImageTransformer2DModel`` kwargs (hidden 128, 8 dual-stream blocks)."""

KLEIN_VAE_CONFIG = {
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 64),  # 3 levels: 4x spatial compression
    "layers_per_block": 1,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 8,
    "sample_size": ref.RESOLUTION,
}
"""``AutoencoderKLFlux2`` kwargs; the batch-norm statistics of the patchified latents are measured on the training set."""

KLEIN_TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 4 * LATENT_CHANNELS,  # 2x2-patchified latents
    "num_layers": 2,
    "num_single_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 3 * 32,  # three stacked hidden states of the tiny Qwen3 text encoder
    "axes_dims_rope": (8, 8, 8, 8),
    "guidance_embeds": False,
}
"""``Flux2Transformer2DModel`` kwargs (hidden 128, 2 double-stream + 6 single-stream blocks)."""

KLEIN_EMBEDDING_GAIN = 25.0
"""Factor on the Klein text encoder's token embeddings after its default initialisation (std 0.02 -> 0.5)."""

CAPTION_DROPOUT = 0.1


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def to_pixels(images: np.ndarray, video: bool) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float in [-1, 1], (N, 3, H, W) or (N, 3, 1, H, W) for the video-layout VAE."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x.unsqueeze(2) if video else x


# -- the two architectures -------------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """What differs between the architectures: the autoencoder's layout, the caption-dropout prompt, the models."""

    name: str
    video_vae: bool
    negative_prompt: str
    build_vae: Callable[[], Any]
    build_transformer: Callable[[], Any]


def qwenimage_recipe() -> Recipe:
    return Recipe(
        "qwenimage", True, ref.NEGATIVE_PROMPT,
        lambda: AutoencoderKLQwenImage(**VAE_CONFIG), lambda: QwenImageTransformer2DModel(**TRANSFORMER_CONFIG),
    )  # fmt: skip


def klein_recipe() -> Recipe:
    return Recipe(
        "flux2-klein", False, "",
        lambda: AutoencoderKLFlux2(**KLEIN_VAE_CONFIG), lambda: Flux2Transformer2DModel(**KLEIN_TRANSFORMER_CONFIG),
    )  # fmt: skip


def train_vae(recipe: Recipe, images: np.ndarray, steps: int, batch_size: int, seed: int):
    """Autoencoder training: L1 + MSE reconstruction of the posterior sample, KL weight 1e-6."""
    torch.manual_seed(seed)
    vae = recipe.build_vae()
    pixels = to_pixels(images, recipe.video_vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    for step in range(steps):
        x = pixels[torch.randint(len(pixels), (batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    vae.eval()
    return vae


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, video: bool) -> torch.Tensor:
    """Posterior means: (N, 16, 1, H/4, W/4) for the video-layout VAE, (N, 16, H/4, W/4) otherwise."""
    return torch.cat(
        [vae.encode(to_pixels(images[i : i + 64], video)).latent_dist.mode() for i in range(0, len(images), 64)]
    )


def qwen_tokens(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalise with per-channel statistics (stored in the VAE config, as the pipeline reads them) and pack 2x2
    patches as ``QwenImagePipeline._pack_latents``: (N, 16, 1, h, w) -> (N, h/2 * w/2, 64)."""
    mean, std = latents.mean(dim=(0, 2, 3, 4)), latents.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=[round(float(v), 4) for v in mean], latents_std=[round(float(v), 4) for v in std])
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    x = (latents - mean) / std
    n, c, _, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def klein_tokens(vae, latents: torch.Tensor) -> torch.Tensor:
    """Patchify 2x2, normalise with the batch-norm statistics (set in ``vae.bn`` from the data, as the pipeline reads
    them), pack as ``Flux2KleinPipeline``: (N, 16, h, w) -> (N, h/2 * w/2, 64)."""
    x = Flux2KleinPipeline._patchify_latents(latents)
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3))
    with torch.no_grad():
        vae.bn.running_mean.copy_(mean)
        vae.bn.running_var.copy_(var)
    std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).view(1, -1, 1, 1)
    x = (x - vae.bn.running_mean.view(1, -1, 1, 1)) / std
    return Flux2KleinPipeline._pack_latents(x)


@torch.no_grad()
def encode_prompts(recipe: Recipe, pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings (N, L, D), padded to the longest (Qwen-Image, with masks (N, L)) or to the fixed length
    (Klein, no mask: the pipeline passes none)."""
    cpu = torch.device("cpu")
    if recipe.name == "flux2-klein":
        embeds = [
            pipe.encode_prompt(prompts[i : i + 64], device=cpu, max_sequence_length=ref.KLEIN_MAX_SEQUENCE_LENGTH)[0]
            for i in range(0, len(prompts), 64)
        ]
        return torch.cat(embeds), None
    embeds, masks = [], []
    for i in range(0, len(prompts), 64):
        e, m = pipe._get_qwen_prompt_embeds(prompts[i : i + 64], device=cpu, dtype=torch.float32)
        embeds.append(e)
        masks.append(m)
    length = max(e.shape[1] for e in embeds)
    embeds = torch.cat([F.pad(e, (0, 0, 0, length - e.shape[1])) for e in embeds])
    masks = torch.cat([F.pad(m, (0, length - m.shape[1])) for m in masks])
    return embeds, masks


def model_call(recipe: Recipe, model, xt, t, text, mask, side: int) -> torch.Tensor:
    """The transformer's velocity for packed latents ``xt`` (B, side^2, 64) at times ``t`` (B,) in [0, 1]."""
    b = xt.shape[0]
    if recipe.name == "flux2-klein":
        img_ids = Flux2KleinPipeline._prepare_latent_ids(torch.empty(b, 1, side, side))
        txt_ids = Flux2KleinPipeline._prepare_text_ids(text)
        return model(hidden_states=xt, timestep=t, guidance=None, encoder_hidden_states=text, txt_ids=txt_ids,
                     img_ids=img_ids, return_dict=False)[0]  # fmt: skip
    return model(hidden_states=xt, timestep=t, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                 img_shapes=[[(1, side, side)]] * b, return_dict=False)[0]  # fmt: skip


def train_transformer(recipe: Recipe, x0_all, embeds, masks, empty, steps: int, batch_size: int, seed: int):
    torch.manual_seed(seed)
    model = recipe.build_transformer()
    n, tokens, _ = x0_all.shape
    side = int(math.isqrt(tokens))
    empty_embed, empty_mask = empty
    pad = embeds.shape[1] - empty_embed.shape[1]
    empty_embed = F.pad(empty_embed, (0, 0, 0, pad))[0]
    empty_mask = F.pad(empty_mask, (0, pad))[0] if empty_mask is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.03)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    model.train()
    running = None
    for step in range(steps):
        idx = torch.randint(n, (batch_size,), generator=gen)
        x0, text = x0_all[idx], embeds[idx].clone()
        mask = masks[idx].clone() if masks is not None else None
        drop = torch.rand(batch_size, generator=gen) < CAPTION_DROPOUT
        text[drop] = empty_embed
        if mask is not None:
            mask[drop] = empty_mask
            length = int(mask.sum(1).max())  # no longer than the batch's longest prompt
            text, mask = text[:, :length], mask[:, :length]
        t = torch.sigmoid(torch.randn(batch_size, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        loss = F.mse_loss(model_call(recipe, model, xt, t, text, mask, side), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay) if v.is_floating_point() else ema[k].copy_(v)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"transformer step {step}/{steps} loss {running:.4f}")
    model.load_state_dict(ema)
    model.eval()
    return model


def build_text_side(recipe: Recipe, words: list[str], work: Path, seed: int):
    """The tokenizer (BPE over the template and ``words``) and the frozen random text encoder."""
    tokenizer_dir = build_tokenizer(work / "tokenizer-qwen2", extra_words=words, max_vocab=8192)
    if recipe.name == "flux2-klein":
        tokenizer_dir = write_tiny_qwen3_tokenizer(work / "tokenizer-qwen3", source_dir=tokenizer_dir)
    tokenizer = Qwen2Tokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(seed)
    if recipe.name == "flux2-klein":
        text_encoder = Qwen3ForCausalLM(_flux2_klein_text_encoder_config(tokenizer))
        # Klein feeds un-normalised intermediate hidden states (layers 9, 18, 27) to its transformer, with no input
        # norm. With the default 0.02 initialisation they are about 0.04 per element, so the prompt barely reaches
        # the transformer and training stalls (a first run: loss 0.33, 9 % top-1). Token embeddings of std 0.5 make
        # them O(0.5), like Qwen-Image's RMS-normalised text input.
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight.mul_(KLEIN_EMBEDDING_GAIN)
    else:
        text_encoder = Qwen2_5_VLForConditionalGeneration(_text_encoder_config(tokenizer))
    return tokenizer, text_encoder.eval()


def make_pipeline(recipe: Recipe, vae, text_encoder, tokenizer, transformer):
    if recipe.name == "flux2-klein":
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX2_KLEIN_SCHEDULER_CONFIG)
        return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                  transformer=transformer, is_distilled=False)  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", choices=("qwenimage", "flux2-klein"), default="qwenimage")
    parser.add_argument("--output", type=Path, default=None, help="default: the shipped reference model's directory")
    parser.add_argument("--dataset-output", type=Path, default=ref.REFERENCE_DATASET_DIR)
    parser.add_argument("--font", default=ref.EMOJI_FONT_PATH)
    parser.add_argument("--num-emoji", type=int, default=512, help="a seeded random subset of the glyphs (0: all)")
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="transformer steps (default: 6000, Klein 4000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=None, help="keeps the trained autoencoder between runs")
    parser.add_argument("--evaluate-only", action="store_true", help="re-measure the model in --output, no training")
    args = parser.parse_args()
    recipe = klein_recipe() if args.architecture == "flux2-klein" else qwenimage_recipe()
    output = args.output or (ref.REFERENCE_KLEIN_DIR if recipe.name == "flux2-klein" else ref.REFERENCE_MODEL_DIR)
    if args.steps is None:
        args.steps = 4000 if recipe.name == "flux2-klein" else 6000
    torch.set_num_threads(args.threads)
    if args.evaluate_only:
        pipeline_class = Flux2KleinPipeline if recipe.name == "flux2-klein" else QwenImagePipeline
        pipe = pipeline_class.from_pretrained(output)
        pipe.set_progress_bar_config(disable=True)
        report_path = output / "training_report.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        report.update(evaluate(recipe, pipe, ref.load_reference_dataset(args.dataset_output), output))
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        log(f"top-1 {report['nearest_image_top1']:.3f}, top-5 {report['nearest_image_top5']:.3f}")
        return
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="reference-model-"))
    work.mkdir(parents=True, exist_ok=True)
    clock = Stopwatch().start()

    rendered = ref.render_emoji_dataset(args.font)
    dataset = ref.subset(rendered, args.num_emoji, args.seed)
    log(f"rendered {len(rendered)} emoji at {ref.RESOLUTION}x{ref.RESOLUTION}, training on {len(dataset)}")
    words = sorted({w for c in dataset.captions for w in c.split()})
    tokenizer, text_encoder = build_text_side(recipe, words, work, args.seed)

    vae_path = work / f"vae-{recipe.name}"
    vae_class = type(recipe.build_vae())
    if (vae_path / "config.json").exists():
        vae = vae_class.from_pretrained(vae_path)
    else:
        vae = train_vae(recipe, dataset.images, args.vae_steps, args.vae_batch_size, args.seed)
        vae.save_pretrained(vae_path)
    with torch.no_grad():
        target = to_pixels(dataset.images[:256], recipe.video_vae)
        recon = vae.decode(vae.encode(target).latent_dist.mode()).sample.clamp(-1, 1)
    vae_psnr = float(-10 * torch.log10(F.mse_loss(recon / 2, target / 2)))
    log(f"vae reconstruction PSNR {vae_psnr:.2f} dB")

    latents = encode_latents(vae, dataset.images, recipe.video_vae)
    x0 = klein_tokens(vae, latents) if recipe.name == "flux2-klein" else qwen_tokens(vae, latents)
    pipe = make_pipeline(recipe, vae, text_encoder, tokenizer, None)
    embeds, masks = encode_prompts(recipe, pipe, dataset.captions)
    empty = encode_prompts(recipe, pipe, [recipe.negative_prompt])
    log(f"latent tokens {tuple(x0.shape)}, prompt embeddings {tuple(embeds.shape)}")

    transformer = train_transformer(recipe, x0, embeds, masks, empty, args.steps, args.batch_size, args.seed)
    pipe = make_pipeline(recipe, vae, text_encoder, tokenizer, transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(output, safe_serialization=True)
    write_generation_defaults(recipe, output)
    ref.save_reference_dataset(dataset, args.dataset_output)
    log(f"saved the pipeline to {output} and the dataset to {args.dataset_output}")

    report = {
        "architecture": recipe.name,
        "dataset_size": len(dataset),
        "glyphs_rendered": len(rendered),
        "resolution": ref.RESOLUTION,
        "vae_steps": args.vae_steps,
        "transformer_steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "vae_reconstruction_psnr_db": round(vae_psnr, 2),
        "training_minutes": round(clock.elapsed() / 60, 1),
        "torch_threads": args.threads,
        **evaluate(recipe, pipe, dataset, output),
    }
    (output / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"top-1 {report['nearest_image_top1']:.3f}, top-5 {report['nearest_image_top5']:.3f} "
        f"(chance {report['chance']:.4f})")  # fmt: skip


def write_generation_defaults(recipe: Recipe, output: Path) -> None:
    """``<output>/generation_defaults.json``: the call arguments the model is meant to be run with, for the CLI."""
    data = {"_comment": GENERATION_DEFAULTS_COMMENT, **ref.GENERATION_DEFAULTS[recipe.name]}
    (output / GENERATION_DEFAULTS_NAME).write_text(json.dumps(data, indent=2) + "\n")


GENERATION_DEFAULTS_COMMENT = (
    "Call arguments this model is meant to be run with (its training size and prompt length, the evaluation's steps "
    "and CFG); cached-diffusers generate/calibrate/bench use them for every option not given. Stock diffusers "
    "ignores this file."
)


def evaluate(recipe: Recipe, pipe, dataset: ref.EmojiDataset, output: Path) -> dict[str, Any]:
    """Nearest-training-image top-1 / top-5 of uncached generations of the fixed evaluation prompts; also writes the
    generations over the training images, as ``docs/reference-model[-klein].png`` for the shipped models and as
    ``<output>/samples.png`` for a model written elsewhere."""
    prompts = ref.eval_prompts(dataset)
    result = ref.nearest_image_accuracy(ref.generator(pipe, **ref.EVAL_SETTINGS), dataset, prompts)
    if output.resolve() in (ref.REFERENCE_MODEL_DIR, ref.REFERENCE_KLEIN_DIR):
        suffix = "-klein" if recipe.name == "flux2-klein" else ""
        sheet = ROOT / "docs" / f"reference-model{suffix}.png"
    else:
        sheet = output / "samples.png"
    ref.comparison_sheet(result, dataset, prompts).save(sheet)
    return {
        "eval": {"prompts": len(prompts), **ref.EVAL_SETTINGS, "architecture": recipe.name},
        "nearest_image_top1": result.top1,
        "nearest_image_top5": result.top5,
        "chance": result.chance,
    }


if __name__ == "__main__":
    main()
