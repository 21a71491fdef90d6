"""CachedBagelPipeline end to end: parity with the official implementation's vectors (tests/data/reference/bagel-tiny),
loading (official layout and diffusers format), and per-branch caching (gen / cfg_text / cfg_img)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cached_diffusers import (
    BagelPipeline,
    CachedBagelPipeline,
    CachedBagelTransformer2DModel,
    DBCacheConfig,
    MagCacheConfig,
    TeaCacheConfig,
)
from cached_diffusers.pipelines.bagel import pack_latents, unpack_latents
from cached_diffusers.registry import cache_method
from conftest import matrix_context, matrix_methods, short_run_config
from helpers import record_calls, stop_recording, teacache_reference
from reference import reference_dir

TOL = dict(atol=1e-4, rtol=1e-4)  # the reference README's float32 tolerances


@pytest.fixture(scope="module")
def ref():
    root = reference_dir("bagel-tiny")
    return {
        "ckpt": root / "checkpoint",
        "expected": load_file(root / "expected.safetensors"),
        "noise": load_file(root / "initial_noise.safetensors"),
        "inputs": json.loads((root / "inputs.json").read_text()),
    }


@pytest.fixture(scope="module")
def pipe(ref):
    pipe = CachedBagelPipeline.from_pretrained(ref["ckpt"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_kwargs(ref, **overrides):
    inputs = ref["inputs"]
    kwargs = dict(
        prompt=inputs["prompt"],
        height=inputs["height"],
        width=inputs["width"],
        num_timesteps=inputs["num_timesteps"],
        timestep_shift=inputs["timestep_shift"],
        cfg_text_scale=inputs["cfg_text_scale"],
        cfg_img_scale=inputs["cfg_img_scale"],
        cfg_interval=tuple(inputs["cfg_interval"]),
        cfg_renorm_type=inputs["cfg_renorm_type"],
        cfg_renorm_min=inputs["cfg_renorm_min"],
        generator=torch.Generator().manual_seed(inputs["seed"]),
    )
    kwargs.update(overrides)
    return kwargs


def run_recording(pipe, **kwargs):
    steps = []

    def callback(pipeline, i, t, tensors):
        steps.append({k: (v.clone() if v is not None else None) for k, v in tensors.items()})
        return {}

    names = ["latents", "velocity", "v_gen", "v_cfg_text", "v_cfg_img"]
    out = pipe(**kwargs, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=names)
    return out, steps


def stack(steps, name, shape):
    return torch.stack([s[name][0] if s[name] is not None else torch.zeros(shape) for s in steps])


def max_diff(name, ours, theirs):
    diff = (ours.float() - theirs.float()).abs().max().item()
    print(f"{name}: max abs diff {diff:.3g}")
    return diff


@pytest.mark.parametrize("noise_from", ["seed", "latents"])
def test_caching_off_reproduces_the_official_implementation(pipe, ref, noise_from):
    expected, noise = ref["expected"], ref["noise"]
    pipe.cache_config = None
    overrides = {}
    if noise_from == "latents":
        overrides.update(latents=noise["noise_latents"], generator=None)
    out, steps = run_recording(pipe, **reference_kwargs(ref, **overrides, output_type="pt"))

    # inputs, ids and schedule: exact
    assert pipe.prompt_ids(ref["inputs"]["prompt"]) == expected["prompt_input_ids"].tolist()
    assert torch.equal(pack_latents(noise["noise_latents"]), noise["noise_tokens"][None])
    assert torch.equal(unpack_latents(noise["noise_tokens"][None], (4, 6)), noise["noise_latents"])
    sigmas = pipe.scheduler.sigmas
    assert torch.equal(sigmas, expected["sigmas"])
    assert torch.equal(sigmas[:-1], expected["timesteps"])
    assert torch.equal(sigmas[:-1] - sigmas[1:], expected["dts"])
    assert len(steps) == ref["inputs"]["derived"]["num_model_steps"]
    computed = {b: torch.tensor([int(s[f"v_{b}"] is not None) for s in steps]) for b in ("gen", "cfg_text", "cfg_img")}
    for branch, flags in computed.items():
        assert torch.equal(flags, expected[f"{branch}_computed"]), branch
    applied = torch.where(computed["cfg_text"].bool(), ref["inputs"]["cfg_text_scale"], 1.0)
    assert torch.equal(applied.float(), expected["cfg_text_scale_applied"])

    # per-step tensors: the README's float32 tolerance (intrinsic float32 error about 5e-6)
    shape = (24, 64)
    for name, ours, key in [
        ("v_gen", stack(steps, "v_gen", shape), "v_gen"),
        ("v_cfg_text", stack(steps, "v_cfg_text", shape), "v_cfg_text"),
        ("v_cfg_img", stack(steps, "v_cfg_img", shape), "v_cfg_img"),
        ("v_combined", stack(steps, "velocity", shape), "v_combined"),
        ("latents_per_step", torch.cat([noise["noise_tokens"][None], stack(steps, "latents", shape)[:-1]]), "latents_per_step"),
        ("final_latent_tokens", steps[-1]["latents"][0], "final_latent_tokens"),
    ]:
        assert max_diff(name, ours, expected[key]) < 1e-4
        torch.testing.assert_close(ours, expected[key], **TOL)
    torch.testing.assert_close(out.images, expected["image"], atol=1e-4, rtol=0)
    max_diff("image", out.images, expected["image"])

    latents = pipe(**reference_kwargs(ref, **overrides, output_type="latent")).images
    assert max_diff("final_latents", latents, expected["final_latents"]) < 1e-4
    vae = pipe.vae
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    assert max_diff("decoded", decoded, expected["decoded"]) < 1e-4
    image = pipe(**reference_kwargs(ref, **overrides, output_type="np")).images[0]
    uint8 = np.asarray(pipe(**reference_kwargs(ref, **overrides, output_type="pil")).images[0])
    assert image.shape == (64, 96, 3)
    diff = np.abs(uint8.astype(int) - expected["image_uint8"].numpy().astype(int)).max()
    print(f"image_uint8: max abs diff {diff}")
    assert diff <= 1


def test_num_timesteps_and_num_inference_steps_agree(pipe, ref):
    pipe.cache_config = None
    a = pipe(**reference_kwargs(ref, output_type="latent")).images
    kwargs = reference_kwargs(ref, output_type="latent")
    del kwargs["num_timesteps"]
    b = pipe(**kwargs, num_inference_steps=ref["inputs"]["num_timesteps"] - 1).images
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="num_timesteps"):
        pipe(**reference_kwargs(ref, num_inference_steps=3))


def test_official_directory_needs_no_config_json_and_lists_skipped_keys(pipe):
    info = pipe.transformer.loading_info
    assert info["missing"] == [] and info["unexpected"] == [] and len(info["skipped"]) > 0
    assert isinstance(pipe.transformer, CachedBagelTransformer2DModel)
    assert pipe.scheduler.config.shift == 3.0
    assert pipe.transformer.config.max_latent_size == 64


def test_diffusers_format_round_trip(pipe, ref, tmp_path):
    pipe.cache_config = TeaCacheConfig(rel_l1_thresh=0.5)
    kwargs = reference_kwargs(ref, output_type="latent", num_timesteps=11)
    first = pipe(**kwargs).images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "BagelPipeline"
    assert index["transformer"] == ["cached_diffusers.models.bagel", "BagelTransformer2DModel"]
    loaded = CachedBagelPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.cache_config == pipe.cache_config
    assert isinstance(loaded.transformer, CachedBagelTransformer2DModel)
    again = loaded(**reference_kwargs(ref, output_type="latent", num_timesteps=11)).images
    assert torch.equal(first, again)
    stock = BagelPipeline.from_pretrained(tmp_path)
    stock.set_progress_bar_config(disable=True)
    assert type(stock.transformer).__name__ == "BagelTransformer2DModel"
    pipe.cache_config = None
    uncached = pipe(**reference_kwargs(ref, output_type="latent", num_timesteps=11)).images
    assert torch.equal(stock(**reference_kwargs(ref, output_type="latent", num_timesteps=11)).images, uncached)


@pytest.mark.parametrize(
    "config",
    [TeaCacheConfig(rel_l1_thresh=1e-9), DBCacheConfig(Fn=1, Bn=0, residual_diff_threshold=0.0, max_warmup_steps=0)],
)
def test_a_config_that_never_reuses_is_bit_identical_to_caching_off(pipe, ref, config):
    pipe.cache_config = None
    kwargs = dict(output_type="latent", num_timesteps=11, cfg_img_scale=1.5)
    off = pipe(**reference_kwargs(ref, **kwargs)).images
    pipe.cache_config = config
    on = pipe(**reference_kwargs(ref, **kwargs)).images
    assert torch.equal(off, on)
    assert set(pipe.cache_stats.branches) == {"gen", "cfg_text", "cfg_img"}
    assert all(not b.reused_steps for b in pipe.cache_stats.branches.values())


def test_each_branch_keeps_its_own_state_and_residuals(pipe, ref):
    steps = 12
    pipe.cache_config = TeaCacheConfig(rel_l1_thresh=0.5)
    calls = record_calls(pipe)
    try:
        pipe(**reference_kwargs(ref, output_type="latent", num_timesteps=steps + 1, cfg_img_scale=1.5))
    finally:
        stop_recording(pipe)
    sigmas = pipe.scheduler.sigmas[:-1]
    active = [i for i in range(steps) if 0.4 < sigmas[i] <= 1.0]
    assert active == list(range(len(active))) and len(active) < steps  # the interval ends before the last step
    stats = pipe.cache_stats.branches
    assert [r.step for r in stats["gen"].records] == list(range(steps))
    for branch in ("cfg_text", "cfg_img"):
        # not evaluated outside the interval: no record there, the state does not advance
        assert [r.step for r in stats[branch].records] == active
    assert stats["gen"].reused_steps, "the test threshold must let some steps be reused"

    last_residual = {}
    for branch, step, reused, streams, out in calls:
        if reused:
            expected = tuple(s + r for s, r in zip(streams, last_residual[branch]))
            assert all(torch.equal(o, e) for o, e in zip(out, expected)), (branch, step)
            if branch in ("gen", "cfg_text"):
                # the other branch's residual differs, so adding it instead would have failed the check above
                other = last_residual["cfg_text" if branch == "gen" else "gen"]
                assert not torch.equal(other[0], last_residual[branch][0])
        else:
            last_residual[branch] = tuple(o - s for o, s in zip(out, streams))

    # each branch's TeaCache decisions follow the rule replayed on that branch's own signals only
    for branch in ("gen", "cfg_text", "cfg_img"):
        signals = [torch.cat(c[3], dim=1).numpy() for c in calls if c[0] == branch]
        reused, _ = teacache_reference(
            signals, 0.5, pipe.transformer.cache_engine._policy.coefficients, compute_last_step=branch == "gen"
        )
        assert stats[branch].reused_steps == reused, branch


def test_branch_outside_the_interval_does_not_disturb_a_run_of_that_branch_alone(pipe, ref):
    """A run whose CFG interval is empty calls only "gen" and equals a run without CFG, records included: branches
    that are never evaluated leave no state and do not touch gen's."""
    pipe.cache_config = TeaCacheConfig(rel_l1_thresh=0.5)
    plain = pipe(**reference_kwargs(ref, output_type="latent", num_timesteps=11, cfg_text_scale=1.0)).images
    plain_records = list(pipe.cache_stats.branches["gen"].records)
    empty = pipe(**reference_kwargs(ref, output_type="latent", num_timesteps=11, cfg_interval=(1.0, 1.0))).images
    assert set(pipe.cache_stats.branches) == {"gen"}
    assert pipe.cache_stats.branches["gen"].records == plain_records
    assert torch.equal(plain, empty)


