"""The method family on the model-free toy stack: MagCache, DBCache / FBCache, TaylorSeer, SCM masks."""

import json

import numpy as np
import pytest
import torch

from cached_diffusers import (
    CacheEngine,
    DBCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    QWENIMAGE_MAG_RATIOS,
    TaylorSeerConfig,
    TeaCacheConfig,
    cache_config_from_dict,
    steps_mask,
)
from cached_diffusers.policies import interpolate_ratios, relative_l1
from cached_diffusers.spec import ModelCacheSpec
from cached_diffusers.residuals import TaylorSeerStore

from test_engine import IDENTITY, ToyStack, run_generation, streams_at

FLUX_MAG_RATIOS = (
    1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344, 0.98047, 1.01562,
    1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047, 0.98828, 0.96484, 0.95703, 0.93359,
    0.89062,
)  # Zehong-Ma/MagCache MagCache4FLUX (= diffusers FLUX_MAG_RATIOS)


def computed(config, num_steps, defaults=None, branches=("cond",)):
    engine, toy = CacheEngine(defaults or ModelCacheSpec(num_blocks=4)), ToyStack()
    engine.config = config
    run_generation(engine, toy, num_steps, branches=branches)
    return engine, [engine.stats.branches[b].computed_steps for b in branches]


# -- configs ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: MagCacheConfig(mag_threshold=-0.1), r"mag_threshold must be a finite number >= 0"),
        (lambda: MagCacheConfig(mag_max_reused_steps=0), r"mag_max_reused_steps must be an integer >= 1"),
        (lambda: MagCacheConfig(mag_retention_ratio=1.0), r"mag_retention_ratio must be in \[0, 1\)"),
        (lambda: MagCacheConfig(mag_retention_ratio=-0.1), r"mag_retention_ratio must be a finite number >= 0"),
        (lambda: MagCacheConfig(mag_ratios=[1.0]), r"mag_ratios must have at least 2 entries"),
        (lambda: MagCacheConfig(mag_ratios=[1.0, -1.0]), r"mag_ratios\[1\] must be a finite number > 0"),
        (lambda: MagCacheConfig(mag_ratios={"cond": [1, 1.1, 1], "uncond": [1, 1.1]}), r"must all have the calibration step count's length"),
        (lambda: MagCacheConfig(calibrate=True, mag_ratios=[1, 1.1]), r"mag_ratios must be None when calibrate=True"),
        (lambda: DBCacheConfig(Fn=0), r"Fn must be an integer >= 1"),
        (lambda: DBCacheConfig(Bn=-1), r"Bn must be an integer >= 0"),
        (lambda: DBCacheConfig(residual_diff_threshold=-0.01), r"residual_diff_threshold must be a finite number >= 0"),
        (lambda: FirstBlockCacheConfig(Fn=2), r"FirstBlockCacheConfig has Fn=1 and Bn=0"),
        (lambda: TaylorSeerConfig(order=5), r"order must be an integer in \[1, 4\]"),
        (lambda: TaylorSeerConfig(interval=0), r"interval must be an integer >= 1"),
        (lambda: TeaCacheConfig(taylorseer_order=0), r"taylorseer_order must be an integer >= 1"),
        (lambda: DBCacheConfig(scm_steps_mask="turbo"), r"unknown preset 'turbo'; valid presets: slow, medium, fast, ultra"),
        (lambda: DBCacheConfig(scm_steps_mask=[1, 2, 0]), r"a non-empty sequence of 0 and 1"),
        (lambda: DBCacheConfig(scm_steps_mask={"compute_bins": [2]}), r"exactly the keys 'compute_bins' and 'cache_bins'"),
        (lambda: DBCacheConfig(scm_steps_policy="lazy"), r"scm_steps_policy must be 'dynamic' or 'static'"),
    ],
)
def test_bad_parameters_are_clear_errors(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize(
    "config",
    [
        MagCacheConfig(mag_threshold=0.1, mag_ratios={"cond": [1.0, 1.2, 0.9], "uncond": [1.0, 1.1, 0.8]}),
        MagCacheConfig(calibrate=True),
        DBCacheConfig(Fn=2, Bn=1, enable_taylorseer=True, taylorseer_order=2, scm_steps_mask={"compute_bins": [2, 1], "cache_bins": [3]}),
        FirstBlockCacheConfig(residual_diff_threshold=0.2, scm_steps_mask="fast", scm_steps_policy="static"),
        TaylorSeerConfig(order=2, interval=3, scm_steps_mask=[1, 1, 0, 1]),
    ],
)
def test_every_config_round_trips_through_json(config):
    again = cache_config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and type(again) is type(config)
    assert hash(again) == hash(config)


def test_magcache_old_field_name_still_loads_with_a_future_warning():
    """``mag_max_skip_steps`` (renamed ``mag_max_reused_steps``): a keyword, a JSON key and an attribute still work,
    each with a FutureWarning naming the new field; nothing is dropped, and ``to_dict`` writes the new name."""
    from cached_diffusers.configs import cache_config_from_dict

    with pytest.warns(FutureWarning, match="renamed mag_max_reused_steps"):
        config = MagCacheConfig(mag_max_skip_steps=5)
    assert config == MagCacheConfig(mag_max_reused_steps=5)
    with pytest.warns(FutureWarning, match="renamed mag_max_reused_steps"):
        loaded = cache_config_from_dict({"method": "magcache", "mag_max_skip_steps": 4})
    assert loaded.mag_max_reused_steps == 4
    with pytest.warns(FutureWarning, match="renamed mag_max_reused_steps"):
        assert loaded.mag_max_skip_steps == 4
    assert "mag_max_reused_steps" in config.to_dict() and "mag_max_skip_steps" not in config.to_dict()
    with pytest.raises(ValueError, match="give mag_max_reused_steps only"):
        MagCacheConfig(mag_max_skip_steps=5, mag_max_reused_steps=2)


def test_fn_plus_bn_must_leave_blocks_to_cache():
    engine = CacheEngine(ModelCacheSpec(model_name="Toy", num_blocks=4))
    with pytest.raises(ValueError, match=r"Fn \+ Bn must be smaller than the model's 4 blocks.*Fn=3, Bn=1"):
        engine.config = DBCacheConfig(Fn=3, Bn=1)
    engine.config = DBCacheConfig(Fn=2, Bn=1)


# -- MagCache --------------------------------------------------------------------------------------------------------
def test_ratio_interpolation_worked_examples():
    assert interpolate_ratios(FLUX_MAG_RATIOS, 4) == (1.0, 1.03125, 1.0, 0.89062)
    assert interpolate_ratios(FLUX_MAG_RATIOS, 8) == (1.0, 1.0625, 1.02344, 1.01562, 1.00781, 1.0, 0.98828, 0.89062)
    indices = [FLUX_MAG_RATIOS.index(v) for v in interpolate_ratios(FLUX_MAG_RATIOS, 20)]
    assert interpolate_ratios(FLUX_MAG_RATIOS, 20) == tuple(FLUX_MAG_RATIOS[i] for i in np.round(np.linspace(0, 27, 20)).astype(int))
    assert interpolate_ratios(FLUX_MAG_RATIOS, 1) == (0.89062,)
    assert len(indices) == 20


@pytest.mark.parametrize(
    "ratios, num_steps, settings, expected",
    [
        # methods.md 2.7: schedules implied by the published ratios (data-independent)
        (QWENIMAGE_MAG_RATIOS, 50, dict(mag_threshold=0.06, mag_max_reused_steps=2, mag_retention_ratio=0.2),
         [*range(16), 17, 18, 19, 21, 23, 25, 27, 29, 31, 34, 37, 39, *range(41, 50)]),
        (FLUX_MAG_RATIOS, 28, dict(mag_threshold=0.24, mag_max_reused_steps=5, mag_retention_ratio=0.1),
         [0, 1, 2, 5, 9, 15, 21, 26]),
        (FLUX_MAG_RATIOS, 28, dict(mag_threshold=0.06, mag_max_reused_steps=3, mag_retention_ratio=0.2),
         [0, 1, 2, 3, 4, 5, 7, 9, 13, 17, 21, 24, 26, 27]),
    ],
)
def test_magcache_reproduces_the_published_schedules(ratios, num_steps, settings, expected):
    config = MagCacheConfig(mag_ratios=ratios, compute_last_step=False, **settings)
    _, (got,) = computed(config, num_steps)
    assert got == expected


def test_magcache_reinterpolates_on_every_call():
    engine, toy = CacheEngine(ModelCacheSpec(num_blocks=4)), ToyStack()
    engine.config = MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, mag_threshold=0.24, mag_max_reused_steps=5, mag_retention_ratio=0.1)
    for num_steps in (28, 12, 28, 40):
        run_generation(engine, toy, num_steps)
        fresh, (expected,) = computed(
            MagCacheConfig(mag_ratios=interpolate_ratios(FLUX_MAG_RATIOS, num_steps), mag_threshold=0.24,
                           mag_max_reused_steps=5, mag_retention_ratio=0.1),
            num_steps,
        )
        assert engine.stats.branches["cond"].computed_steps == expected
        assert engine.stats.num_steps == num_steps


