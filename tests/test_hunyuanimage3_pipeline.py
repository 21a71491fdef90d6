"""CachedHunyuanImage3Pipeline: parity with the official implementation (caching off) and caching in the loop."""

import json
import logging

import numpy as np
import pytest
import torch
from conftest import matrix_context, matrix_methods, short_run_config, supports
from helpers import teacache_reference
from reference import reference_dir
from safetensors.torch import load_file

from cached_diffusers import (
    CachedHunyuanImage3Pipeline,
    DBCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    TeaCacheConfig,
)
from cached_diffusers.hub import save_cache_config
from cached_diffusers.registry import cache_method
from cached_diffusers.models.hunyuanimage3 import HUNYUANIMAGE3_TEACACHE_COEFFICIENTS, HunyuanImage3KVCache

REF = reference_dir("hunyuanimage3-tiny")
CKPT = REF / "checkpoint"
INPUTS = json.loads((REF / "inputs.json").read_text())
NOISE = load_file(REF / "initial_noise.safetensors")["noise"]
ATOL = RTOL = 1e-4
ALL = ["latents", "noise_pred", "pred_cond", "pred_uncond"]


@pytest.fixture(scope="module")
def pipe():
    pipe = CachedHunyuanImage3Pipeline.from_pretrained(CKPT, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def expected():
    return load_file(REF / "expected.safetensors")


def run(pipe, steps=6, record=None, **kwargs):
    """Run the tiny case; returns (output, per-step records, transformer calls [(rows, full_sequence)])."""
    records = {k: [] for k in ALL}
    latents_in = []

    def callback(p, i, t, tensors):
        for k, v in tensors.items():
            if v is not None:
                records[k].append(v.clone())
        return {}

    calls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kw: calls.append((args[0].shape[0], kw.get("full_sequence", True))), with_kwargs=True
    )
    try:
        kwargs.setdefault("latents", NOISE)
        out = pipe(
            INPUTS["prompt"], height=INPUTS["height"], width=INPUTS["width"], num_inference_steps=steps,
            callback_on_step_end=callback, callback_on_step_end_tensor_inputs=ALL, **kwargs,
        )
    finally:
        handle.remove()
    records["latents_in"] = [kwargs["latents"]] + records["latents"][:-1] if kwargs.get("latents") is not None else None
    return out, {k: torch.stack(v) if isinstance(v, list) and v else v for k, v in records.items()}, calls


def report(name, ours, theirs):
    diff = (ours.double() - theirs.double()).abs().max().item()
    print(f"{name}: max abs diff {diff:.3e}")
    return diff


def test_parity_with_official_caching_off(pipe, expected):
    pipe.cache_config = None
    out, rec, calls = run(pipe, output_type="pt", guidance_scale=INPUTS["guidance_scale"], flow_shift=INPUTS["flow_shift"])
    sigmas = torch.as_tensor(pipe.scheduler.sigmas)
    assert report("sigmas", sigmas, expected["sigmas"]) <= 1e-6
    assert report("timesteps", pipe.scheduler.timesteps, expected["timesteps"]) <= 1e-6 * 1000
    for name, ours in (("pred_cond", rec["pred_cond"]), ("pred_uncond", rec["pred_uncond"]),
                       ("pred_combined", rec["noise_pred"]), ("latents_per_step", rec["latents_in"]),
                       ("final_latents", rec["latents"][-1])):
        report(name, ours, expected[name])
        torch.testing.assert_close(ours, expected[name], atol=ATOL, rtol=RTOL)
    assert report("image", out.images, expected["image"]) <= ATOL
    assert calls == [(2, True)] + [(2, False)] * 5  # one batched call per step, full sequence at step 0 only
    pil = run(pipe)[0].images[0]
    assert np.abs(np.asarray(pil).astype(int) - expected["image_uint8"].numpy().astype(int)).max() <= 1
    assert pipe.cache_stats.branches == {}


def test_defaults_from_generation_config_and_seed(pipe):
    pipe.cache_config = None
    assert (pipe.config.default_num_inference_steps, pipe.config.default_guidance_scale, pipe.config.default_flow_shift) == (6, 5.0, 3.0)
    explicit = run(pipe, output_type="latent", guidance_scale=5.0, flow_shift=3.0)[0].images
    out, rec, calls = run(pipe, steps=None, output_type="latent")
    assert len(calls) == 6 and torch.equal(out.images, explicit)
    seeded = pipe(INPUTS["prompt"], height=80, width=48, seed=INPUTS["seed"], output_type="latent").images
    assert torch.equal(seeded, explicit)  # the seed draws the reference's noise (CPU, bfloat16)
    no_cfg, _, calls = run(pipe, guidance_scale=1.0, output_type="latent")
    assert [rows for rows, _ in calls] == [1] * 6


