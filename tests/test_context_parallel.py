"""Caching under diffusers' context parallelism (Ulysses 2, two gloo processes): every method, Qwen-Image (also the
edit models' zero_cond_t) and Klein.

Each scenario drives a tiny cached transformer through a two-branch (cond / uncond) Euler loop with
``cache_context``, once in this process (the single-process reference) and once on each of two ranks with
``enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))``. It checks that every rank records the
single-process decisions (step, reuse, reason; decision values equal up to the rounding of the summation order),
the same calibration data, and returns the single-process latents within 1e-4 (float32). Klein with DBCache /
First-Block-Cache is the case that hung before the decision statistics were summed over the group.
"""

import math

import pytest
import torch

from conftest import decides_per_sample, matrix_context, matrix_methods, mixing_config
from distributed import run_distributed

from cached_diffusers import CachedFlux2Transformer2DModel, CachedQwenImageTransformer2DModel, FirstBlockCacheConfig
from cached_diffusers.tools.tiny import FLUX2_KLEIN_TEMB_GAIN

pytestmark = pytest.mark.slow  # spawns gloo process groups (multi-process): left out of the fast set (-m "not slow")

NUM_STEPS = 8
IDENTITY = (0.0, 0.0, 0.0, 1.0, 0.0)  # f(x) = x: TeaCache accumulates the raw relative L1 distance
MAG_RATIOS = (1.0, 1.02, 1.01, 1.0, 0.99, 0.98, 0.97, 0.9)

QWEN_CONFIG = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=4,
    attention_head_dim=16,
    num_attention_heads=2,  # Ulysses 2 splits the heads
    joint_attention_dim=16,
    axes_dims_rope=(8, 4, 4),
)
KLEIN_CONFIG = dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=16,
    axes_dims_rope=(4, 4, 4, 4),
    guidance_embeds=False,
)

def scenario_names(family):
    """The scenarios of ``family``: every registered method (:func:`conftest.matrix_methods`), each method calibrated
    from runs (``calibrate=True``), DBCache with the TaylorSeer calibrator and with a step mask (SCM). The edit
    models' ``zero_cond_t`` changes the indicators only: there, one method per indicator kind."""
    methods = matrix_methods()
    if family == "qwen-edit":
        kinds = {}
        for m in methods:
            if decides_per_sample(m):
                kinds.setdefault(m.policy_class.indicator_kind, m.name)
        return tuple(kinds.values())
    calibrated = [f"{m.name}-calibrate" for m in methods if m.calibration == "runs"]
    return (*[m.name for m in methods], *calibrated, "dbcache-taylorseer", "scm")


_CONFIGS: dict[str, dict] = {}


def method_configs(family, methods):
    """name -> config of each of ``methods`` that reuses some steps and computes others on ``family``'s model
    (:func:`conftest.mixing_config`, searched with single-process runs)."""
    model = _model(family)
    model.set_attention_backend("native")
    context = {**matrix_context(IDENTITY, model.num_cache_blocks, NUM_STEPS), "mag_ratios": MAG_RATIOS}

    def reused_by_branch(config):
        records = _generate(model, family, config)[1]
        return {b: [r[1] for r in rs] for b, rs in records.items()}

    return {m.name: mixing_config(m, context, reused_by_branch, NUM_STEPS) for m in methods}


def scenario_configs(family):
    """name -> cache config of :func:`scenario_names`, searched once in the test process (the ranks get them): each
    method's config reuses some steps and computes others on the family's model (:func:`conftest.mixing_config`, a
    threshold bisected over the method's sweep range; checked below)."""
    if family not in _CONFIGS:
        configs = method_configs(family, matrix_methods())
        for m in matrix_methods():
            if m.calibration == "runs":
                configs[f"{m.name}-calibrate"] = m.config_class(calibrate=True)
        db = configs["dbcache"]
        configs["dbcache-taylorseer"] = db.replace(Bn=0, enable_taylorseer=True, taylorseer_order=1)
        configs["scm"] = db.replace(Bn=0, scm_steps_mask=[1, 1, 0, 1, 0, 0, 1, 1])
        _CONFIGS[family] = {name: configs[name] for name in scenario_names(family)}
    return _CONFIGS[family]


def _model(family):
    torch.manual_seed(0)
    if family.startswith("qwen"):
        # qwen-edit: zero_cond_t, the per-token modulation index of the edit models (target image, then references)
        return CachedQwenImageTransformer2DModel(**QWEN_CONFIG, zero_cond_t=family == "qwen-edit").eval()
    model = CachedFlux2Transformer2DModel(**KLEIN_CONFIG).eval()
    with torch.no_grad():  # O(1) modulations, as in the tiny pipeline
        model.time_guidance_embed.timestep_embedder.linear_2.weight.mul_(FLUX2_KLEIN_TEMB_GAIN)
    return model