def test_magcache_uses_the_models_ratios_and_errors_without_them():
    engine = CacheEngine(ModelCacheSpec(model_name="Toy", num_blocks=4))
    with pytest.raises(ValueError, match=r"no MagCache ratios are known for Toy.*calibrate=True"):
        engine.config = MagCacheConfig()
    _, (got,) = computed(MagCacheConfig(compute_last_step=False, mag_max_reused_steps=2), 50,
                         defaults=ModelCacheSpec(num_blocks=4, mag_ratios=QWENIMAGE_MAG_RATIOS,
                                                 mag_ratios_source="Qwen-Image"))
    assert len(got) == 37


def test_magcache_calibration_never_skips_and_records_per_branch():
    engine, toy = CacheEngine(ModelCacheSpec(num_blocks=4)), ToyStack()
    engine.config = MagCacheConfig(calibrate=True)
    run_generation(engine, toy, 6, branches=("cond", "uncond"), scales={"cond": 0.01, "uncond": 0.5})
    stats = engine.stats
    assert stats.num_reused == 0
    cond = stats.branches["cond"].calibration["mag_ratios"]
    uncond = stats.branches["uncond"].calibration["mag_ratios"]
    assert len(cond) == len(uncond) == 6 and cond[0] == uncond[0] == 1.0
    # independent recomputation of the cond ratios from the toy's residuals
    norms = []
    for step in range(6):
        inputs = streams_at(step, 0.01)
        out = ToyStack().run_blocks(0, 4, inputs)
        norms.append((out[0] - inputs[0]).norm(dim=-1))
    expected = [1.0] + [round((norms[i] / (norms[i - 1] + 1e-8)).mean().item(), 5) for i in range(1, 6)]
    assert cond == expected
    assert cond != uncond
    config = MagCacheConfig.from_calibration(stats, mag_threshold=0.1)
    assert config.mag_ratios == {"cond": tuple(cond), "uncond": tuple(uncond)}
    with pytest.raises(ValueError, match=r"hold no MagCache calibration"):
        MagCacheConfig.from_calibration(computed(TeaCacheConfig(0.1, coefficients=IDENTITY), 3)[0].stats)