def test_bad_inputs_are_named(pipe, caplog):
    for kwargs, field in (
        (dict(num_inference_steps=0), "num_inference_steps"), (dict(flow_shift=0.0), "flow_shift"),
        (dict(height=0), "height"), (dict(output_type="jpg"), "output_type"),
        (dict(latents=torch.zeros(1, 16, 4, 4)), "latents"), (dict(seed=1, generator=torch.Generator()), "seed"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    ):
        args = dict(height=80, width=48, num_inference_steps=2, output_type="latent")
        args.update(kwargs)
        with pytest.raises(ValueError, match=field):
            pipe(INPUTS["prompt"], **args)
    with pytest.raises(ValueError, match="same length"):
        pipe(["a cat", "a red cat sitting"], height=80, width=48, num_inference_steps=1, output_type="latent")
    with caplog.at_level(logging.WARNING):
        out = pipe("a cat", height=82, width=50, num_inference_steps=1, output_type="latent")
    assert out.images.shape == (1, 16, 5, 3) and "snaps to 80x48" in caplog.text


def time_embed_signals(pipe, steps):
    pipe.scheduler.set_shift(3.0)
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    with torch.no_grad():
        return [pipe.transformer.time_embed(t.reshape(1)).float().numpy() for t in pipe.scheduler.timesteps]


def test_teacache_per_branch_decisions_and_no_transformer_on_reused_steps(pipe):
    steps = 16
    signals = time_embed_signals(pipe, steps)
    _, values = teacache_reference(signals, 1e9, HUNYUANIMAGE3_TEACACHE_COEFFICIENTS)
    thresh = 2.5 * float(np.median(values))
    reused, _ = teacache_reference(signals, thresh, HUNYUANIMAGE3_TEACACHE_COEFFICIENTS)
    assert reused, "threshold chosen to reuse some steps"
    pipe.cache_config = TeaCacheConfig(rel_l1_thresh=thresh)  # the shipped coefficients
    out, rec, calls = run(pipe, steps=steps, latents=NOISE, output_type="latent")
    stats = pipe.cache_stats
    assert set(stats.branches) == {"cond", "uncond"}
    for branch in ("cond", "uncond"):
        assert [r.step for r in stats.branches[branch].records if r.reused] == reused
    computed = [i for i in range(steps) if i not in reused]
    assert len(calls) == len(computed) and all(rows == 2 for rows, _ in calls)  # both branches batched, no reused call
    for i in reused:  # the reused prediction is the branch's last computed one
        last = max(j for j in computed if j < i)
        assert torch.equal(rec["pred_cond"][i], rec["pred_cond"][last])
        assert torch.equal(rec["pred_uncond"][i], rec["pred_uncond"][last])
    pipe.cache_summary(details=True)


def test_never_reusing_config_is_bit_identical_to_caching_off(pipe):
    pipe.cache_config = None
    off = run(pipe, steps=8, output_type="pt")[0].images
    pipe.cache_config = TeaCacheConfig(rel_l1_thresh=1e-12)
    on, _, calls = run(pipe, steps=8, output_type="pt")
    assert torch.equal(on.images, off) and len(calls) == 8
    assert all(not r.reused for b in pipe.cache_stats.branches.values() for r in b.records)


def fresh_prediction(pipe, latents, t, rows):
    """The step recomputed from scratch: full sequence, new KV cache (no state from earlier steps)."""
    from cached_diffusers.models.hunyuanimage3 import HunyuanImage3Sequence
    from cached_diffusers.pipelines.hunyuanimage3 import build_t2i_input_ids

    ids, start, ts = build_t2i_input_ids(pipe.tokenizer, [INPUTS["prompt"]], 64, 20, (5, 3), True)
    seq = HunyuanImage3Sequence.build(ids, start, (5, 3), ts, 16)
    with torch.no_grad():
        out = pipe.transformer(torch.cat([latents, latents]), t.expand(2), seq, kv_cache=HunyuanImage3KVCache(2, seq.seq_len))
    return out.sample[rows].float()


def test_branches_that_disagree_run_only_the_computing_rows_and_keep_the_kv_cache_consistent(pipe):
    steps = 8
    ratios = {"cond": [1.0] * steps, "uncond": [1.5] * steps}  # cond: no error, reuses; uncond: large error, computes
    pipe.cache_config = MagCacheConfig(mag_ratios=ratios, mag_retention_ratio=0.0, mag_threshold=0.1, mag_max_reused_steps=2)
    out, rec, calls = run(pipe, steps=steps, output_type="latent")
    stats = pipe.cache_stats
    cond_reused = [r.step for r in stats.branches["cond"].records if r.reused]
    uncond_reused = [r.step for r in stats.branches["uncond"].records if r.reused]
    assert cond_reused == [1, 2, 4, 5] and uncond_reused == []
    # step 0 and cond-computing steps batch both branches; steps where only uncond computes run 1 row
    assert calls == [(2, True), (1, False), (1, False), (2, False), (1, False), (1, False), (2, False), (2, False)]
    sigmas = torch.as_tensor(pipe.scheduler.sigmas)
    timesteps = pipe.scheduler.timesteps
    latents_in = rec["latents_in"]
    for i in range(1, steps):
        if i in cond_reused:
            assert torch.equal(rec["pred_cond"][i], rec["pred_cond"][max(j for j in range(i) if j not in cond_reused)])
        # every computed prediction equals a from-scratch recomputation: the stale rows left by reused steps are
        # overwritten before use
        fresh = fresh_prediction(pipe, latents_in[i], timesteps[i], slice(None))
        assert (rec["pred_uncond"][i] - fresh[1:]).abs().max() <= 1e-5
        if i not in cond_reused:
            assert (rec["pred_cond"][i] - fresh[:1]).abs().max() <= 1e-5
    assert sigmas.shape[0] == steps + 1


FEATURES = {
    "teacache+taylorseer": TeaCacheConfig(rel_l1_thresh=1e3, max_continuous_cached_steps=2, enable_taylorseer=True),
    "scm-static": TeaCacheConfig(rel_l1_thresh=1e-9, scm_steps_mask="fast", scm_steps_policy="static"),
    "magcache-calibrated": "magcache",
}
"""Run beside every registered method: TeaCache with the TaylorSeer calibrator, a static step mask (SCM), and MagCache
with the ratios of a calibration run."""


def method_config(pipe, name, steps):
    """The config of scenario ``name``: a :data:`FEATURES` entry, or the registered method ``name``'s
    :func:`conftest.short_run_config` on the whole call (one "block") and ``steps`` steps."""
    if name in FEATURES:
        return FEATURES[name]
    return short_run_config(cache_method(name), matrix_context(None, pipe.transformer.num_cache_blocks, steps), steps)


@pytest.mark.parametrize("name", [m.name for m in matrix_methods()] + list(FEATURES))
def test_every_applicable_method_runs(pipe, name):
    """Every registered method whose policy supports the whole-call pattern runs and reuses; the others (DBCache,
    First-Block-Cache) are refused at configuration time."""
    steps = 12
    config = method_config(pipe, name, steps)
    if name not in FEATURES and not supports(pipe, cache_method(name)):
        with pytest.raises(ValueError, match="whole transformer calls"):
            pipe.cache_config = config
        return
    if config == "magcache":
        pipe.cache_config = MagCacheConfig(calibrate=True)
        run(pipe, steps=steps, output_type="latent")
        ratios = pipe.cache_stats.branches["cond"].calibration["mag_ratios"]
        assert len(ratios) == steps
        config = MagCacheConfig.from_calibration(pipe.cache_stats, mag_threshold=0.5, mag_retention_ratio=0.1)
    pipe.cache_config = config
    out, rec, calls = run(pipe, steps=steps, output_type="pt")
    stats = pipe.cache_stats
    reused = {b: [r.step for r in s.records if r.reused] for b, s in stats.branches.items()}
    assert reused["cond"], f"{config} reused nothing"
    computed_steps = {r.step for s in stats.branches.values() for r in s.records if not r.reused}
    assert len(calls) == len(computed_steps)
    assert 0 in computed_steps and torch.isfinite(out.images).all()


def test_dbcache_refused_at_configuration_time(pipe, tmp_path):
    for config in (DBCacheConfig(Fn=1, Bn=0), FirstBlockCacheConfig(), "dbcache", {"method": "fbcache"}):
        with pytest.raises(ValueError, match="whole transformer calls"):
            pipe.cache_config = config
    with pytest.raises(ValueError, match="DBCacheConfig"):
        CachedHunyuanImage3Pipeline.from_pretrained(CKPT, cache_config=DBCacheConfig())
    with pytest.raises(ValueError, match="MagCacheConfig.from_calibration"):
        pipe.cache_config = MagCacheConfig()  # no published ratios: says how to calibrate
    # cache_config.json beside the release weights is read (and validated before loading)
    directory = tmp_path / "release"
    directory.mkdir()
    for f in CKPT.iterdir():
        (directory / f.name).symlink_to(f)
    save_cache_config(TeaCacheConfig(rel_l1_thresh=0.3), directory)
    loaded = CachedHunyuanImage3Pipeline.from_pretrained(directory, dtype=torch.float32)
    assert loaded.cache_config == TeaCacheConfig(rel_l1_thresh=0.3)
    assert CachedHunyuanImage3Pipeline.from_pretrained(directory, cache_config=None).cache_config is None
    save_cache_config(FirstBlockCacheConfig(), directory)
    with pytest.raises(ValueError, match="FirstBlockCacheConfig"):
        CachedHunyuanImage3Pipeline.from_pretrained(directory)
    with pytest.raises(NotImplementedError, match="save_cache_config"):
        loaded.save_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="not a HunyuanImage-3.0 release directory"):
        CachedHunyuanImage3Pipeline.from_pretrained(tmp_path)


