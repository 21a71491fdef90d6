"""Batch invariance (issue 22): with ``batch_decisions="per_sample"`` (the default) every sample of a batch decides
for itself, so a batched call gives each sample the output of its own call (within 1e-4, float32, CPU), and the
statistics record each sample's computed and reused steps. ``"shared"`` keeps one decision per batch (the peers').

Every registered method runs (``tests/conftest.py``'s ``contract_method``). The thresholds of the methods that decide
from each sample's data (:func:`conftest.decides_per_sample`) are set between the samples' own decision values at one
step, measured by a probe run that never reuses (:func:`conftest.probe_config`), so that the samples disagree there:
every such test asserts that some step was mixed (some samples computed, the others reused), so it could fail. The
other methods run the contract's reusing config, warm-up cut to the first step (:func:`conftest.short_run_config`),
and must not mix."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cached_diffusers import DBCacheConfig, FirstBlockCacheConfig, TeaCacheConfig, available_cache_methods
from cached_diffusers.configs import cache_config_from_dict
from cached_diffusers.engine import BatchDecision, CacheEngine
from cached_diffusers.registry import cache_method
from cached_diffusers.spec import ModelCacheSpec
from cached_diffusers.tools.tiny import DEFAULT_PROMPTS

from conftest import (
    contract_config,
    decides_per_sample,
    matrix_context,
    matrix_methods,
    probe_config,
    short_run_config,
    supports,
    threshold_config,
)
from families import CASES_BY_NAME, small_working_sizes
from helpers import BATCH_TOLERANCE, check_batch_rows, threshold_between

STEPS = 5
TOLERANCE = BATCH_TOLERANCE
BLOCKS = 4
"""Blocks kept of the tiny transformers (the property does not depend on depth; CPU time does)."""

PER_SAMPLE = [m.name for m in matrix_methods() if decides_per_sample(m)]
"""The registered methods whose decisions depend on each sample's data (for the hypothesis test's strategy)."""


def test_the_matrix_runs_every_registered_method_and_some_decide_per_sample():
    assert {m.name for m in matrix_methods()} == set(available_cache_methods()) - {"none"}
    assert PER_SAMPLE and len(PER_SAMPLE) < len(matrix_methods())  # both kinds of check below bite


def batch_context(case, pipe, num_steps=STEPS):
    """:func:`conftest.matrix_context` of a pipeline of ``case``."""
    return matrix_context(case.teacache_coefficients, pipe.transformer.num_cache_blocks, num_steps)


def build(case):
    """The case's cached pipeline, its transformer cut to its first :data:`BLOCKS` blocks of each list."""
    components = case.components()
    transformer = components["transformer"]
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks = getattr(transformer, name, None)
        if blocks is not None and len(blocks) > BLOCKS:
            setattr(transformer, name, torch.nn.ModuleList(list(blocks)[:BLOCKS]))
    return case.cached(**components)


def batch_inputs(case, prompts: list[str], seeds: list[int], per_prompt: int, **extra):
    """The case's call arguments for ``prompts`` x ``per_prompt`` samples, sample ``i`` drawn with ``seeds[i]``."""
    assert len(seeds) == len(prompts) * per_prompt
    kwargs = case.inputs(steps=STEPS, **extra)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    kwargs["generator"] = generators[0] if len(generators) == 1 else generators
    if "prompt_embeds" in kwargs:  # FLUX.2 [dev]: embeddings instead of prompts, one row per prompt
        dim = kwargs["prompt_embeds"].shape[-1]
        kwargs["prompt_embeds"] = torch.cat(
            [torch.randn(1, 8, dim, generator=torch.Generator().manual_seed(DEFAULT_PROMPTS.index(p))) for p in prompts]
        )
    else:
        kwargs["prompt"] = prompts[0] if len(prompts) == 1 else list(prompts)
        if kwargs.get("negative_prompt") is not None:
            kwargs["negative_prompt"] = kwargs["negative_prompt"] if len(prompts) == 1 else [" "] * len(prompts)
    if case.name.startswith("qwen") and len(prompts) > 1:
        # one reference image (and mask) per prompt: the Qwen-Image pipelines encode a single image with the first
        # generator only, which would change the later samples' noise against their own calls even uncached
        for name in ("image", "mask_image"):
            if name in kwargs:
                kwargs[name] = [kwargs[name]] * len(prompts)
    if per_prompt > 1:
        kwargs["num_images_per_prompt"] = per_prompt
    kwargs["output_type"] = "latent"
    return kwargs