def test_magcache_calibration_of_a_branch_evaluated_at_some_steps_is_indexed_by_step():
    # BAGEL evaluates its CFG branches only inside `cfg_interval`: their lists still have one ratio per step, 1.0
    # where the branch did not run, so that the ratio at index i is the one recorded at step i.
    engine, toy = CacheEngine(ModelCacheSpec(num_blocks=4)), ToyStack()
    engine.config = MagCacheConfig(calibrate=True)
    for step in range(6):
        for branch in ("gen", "cfg_text") if step < 4 else ("gen",):
            with engine.context(branch, step_index=step, num_inference_steps=6):
                engine.run(toy.as_stack(), streams_at(step, 0.01 if branch == "gen" else 0.5))
    gen = engine.stats.branches["gen"].calibration["mag_ratios"]
    text = engine.stats.branches["cfg_text"].calibration["mag_ratios"]
    assert len(gen) == len(text) == 6
    assert text[4:] == [1.0, 1.0] and text[1:4] != gen[1:4]
    config = MagCacheConfig.from_calibration(engine.stats)
    assert set(config.mag_ratios) == {"gen", "cfg_text"}


# -- DBCache ---------------------------------------------------------------------------------------------------------
def test_dbcache_runs_front_and_back_blocks_and_follows_its_rule():
    config = DBCacheConfig(Fn=1, Bn=1, residual_diff_threshold=0.05, max_warmup_steps=0, compute_last_step=False)
    engine, toy = CacheEngine(ModelCacheSpec(num_blocks=4)), ToyStack()
    engine.config = config
    num_steps = 10
    outputs = run_generation(engine, toy, num_steps)["cond"]
    stats = engine.stats.branches["cond"]
    reference = ToyStack()
    expected_reused, probe_ref, middle = [], None, None
    for step in range(num_steps):
        inputs = streams_at(step)
        front = reference.run_blocks(0, 1, inputs)
        probe = front[0] - inputs[0]
        reuse = probe_ref is not None and relative_l1(probe, probe_ref) < 0.05
        if reuse:
            expected_reused.append(step)
            mid_out = tuple(f + m for f, m in zip(front, middle))
        else:
            mid_out = reference.run_blocks(1, 3, front)
            middle = tuple(o - f for o, f in zip(mid_out, front))
            probe_ref = probe
        expected = reference.run_blocks(3, 4, mid_out)
        assert all(torch.equal(a, b) for a, b in zip(outputs[step], expected))
    assert stats.reused_steps == expected_reused
    assert 0 < len(expected_reused) < num_steps - 1
    assert toy.blocks_run == 4 * num_steps - 2 * len(expected_reused)
    assert all(r.blocks_computed == (2 if r.reused else 4) for r in stats.records)
    assert set(stats.values) == set(range(1, num_steps))


