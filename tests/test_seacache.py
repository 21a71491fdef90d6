"""SeaCache (arXiv 2602.18993): the SEA filter, the distances and the compute/reuse decisions against the installed
diffusers hook's own functions; the config; the linear residual extrapolation; the latent grids of every model; every
cached pipeline running it; calibration by replay."""

import math

import numpy as np
import pytest
import torch

from cached_diffusers import CacheEngine, ModelCacheSpec, SeaCacheConfig, WHOLE_CALL
from cached_diffusers.calibration import replay_seacache, suggest_sea_threshold
from cached_diffusers.configs import cache_config_from_dict
from cached_diffusers.residuals import LinearExtrapolationStore
from cached_diffusers.sea import sea_distance, sea_filter, unpack_patch_tokens

from families import CASES, small_working_sizes

try:  # the installed diffusers' private helpers: the differential tests skip, with the reason, if they move
    from diffusers.hooks.sea_cache import SeaCacheConfig as HookConfig
    from diffusers.hooks.sea_cache import SeaCacheContextState, SeaCacheSharedState, _apply_sea_filter
    from diffusers.hooks.sea_cache import _SeaCacheForwardMetadata

    HOOK_ERROR = None
except ImportError as error:  # pragma: no cover - depends on the installed diffusers
    HOOK_ERROR = f"diffusers.hooks.sea_cache helpers not importable ({error}); the differential test needs them"

needs_hook = pytest.mark.skipif(HOOK_ERROR is not None, reason=HOOK_ERROR or "")


def hook_filter(latents: torch.Tensor, sigma: float, power_exp: float) -> torch.Tensor:
    """The hook's filter on image latents ``(B, C, H, W)``: each sample as a one-frame video ``(C, 1, H, W)``, moved
    channel-last as the hook's ``_build_indicator`` does."""
    return torch.stack(
        [_apply_sea_filter(x[:, None].movedim(0, -1), sigma=sigma, power_exp=power_exp)[0].movedim(-1, 0) for x in latents]
    )