def run(pipe, kwargs):
    pipe.set_progress_bar_config(disable=True)
    with small_working_sizes():
        return pipe(**kwargs).images.float()


def samples_of(prompts, seeds, per_prompt):
    """``[(prompt, seed)]`` of every sample in batch order (prompt-major, as diffusers repeats embeddings)."""
    return [(prompt, seeds[i * per_prompt + j]) for i, prompt in enumerate(prompts) for j in range(per_prompt)]


def mixing_threshold(pipe, case, method, prompts, seeds, per_prompt) -> float:
    """A threshold between the samples' decision values at the first step where they differ, from a probe run that
    never reuses (so that at that step some samples reuse and the others compute)."""
    pipe.cache_config = probe_config(method, batch_context(case, pipe))
    run(pipe, batch_inputs(case, prompts, seeds, per_prompt))
    samples = pipe.cache_stats.branches["cond"].samples
    assert len(samples) == len(prompts) * per_prompt
    assert not any(s.reused_steps for s in samples), [s.reused_steps for s in samples]  # the probe never reuses
    return threshold_between(samples, method.name)


def check_invariance(case_name, method, prompts, seeds, per_prompt=1, expect_mixed=None):
    """A batched call with ``method`` (a registry entry) gives each sample its own call's latents within TOLERANCE,
    and each sample's recorded steps are those of its own call; returns the batched call's statistics."""
    case = CASES_BY_NAME[case_name]
    pipe = build(case)
    if decides_per_sample(method):
        threshold = mixing_threshold(pipe, case, method, prompts, seeds, per_prompt)
        config = threshold_config(method, threshold, batch_context(case, pipe))
    else:
        config = short_run_config(method, batch_context(case, pipe), num_steps=STEPS)
    if expect_mixed is None:
        expect_mixed = decides_per_sample(method)
    return check_config_invariance(pipe, case, config, prompts, seeds, per_prompt, expect_mixed)


def check_config_invariance(pipe, case, config, prompts, seeds, per_prompt, expect_mixed):
    """:func:`check_invariance` with a given ``config``: whether some step mixed must be ``expect_mixed``."""
    pipe.cache_config = config
    batched = run(pipe, batch_inputs(case, prompts, seeds, per_prompt))
    stats = pipe.cache_stats
    batch = len(prompts) * per_prompt
    assert batched.shape[0] == batch
    branches = dict(stats.branches)
    for branch in branches.values():
        assert len(branch.samples) == batch
    mixed = any(len({tuple(s.reused_steps) for s in b.samples}) > 1 for b in branches.values())
    assert mixed == expect_mixed, {name: [s.reused_steps for s in b.samples] for name, b in branches.items()}
    assert any(s.num_reused for b in branches.values() for s in b.samples)  # caching happened
    for row, (prompt, seed) in enumerate(samples_of(prompts, seeds, per_prompt)):
        alone = run(pipe, batch_inputs(case, [prompt], [seed], 1))
        difference = (batched[row] - alone[0]).abs().max().item()
        assert difference <= TOLERANCE, f"sample {row}: max abs difference {difference:.3g}"
        for name, branch in pipe.cache_stats.branches.items():
            own = branches[name].samples[row]
            assert own.reused_steps == branch.reused_steps, (name, row)
            assert own.computed_steps == branch.computed_steps, (name, row)
    return stats


TWO = [DEFAULT_PROMPTS[0], DEFAULT_PROMPTS[2]]


@pytest.mark.parametrize("case_name", ["qwen-txt2img", "flux2-klein"])
def test_each_sample_of_a_prompt_list_gets_its_own_output(case_name, contract_method):
    check_invariance(case_name, contract_method, TWO, [0, 1])


@pytest.mark.parametrize("method", ["fbcache", "teacache"])
@pytest.mark.parametrize("case_name", ["qwen-txt2img", "flux2-klein"])
def test_each_sample_gets_its_own_output_with_several_images_per_prompt(case_name, method):
    check_invariance(case_name, cache_method(method), [DEFAULT_PROMPTS[1]], [3, 4], per_prompt=2)
    check_invariance(case_name, cache_method(method), TWO, [0, 1, 2, 3], per_prompt=2)