def test_dbcache_warmup_interval_and_accumulated_limit():
    base = dict(Fn=1, residual_diff_threshold=100.0, compute_last_step=False)
    _, (got,) = computed(DBCacheConfig(max_warmup_steps=4, warmup_interval=2, **base), 8)
    assert got == [0, 2]
    engine, (got,) = computed(DBCacheConfig(max_warmup_steps=0, max_accumulated_residual_diff_threshold=0.02, **base), 8)
    diffs = engine.stats.branches["cond"].values
    first_over = next(s for s in range(1, 8) if sum(diffs[t] for t in range(1, s + 1)) >= 0.02)
    assert got == [0, *range(first_over + 1, 8)]


# -- TaylorSeer ------------------------------------------------------------------------------------------------------
def test_taylorseer_store_follows_the_published_ladder():
    x = torch.linspace(-1, 1, 5)
    # order 1 is exact on a linear sequence, whatever the spacing of the computed steps
    linear = TaylorSeerStore(order=1)
    linear.update(0, (x,), (x,))
    assert torch.equal(linear.get(3)[0], x)  # one computed step: order 0, plain reuse
    linear.update(3, (x,), (4 * x,))
    assert torch.allclose(linear.get(5)[0], 6 * x)
    # no difference is formed at a computed step before step 3 (cache-dit's calibrator)
    early = TaylorSeerStore(order=1)
    early.update(0, (x,), (x,))
    early.update(2, (x,), (3 * x,))
    assert len(early.factors) == 1 and torch.equal(early.get(4)[0], 3 * x)
    # order 2: F0 = Y(s_j), F1 = (Y(s_j) - Y(s_j-1)) / (s_j - s_j-1), F2 = (F1(s_j) - F1(s_j-1)) / (s_j - s_j-1),
    # forecast F0 + F1 d + F2 d^2 / 2 (arXiv 2503.06923; cache-dit's TaylorSeer calibrator)
    store = TaylorSeerStore(order=2)
    values = {0: 1.0 * x, 3: 2.0 * x, 5: 4.5 * x}
    for s, v in values.items():
        store.update(s, (x,), (v,))
    f1_prev = (values[3] - values[0]) / 3
    f1 = (values[5] - values[3]) / 2
    f2 = (f1 - f1_prev) / 2
    for s in (6, 8):
        d = s - 5
        assert torch.allclose(store.get(s)[0], values[5] + f1 * d + f2 * d * d / 2, atol=1e-6)
    assert store.get(6)[0].dtype == x.dtype and store.factors[2][0].dtype == torch.float32
    store.update(7, (x[:3],), (x[:3],))  # a new shape restarts the ladder
    assert len(store.factors) == 1