def trajectory(steps=20, shape=(2, 4, 16, 12), seed=0):
    """A flow-matching-like latent trajectory ``x_s = (1 - s) x0 + s eps`` with the sigmas of a shifted schedule,
    plus a content jump mid-way so that the decisions are not all alike."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g).cumsum(-1).cumsum(-2) / 8  # smooth "content"
    eps = torch.randn(shape, generator=g)
    sigmas = [float(s) for s in np.linspace(1.0, 1.0 / steps, steps) ** 1.5]
    latents = []
    for i, s in enumerate(sigmas):
        content = x0 if i < steps // 2 else x0 + 0.5 * torch.randn(shape, generator=g) * (i == steps // 2)
        latents.append((1 - s) * content + s * eps)
    return latents, sigmas + [0.0]


@needs_hook
@pytest.mark.parametrize("power_exp", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("sigma", [0.0, 1e-3, 0.3, 0.8, 0.999, 1.0])
def test_filter_equals_the_hooks_apply_sea_filter(sigma, power_exp):
    latents = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(1))
    ours, theirs = sea_filter(latents, sigma, power_exp), hook_filter(latents, sigma, power_exp)
    difference = (ours - theirs).abs().max().item()
    print(f"sigma {sigma} power_exp {power_exp}: max |ours - hook| = {difference:.3g} (max |hook| {theirs.abs().max():.3g})")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    # a video, the hook's own layout (C, T, H, W) -> (T, H, W, C), against our 3-D filter
    video = torch.randn(3, 5, 6, 7, generator=torch.Generator().manual_seed(2))
    theirs = _apply_sea_filter(video.movedim(0, -1), sigma=sigma, power_exp=power_exp).movedim(-1, 0)
    torch.testing.assert_close(sea_filter(video[None], sigma, power_exp, grid_dims=3)[0], theirs, rtol=1e-5,
                               atol=1e-5 * theirs.abs().max().item())


def test_filter_is_per_channel_and_keeps_dtype_and_shape():
    latents = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    out = sea_filter(latents, 0.5, 3.0)
    assert out.shape == latents.shape and out.dtype == torch.bfloat16
    single = sea_filter(latents[:, 1:2], 0.5, 3.0)
    assert torch.equal(out[:, 1:2], single)  # channels do not mix
    constant = torch.full((1, 1, 8, 8), 2.0)  # the DC gain is normalised, not 1: a constant is scaled, not kept
    scaled = sea_filter(constant, 0.5, 3.0)
    assert torch.allclose(scaled, scaled.flatten()[0].expand_as(scaled)) and not torch.allclose(scaled, constant)
    with pytest.raises(ValueError, match="grid_dims"):
        sea_filter(torch.zeros(4), 0.5, 3.0, grid_dims=2)


def hook_decisions(latents, sigmas, config: "HookConfig"):
    """Compute/reuse per step of the hook's gate (``SeaCacheSharedState.resolve_gate``) on the hook's filtered
    indicators; the consecutive-reuse counter is kept as the hook's leader block does (``+1`` on a reuse, ``0`` on a
    full execution). Returns ``(computes, distances)``."""
    shared, state = SeaCacheSharedState(), SeaCacheContextState()
    computes, distances, previous = [], [], None
    for step, x in enumerate(latents):
        indicator = [hook_filter(x[b : b + 1], sigmas[step], config.power_exp)[0].movedim(0, -1) for b in range(len(x))]
        if previous is not None:
            per_row = [
                float(((c.float() - p.float()).abs().mean() / (p.float().abs().mean() + 1e-16))) for c, p in zip(indicator, previous)
            ]
            distances.append(sum(per_row) / len(per_row))
        previous = indicator
        metadata = _SeaCacheForwardMetadata(step_index=step, sigma=sigmas[step], num_inference_steps=len(latents))
        compute = shared.resolve_gate(state, metadata, indicator, config)
        state.consecutive_cached = 0 if compute else state.consecutive_cached + 1
        computes.append(compute)
    return computes, distances


def our_decisions(latents, sigmas, config: SeaCacheConfig, branches=("cond",)):
    """The same through our engine (whole-call wiring, the sigmas as a pipeline's scheduler gives them)."""
    engine = CacheEngine(ModelCacheSpec(model_name="SeaSketch", num_blocks=1, patterns=(WHOLE_CALL,)))
    engine.config = config
    engine.current.sigma_source = lambda: sigmas
    for step, x in enumerate(latents):
        for branch in branches:
            decision = engine.decide(branch, step, len(latents), inputs=(x,), indicator={"sea_latent": x})
            if decision.reuse:
                engine.recall(branch=branch)
            else:
                engine.commit((x * 0.1,), branch=branch)
    return engine.stats


@needs_hook
@pytest.mark.parametrize(
    "fields",
    [
        dict(threshold=0.25),
        dict(threshold=0.6, max_consecutive_cached=0),
        dict(threshold=0.4, retention_steps=4, cache_end_steps=3, max_consecutive_cached=3, power_exp=2.0),
        dict(threshold=1.5, residual_order=0, max_consecutive_cached=1, power_exp=1.0),
        dict(threshold=0.0),
    ],
)
def test_distances_and_decisions_equal_the_hooks_gate(fields):
    latents, sigmas = trajectory()
    computes, hook_distances = hook_decisions(latents, sigmas, HookConfig(**fields))
    fields = {**fields, "batch_decisions": "shared"}  # the hook takes one decision per batch
    calibration = our_decisions(latents, sigmas, SeaCacheConfig(calibrate=True, **fields))
    ours = calibration.branches["cond"].calibration["sea_distances"]
    assert ours[0] is None
    difference = max(abs(a - b) / b for a, b in zip(ours[1:], hook_distances))
    print(f"{fields}: largest relative difference of the distances {difference:.3g}")
    assert difference < 1e-5
    stats = our_decisions(latents, sigmas, SeaCacheConfig(**fields), branches=("cond", "uncond"))
    for branch in ("cond", "uncond"):
        assert [not r.reused for r in stats.branches[branch].records] == computes
    if fields["threshold"] > 0:
        assert not all(computes), "the case must reuse somewhere to test anything"
    assert replay_seacache(ours, SeaCacheConfig(**fields)) == [i for i, c in enumerate(computes) if c]


def test_distance_is_the_mean_over_rows_of_the_hooks_ratio():
    a = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    b = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    expected = np.mean([float((a[i] - b[i]).abs().mean() / (b[i].abs().mean() + 1e-16)) for i in range(3)])
    assert sea_distance(a, b) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        sea_distance(a, b[:2])


def test_residual_order_1_extrapolates_linearly_from_the_last_two_computed_steps():
    store, x = LinearExtrapolationStore(), (torch.zeros(2, 3),)
    r2, r5 = torch.randn(2, 3), torch.randn(2, 3)
    store.update(2, x, (r2,))
    assert torch.equal(store.get(3)[0], r2)  # one computed step: reused as it is
    store.update(5, x, (r5,))
    for step in (6, 7):
        torch.testing.assert_close(store.get(step)[0], r5 + (r5 - r2) * (step - 5) / 3)
    store.update(8, (torch.zeros(4, 3),), (torch.ones(4, 3),))  # other shapes: the history restarts
    assert torch.equal(store.get(9)[0], torch.ones(4, 3))


def test_reused_steps_add_the_extrapolated_residual_per_branch():
    latents, sigmas = trajectory(steps=12)
    engine = CacheEngine(ModelCacheSpec(model_name="SeaSketch", num_blocks=1, patterns=(WHOLE_CALL,)))
    engine.config = SeaCacheConfig(threshold=5.0, max_consecutive_cached=0, retention_steps=2)
    engine.current.sigma_source = lambda: sigmas
    committed = {"cond": {}, "uncond": {}}
    for step, x in enumerate(latents):
        for sign, branch in ((1.0, "cond"), (-1.0, "uncond")):
            decision = engine.decide(branch, step, len(latents), inputs=(x,), indicator=x)
            if decision.reuse:
                (got,) = engine.recall(branch=branch)
                (s1, r1), (s2, r2) = list(committed[branch].items())[-2:]
                torch.testing.assert_close(got, r2 + (r2 - r1) * (step - s2) / (s2 - s1))
            else:
                value = sign * (step + 1.0) ** 2 * torch.ones_like(x)
                committed[branch][step] = value
                engine.commit((value,), branch=branch)
    reused = engine.stats.branches["cond"].reused_steps
    assert reused and reused == engine.stats.branches["uncond"].reused_steps


def test_config_defaults_validation_and_round_trip():
    config = SeaCacheConfig()
    hook_defaults = dict(threshold=0.25, residual_order=1, retention_steps=1, cache_end_steps=1,
                         max_consecutive_cached=2, power_exp=3.0)
    assert {k: getattr(config, k) for k in hook_defaults} == hook_defaults
    if HOOK_ERROR is None:
        assert {k: getattr(HookConfig(), k) for k in hook_defaults} == hook_defaults
    assert "2602.18993" in SeaCacheConfig.source and "sea_cache.py" in SeaCacheConfig.source
    custom = SeaCacheConfig(threshold=0.4, residual_order=0, retention_steps=3, max_consecutive_cached=0, power_exp=2)
    assert cache_config_from_dict(custom.to_dict()) == custom
    assert cache_config_from_dict({"method": "sea-cache"}) == config
    for fields, match in [
        (dict(threshold=-0.1), r"SeaCacheConfig.threshold must be a finite number >= 0"),
        (dict(threshold=math.inf), r"SeaCacheConfig.threshold must be a finite number"),
        (dict(residual_order=2), r"SeaCacheConfig.residual_order must be 0 or 1"),
        (dict(retention_steps=-1), r"SeaCacheConfig.retention_steps must be an integer >= 0"),
        (dict(cache_end_steps=1.5), r"SeaCacheConfig.cache_end_steps must be an integer >= 0"),
        (dict(max_consecutive_cached=True), r"SeaCacheConfig.max_consecutive_cached must be an integer >= 0"),
        (dict(power_exp=0.0), r"SeaCacheConfig.power_exp must be a finite number > 0"),
        (dict(calibrate="yes"), r"SeaCacheConfig.calibrate must be True or False"),
    ]:
        with pytest.raises(ValueError, match=match):
            SeaCacheConfig(**fields)


def test_latent_grids_invert_each_pipelines_packing():
    from diffusers import Flux2Pipeline, QwenImagePipeline

    from cached_diffusers.models.flux2 import flux2_latent_grid
    from cached_diffusers.models.qwenimage import qwenimage_latent_grid
    from cached_diffusers.pipelines.bagel import pack_latents

    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(7))
    packed = QwenImagePipeline._pack_latents(latents, 2, 4, 8, 6)
    condition = torch.randn(2, 5, 16)  # an edit pipeline's conditioning tokens after the generated ones
    grid = qwenimage_latent_grid(torch.cat([packed, condition], 1), [[(1, 4, 3), (1, 1, 5)]] * 2)
    assert torch.equal(grid, latents)
    patchified = Flux2Pipeline._patchify_latents(latents)  # (B, 16, 4, 3)
    tokens = Flux2Pipeline._pack_latents(patchified)
    ids = Flux2Pipeline._prepare_latent_ids(patchified)
    reference_ids = ids.clone()[:, :5]
    reference_ids[..., 0] = 10
    shuffled = torch.randperm(tokens.shape[1], generator=torch.Generator().manual_seed(8))
    with_reference = torch.cat([torch.randn(2, 5, 16), tokens[:, shuffled]], 1)  # KV extract: references first
    assert torch.equal(flux2_latent_grid(with_reference, torch.cat([reference_ids, ids[:, shuffled]], 1)), latents)
    assert torch.equal(unpack_patch_tokens(pack_latents(latents), 4, 3, channel_last=True), latents)