@pytest.mark.parametrize("case_name", ["qwen-img2img", "qwen-inpaint", "qwen-edit", "flux2-klein-inpaint", "flux2-dev"])
def test_each_sample_gets_its_own_output_on_the_other_pipelines(case_name):
    check_invariance(case_name, cache_method("fbcache"), TWO, [0, 1])


@pytest.mark.slow
@pytest.mark.parametrize(
    "case_name", ["qwen-img2img", "qwen-inpaint", "qwen-edit", "flux2-klein-inpaint", "flux2-dev"]
)
def test_every_method_gives_each_sample_its_own_output_on_the_other_pipelines(case_name, contract_method):
    check_invariance(case_name, contract_method, TWO, [0, 1])


def test_a_taylorseer_calibrator_keeps_a_forecast_per_sample():
    """DBCache with ``Bn=1`` and the TaylorSeer calibrator (``enable_taylorseer``): the forecasts of a mixed batch
    are each sample's own (the registry's sweep config runs neither)."""
    case = CASES_BY_NAME["qwen-txt2img"]
    method = cache_method("dbcache")
    pipe = build(case)
    threshold = mixing_threshold(pipe, case, method, TWO, [0, 1], 1)
    config = DBCacheConfig(Fn=1, Bn=1, residual_diff_threshold=threshold, max_warmup_steps=0, enable_taylorseer=True)
    check_config_invariance(pipe, case, config, TWO, [0, 1], 1, expect_mixed=True)


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    case_name=st.sampled_from(["qwen-txt2img", "flux2-klein"]),
    method=st.sampled_from(PER_SAMPLE),
    prompts=st.lists(st.sampled_from(DEFAULT_PROMPTS), min_size=1, max_size=3),
    per_prompt=st.integers(1, 2),
    seed=st.integers(0, 1000),
)
def test_random_batch_compositions_give_each_sample_its_own_output(case_name, method, prompts, per_prompt, seed):
    batch = len(prompts) * per_prompt
    if batch < 2:
        prompts = prompts + [DEFAULT_PROMPTS[3]]
        batch = len(prompts) * per_prompt
    if case_name.startswith("qwen") and per_prompt > 1 and len(prompts) > 1:
        # diffusers' QwenImagePipeline.encode_prompt repeats the text mask (B, L) with .repeat(1, n, 1), which
        # interleaves the prompts' masks ([m0, m1, m0, m1]) while the embeddings are grouped ([e0, e0, e1, e1]): with
        # num_images_per_prompt > 1 and prompts of different lengths a sample gets another prompt's mask, caching or
        # not. Prompts of one token length (TWO) keep the masks alike.
        prompts = [TWO[i % 2] for i in range(len(prompts))]
    seeds = [seed + i for i in range(batch)]
    check_invariance(case_name, cache_method(method), prompts, seeds, per_prompt)


# -- "shared": today's batch-level decision -------------------------------------------------------------------------
def test_shared_takes_one_decision_on_the_batch_and_per_sample_does_not():
    case = CASES_BY_NAME["qwen-txt2img"]
    pipe = build(case)
    threshold = mixing_threshold(pipe, case, cache_method("fbcache"), TWO, [0, 1], 1)
    inputs = batch_inputs(case, TWO, [0, 1], 1)

    pipe.cache_config = FirstBlockCacheConfig(residual_diff_threshold=threshold, batch_decisions="shared")
    shared = run(pipe, inputs)
    stats = pipe.cache_stats
    assert all(not b.samples for b in stats.branches.values())  # one decision per branch, no per-sample records
    per_sample_config = FirstBlockCacheConfig(residual_diff_threshold=threshold)
    pipe.cache_config = per_sample_config
    per_sample = run(pipe, batch_inputs(case, TWO, [0, 1], 1))
    branches = pipe.cache_stats.branches.values()
    assert any(len({tuple(s.reused_steps) for s in b.samples}) > 1 for b in branches)  # the samples disagreed
    assert not torch.allclose(shared, per_sample, atol=TOLERANCE)  # sharing changes some sample's output
    alone = run(pipe, batch_inputs(case, [TWO[1]], [1], 1))
    assert (per_sample[1] - alone[0]).abs().max() <= TOLERANCE