def test_taylorseer_standalone_schedule_and_forecast():
    config = TaylorSeerConfig(order=1, interval=3, max_warmup_steps=2)
    engine, (got,) = computed(config, 12)
    assert got == [0, 1, 4, 7, 10, 11]
    assert engine.stats.branches["cond"].reused_steps == [2, 3, 5, 6, 8, 9]
    assert all(r.reason == "forecast" for r in engine.stats.branches["cond"].records if r.reused)


def test_taylorseer_calibrator_forecasts_the_reused_residual():
    engine, toy = CacheEngine(ModelCacheSpec(num_blocks=4)), ToyStack()
    engine.config = TeaCacheConfig(100.0, coefficients=IDENTITY, max_continuous_cached_steps=2, enable_taylorseer=True)
    outputs = run_generation(engine, toy, 9)["cond"]
    assert engine.stats.branches["cond"].computed_steps == [0, 3, 6, 8]
    residual = lambda s: tuple(o - i for o, i in zip(ToyStack().run_blocks(0, 4, streams_at(s)), streams_at(s)))  # noqa: E731
    r0, r3 = residual(0), residual(3)
    for step in (1, 2):  # one computed step so far: plain reuse of R(0)
        expected = tuple(i + r for i, r in zip(streams_at(step), r0))
        assert all(torch.equal(o, e) for o, e in zip(outputs[step], expected))
    for step in (4, 5):  # first order from steps 0 and 3
        forecast = tuple(b + (b - a) / 3 * (step - 3) for a, b in zip(r0, r3))
        expected = tuple(i + f for i, f in zip(streams_at(step), forecast))
        assert all(torch.allclose(o, e, atol=1e-5) for o, e in zip(outputs[step], expected))


# -- SCM -------------------------------------------------------------------------------------------------------------
def test_presets_at_their_base_length():
    as_text = lambda m: "".join(map(str, m))  # noqa: E731
    assert as_text(steps_mask("slow", 28)) == "1111111101110011100110010001"
    assert as_text(steps_mask("medium", 28)) == "1111110110001100011000110001"
    assert as_text(steps_mask("fast", 28)) == "1111110100010000100000100001"
    assert as_text(steps_mask("ultra", 28)) == "1111001000001000000100000001"
    assert steps_mask({"compute_bins": [4, 2, 1], "cache_bins": [2, 3, 4]}, 16) == tuple(map(int, "1111001100010001"))