def run_case(case, config):
    pipe = case.cached(**case.components())
    pipe.set_progress_bar_config(disable=True)
    pipe.cache_config = config
    torch.manual_seed(1234)
    with small_working_sizes():
        images = pipe(**case.inputs(steps=6)).images
    return pipe, images


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_every_pipeline_runs_seacache_per_branch(case):
    pipe, images = run_case(case, SeaCacheConfig(threshold=50.0, max_consecutive_cached=2))
    flat = images if isinstance(images, torch.Tensor) else torch.cat([torch.as_tensor(i).flatten() for i in images])
    assert torch.isfinite(flat).all()
    stats = pipe.cache_stats
    assert tuple(stats.branches) == case.branches_with_cfg
    for branch in case.branches_with_cfg:
        records = stats.branches[branch].records
        assert [r.step for r in records] == list(range(stats.first_step, stats.num_steps))
        assert records[0].reason == "first-step" and records[-1].reason == "last-step"
        reused = [r.step for r in records if r.reused]
        assert reused, f"{case.name}: {branch} reused nothing"
        assert all(b - a > 0 for a, b in zip(reused, reused[2:])) and not any(
            reused[i + 2] == reused[i] + 2 for i in range(len(reused) - 2)
        )  # never three in a row (max_consecutive_cached=2)
    first = stats.branches[case.branches_with_cfg[0]]
    for branch in case.branches_with_cfg[1:]:  # the latent and sigma are the branches' common input
        assert [r.reused for r in stats.branches[branch].records] == [r.reused for r in first.records]


