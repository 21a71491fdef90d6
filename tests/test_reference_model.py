"""The shipped reference model: loads like a Hub checkpoint, is small, and draws the emoji its captions name."""

import json

from diffusers import Flux2KleinPipeline
import numpy as np
import pytest
import torch

from cached_diffusers import CachedFlux2KleinPipeline, CachedQwenImagePipeline, TeaCacheConfig
from cached_diffusers.tools import reference_model as ref

TOP1_FLOOR = 0.9
"""Nearest-training-image top-1 the shipped model must keep on the fixed evaluation prompts (uncached, 20 steps, true
CFG 4). The measured value is in ``training_report.json`` and the README; chance is 1 / 512."""


@pytest.fixture(scope="module")
def pipe():
    pipe = ref.load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dataset():
    return ref.load_reference_dataset()


def measure(pipe, dataset):
    """Nearest-image accuracy of ``pipe`` on the fixed evaluation prompts (one torch thread: a shared CPU stalls two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ref.nearest_image_accuracy(ref.generator(pipe, **ref.EVAL_SETTINGS), dataset, ref.eval_prompts(dataset))
    finally:
        torch.set_num_threads(threads)


def test_layout_is_an_ordinary_small_diffusers_directory():
    index = json.loads((ref.REFERENCE_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    weights = list(ref.REFERENCE_MODEL_DIR.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"transformer", "vae", "text_encoder"}
    assert not list(ref.REFERENCE_MODEL_DIR.rglob("*.bin"))
    assert sum(p.stat().st_size for p in ref.REFERENCE_MODEL_DIR.rglob("*") if p.is_file()) < 40e6


def test_loads_into_the_cached_pipeline_with_its_calibrated_cache_config(pipe):
    assert isinstance(pipe, CachedQwenImagePipeline)
    config = pipe.cache_config  # written by `cached-diffusers calibrate`, shipped beside model_index.json
    assert isinstance(config, TeaCacheConfig) and config.coefficients is not None
    provenance = json.loads((ref.REFERENCE_MODEL_DIR / "cache_config.calibration.json").read_text())
    assert provenance["method"] == "teacache"


def test_dataset_matches_the_training_report(dataset):
    report = json.loads((ref.REFERENCE_MODEL_DIR / "training_report.json").read_text())
    assert len(dataset) == report["dataset_size"] == 512 and report["glyphs_rendered"] > 1300
    assert dataset.images.shape == (len(dataset), ref.RESOLUTION, ref.RESOLUTION, 3)
    assert len(set(dataset.captions)) == len(dataset)
    assert dataset.captions[dataset.codepoints.index(0x1F34E)] == "red apple" == ref.emoji_caption(0x1F34E)  # in the 512 trained
    assert all(p in dataset.captions for p in ref.DEMO_PROMPTS)
    # distinct glyphs: nearest-image retrieval over the training set is well posed
    flat = dataset.images.reshape(len(dataset), -1)
    assert len(np.unique(flat, axis=0)) > 0.98 * len(dataset)


@pytest.mark.slow  # over 4 s
def test_generations_are_recognisably_their_captions(pipe, dataset):
    result = measure(pipe, dataset)
    report = json.loads((ref.REFERENCE_MODEL_DIR / "training_report.json").read_text())
    print(f"top-1 {result.top1:.3f} top-5 {result.top5:.3f} (chance {result.chance:.5f})")
    assert result.top1 >= TOP1_FLOOR
    assert result.top1 == pytest.approx(report["nearest_image_top1"], abs=0.05)  # what the README reports


def test_an_untrained_model_fails_the_same_measure(dataset):
    # The measure can fail: the untrained embedded tiny pipeline scores near chance.
    from cached_diffusers.tools import tiny

    untrained = tiny.build_tiny_qwenimage_pipeline(seed=0)
    untrained.set_progress_bar_config(disable=True)
    prompts = ref.eval_prompts(dataset, count=16)
    result = ref.nearest_image_accuracy(ref.generator(untrained, num_inference_steps=4), dataset, prompts)
    assert result.top1 <= 0.1


def test_nearest_image_accuracy_checks_its_inputs(dataset):
    with pytest.raises(KeyError, match="not in the reference dataset"):
        ref.nearest_image_accuracy(lambda p: dataset.images[: len(p)], dataset, ["a purple zebra"])
    with pytest.raises(ValueError, match="generated images have shape"):
        ref.nearest_image_accuracy(lambda p: np.zeros((len(p), 8, 8, 3), np.uint8), dataset, dataset.captions[:2])
    own = ref.nearest_image_accuracy(lambda p: dataset.images[[dataset.index(c) for c in p]], dataset, dataset.captions[:8])
    assert own.top1 == own.top5 == 1.0
    with pytest.raises(ValueError, match=r"count must be in \[1, "):
        ref.eval_prompts(dataset, count=0)


# -- the FLUX.2 [klein] reference model ------------------------------------------------------------------------------
KLEIN_TOP1_FLOOR = 0.9
"""The same floor for the Klein reference model (measured: 63 of 64, in its ``training_report.json``)."""


@pytest.mark.slow  # over 4 s
def test_klein_reference_model_loads_and_draws_its_captions(dataset):
    index = json.loads((ref.REFERENCE_KLEIN_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is False
    assert sum(p.stat().st_size for p in ref.REFERENCE_KLEIN_DIR.rglob("*") if p.is_file()) < 40e6
    pipe = CachedFlux2KleinPipeline.from_pretrained(ref.REFERENCE_KLEIN_DIR)
    assert isinstance(pipe, Flux2KleinPipeline)
    pipe.set_progress_bar_config(disable=True)
    report = json.loads((ref.REFERENCE_KLEIN_DIR / "training_report.json").read_text())
    assert report["architecture"] == "flux2-klein" and report["dataset_size"] == len(dataset)
    result = measure(pipe, dataset)
    print(f"klein top-1 {result.top1:.3f} top-5 {result.top5:.3f}")
    assert result.top1 >= KLEIN_TOP1_FLOOR
    assert result.top1 == pytest.approx(report["nearest_image_top1"], abs=0.05)


def test_image_grids_are_diffusers_make_image_grid_with_white_gaps_and_fill(tmp_path):
    from PIL import Image

    from cached_diffusers.tools.imaging import side_by_side

    red, blue = Image.new("RGB", (5, 3), "red"), Image.new("RGB", (5, 3), "blue")
    sheet = np.asarray(side_by_side([[red, blue], [red]], gap=2))
    assert sheet.shape == (3 + 2 + 3, 5 + 2 + 5, 3)
    assert (sheet[:3, :5] == (255, 0, 0)).all() and (sheet[:3, 7:] == (0, 0, 255)).all()
    assert (sheet[3:5] == 255).all() and (sheet[:, 5:7] == 255).all() and (sheet[5:, 7:] == 255).all()

    dataset = ref.load_reference_dataset()
    subset = ref.EmojiDataset(dataset.images[:10], dataset.captions[:10], dataset.codepoints[:10])
    ref.save_reference_dataset(subset, tmp_path)  # 4 a row: the third row holds 2 images, then white
    res = dataset.images.shape[1]
    grid = np.asarray(Image.open(tmp_path / "images.png").convert("RGB"))
    assert grid.shape == (3 * res, 4 * res, 3) and (grid[2 * res:, 2 * res:] == 255).all()
    assert np.array_equal(ref.load_reference_dataset(tmp_path).images, subset.images)
