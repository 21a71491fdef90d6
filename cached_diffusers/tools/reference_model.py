"""The trained reference model: a small Qwen-Image pipeline that learned to draw emoji from their Unicode names.

Caching trades fidelity for speed, and that trade is only measurable on a model whose denoising dynamics are real.
The reference model is the stock diffusers Qwen-Image pipeline (``QwenImageTransformer2DModel``,
``AutoencoderKLQwenImage``, a frozen Qwen2.5-VL text encoder and a Qwen2 tokenizer, all at small configs), trained by
``scripts/train_reference_model.py`` with rectified flow on the glyphs of the Noto Color Emoji font (Debian
``fonts-noto-color-emoji``, SIL Open Font License 1.1) rendered with Pillow, each captioned with its lower-cased
Unicode name (``"red apple"``, ``"cat face"``). It ships in :data:`REFERENCE_MODEL_DIR` as an ordinary diffusers
directory, so ``CachedQwenImagePipeline.from_pretrained(REFERENCE_MODEL_DIR)`` loads it like a Hub checkpoint; it is the
default model of ``cached-diffusers demo`` and ``cached-diffusers bench``.

The rendered training set ships beside it (:data:`REFERENCE_DATASET_DIR`: ``images.png``, a grid of the
``RESOLUTION x RESOLUTION`` RGB training images, and ``captions.json``), so that "did it learn" is measurable anywhere:
:func:`nearest_image_accuracy` generates an image per caption and checks that the nearest training image (pixel L2)
is the caption's own glyph (top-1 over the whole training set; chance is ``1 / len(dataset)``).
"""

from __future__ import annotations

import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = [
    "EMOJI_FONT_PATH",
    "DEMO_PROMPTS",
    "EVAL_PROMPT_COUNT",
    "EVAL_SETTINGS",
    "GENERATION_DEFAULTS",
    "KLEIN_MAX_SEQUENCE_LENGTH",
    "NEGATIVE_PROMPT",
    "REFERENCE_KLEIN_DIR",
    "REFERENCE_DATASET_DIR",
    "REFERENCE_MODEL_DIR",
    "RESOLUTION",
    "EmojiDataset",
    "NearestImageResult",
    "comparison_sheet",
    "emoji_caption",
    "eval_prompts",
    "generator",
    "load_reference_dataset",
    "load_reference_pipeline",
    "nearest_image_accuracy",
    "render_emoji_dataset",
    "save_reference_dataset",
    "subset",
]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
REFERENCE_MODEL_DIR = ASSETS / "reference-qwenimage-emoji"
"""The trained pipeline, a diffusers directory (``model_index.json``, one folder per component, safetensors)."""

REFERENCE_DATASET_DIR = ASSETS / "reference-emoji-dataset"
"""The rendered training set (``images.png``, ``captions.json``): the targets of :func:`nearest_image_accuracy`."""

REFERENCE_KLEIN_DIR = ASSETS / "reference-flux2-klein-emoji"
"""The FLUX.2 [klein] reference pipeline (base variant, CFG), trained the same way on the same glyphs."""

KLEIN_MAX_SEQUENCE_LENGTH = 32
"""Prompt length the Klein reference model was trained with: pass ``max_sequence_length=32`` when calling it
(``Flux2KleinPipeline`` pads prompts to this length and its transformer attends to the padding)."""

NEGATIVE_PROMPT = " "
"""The Qwen-Image reference model's negative prompt (true CFG); Klein's pipeline always uses ``""``."""

EVAL_SETTINGS = {"num_inference_steps": 20, "cfg_scale": 4.0, "seed": 0}
"""How :func:`generator` generates for the nearest-image measure: 20 steps, CFG 4 (``true_cfg_scale`` for Qwen-Image,
``guidance_scale`` for Klein), one generator seeded 0 per batch of prompts."""

EMOJI_FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
"""Where Debian's ``fonts-noto-color-emoji`` installs the font (a CBDT bitmap font, drawable at 109 px only)."""

RESOLUTION = 32
"""Image size of the reference model, pixels (square): the VAE compresses 4x, so latents are 8 x 8 and the
transformer sees (8 / 2)^2 = 16 image tokens."""