@pytest.mark.slow  # over 20 s on the 2-core machine (measured with --durations, 2026-12-08)
def test_calibrate_suggests_a_threshold_for_a_target_of_computed_steps():
    case = next(c for c in CASES if c.name == "qwen-txt2img")
    pipe = case.cached(**case.components())
    pipe.set_progress_bar_config(disable=True)
    pipe.cache_config = SeaCacheConfig(calibrate=True)
    pipe(**case.inputs(steps=10))
    calibration = pipe.cache_stats
    assert all(not r.reused for b in calibration.branches.values() for r in b.records)
    distances = {b: s.calibration["sea_distances"] for b, s in calibration.branches.items()}
    assert all(d[0] is None and all(v > 0 for v in d[1:]) for d in distances.values())
    config = SeaCacheConfig(max_consecutive_cached=0)
    fewest = {b: len(replay_seacache(d, config.replace(threshold=1e9))) for b, d in distances.items()}
    for target in range(max(fewest.values()), 11):
        suggestion = suggest_sea_threshold(calibration, target, config)
        counts = {b: len(replay_seacache(d, config.replace(threshold=suggestion.threshold))) for b, d in distances.items()}
        assert suggestion.computed_steps == [counts] and min(counts.values()) >= target
        above = {b: len(replay_seacache(d, config.replace(threshold=suggestion.threshold * (1 + 1e-9) + 1e-12)))
                 for b, d in distances.items()}
        assert min(above.values()) < target or above == fewest  # the largest such threshold
    # the real run at a suggested threshold computes the first reuse where the replay does
    suggestion = suggest_sea_threshold(calibration, max(fewest.values()) + 2, config)
    pipe.cache_config = config.replace(threshold=suggestion.threshold)
    pipe(**case.inputs(steps=10))
    for branch, stats in pipe.cache_stats.branches.items():
        replayed = replay_seacache(distances[branch], config.replace(threshold=suggestion.threshold))
        first_reuse = next(i for i in range(10) if i not in replayed)
        assert stats.reused_steps[0] == first_reuse
    with pytest.raises(ValueError, match="computed_steps must be an integer in"):
        suggest_sea_threshold(calibration, 11, config)