def legacy_predict(self, i, num_steps, t, latents, sequence, kv_cache, branch_rows):
    """The loop's caching as it was before the two-phase engine API: the whole transformer call as one "block" of a
    ``BlockStack`` over a stream of zeros, re-entering ``CacheEngine.run`` to batch the branches that compute. Kept
    here only to check that the whole-call pattern takes the same decisions and gives the same tensors."""
    from cached_diffusers.engine import BlockStack

    engine = self.transformer.cache_engine
    branches = list(branch_rows)
    b, c, h, w = latents.shape
    zeros = torch.zeros(b, h * w, c, dtype=torch.float32, device=latents.device)
    computed, decided, wanting = {}, {}, []

    def indicator(_streams):
        embedder = self.transformer.time_embed
        return embedder(t.reshape(1).expand(b)).float()

    def run_blocks_for(branch):
        def run_blocks(start, end, streams):
            if end - start == 0:
                return streams
            wanting.append(branch)
            for later in branches[branches.index(branch) + 1 :]:
                if later not in decided:
                    decide(later)
            if branch not in computed:
                members = [m for m in wanting if m not in computed]
                rows = slice(branch_rows[members[0]].start, branch_rows[members[-1]].stop)
                pred = self._run_transformer(i, t, latents, sequence, kv_cache, rows)
                for m in members:
                    r = branch_rows[m]
                    computed[m] = pred[r.start - rows.start : r.stop - rows.start].flatten(2).transpose(1, 2)
            return (computed[branch],)

        return run_blocks

    def decide(branch):
        stack = BlockStack(1, run_blocks_for(branch), {"teacache_indicator": indicator})
        with engine.context(branch, step_index=i, num_inference_steps=num_steps):
            decided[branch] = engine.run(stack, (zeros,))[0]

    for branch in branches:
        if branch not in decided:
            decide(branch)
    return {br: decided[br].transpose(1, 2).reshape(b, c, h, w) for br in branches}