GENERATION_DEFAULTS = {
    "qwenimage": {
        "height": RESOLUTION, "width": RESOLUTION, "num_inference_steps": EVAL_SETTINGS["num_inference_steps"],
        "true_cfg_scale": EVAL_SETTINGS["cfg_scale"], "negative_prompt": NEGATIVE_PROMPT,
    },
    "flux2-klein": {
        "height": RESOLUTION, "width": RESOLUTION, "num_inference_steps": EVAL_SETTINGS["num_inference_steps"],
        "guidance_scale": EVAL_SETTINGS["cfg_scale"], "max_sequence_length": KLEIN_MAX_SEQUENCE_LENGTH,
    },
}  # fmt: skip
"""Per architecture, the call arguments the reference model is meant to be run with (its training size, prompt
length and the evaluation's steps and CFG). ``scripts/train_reference_model.py`` writes them to the model directory's
``generation_defaults.json`` (:data:`cached_diffusers.hub.GENERATION_DEFAULTS_NAME`), where the command line finds
them."""

DEMO_PROMPTS = ["red apple", "dog face", "rocket", "sun with face"]
"""Captions of the reference model that ``cached-diffusers demo`` and ``bench`` use by default."""

EVAL_PROMPT_COUNT = 64
"""Captions in the fixed evaluation prompt set (:func:`eval_prompts`)."""

_GLYPH_PX = 109  # the only strike of Noto Color Emoji
_SKIPPED_NAME_PARTS = ("REGIONAL INDICATOR", "EMOJI MODIFIER", "TAG ", "VARIATION SELECTOR", "COMBINING", "JOINER")


def emoji_caption(codepoint: int) -> str | None:
    """The caption of one emoji: its Unicode name, lower-cased (``0x1F34E -> "red apple"``).

    Returns ``None`` for code points with no name or that are not pictures on their own (regional indicators, skin
    tone modifiers, tags, variation selectors, joiners).
    """
    try:
        name = unicodedata.name(chr(codepoint))
    except ValueError:
        return None
    if any(part in name for part in _SKIPPED_NAME_PARTS):
        return None
    return name.lower()


@dataclass(frozen=True)
class EmojiDataset:
    """Rendered emoji with captions.

    Attributes:
        images: ``uint8`` array ``(N, RESOLUTION, RESOLUTION, 3)``, RGB, glyph alpha-composited on white.
        captions: ``N`` captions, unique, in the order of ``images``.
        codepoints: ``N`` Unicode code points.
    """

    images: np.ndarray
    captions: list[str]
    codepoints: list[int]

    def __len__(self) -> int:
        return len(self.captions)

    def index(self, caption: str) -> int:
        """Position of ``caption``; raises ``KeyError`` naming it when it is not in the dataset."""
        try:
            return self.captions.index(caption)
        except ValueError:
            raise KeyError(f"caption {caption!r} is not in the reference dataset") from None