def _inputs(family):
    """The initial latents and, per branch, the text tokens and the model's other keyword arguments."""
    g = torch.Generator().manual_seed(1)
    if family.startswith("qwen"):
        img_shapes = [[(1, 4, 4)]] if family == "qwen" else [[(1, 4, 4), (1, 2, 4)]]  # a 4x4 target, a 2x4 reference
        tokens = sum(f * h * w for f, h, w in img_shapes[0])
        latents = torch.randn(1, tokens, 16, generator=g)  # patches of 2x2x4 channels
        texts = {"cond": torch.randn(1, 8, 16, generator=g), "uncond": torch.randn(1, 6, 16, generator=g)}
        extra = {
            b: dict(encoder_hidden_states_mask=torch.ones(1, t.shape[1], dtype=torch.long), img_shapes=img_shapes)
            for b, t in texts.items()
        }
        return latents, texts, extra
    latents = torch.randn(1, 16, 8, generator=g)
    texts = {"cond": torch.randn(1, 8, 16, generator=g), "uncond": torch.randn(1, 6, 16, generator=g)}
    img_ids = torch.cartesian_prod(torch.tensor([0]), torch.arange(4), torch.arange(4), torch.arange(1))
    extra = {}
    for branch, text in texts.items():
        txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text.shape[1]))
        extra[branch] = dict(img_ids=img_ids.unsqueeze(0), txt_ids=txt_ids.unsqueeze(0), guidance=None)
    return latents, texts, extra


def _denoise(model, config, latents, texts, extra):
    """The CFG Euler loop (scale 2) over NUM_STEPS steps from ``latents`` ``(B, L, C)``, the text streams and extra
    arguments per branch; returns the final latents and the generation's cache statistics."""
    with model.cache_generation(config) as generation:
        for step in range(NUM_STEPS):
            sigma, next_sigma = 1.0 - step / NUM_STEPS, 1.0 - (step + 1) / NUM_STEPS
            predictions = {}
            for branch in ("cond", "uncond"):
                with model.cache_context(branch, step_index=step, num_inference_steps=NUM_STEPS):
                    predictions[branch] = model(
                        hidden_states=latents,
                        encoder_hidden_states=texts[branch],
                        timestep=torch.tensor([sigma] * latents.shape[0]),
                        return_dict=False,
                        **extra[branch],
                    )[0]
            velocity = predictions["uncond"] + 2.0 * (predictions["cond"] - predictions["uncond"])
            latents = latents + (next_sigma - sigma) * velocity
    return latents, generation.stats


@torch.no_grad()
def _generate(model, family, config):
    """A CFG Euler loop (scale 2) over NUM_STEPS steps; returns the final latents and the cache statistics."""
    latents, stats = _denoise(model, config, *_inputs(family))
    records = {
        b: [(r.step, r.reused, r.reason, r.value, r.blocks_computed) for r in s.records]
        for b, s in stats.branches.items()
    }
    calibration = {b: s.calibration for b, s in stats.branches.items()}
    return latents, records, calibration


def _scenarios(family, configs, parallel):
    model = _model(family)
    model.set_attention_backend("native")
    if parallel:
        from diffusers import ContextParallelConfig

        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    results = {"none": _generate(model, family, None)}
    for name, config in configs.items():
        results[name] = _generate(model, family, config)
    return results


def _diverging_first_block_cache(model):
    """The hang case: First-Block-Cache on Klein with a threshold between the two ranks' own (shard-local) values of
    the first tested statistic, so that deciding from a shard would make one rank reuse and the other compute.

    Returns ``(threshold, [local value per rank], latents, records)`` of the run at that threshold.
    """
    from cached_diffusers import parallel  # the statistics' one reduction (policies.relative_l1 looks it up per call)

    local, real = [], parallel.sequence_sums

    def recording(*partial_sums):  # this rank's own sums, before the reduction over the group
        local.append([t.item() for t in partial_sums])
        return real(*partial_sums)

    parallel.sequence_sums = recording
    try:
        _generate(model, "klein", FirstBlockCacheConfig(residual_diff_threshold=0.0))  # every step computes
    finally:
        parallel.sequence_sums = real
    numerator, denominator = local[0]  # step 1 of the first branch
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, (numerator, denominator))
    values = [n / d for n, d in gathered]
    whole = sum(n for n, _ in gathered) / sum(d for _, d in gathered)  # between the two, away from both
    threshold = max(((min(values) + whole) / 2, (whole + max(values)) / 2), key=lambda t: abs(t - whole))
    latents, records, _ = _generate(model, "klein", FirstBlockCacheConfig(residual_diff_threshold=threshold))
    return threshold, values, latents, records