BAGEL_STEPS = 12
"""Denoising steps of ``num_timesteps=13``."""


FEATURES = {
    "dbcache-taylorseer": DBCacheConfig(Fn=1, Bn=0, residual_diff_threshold=0.5, max_warmup_steps=1, enable_taylorseer=True),
    "scm": TeaCacheConfig(rel_l1_thresh=0.5, scm_steps_mask="fast", scm_steps_policy="static"),
}  # fmt: skip
"""Run beside every registered method: DBCache with the TaylorSeer calibrator, TeaCache with a static step mask."""


@pytest.mark.parametrize("name", [m.name for m in matrix_methods()] + list(FEATURES))
def test_every_method_runs_with_per_branch_state(pipe, ref, name):
    """Every registered method (:func:`conftest.short_run_config` on BAGEL's 12 steps) and :data:`FEATURES`."""
    context = matrix_context(None, pipe.transformer.num_cache_blocks, BAGEL_STEPS)
    config = FEATURES[name] if name in FEATURES else short_run_config(cache_method(name), context, BAGEL_STEPS)
    pipe.cache_config = config
    images = pipe(**reference_kwargs(ref, output_type="latent", num_timesteps=13)).images
    assert torch.isfinite(images).all()
    stats = pipe.cache_stats.branches
    assert set(stats) == {"gen", "cfg_text"}
    assert len(stats["gen"].records) == 12 and len(stats["cfg_text"].records) < 12
    assert sum(len(b.reused_steps) for b in stats.values()) > 0