@pytest.mark.parametrize("spec", ["slow", "medium", "fast", "ultra", [1, 0, 0, 1, 0], {"compute_bins": [2, 1], "cache_bins": [5, 5]}])
def test_masks_fit_every_step_count(spec):
    for n in range(1, 101):
        mask = steps_mask(spec, n)
        assert len(mask) == n and mask[0] == 1 and mask[-1] == 1 and set(mask) <= {0, 1}


def test_scm_static_reuses_exactly_the_mask_zeros_and_dynamic_still_tests():
    mask = steps_mask("fast", 20)
    static = DBCacheConfig(Fn=1, residual_diff_threshold=0.0, max_warmup_steps=0, scm_steps_mask="fast", scm_steps_policy="static")
    _, (got,) = computed(static, 20, branches=("cond",))
    assert got == [i for i, m in enumerate(mask) if m == 1]
    dynamic_never = static.replace(scm_steps_policy="dynamic")  # threshold 0: the test never agrees
    assert computed(dynamic_never, 20)[1][0] == list(range(20))
    dynamic_always = static.replace(scm_steps_policy="dynamic", residual_diff_threshold=100.0)
    assert computed(dynamic_always, 20)[1][0] == [i for i, m in enumerate(mask) if m == 1]
    tea = TeaCacheConfig(100.0, coefficients=IDENTITY, scm_steps_mask="ultra")
    assert computed(tea, 28)[1][0] == [i for i, m in enumerate(steps_mask("ultra", 28)) if m == 1]


# -- calibration -----------------------------------------------------------------------------------------------------
def test_teacache_calibration_records_signal_and_output_changes_per_branch():
    from cached_diffusers.calibration import fit_teacache, teacache_pairs

    engine, toy = CacheEngine(ModelCacheSpec(num_blocks=4)), ToyStack()
    engine.config = TeaCacheConfig(calibrate=True)  # no coefficients needed, never reuses
    run_generation(engine, toy, 6, branches=("cond", "uncond"), scales={"cond": 0.01, "uncond": 0.3})
    assert engine.stats.num_reused == 0
    pairs = engine.stats.branches["cond"].calibration["teacache_pairs"]
    expected = []
    for step in range(1, 6):
        a, b = streams_at(step - 1, 0.01), streams_at(step, 0.01)
        x = relative_l1(b[0] * 2.0, a[0] * 2.0)
        y = relative_l1(ToyStack().run_blocks(0, 4, b)[0], ToyStack().run_blocks(0, 4, a)[0])
        expected.append([x, y])
    assert np.allclose(pairs, expected, rtol=1e-6)
    assert len(teacache_pairs(engine.stats)) == 10  # pooled over both branches
    fit = fit_teacache(teacache_pairs(engine.stats))
    assert len(fit.coefficients) == 5 and fit.num_pairs == 10


def test_polynomial_fit_recovers_a_known_polynomial_and_refuses_too_few_pairs():
    from cached_diffusers.calibration import fit_teacache

    truth = (12.0, -6.0, 1.5, 0.4, 0.01)
    x = np.linspace(0.01, 0.3, 40)
    fit = fit_teacache(np.stack([x, np.polyval(truth, x)], axis=1))
    assert fit.coefficients == pytest.approx(truth, rel=1e-6, abs=1e-8)
    assert fit.rmse < 1e-9 and fit.r2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"needs at least 5 \(x, y\) pairs, got 3"):
        fit_teacache(np.ones((3, 2)))


def test_mag_ratios_average_over_runs():
    engine, toy = CacheEngine(ModelCacheSpec(num_blocks=4)), ToyStack()
    engine.config = MagCacheConfig(calibrate=True)
    runs = []
    for scale in (0.01, 0.2):
        run_generation(engine, toy, 5, scales={"cond": scale})
        runs.append(engine.stats)
    config = MagCacheConfig.from_calibration(runs)
    first, second = (r.branches["cond"].calibration["mag_ratios"] for r in runs)
    assert config.mag_ratios == pytest.approx([round((a + b) / 2, 5) for a, b in zip(first, second)], abs=1e-5)