def _rank_scenarios(rank, world_size, family_configs):
    results = {family: _scenarios(family, configs, parallel=True) for family, configs in family_configs.items()}
    model = _model("klein")
    model.set_attention_backend("native")
    from diffusers import ContextParallelConfig

    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    results["hang-case"] = _diverging_first_block_cache(model)
    return results


def _close(a, b, rel=1e-5):
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-7)


def _assert_same_decisions(got, expected, where):
    assert got.keys() == expected.keys(), where
    for branch in expected:
        g, e = got[branch], expected[branch]
        assert [r[:3] + r[4:] for r in g] == [r[:3] + r[4:] for r in e], f"{where}, branch {branch}"
        assert all(_close(a[3], b[3]) for a, b in zip(g, e)), f"{where}, branch {branch}: {g} != {e}"


def _assert_same_calibration(got, expected, where):
    assert got.keys() == expected.keys(), where
    for branch, data in expected.items():
        assert got[branch].keys() == data.keys(), where
        for key, values in data.items():
            flat_got = torch.tensor(_numbers(got[branch][key]), dtype=torch.float64).flatten()
            flat_expected = torch.tensor(_numbers(values), dtype=torch.float64).flatten()
            assert flat_got.shape == flat_expected.shape and len(flat_expected) > 0, f"{where}: {key}"
            # the MagCache ratios are rounded to 5 decimals: a rounding boundary may move the last digit; a step
            # without a value (None, SeaCache's first distance) is NaN on both sides
            assert torch.allclose(flat_got, flat_expected, rtol=1e-5, atol=1.1e-5, equal_nan=True), f"{where}: {key}"


def _numbers(values):
    """``values`` (nested lists) with ``None`` as NaN."""
    if isinstance(values, (list, tuple)):
        return [_numbers(v) for v in values]
    return math.nan if values is None else values


FAMILIES = ("qwen", "klein", "qwen-edit")


@pytest.fixture(scope="module")
def all_runs():
    """{family: (single-process results, results of the two ranks)}, every method, one pair of processes for all."""
    return runs_of({f: scenario_configs(f) for f in FAMILIES})


def runs_of(configs):
    """``{family: {name: config}}`` run on two ranks and in this process: ``{family: (single-process results, results
    of the two ranks)}`` and ``"hang-case"``."""
    ranks = run_distributed(_rank_scenarios, world_size=2, args=(configs,), timeout_s=120)
    runs = {f: (_scenarios(f, c, parallel=False), [r[f] for r in ranks]) for f, c in configs.items()}
    runs["hang-case"] = [r["hang-case"] for r in ranks]
    return runs


@pytest.mark.parametrize("family, method", [(f, m) for f in FAMILIES for m in ("none", *scenario_names(f))])
def test_every_rank_decides_and_returns_as_the_single_process(all_runs, family, method):
    check_every_rank_decides_as_the_single_process(all_runs, family, method)


def check_every_rank_decides_as_the_single_process(all_runs, family, method):
    """Scenario ``method`` of ``family`` (:func:`runs_of`): it reuses and computes (unless it calibrates), and every
    rank records the single process's decisions and calibration and returns its latents."""
    reference, ranks = all_runs[family]
    latents, records, calibration = reference[method]
    if method != "none" and not method.endswith("-calibrate"):
        reused = [r for branch in records.values() for r in branch if r[1]]
        computed = [r for branch in records.values() for r in branch if not r[1]]
        assert reused and len(computed) > 2, f"{family} {method}: the scenario must both reuse and compute"
    for rank, results in enumerate(ranks):
        where = f"{family} {method}, rank {rank}"
        got_latents, got_records, got_calibration = results[method]
        _assert_same_decisions(got_records, records, where)
        _assert_same_calibration(got_calibration, calibration, where)
        assert (got_latents - latents).abs().max().item() < 1e-4, where


def test_klein_first_block_cache_where_shard_local_decisions_diverge(all_runs):
    """Before the reduction each rank decided from its own shard: at this threshold one rank would have reused step 1
    and the other computed it (running the blocks' all-to-all alone), and the run hung until the group's timeout."""
    (threshold, values, latents, records), other = all_runs["hang-case"]
    assert other[0] == threshold and other[1] == values  # every rank saw the same local values and threshold
    assert min(values) < threshold < max(values)  # shard-local decisions would disagree at step 1
    model = _model("klein")
    model.set_attention_backend("native")
    expected_latents, expected, _ = _generate(model, "klein", FirstBlockCacheConfig(residual_diff_threshold=threshold))
    for rank, (_, _, got_latents, got) in enumerate(all_runs["hang-case"]):
        _assert_same_decisions(got, expected, f"rank {rank}")
        assert (got_latents - expected_latents).abs().max().item() < 1e-4
    assert any(r[1] for branch in expected.values() for r in branch)  # the run reuses some step