def test_magcache_calibrates_per_branch_and_then_reuses(pipe, ref):
    pipe.cache_config = MagCacheConfig(calibrate=True)
    pipe(**reference_kwargs(ref, output_type="latent", num_timesteps=13))
    ratios = {b: s.calibration["mag_ratios"] for b, s in pipe.cache_stats.branches.items()}
    assert len(ratios["gen"]) == len(ratios["cfg_text"]) == 12
    evaluated = [r.step for r in pipe.cache_stats.branches["cfg_text"].records]
    assert all(ratios["cfg_text"][i] == 1.0 for i in range(12) if i not in evaluated)
    config = MagCacheConfig.from_calibration(pipe.cache_stats, mag_threshold=0.5, mag_retention_ratio=0.1)
    pipe.cache_config = config
    pipe(**reference_kwargs(ref, output_type="latent", num_timesteps=13))
    assert pipe.cache_stats.branches["gen"].reused_steps
    # re-interpolated to another step count by the engine
    pipe(**reference_kwargs(ref, output_type="latent", num_timesteps=9))
    assert len(pipe.cache_stats.branches["gen"].records) == 8


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_guidance_combine_matches_the_reference_formulas(renorm):
    g = torch.Generator().manual_seed(3)
    v, vt, vi = (torch.randn(2, 5, 4, generator=g) for _ in range(3))
    st, si, low = 4.0, 1.5, 0.2
    ours = BagelPipeline.combine_guidance(v, vt, vi, st, si, renorm, low)
    for b in range(2):  # the reference's formulas, one image at a time (numpy, float64)
        c, t, i = (x[b].double().numpy() for x in (v, vt, vi))
        text = t + st * (c - t)
        if renorm == "text_channel":
            scale = np.clip(np.linalg.norm(c, axis=-1, keepdims=True) / (np.linalg.norm(text, axis=-1, keepdims=True) + 1e-8), low, 1)
            want = i + si * (text * scale - i)
        else:
            comb = i + si * (text - i)
            if renorm == "global":
                scale = np.clip(np.linalg.norm(c) / (np.linalg.norm(comb) + 1e-8), low, 1)
            else:
                scale = np.clip(np.linalg.norm(c, axis=-1, keepdims=True) / (np.linalg.norm(comb, axis=-1, keepdims=True) + 1e-8), low, 1)
            want = comb * scale
        np.testing.assert_allclose(ours[b].numpy(), want, atol=1e-5)
    assert torch.equal(BagelPipeline.combine_guidance(v, vt, vi, 1.0, si, renorm, low), v)