def render_emoji_dataset(font_path: str | os.PathLike = EMOJI_FONT_PATH, resolution: int = RESOLUTION) -> EmojiDataset:
    """Renders every single-code-point emoji of the font that has a caption (:func:`emoji_caption`).

    Each glyph is drawn with Pillow at the font's 109 px strike, cropped to its bounding box, centred on a square
    transparent canvas, composited on white and resized to ``resolution`` with a Lanczos filter. Deterministic.

    Raises:
        FileNotFoundError: when the font is missing (``apt-get install fonts-noto-color-emoji`` installs it).
    """
    from fontTools.ttLib import TTFont
    from PIL import Image, ImageDraw, ImageFont

    if not Path(font_path).is_file():
        raise FileNotFoundError(f"emoji font not found at {font_path}: apt-get install fonts-noto-color-emoji")
    font = ImageFont.truetype(str(font_path), _GLYPH_PX)
    images, captions, codepoints = [], [], []
    for codepoint in sorted(TTFont(str(font_path))["cmap"].getBestCmap()):
        caption = emoji_caption(codepoint)
        if caption is None or caption in captions:
            continue
        canvas = Image.new("RGBA", (2 * _GLYPH_PX, 2 * _GLYPH_PX), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((_GLYPH_PX // 2, _GLYPH_PX // 2), chr(codepoint), font=font, embedded_color=True)
        box = canvas.getbbox()
        if box is None:
            continue
        glyph = canvas.crop(box)
        side = max(glyph.size)
        square = Image.new("RGBA", (side, side), (255, 255, 255, 0))
        square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
        white = Image.new("RGBA", square.size, (255, 255, 255, 255))
        white.alpha_composite(square)
        image = white.convert("RGB").resize((resolution, resolution), Image.LANCZOS)
        images.append(np.asarray(image, dtype=np.uint8))
        captions.append(caption)
        codepoints.append(codepoint)
    return EmojiDataset(np.stack(images), captions, codepoints)


def subset(dataset: EmojiDataset, count: int, seed: int = 0) -> EmojiDataset:
    """``count`` glyphs drawn without replacement by ``seed``, in their original order (``count=0``: all).

    Raises:
        ValueError: when ``count`` is not in ``[0, len(dataset)]``.
    """
    if not 0 <= count <= len(dataset):
        raise ValueError(f"count must be in [0, {len(dataset)}], got {count}")
    if count == 0:
        return dataset
    keep = sorted(np.random.default_rng(seed).choice(len(dataset), count, replace=False).tolist())
    return EmojiDataset(dataset.images[keep], [dataset.captions[i] for i in keep], [dataset.codepoints[i] for i in keep])


def save_reference_dataset(dataset: EmojiDataset, path: str | os.PathLike = REFERENCE_DATASET_DIR) -> Path:
    """Writes ``images.png`` (a grid, row-major, ``ceil(sqrt(N))`` images a row) and ``captions.json``."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n, res = len(dataset), dataset.images.shape[1]
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    images = [Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB") for image in dataset.images]
    images += [Image.new("RGB", (res, res), "white")] * (rows * cols - n)  # the last row's empty cells are white
    make_image_grid(images, rows=rows, cols=cols).save(path / "images.png", optimize=True)
    meta = {
        "resolution": res,
        "columns": cols,
        "source": "Noto Color Emoji (Debian fonts-noto-color-emoji, SIL Open Font License 1.1), rendered with Pillow",
        "captions": dataset.captions,
        "codepoints": dataset.codepoints,
    }
    (path / "captions.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return path


def load_reference_dataset(path: str | os.PathLike = REFERENCE_DATASET_DIR) -> EmojiDataset:
    """Reads the dataset written by :func:`save_reference_dataset`.

    Raises:
        FileNotFoundError: when ``images.png`` or ``captions.json`` is missing.
    """
    from PIL import Image

    path = Path(path)
    meta = json.loads((path / "captions.json").read_text(encoding="utf-8"))
    grid = np.asarray(Image.open(path / "images.png").convert("RGB"), dtype=np.uint8)
    res, cols = meta["resolution"], meta["columns"]
    images = [
        grid[(i // cols) * res : (i // cols + 1) * res, (i % cols) * res : (i % cols + 1) * res]
        for i in range(len(meta["captions"]))
    ]
    return EmojiDataset(np.stack(images), list(meta["captions"]), list(meta["codepoints"]))


def eval_prompts(dataset: EmojiDataset, count: int = EVAL_PROMPT_COUNT, seed: int = 0) -> list[str]:
    """The fixed evaluation prompt set: ``count`` training captions drawn without replacement by ``seed``."""
    if not 1 <= count <= len(dataset):
        raise ValueError(f"count must be in [1, {len(dataset)}], got {count}")
    order = np.random.default_rng(seed).permutation(len(dataset))[:count]
    return [dataset.captions[i] for i in sorted(order)]


def generator(pipe, num_inference_steps: int = 20, cfg_scale: float = 4.0, seed: int = 0):
    """``generate(prompts) -> uint8 (P, RESOLUTION, RESOLUTION, 3)`` for :func:`nearest_image_accuracy`.

    Works with a Qwen-Image pipeline (true CFG with :data:`NEGATIVE_PROMPT`) and a Flux2 Klein one (``guidance_scale``,
    prompts of :data:`KLEIN_MAX_SEQUENCE_LENGTH` tokens); uncached unless ``pipe`` carries a cache config.
    """
    from diffusers import Flux2KleinPipeline

    def generate(prompts: list[str]) -> np.ndarray:
        kwargs: dict[str, Any] = dict(
            prompt=prompts, height=RESOLUTION, width=RESOLUTION, num_inference_steps=num_inference_steps,
            generator=torch.Generator().manual_seed(seed), output_type="np",
        )  # fmt: skip
        if isinstance(pipe, Flux2KleinPipeline):
            kwargs.update(guidance_scale=cfg_scale, max_sequence_length=KLEIN_MAX_SEQUENCE_LENGTH)
        else:
            kwargs.update(true_cfg_scale=cfg_scale, negative_prompt=[NEGATIVE_PROMPT] * len(prompts))
        images = pipe(**kwargs).images
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)

    return generate


def comparison_sheet(result: "NearestImageResult", dataset: EmojiDataset, prompts: Sequence[str], count: int = 16,
                     scale: int = 3):
    """A PIL image: the first ``count`` generations of ``result`` (top row) over the training image of each prompt
    (bottom row), enlarged ``scale`` times (nearest neighbour), 2-pixel white gaps."""
    from PIL import Image

    from .imaging import side_by_side

    count = min(count, len(prompts))
    top = [Image.fromarray(image) for image in result.images[:count]]
    bottom = [Image.fromarray(dataset.images[dataset.index(p)]) for p in prompts[:count]]
    sheet = side_by_side([top, bottom], gap=2)
    return sheet.resize((sheet.width * scale, sheet.height * scale), resample=0)


def load_reference_pipeline(pipeline_class: type | None = None, **kwargs: Any):
    """``pipeline_class.from_pretrained(REFERENCE_MODEL_DIR, **kwargs)`` (``CachedQwenImagePipeline`` by default).

    Raises:
        OSError: when the shipped model files are missing.
    """
    if pipeline_class is None:
        from cached_diffusers.pipelines.qwenimage import CachedQwenImagePipeline as pipeline_class
    return pipeline_class.from_pretrained(REFERENCE_MODEL_DIR, **kwargs)


@dataclass(frozen=True)
class NearestImageResult:
    """Outcome of :func:`nearest_image_accuracy`.

    Attributes:
        top1: fraction of prompts whose generation is nearest (pixel L2) to the prompt's own training image, in [0, 1].
        top5: fraction whose own image is among the 5 nearest.
        chance: ``1 / len(dataset)``, the top-1 of a model that ignores the prompt.
        nearest: per prompt, the caption of the nearest training image.
        images: the generations, ``uint8`` ``(P, H, W, 3)``.
    """

    top1: float
    top5: float
    chance: float
    nearest: list[str]
    images: np.ndarray


def nearest_image_accuracy(
    generate: Callable[[list[str]], np.ndarray],
    dataset: EmojiDataset,
    prompts: Sequence[str],
    batch_size: int = 16,
) -> NearestImageResult:
    """Generates one image per prompt and finds the nearest training image of each (L2 over uint8 RGB pixels).

    Args:
        generate: ``generate(prompts) -> uint8 (len(prompts), H, W, 3)``; the images must have the dataset's size.
        dataset: the training set; each prompt must be one of its captions.
        prompts: the captions to generate.
        batch_size: prompts per ``generate`` call.

    Raises:
        KeyError: for a prompt that is not a caption of ``dataset``.
        ValueError: when the generated images do not have the dataset's image shape.
    """
    targets = [dataset.index(p) for p in prompts]
    images = np.concatenate([generate(list(prompts[i : i + batch_size])) for i in range(0, len(prompts), batch_size)])
    if images.shape[1:] != dataset.images.shape[1:]:
        raise ValueError(f"generated images have shape {images.shape[1:]}, the dataset's are {dataset.images.shape[1:]}")
    flat = torch.from_numpy(dataset.images.reshape(len(dataset), -1).astype(np.float32))
    gen = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32))
    ranks = torch.cdist(gen, flat).argsort(dim=1)[:, :5].numpy()
    top1 = float(np.mean([ranks[i, 0] == t for i, t in enumerate(targets)]))
    top5 = float(np.mean([t in ranks[i] for i, t in enumerate(targets)]))
    nearest = [dataset.captions[r] for r in ranks[:, 0]]
    return NearestImageResult(top1, top5, 1.0 / len(dataset), nearest, images)