def test_without_a_group_the_sums_are_the_local_ones_and_nothing_is_sharded():
    from cached_diffusers.parallel import context_parallel_group, sequence_mean, sequence_sums, shard_sequence

    values = torch.randn(3, 5)
    assert sequence_sums(values.sum(), values.abs().sum()) == (values.sum().item(), values.abs().sum().item())
    assert sequence_mean(values) == values.mean().item()
    model = _model("klein")
    assert context_parallel_group(model) is None
    assert shard_sequence(model, values, dim=1) is values


def test_cached_qwen_plan_is_the_parents_without_the_split_inside_the_stack():
    from diffusers import QwenImageTransformer2DModel

    parent = QwenImageTransformer2DModel._cp_plan
    assert set(parent) - set(CachedQwenImageTransformer2DModel._cp_plan) == {"transformer_blocks.0"}
    assert all(CachedQwenImageTransformer2DModel._cp_plan[k] is parent[k] for k in CachedQwenImageTransformer2DModel._cp_plan)
    assert "_cp_plan" not in vars(CachedFlux2Transformer2DModel)  # Klein's plan (split at the model input) as is


# -- per-sample decisions under context parallelism ---------------------------------------------------------------
def _batch_inputs(family):
    """``_inputs`` for a batch of two samples: the second sample's latents drawn apart, the texts repeated."""
    latents, texts, extra = _inputs(family)
    other = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    batch = torch.cat([latents, other])
    texts = {b: t.expand(2, *t.shape[1:]).contiguous() for b, t in texts.items()}
    for branch in extra:
        mask = extra[branch].get("encoder_hidden_states_mask")
        if mask is not None:
            extra[branch] = {**extra[branch], "encoder_hidden_states_mask": mask.expand(2, -1).contiguous()}
    return batch, texts, extra


@torch.no_grad()
def _generate_batch(model, family, config, rows=(0, 1)):
    """``_generate`` on the batch of two (or on the samples ``rows`` of it); returns the latents and, per branch,
    each sample's records (step, reused, reason)."""
    latents, texts, extra = _batch_inputs(family)
    index = list(rows)
    latents, texts = latents[index], {b: t[index] for b, t in texts.items()}
    extra = {
        b: {k: (v[index] if k == "encoder_hidden_states_mask" else v) for k, v in e.items()} for b, e in extra.items()
    }
    latents, stats = _denoise(model, config, latents, texts, extra)
    samples = {
        b: [[(r.step, r.reused, r.reason) for r in sample.records] for sample in s.samples] or [
            [(r.step, r.reused, r.reason) for r in s.records]
        ]
        for b, s in stats.branches.items()
    }
    return latents, samples, {b: [sample.values for sample in s.samples] for b, s in stats.branches.items()}


def _rank_batch(rank, world_size, thresholds):
    results = {}
    for family, threshold in thresholds.items():
        model = _model(family)
        model.set_attention_backend("native")
        from diffusers import ContextParallelConfig

        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        results[family] = _generate_batch(model, family, FirstBlockCacheConfig(residual_diff_threshold=threshold))[:2]
    return results


@pytest.mark.slow
def test_per_sample_decisions_agree_on_every_rank_when_the_samples_disagree():
    """A batch of two whose samples decide differently at some step (First-Block-Cache, threshold between the two
    samples' values): each rank records the single process's per-sample decisions and returns its latents, and each
    sample equals its own single-sample run."""
    thresholds, expected = {}, {}
    for family in ("qwen", "klein"):
        model = _model(family)
        model.set_attention_backend("native")
        _, _, values = _generate_batch(model, family, FirstBlockCacheConfig(residual_diff_threshold=0.0))
        first, second = values["cond"]
        step = next(s for s in sorted(first) if s in second and abs(first[s] - second[s]) > 1e-3 * max(first[s], second[s]))
        thresholds[family] = (first[step] + second[step]) / 2
        expected[family] = _generate_batch(model, family, FirstBlockCacheConfig(residual_diff_threshold=thresholds[family]))
        latents, samples, _ = expected[family]
        assert any(len({tuple(s) for s in branch}) > 1 for branch in samples.values()), f"{family}: no mixed step"
        for row in (0, 1):
            alone, alone_samples, _ = _generate_batch(model, family, FirstBlockCacheConfig(residual_diff_threshold=thresholds[family]), rows=(row,))
            assert (alone[0] - latents[row]).abs().max().item() < 1e-4, (family, row)
            assert {b: s[0] for b, s in alone_samples.items()} == {b: s[row] for b, s in samples.items()}
    ranks = run_distributed(_rank_batch, world_size=2, args=(thresholds,), timeout_s=120)
    for rank, results in enumerate(ranks):
        for family, (latents, samples) in results.items():
            assert samples == expected[family][1], f"{family}, rank {rank}"
            assert (latents - expected[family][0]).abs().max().item() < 1e-4, f"{family}, rank {rank}"