def test_cfg_img_branch_reproduces_gen_for_text_to_image(pipe, ref):
    pipe.cache_config = None
    _, steps = run_recording(pipe, **reference_kwargs(ref, output_type="latent", cfg_img_scale=1.5))
    for s in steps:
        if s["v_cfg_img"] is not None:
            torch.testing.assert_close(s["v_cfg_img"], s["v_gen"], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(height=72), "height must be a multiple of 16"),
        (dict(width=2048), "width must be a multiple of 16"),
        (dict(cfg_renorm_type="per_token"), "cfg_renorm_type"),
        (dict(cfg_renorm_min=1.5), "cfg_renorm_min"),
        (dict(cfg_interval=(0.8, 0.2)), "cfg_interval"),
        (dict(timestep_shift=0.0), "timestep_shift"),
        (dict(output_type="tensor"), "output_type"),
        (dict(latents=torch.zeros(1, 16, 4, 4), generator=None), "latents must have the shape"),
        (dict(num_timesteps=1), "num_timesteps"),
    ],
)
def test_bad_inputs_raise_errors_naming_the_field(pipe, ref, overrides, match):
    with pytest.raises(ValueError, match=match):
        pipe(**reference_kwargs(ref, **overrides))


def test_official_loader_rejects_unknown_keywords(ref):
    with pytest.raises(ValueError, match="unknown variant"):
        CachedBagelPipeline.from_pretrained(ref["ckpt"], variant="fp16")
