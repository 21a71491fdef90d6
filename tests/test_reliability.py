"""Reliability: pipelines sharing a transformer (threads, nesting), callbacks that change the inputs, command-line
errors, config values and broken checkpoint files (issue 13)."""

import json
import re
import shutil
import threading

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

from cached_diffusers import (
    CachedQwenImagePipeline,
    DBCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    TeaCacheConfig,
)
from cached_diffusers.registry import cache_method
from cached_diffusers.tools.cli import main
from cached_diffusers.tools.tiny import TRANSFORMER_CONFIG, build_tiny_qwenimage_components, save_tiny_qwenimage_pipeline
from conftest import matrix_context, matrix_methods, short_run_config
from reference import reference_dir

STEPS = 6


def small_qwen_pipeline(cache_config=None):
    """The tiny Qwen-Image pipeline with a 3-block transformer (fast enough to run many generations)."""
    components = build_tiny_qwenimage_components()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        components["transformer"] = QwenImageTransformer2DModel(
            **{**TRANSFORMER_CONFIG, "num_layers": 3, "num_attention_heads": 2}
        ).eval()
    pipe = CachedQwenImagePipeline(**components, cache_config=cache_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sibling(pipe, cache_config=None):
    """Another pipeline around the same transformer (and text encoder, VAE), with a scheduler of its own."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    other = CachedQwenImagePipeline(**{**pipe.components, "scheduler": scheduler}, cache_config=cache_config)
    other.set_progress_bar_config(disable=True)
    return other


def generate(pipe, seed=0, steps=STEPS, callback=None, prompt="a red cat"):
    out = pipe(
        prompt, negative_prompt=" ", true_cfg_scale=2.0, num_inference_steps=steps, height=32, width=32,
        output_type="latent", generator=torch.Generator().manual_seed(seed), callback_on_step_end=callback,
    )
    return out.images, pipe.cache_stats.to_dict()


TEACACHE = TeaCacheConfig(rel_l1_thresh=0.3)
MAGCACHE = MagCacheConfig(mag_ratios=[1.0, 0.99, 0.98, 0.97, 0.96, 0.95], mag_threshold=0.2, mag_retention_ratio=0.0)


@pytest.fixture(scope="module")
def pipe():
    return small_qwen_pipeline()


# -- 1. one transformer, several pipelines ------------------------------------------------------------------------
def test_constructing_a_pipeline_leaves_another_pipelines_cache_config(pipe):
    pipe.cache_config = TEACACHE
    other = CachedQwenImagePipeline(**pipe.components)
    assert other.cache_config is None
    assert pipe.cache_config == TEACACHE
    assert other.transformer is pipe.transformer
    other.cache_config = MAGCACHE
    assert pipe.cache_config == TEACACHE


def test_pipelines_sharing_a_transformer_run_concurrently_in_threads(pipe):
    pipe.cache_config = TEACACHE
    other = sibling(pipe, MAGCACHE)
    alone = {"a": generate(pipe, seed=1), "b": generate(other, seed=2, prompt="a blue bird")}
    assert alone["a"][1]["num_reused"] > 0 and alone["b"][1]["num_reused"] > 0

    barrier = threading.Barrier(2, timeout=60)

    def lockstep(p, i, t, tensors):  # both generations are inside the shared transformer's engine at every step
        barrier.wait()
        return {}

    results, errors = {}, []

    def worker(name, p, seed, prompt):
        try:
            results[name] = generate(p, seed=seed, callback=lockstep, prompt=prompt)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
            barrier.abort()

    threads = [
        threading.Thread(target=worker, args=("a", pipe, 1, "a red cat")),
        threading.Thread(target=worker, args=("b", other, 2, "a blue bird")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for name in ("a", "b"):
        assert torch.equal(results[name][0], alone[name][0])
        assert results[name][1] == alone[name][1]


def test_a_pipeline_busy_in_another_thread_refuses_at_once(pipe):
    pipe.cache_config = TEACACHE
    expected = generate(pipe, seed=3)
    started, release = threading.Event(), threading.Event()

    def hold(p, i, t, tensors):
        if i == 1:
            started.set()
            assert release.wait(timeout=60)
        return {}

    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("a", generate(pipe, seed=3, callback=hold)))
    thread.start()
    try:
        assert started.wait(timeout=60)
        with pytest.raises(RuntimeError, match=r"this pipeline is already running a generation .* own pipeline with its own scheduler"):
            generate(pipe)
        same_scheduler = CachedQwenImagePipeline(**pipe.components)  # shares the scheduler
        with pytest.raises(RuntimeError, match=r"this pipeline's scheduler is already running a generation"):
            generate(same_scheduler)
    finally:
        release.set()
        thread.join(timeout=120)
    assert torch.equal(result["a"][0], expected[0]) and result["a"][1] == expected[1]
    assert generate(pipe, seed=3)[1] == expected[1]  # nothing is left busy


def test_a_pipeline_called_from_another_ones_callback_keeps_both_exact(pipe):
    pipe.cache_config = TEACACHE
    other = sibling(pipe, DBCacheConfig(Fn=1, residual_diff_threshold=0.5, max_warmup_steps=0))
    alone_a, alone_b = generate(pipe, seed=4), generate(other, seed=5)
    inner = {}

    def nested(p, i, t, tensors):
        if i == 2:
            inner["b"] = generate(other, seed=5)
        return {}

    outer = generate(pipe, seed=4, callback=nested)
    assert torch.equal(outer[0], alone_a[0]) and outer[1] == alone_a[1]
    assert torch.equal(inner["b"][0], alone_b[0]) and inner["b"][1] == alone_b[1]


def test_a_transformer_driven_directly_keeps_its_own_state_beside_a_pipeline(pipe):
    pipe.cache_config = TEACACHE
    expected = generate(pipe, seed=6)
    transformer = pipe.transformer
    transformer.cache_config = TeaCacheConfig(rel_l1_thresh=1e9)
    hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(1))
    kwargs = dict(encoder_hidden_states=text, encoder_hidden_states_mask=torch.ones(1, 3, dtype=torch.long), img_shapes=[(1, 2, 2)])
    with transformer.cache_context("cond", step_index=0, num_inference_steps=3):
        transformer(hidden, timestep=torch.tensor([1.0]), **kwargs)
    assert generate(pipe, seed=6)[1] == expected[1]  # a pipeline call in between
    with transformer.cache_context("cond", step_index=1, num_inference_steps=3):
        transformer(hidden, timestep=torch.tensor([0.9]), **kwargs)
    assert transformer.cache_stats.branches["cond"].reused_steps == [1]  # the direct generation went on
    assert pipe.cache_config == TEACACHE


# -- 2. callbacks that change the inputs -----------------------------------------------------------------------------
STATIC_SCM = FirstBlockCacheConfig(residual_diff_threshold=0.0, scm_steps_mask=[1, 0, 0, 0, 0, 1], scm_steps_policy="static")
"""A static SCM mask (the mask alone decides), beside every registered method."""


def reusing_config(name, pipe):
    """``"static-scm"`` (:data:`STATIC_SCM`), or the contract's config of the registered method ``name``
    with its warm-up cut to the first step (:func:`conftest.short_run_config`), so that step 2 may reuse (the tests
    check that it does)."""
    if name == "static-scm":
        return STATIC_SCM
    context = matrix_context(None, pipe.transformer.num_cache_blocks, STEPS)
    return short_run_config(cache_method(name), context, num_steps=STEPS)


REUSING = [m.name for m in matrix_methods()] + ["static-scm"]
"""Every registered method (its reusing contract config), and a static SCM mask."""


def replace_latents(p, i, t, tensors):
    return {"latents": tensors["latents"] * 0.5} if i == 1 else {}


def edit_latents_in_place(p, i, t, tensors):
    if i == 1:
        tensors["latents"].mul_(0.5)
    return {}


def change_the_schedule(p, i, t, tensors):
    if i == 1:
        p.scheduler.sigmas[3:-1] *= 0.9
    return {}


@pytest.mark.parametrize("method", REUSING)
@pytest.mark.parametrize("callback", [replace_latents, edit_latents_in_place, change_the_schedule])
def test_a_step_after_a_callback_changed_the_inputs_is_computed(pipe, method, callback):
    pipe.cache_config = reusing_config(method, pipe)
    _, plain = generate(pipe)
    for branch in plain["branches"].values():
        assert 2 in branch["reused_steps"]  # without the change, step 2 reuses
    _, stats = generate(pipe, callback=callback)
    for branch in stats["branches"].values():
        assert 2 in branch["computed_steps"] and branch["reasons"]["2"] == "input-changed"


@pytest.mark.parametrize("method", REUSING)
def test_a_callback_that_changes_nothing_changes_no_decision(pipe, method):
    pipe.cache_config = reusing_config(method, pipe)
    latents, stats = generate(pipe)
    same = generate(pipe, callback=lambda p, i, t, tensors: {"latents": tensors["latents"].clone()})
    assert torch.equal(same[0], latents) and same[1] == stats


# -- 3. the command line ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwenimage_pipeline(tmp_path_factory.mktemp("cli") / "model")


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    return code, err, lines[-1] if lines else ""


def generate_args(model, tmp_path, *extra):
    return ["generate", "--model", model, "--prompt", "x", "--steps", "2", "--height", "32", "--width", "32", "--quiet",
            "--output", tmp_path / "out.png", *extra]


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--steps", "0"], 2, r"--steps must be an integer in \[1, 10000\], got 0"),
        (["--steps", "-1"], 2, r"--steps must be an integer in \[1, 10000\], got -1"),
        (["--steps", "10001"], 2, r"--steps must be an integer in \[1, 10000\], got 10001"),
        (["--height", "0"], 2, r"--height must be an integer >= 1 \(pixels\), got 0"),
        (["--device", "nonsense"], 2, r"--device 'nonsense' is not a device"),
        (["--cache-config", "[1, 2]"], 2, r"--cache-config must be a JSON object .*got list"),
        (["--cache-config", "null"], 2, r"--cache-config must be a JSON object .*got NoneType"),
        (["--cache-config", "{TMP}"], 2, r"--cache-config '.*' is a directory"),
        (["--cache-config", "{TMP}/latin1.json"], 2, r"--cache-config: the file '.*latin1.json' is not UTF-8"),
        (["--output", "{TMP}/a-file/out.png"], 2, r"--output '.*a-file/out.png': '.*a-file' is a file, not a folder"),
        (["--output", "{TMP}/out.unknown"], 2, r"--output '.*out.unknown': unknown image file extension"),
        (["--output", "{TMP}"], 2, r"--output '.*' is a directory"),
    ],
)
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, extra, code, message):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "latin1.json").write_bytes(b'{"method": "teacache", "x": "\xe9"}')
    extra = [str(e).replace("{TMP}", str(tmp_path)) for e in extra]
    # the model does not exist: the error about the option comes before loading it
    got, err, last = run_cli(generate_args(tmp_path / "no-model", tmp_path, *extra), capsys)
    assert (got, "Traceback" in err) == (code, False)
    assert last.startswith("cached-diffusers generate: error: ") and re.search(message, last), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_cuda_device_without_a_gpu_is_a_usage_error(tmp_path, capsys):
    got, err, last = run_cli(generate_args(tmp_path / "no-model", tmp_path, "--device", "cuda"), capsys)
    assert got == 2 and "--device cuda: no CUDA GPU is available" in last and "Traceback" not in err


def test_a_model_directory_that_does_not_load_is_a_failed_run(tmp_path, capsys):
    empty, garbage = tmp_path / "empty", tmp_path / "garbage"
    empty.mkdir()
    garbage.mkdir()
    (garbage / "model_index.json").write_text("{not json")
    got, err, last = run_cli(generate_args(garbage, tmp_path), capsys)
    assert got == 1 and "Traceback" not in err
    assert last.startswith("cached-diffusers generate: error: OSError: ") and str(garbage) in last
    # a folder without model_index.json is no model directory: a usage error, before anything is loaded
    got, err, last = run_cli(generate_args(empty, tmp_path), capsys)
    assert got == 2 and "Traceback" not in err and "it has no model_index.json" in last


def test_a_size_the_pipeline_cannot_make_names_the_option(model_dir, tmp_path, capsys):
    got, err, last = run_cli(generate_args(model_dir, tmp_path, "--height", "7"), capsys)
    assert got == 2 and "Traceback" not in err
    assert re.search(r"--height must be a multiple of 16 pixels for CachedQwenImagePipeline, got 7", last)
    assert not (tmp_path / "out.png").exists()


def test_output_paths_of_calibrate_demo_and_bench_are_checked_first(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    calibrate = ["calibrate", "--model", tmp_path / "no-model", "--output", tmp_path / "a-file" / "c.json"]
    got, err, last = run_cli(calibrate, capsys)
    assert got == 2 and "--output" in last and "is a file, not a folder" in last
    got, err, last = run_cli(["demo", "--output", tmp_path / "demo.nope"], capsys)
    assert got == 2 and "--output" in last and "unknown image file extension" in last
    got, err, last = run_cli(["bench", "--output-dir", tmp_path / "a-file", "--quiet"], capsys)
    assert got == 2 and "--output-dir" in last and "is a file, not a folder" in last
    assert len(err.strip().splitlines()) == 1  # nothing was loaded


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match=r"--steps must be an integer in \[1, 10000\]"):
        main([str(a) for a in generate_args(tmp_path / "no-model", tmp_path, "--steps", "0", "--debug")])
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(OSError):
        main([str(a) for a in generate_args(tmp_path, tmp_path / "o", "--debug")])


# -- 4. config values ------------------------------------------------------------------------------------------------
def test_numpy_and_torch_scalars_are_numbers():
    expected = TeaCacheConfig(0.25, coefficients=(1.0, 2.0, 3.0, 4.0, 5.0), max_warmup_steps=3, compute_last_step=False)
    got = TeaCacheConfig(
        np.float64(0.25), coefficients=np.array([1.0, 2.0, 3.0, 4.0, 5.0]), max_warmup_steps=np.int64(3),
        compute_last_step=np.bool_(False),
    )
    assert got == expected
    got = TeaCacheConfig(
        torch.tensor(0.25), max_warmup_steps=torch.tensor(3), coefficients=torch.arange(5.0) + 1,
        compute_last_step=torch.tensor(False),
    )
    assert got == expected
    assert TeaCacheConfig(np.float32(0.5)).rel_l1_thresh == 0.5
    assert DBCacheConfig(Fn=np.int64(2), scm_steps_mask=np.array([1, 0, 1])) == DBCacheConfig(Fn=2, scm_steps_mask=[1, 0, 1])
    with pytest.raises(ValueError, match=r"rel_l1_thresh must be a finite number > 0.0, got tensor\(\[0.2500\]\) \(Tensor\)"):
        TeaCacheConfig(torch.tensor([0.25]))


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: TeaCacheConfig(coefficients={1.0, 2.0, 3.0, 4.0, 5.0}), r"TeaCacheConfig.coefficients"),
        (lambda: MagCacheConfig(mag_ratios=frozenset({1.0, 0.9})), r"MagCacheConfig.mag_ratios"),
        (lambda: MagCacheConfig(mag_ratios={"cond": {1.0, 0.9}}), r"MagCacheConfig.mag_ratios\['cond'\]"),
        (lambda: DBCacheConfig(scm_steps_mask={0, 1}), r"DBCacheConfig.scm_steps_mask"),
        (lambda: DBCacheConfig(scm_steps_mask={"compute_bins": {2, 1}, "cache_bins": [1]}), r"compute_bins'\]"),
        (lambda: TeaCacheConfig(coefficients={1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0}), r"TeaCacheConfig.coefficients"),
    ],
)
def test_unordered_collections_are_refused(make, field):
    with pytest.raises(ValueError, match=field + r" must be a sequence of .*unordered"):
        make()


def test_a_cache_config_file_that_is_not_utf8_is_named(model_dir, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(model_dir, directory)
    path = directory / "cache_config.json"
    path.write_bytes(b'{"method": "teacache", "note": "caf\xe9"}')
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*not UTF-8"):
        CachedQwenImagePipeline.from_pretrained(directory)
    path.write_text("[" * 100_000)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*not valid JSON"):
        CachedQwenImagePipeline.from_pretrained(directory)


# -- 5. broken checkpoints -------------------------------------------------------------------------------------------
def damaged_copy(tmp_path, name, filename, damage):
    directory = tmp_path / name
    shutil.copytree(reference_dir(name) / "checkpoint", directory)
    path = directory / filename
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\xff\xfe not a file" * 8}[damage])
    return directory, path


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize(
    "filename", ["ema.safetensors", "ae.safetensors", "llm_config.json", "ae_params.json", "tokenizer.json", "vocab.json"]
)
def test_a_broken_bagel_checkpoint_names_the_file(tmp_path, filename, damage):
    from cached_diffusers.pipelines import CachedBagelPipeline

    directory, path = damaged_copy(tmp_path, "bagel-tiny", filename, damage)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        CachedBagelPipeline.from_pretrained(directory)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize(
    "filename",
    [
        "model-0001-of-0002.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
        "tokenizer.json", "tokenizer_config.json",
    ],
)
def test_a_broken_hunyuanimage3_checkpoint_names_the_file(tmp_path, filename, damage):
    from cached_diffusers.pipelines import CachedHunyuanImage3Pipeline

    directory, path = damaged_copy(tmp_path, "hunyuanimage3-tiny", filename, damage)
    with pytest.raises(ValueError, match=re.escape(str(path))) as raised:
        CachedHunyuanImage3Pipeline.from_pretrained(directory, dtype=torch.float32)
    assert "not a HunyuanImage-3.0 release directory" not in str(raised.value)


def test_a_tensor_missing_from_its_shard_names_the_file_and_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    from cached_diffusers.pipelines import CachedHunyuanImage3Pipeline

    directory = tmp_path / "hunyuanimage3-tiny"
    shutil.copytree(reference_dir("hunyuanimage3-tiny") / "checkpoint", directory)
    shard = directory / "model-0001-of-0002.safetensors"
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(str(shard)) + r".*" + re.escape(repr(dropped))):
        CachedHunyuanImage3Pipeline.from_pretrained(directory, dtype=torch.float32)