WIRING_FEATURES = {
    "teacache+taylorseer": TeaCacheConfig(
        rel_l1_thresh=1e3, max_continuous_cached_steps=2, enable_taylorseer=True, taylorseer_order=2
    ),
    "magcache-disagreeing": MagCacheConfig(
        mag_ratios={"cond": [1.0] * 10, "uncond": [1.5] * 10}, mag_retention_ratio=0.0, mag_threshold=0.1,
        mag_max_reused_steps=2,
    ),
}
"""Beside every registered method: TeaCache with the TaylorSeer calibrator, MagCache whose branches decide apart."""


LEGACY_INDICATORS = (None, "teacache_indicator")
"""The indicator kinds the former wiring (:func:`legacy_predict`) offered: none, or the timestep embedding."""


def wiring_scenarios():
    """Every registered method that runs whole calls on an indicator the former wiring offered
    (:data:`LEGACY_INDICATORS`), each of those calibrated from runs, and :data:`WIRING_FEATURES`."""
    from cached_diffusers.spec import WHOLE_CALL

    methods = [
        m for m in matrix_methods() if WHOLE_CALL in m.patterns and m.policy_class.indicator_kind in LEGACY_INDICATORS
    ]
    names = [m.name for m in methods] + [f"{m.name}-calibrate" for m in methods if m.calibration == "runs"]
    return names + list(WIRING_FEATURES)


@pytest.mark.parametrize("name", wiring_scenarios())
def test_whole_call_caching_equals_the_previous_reentrant_wiring(pipe, name, monkeypatch):
    """decide for every branch, one batched call for those that compute, commit / recall: the same decisions,
    statistics (decision values, calibration) and images as the former re-entrant ``run`` over a zero stream."""
    if name in WIRING_FEATURES:
        config = WIRING_FEATURES[name]
    elif name.endswith("-calibrate"):
        config = cache_method(name.removesuffix("-calibrate")).config_class(calibrate=True)
    else:
        config = method_config(pipe, name, 10)
    pipe.cache_config = config
    new, new_rec, new_calls = run(pipe, steps=10, output_type="pt")
    new_stats = pipe.cache_stats.to_dict()
    monkeypatch.setattr(type(pipe), "_predict", legacy_predict)
    old, old_rec, old_calls = run(pipe, steps=10, output_type="pt")
    assert pipe.cache_stats.to_dict() == new_stats
    assert new_calls == old_calls
    assert torch.equal(new.images, old.images)
    for name in ("pred_cond", "pred_uncond", "latents"):
        assert torch.equal(new_rec[name], old_rec[name]), name