def test_shared_decides_on_the_batch_mean():
    """``"shared"`` is the one-decision rule on the whole batch's indicator (what the engine did before)."""
    identity = (0.0, 0.0, 0.0, 1.0, 0.0)

    def decisions(mode, batch_indicators):
        engine = CacheEngine(ModelCacheSpec(model_name="Sketch", num_blocks=1))
        engine.config = TeaCacheConfig(rel_l1_thresh=0.15, coefficients=identity, batch_decisions=mode)
        out = []
        for step, indicator in enumerate(batch_indicators):
            latents = torch.zeros(indicator.shape[0], 4)
            decision = engine.decide("cond", step, len(batch_indicators), inputs=(latents,), indicator=indicator)
            if decision.reuse:
                engine.recall(branch="cond")
            elif isinstance(decision, BatchDecision) and decision.mixed:
                engine.commit((latents[list(decision.computing)],), branch="cond")
                engine.recall(branch="cond")
            else:
                engine.commit((latents,), branch="cond")
            out.append(decision)
        return out, engine.stats

    # sample 0 changes by 10% a step, sample 1 by 30%: the batch's relative L1 is 20%
    steps = [torch.tensor([[1.0 * 1.1**s], [1.0 * 1.3**s]]) for s in range(4)]
    shared, shared_stats = decisions("shared", steps)
    assert [d.reuse for d in shared] == [False, False, False, False]  # 0.2 > 0.15 every step
    assert not shared_stats.branches["cond"].samples
    per_sample, stats = decisions("per_sample", steps)
    samples = stats.branches["cond"].samples
    assert samples[0].reused_steps == [1]  # 0.1 < 0.15, then 0.1 + 0.11 > 0.15 computes; the last step computes
    assert samples[1].reused_steps == []
    assert per_sample[1].mixed and per_sample[1].computing == (1,)
    assert stats.branches["cond"].records[1].reason == "mixed"
    # one sample alone decides as its row of the batch
    alone, alone_stats = decisions("per_sample", [s[:1] for s in steps])
    assert alone_stats.branches["cond"].reused_steps == samples[0].reused_steps


def test_all_reuse_returns_the_batched_residual_without_a_copy():
    engine = CacheEngine(ModelCacheSpec(model_name="Sketch", num_blocks=1))
    engine.config = TeaCacheConfig(rel_l1_thresh=10.0, coefficients=(0.0, 0.0, 0.0, 1.0, 0.0))
    latents = torch.zeros(3, 4)
    residual = torch.randn(3, 4)
    indicator = torch.ones(3, 2)
    engine.decide("cond", 0, 4, inputs=(latents,), indicator=indicator)
    engine.commit((residual,), branch="cond")
    decision = engine.decide("cond", 1, 4, inputs=(latents,), indicator=indicator)
    assert isinstance(decision, BatchDecision) and decision.reuse and decision.computing == ()
    (recalled,) = engine.recall(branch="cond")
    assert recalled.data_ptr() == residual.data_ptr() and torch.equal(recalled, residual)


def test_commit_takes_the_computing_rows_only():
    engine = CacheEngine(ModelCacheSpec(model_name="Sketch", num_blocks=1))
    engine.config = TeaCacheConfig(rel_l1_thresh=0.15, coefficients=(0.0, 0.0, 0.0, 1.0, 0.0))
    latents = torch.zeros(2, 4)
    engine.decide("cond", 0, 4, inputs=(latents,), indicator=torch.tensor([[1.0], [1.0]]))
    engine.commit((torch.ones(2, 4),), branch="cond")
    decision = engine.decide("cond", 1, 4, inputs=(latents,), indicator=torch.tensor([[1.1], [1.3]]))
    assert decision.mixed and decision.computing == (1,)
    with pytest.raises(ValueError, match=r"computes rows \[1\], so commit takes 1 rows"):
        engine.commit((torch.ones(2, 4),), branch="cond")
    (recalled,) = engine.recall(branch="cond")
    assert recalled.shape == (1, 4)
    engine.commit((torch.full((1, 4), 2.0),), branch="cond")
    assert engine.stats.branches["cond"].records[-1].reason == "mixed"
    with pytest.raises(RuntimeError, match="no pending decision"):
        engine.recall(branch="cond")


