"""LeMiCa and MeanCache: configs, the planned policy, MeanCache's average-velocity store, and the four models."""

import json

import numpy as np
import pytest
import torch

from cached_diffusers import (
    CacheEngine,
    CachedBagelPipeline,
    CachedFlux2KleinPipeline,
    CachedHunyuanImage3Pipeline,
    CachedQwenImagePipeline,
    LeMiCaConfig,
    MeanCacheConfig,
    ModelCacheSpec,
    cache_config_from_dict,
    make_cache_config,
)
from cached_diffusers.residuals import MeanCacheStore, sigma_at
from cached_diffusers.tools.tiny import DEFAULT_PROMPTS, build_tiny_flux2_klein_pipeline, build_tiny_qwenimage_pipeline

from reference import reference_dir
from test_engine import ToyStack, run_generation, streams_at

SCHEDULE = dict(computed_steps=[0, 1, 4, 5, 7], num_inference_steps=8)


# -- configs ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: LeMiCaConfig(num_inference_steps=8), r"LeMiCaConfig.computed_steps is required"),
        (lambda: LeMiCaConfig(computed_steps=[0, 7]), r"num_inference_steps must be an integer >= 2"),
        (lambda: LeMiCaConfig(computed_steps=[0, 3, 3, 7], num_inference_steps=8), r"strictly increasing"),
        (lambda: LeMiCaConfig(computed_steps=[1, 7], num_inference_steps=8), r"must start at step 0 and end at the last step 7"),
        (lambda: LeMiCaConfig(computed_steps=[0, 6], num_inference_steps=8), r"must start at step 0 and end at the last step 7"),
        (lambda: LeMiCaConfig(computed_steps=[0, -1, 7], num_inference_steps=8), r"computed_steps\[1\] must be an integer >= 0"),
        (lambda: LeMiCaConfig(computed_steps={0, 7}, num_inference_steps=8), r"sets and other unordered collections"),
        (lambda: MeanCacheConfig(**SCHEDULE, windows=0), r"windows\[0\] must be an integer >= 1"),
        (lambda: MeanCacheConfig(**SCHEDULE, windows=7), r"windows\[0\] must be an integer in \[1, 6\]"),
        (lambda: MeanCacheConfig(**SCHEDULE, windows=[1, 2]), r"one per gap \(4 = len\(computed_steps\) - 1\), got 2"),
    ],
)
def test_bad_parameters_are_clear_errors(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize(
    "config",
    [
        LeMiCaConfig(**SCHEDULE),
        MeanCacheConfig(**SCHEDULE),
        MeanCacheConfig(**SCHEDULE, windows=[1, 2, 6, 3]),
    ],
)
def test_configs_round_trip_through_json_and_the_registry(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert cache_config_from_dict(data) == config
    assert make_cache_config(config.method, **{k: v for k, v in data.items() if k != "method"}) == config
    assert config.budget == 5 and config.source and "arXiv" in config.source


def test_numpy_schedules_are_accepted_as_the_integers_they_hold():
    config = LeMiCaConfig(computed_steps=np.array([0, 3, 7]), num_inference_steps=np.int64(8))
    assert config.computed_steps == (0, 3, 7) and type(config.computed_steps[1]) is int


# -- the planned policy on the toy stack ------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [LeMiCaConfig(**SCHEDULE), MeanCacheConfig(**SCHEDULE, windows=3)])
def test_exactly_the_planned_steps_compute_in_every_branch(config):
    engine, toy = CacheEngine(ModelCacheSpec(num_blocks=4)), ToyStack()
    engine.config = config
    run_generation(engine, toy, 8, branches=("cond", "uncond"))
    for branch in ("cond", "uncond"):
        stats = engine.stats.branches[branch]
        assert stats.computed_steps == [0, 1, 4, 5, 7]
        assert {r.reason for r in stats.records if r.reused} == {"planned-reuse"}
    assert toy.blocks_run == 2 * 5 * 4


def test_lemica_reuses_the_last_computed_residual():
    engine, toy = CacheEngine(ModelCacheSpec(num_blocks=4)), ToyStack()
    engine.config = LeMiCaConfig(**SCHEDULE)
    outputs = run_generation(engine, toy, 8)["cond"]
    residual_1 = [o - i for o, i in zip(ToyStack().run_blocks(0, 4, streams_at(1)), streams_at(1))]
    for step in (2, 3):
        assert all(torch.equal(o, i + r) for o, i, r in zip(outputs[step], streams_at(step), residual_1))


def test_another_step_count_is_refused_naming_the_plan():
    engine, toy = CacheEngine(ModelCacheSpec(num_blocks=4)), ToyStack()
    engine.config = LeMiCaConfig(**SCHEDULE)
    with pytest.raises(ValueError, match=r"planned for num_inference_steps=8 .* this call runs 10 steps"):
        run_generation(engine, toy, 10)


# -- MeanCache's store --------------------------------------------------------------------------------------------------
def meancache_forecast(history, sigma, step, window):
    """The official update written out with numpy: u_i = u_{i-1} - (u_{i0} - avg) / (s_i - s_i0) * (s_{i+1} - s_i),
    avg = (x_i - x_{i0}) / (s_i - s_{i0}) with Euler steps x_{m+1} = x_m + (s_{m+1} - s_m) u_m."""
    steps = sorted(history)[-window:]
    i0 = steps[0]
    x = np.zeros_like(history[i0])
    bounds = steps[1:] + [step]
    for m, end in zip(steps, bounds):
        x = x + (sigma[end] - sigma[m]) * history[m]
    average = x / (sigma[step] - sigma[i0])
    derivative = (history[i0] - average) / (sigma[step] - sigma[i0])
    return history[steps[-1]] - derivative * (sigma[step + 1] - sigma[step])


@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_meancache_store_follows_the_average_velocity_update(window):
    rng = np.random.RandomState(window)
    sigma = np.sort(rng.rand(13))[::-1].copy()
    sigma[0], sigma[-1] = 1.0, 0.0
    store = MeanCacheStore(lambda step: window, lambda: torch.tensor(sigma), 12, 6)
    x = torch.zeros(2, 3)
    history = {}
    for step in range(4):  # computed steps
        u = torch.tensor(rng.randn(2, 3), dtype=torch.float32)
        store.update(step, (x,), (u,))
        history[step] = u.double().numpy()
    for step in range(4, 8):  # reused steps: every forecast joins the history
        expected = meancache_forecast(history, sigma, step, window)
        got = store.get(step)[0]
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-5)
        history[step] = got.double().numpy()
    if window == 1:
        assert np.array_equal(history[7], history[3])  # window 1 is plain reuse


def test_meancache_store_without_sigmas_uses_uniform_time_and_a_linear_trend_is_continued():
    assert sigma_at(None, 3, 10) == pytest.approx(0.7)
    assert sigma_at([1.0, 0.5], 1, 2) == 0.5 and sigma_at([1.0, 0.5], 2, 2) == 0.0
    store = MeanCacheStore(lambda step: 2, None, 10, 6)
    x = torch.zeros(4)
    for step in range(3):
        store.update(step, (x,), (torch.full((4,), float(step)),))
    # u_m = m on a uniform grid: avg over steps 1..2 is 1.5, d = (1 - 1.5) / (-0.2) = 2.5 per unit sigma; one step of
    # -0.1 adds 0.25: the forecast moves along the trend (plain reuse would stay at 2).
    assert torch.allclose(store.get(3)[0], torch.full((4,), 2.25))


# -- the four models ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen():
    pipe = build_tiny_qwenimage_pipeline(seed=0, pipeline_class=CachedQwenImagePipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def klein():
    pipe = build_tiny_flux2_klein_pipeline(seed=0, pipeline_class=CachedFlux2KleinPipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PLANS = [LeMiCaConfig(**SCHEDULE), MeanCacheConfig(**SCHEDULE, windows=[1, 3, 1, 2])]


def planned_run(pipe, config, **kwargs):
    pipe.cache_config = config
    generator = torch.Generator().manual_seed(0)
    out = pipe(prompt=DEFAULT_PROMPTS[0], num_inference_steps=8, generator=generator, output_type="latent", **kwargs)
    return out.images, pipe.cache_stats


@pytest.mark.slow  # over 20 s on the 2-core machine (measured with --durations, 2026-12-08)
@pytest.mark.parametrize("config", PLANS, ids=["lemica", "meancache"])
def test_qwenimage_and_klein_compute_the_plan_per_branch(qwen, klein, config):
    for pipe, kwargs in (
        (qwen, dict(negative_prompt=" ", true_cfg_scale=4.0, height=64, width=64)),
        (klein, dict(guidance_scale=4.0, height=64, width=64, max_sequence_length=64)),
    ):
        latents, stats = planned_run(pipe, config, **kwargs)
        assert torch.isfinite(latents).all()
        assert set(stats.branches) == {"cond", "uncond"}
        for branch in stats.branches.values():
            assert branch.computed_steps == [0, 1, 4, 5, 7]
        uncached, _ = planned_run(pipe, None, **kwargs)
        assert not torch.equal(latents, uncached)  # the reuse changed the result: it really reused


def test_meancache_differs_from_lemica_only_where_a_window_above_1_applies(qwen):
    kwargs = dict(negative_prompt=" ", true_cfg_scale=4.0, height=64, width=64)
    lemica, _ = planned_run(qwen, LeMiCaConfig(**SCHEDULE), **kwargs)
    plain, _ = planned_run(qwen, MeanCacheConfig(**SCHEDULE, windows=1), **kwargs)
    corrected, _ = planned_run(qwen, MeanCacheConfig(**SCHEDULE, windows=[1, 3, 1, 1]), **kwargs)
    assert torch.equal(lemica, plain)
    assert not torch.equal(lemica, corrected)


@pytest.mark.parametrize("config", PLANS, ids=["lemica", "meancache"])
def test_bagel_runs_the_plan_on_every_branch_it_evaluates(config):
    root = reference_dir("bagel-tiny")
    inputs = json.loads((root / "inputs.json").read_text())
    pipe = CachedBagelPipeline.from_pretrained(root / "checkpoint")
    pipe.set_progress_bar_config(disable=True)
    changes = dict(computed_steps=[0, 1, 4, 7, 8, 11], num_inference_steps=12)
    plan = config.replace(**changes, windows=2) if isinstance(config, MeanCacheConfig) else config.replace(**changes)
    pipe.cache_config = plan
    images = pipe(
        prompt=inputs["prompt"], height=inputs["height"], width=inputs["width"], num_timesteps=13,
        timestep_shift=inputs["timestep_shift"], cfg_text_scale=inputs["cfg_text_scale"],
        cfg_img_scale=inputs["cfg_img_scale"], cfg_interval=tuple(inputs["cfg_interval"]),
        cfg_renorm_type=inputs["cfg_renorm_type"], cfg_renorm_min=inputs["cfg_renorm_min"],
        generator=torch.Generator().manual_seed(inputs["seed"]), output_type="latent",
    ).images
    assert torch.isfinite(images).all()
    gen = pipe.cache_stats.branches["gen"]
    assert gen.computed_steps == [0, 1, 4, 7, 8, 11]
    for branch in pipe.cache_stats.branches.values():
        # a branch evaluated at some steps only (BAGEL's cfg_interval) computes its first one, then the planned ones
        evaluated = [r.step for r in branch.records]
        assert branch.computed_steps == sorted({evaluated[0]} | {s for s in evaluated if s in plan.computed_steps})


@pytest.mark.parametrize("config", PLANS, ids=["lemica", "meancache"])
def test_hunyuanimage3_runs_the_plan_and_skips_the_transformer_on_reused_steps(config):
    ref = reference_dir("hunyuanimage3-tiny")
    inputs = json.loads((ref / "inputs.json").read_text())
    from safetensors.torch import load_file

    pipe = CachedHunyuanImage3Pipeline.from_pretrained(ref / "checkpoint", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.cache_config = config
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        out = pipe(
            inputs["prompt"], height=inputs["height"], width=inputs["width"], num_inference_steps=8,
            latents=load_file(ref / "initial_noise.safetensors")["noise"], output_type="pt",
        )
    finally:
        handle.remove()
    assert torch.isfinite(out.images).all()
    for branch in pipe.cache_stats.branches.values():
        assert branch.computed_steps == [0, 1, 4, 5, 7]
    assert len(calls) == 5