# -- the config field ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["per_sample", "shared"])
def test_batch_decisions_round_trips_through_json(mode, tmp_path):
    import json

    config = TeaCacheConfig(rel_l1_thresh=0.3, batch_decisions=mode)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["batch_decisions"] == mode
    assert cache_config_from_dict(data) == config


def test_old_config_files_without_the_field_load_per_sample():
    config = cache_config_from_dict({"method": "fbcache", "residual_diff_threshold": 0.3})
    assert config.batch_decisions == "per_sample"
    assert config == FirstBlockCacheConfig(residual_diff_threshold=0.3)


def test_bad_batch_decisions_is_a_clear_error():
    with pytest.raises(ValueError, match=r"FirstBlockCacheConfig.batch_decisions must be one of 'per_sample', 'shared', got 'batch'"):
        FirstBlockCacheConfig(batch_decisions="batch")
    with pytest.raises(ValueError, match=r"batch_decisions must be one of"):
        cache_config_from_dict({"method": "teacache", "batch_decisions": None})


# -- BAGEL (block stack of our own model) and HunyuanImage-3.0 (whole-call caching in the loop) ------------------------
@pytest.fixture(scope="module")
def bagel():
    from reference import reference_dir

    from cached_diffusers.pipelines.bagel import CachedBagelPipeline

    root = reference_dir("bagel-tiny")
    pipe = CachedBagelPipeline.from_pretrained(root / "checkpoint")
    pipe.set_progress_bar_config(disable=True)
    return pipe, json_inputs(root)


def json_inputs(root):
    import json

    return json.loads((root / "inputs.json").read_text())


BAGEL_STEPS = 5
"""Denoising steps of the BAGEL cases (``num_timesteps=6``)."""

@pytest.mark.parametrize("method", [m.name for m in matrix_methods()])
def test_bagel_samples_get_their_own_output(bagel, method):
    """Every registered method on BAGEL (the methods that decide per sample at a threshold between the samples'
    values, the others with the contract's reusing config)."""
    pipe, inputs = bagel
    method = cache_method(method)
    context = matrix_context(None, pipe.transformer.num_cache_blocks, BAGEL_STEPS)
    prompts = [inputs["prompt"], inputs["prompt"] + " at night"]

    def kwargs(prompt, seeds, per_prompt=1):
        return lambda: dict(
            prompt=prompt, height=inputs["height"], width=inputs["width"], num_timesteps=BAGEL_STEPS + 1,
            timestep_shift=inputs["timestep_shift"], cfg_text_scale=inputs["cfg_text_scale"],
            cfg_img_scale=inputs["cfg_img_scale"], cfg_interval=(0.0, 1.0), num_images_per_prompt=per_prompt,
            generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent",
        )  # fmt: skip

    check_batch_rows(
        pipe, method, context, kwargs(prompts, [0, 1]),
        [kwargs(prompts[0], [0]), kwargs(prompts[1], [1])], adaptive=decides_per_sample(method),
    )  # fmt: skip
    if decides_per_sample(method):  # the mixed steps ran the cached layers on the computing sample's row only
        sizes, run_blocks = [], pipe.transformer._run_blocks

        def recording(start, end, streams, context):
            sizes.append((end - start, streams[0].shape[0]))
            return run_blocks(start, end, streams, context)

        pipe.transformer._run_blocks = recording
        try:
            pipe(**kwargs(prompts, [0, 1])())
        finally:
            del pipe.transformer._run_blocks
        assert (pipe.transformer.num_cache_blocks - 1, 1) in sizes or (pipe.transformer.num_cache_blocks, 1) in sizes


@pytest.fixture(scope="module")
def hunyuan():
    from reference import reference_dir

    from cached_diffusers.pipelines.hunyuanimage3 import CachedHunyuanImage3Pipeline

    root = reference_dir("hunyuanimage3-tiny")
    pipe = CachedHunyuanImage3Pipeline.from_pretrained(root / "checkpoint", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe, json_inputs(root)


HUNYUAN_STEPS = 6

@pytest.mark.parametrize("method", [m.name for m in matrix_methods()])
def test_hunyuanimage3_samples_get_their_own_output(hunyuan, method):
    """Every registered method its wiring pattern runs on HunyuanImage-3.0 (the others are refused at configuration
    time, :func:`conftest.supports`)."""
    pipe, inputs = hunyuan
    method = cache_method(method)
    context = matrix_context(None, 1, HUNYUAN_STEPS)
    if not supports(pipe, method):
        with pytest.raises(ValueError, match="whole transformer calls"):
            pipe.cache_config = contract_config(method, context, num_steps=HUNYUAN_STEPS)
        return
    shared = CASES_BY_NAME["hunyuanimage3"].shared_indicators  # TeaCache's time_embed(t): alike for every sample
    adaptive = decides_per_sample(method) and method.policy_class.indicator_kind not in shared
    noise = torch.randn(2, *[int(v) for v in pipe_latent_shape(pipe, inputs)], generator=torch.Generator().manual_seed(5))

    def kwargs(latents, per_prompt):
        return lambda: dict(
            prompt=inputs["prompt"], height=inputs["height"], width=inputs["width"], num_inference_steps=HUNYUAN_STEPS,
            num_images_per_prompt=per_prompt, latents=latents, output_type="latent",
        )  # fmt: skip

    check_batch_rows(
        pipe, method, context, kwargs(noise, 2), [kwargs(noise[:1], 1), kwargs(noise[1:], 1)], adaptive=adaptive
    )


def pipe_latent_shape(pipe, inputs):
    """``(C, h, w)`` of the tiny HunyuanImage-3.0 case's latents (from its reference noise)."""
    from reference import reference_dir
    from safetensors.torch import load_file

    noise = load_file(reference_dir("hunyuanimage3-tiny") / "initial_noise.safetensors")["noise"]
    return noise.shape[1:]


# -- the measurement of issue 22, and torch.compile -----------------------------------------------------------------
def test_reference_model_apple_is_its_own_in_a_batch():
    """Issue 22's measurement on the shipped Qwen-Image reference model (at its 32 x 32 training size): 20 steps,
    CFG 4, First-Block-Cache 0.3, ``["rocket", "red apple"]`` with seeds 0 and 1 against "red apple" alone with seed
    1. Per-sample decisions keep the apple within 1e-4 of its own call; one decision per batch does not."""
    from cached_diffusers import CachedQwenImagePipeline
    from cached_diffusers.tools.reference_model import REFERENCE_MODEL_DIR

    pipe = CachedQwenImagePipeline.from_pretrained(REFERENCE_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)

    def call(prompts, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(
            prompt=prompts, negative_prompt=[" "] * len(prompts), true_cfg_scale=4.0, num_inference_steps=20,
            height=32, width=32, generator=generators if len(generators) > 1 else generators[0], output_type="latent",
        ).images  # fmt: skip

    differences = {}
    for mode in ("per_sample", "shared"):
        pipe.cache_config = FirstBlockCacheConfig(residual_diff_threshold=0.3, batch_decisions=mode)
        both = call(["rocket", "red apple"], [0, 1])
        apple = call(["red apple"], [1])
        differences[mode] = (both[1] - apple[0]).abs().max().item()
    assert differences["per_sample"] <= TOLERANCE, differences
    assert differences["shared"] > 1e-2, differences  # the batch-level decision changes the apple


@pytest.mark.slow
def test_regional_compilation_runs_a_mixed_step():
    """``compile_repeated_blocks``: the blocks run compiled on whole batches and on the computing samples' rows; the
    per-sample decisions and the outputs are the eager run's."""
    case = CASES_BY_NAME["flux2-klein"]
    pipe = build(case)
    threshold = mixing_threshold(pipe, case, cache_method("fbcache"), TWO, [0, 1], 1)
    pipe.cache_config = FirstBlockCacheConfig(residual_diff_threshold=threshold)
    expected = run(pipe, batch_inputs(case, TWO, [0, 1], 1))
    expected_samples = {n: [s.reused_steps for s in b.samples] for n, b in pipe.cache_stats.branches.items()}
    assert any(len({tuple(s) for s in samples}) > 1 for samples in expected_samples.values())
    torch._dynamo.reset()
    try:
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
        latents = run(pipe, batch_inputs(case, TWO, [0, 1], 1))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    finally:
        torch._dynamo.reset()
    assert {n: [s.reused_steps for s in b.samples] for n, b in pipe.cache_stats.branches.items()} == expected_samples
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)
