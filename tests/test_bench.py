"""The benchmark (`cached_diffusers.tools.bench`, `cached-diffusers bench`) on the embedded tiny pipelines.

Timings on a shared CPU are noise: these tests check structure and fidelity facts, never that caching is faster.
"""

import dataclasses
import json
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cached_diffusers import (
    CachedFlux2KleinPipeline,
    CachedQwenImagePipeline,
    DBCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from cached_diffusers.tools import tiny
from cached_diffusers.tools.bench import (
    LPIPS_UNAVAILABLE_NOTE,
    SWEEP_METHODS,
    config_params,
    default_sweep,
    format_markdown,
    lpips_metric,
    plot_pareto,
    run_benchmark,
    ssim,
    sweep_label,
    write_json,
    write_markdown,
)
from cached_diffusers.tools.cli import main

STEPS = 8
CALL = {"num_inference_steps": STEPS, "height": 64, "width": 64, "negative_prompt": " ", "true_cfg_scale": 4.0}
PROMPTS = tiny.DEFAULT_PROMPTS[:2]
NEVER = FirstBlockCacheConfig(residual_diff_threshold=0.0)  # 0 never reuses
AGGRESSIVE = TeaCacheConfig(rel_l1_thresh=0.4)
TOO_MANY_BLOCKS = DBCacheConfig(Fn=12, max_warmup_steps=0)  # the tiny transformer has 12 blocks


def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=refuse)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a shared 2-core machine, 2 torch threads stall for seconds whenever another process takes a core (the
    # tiny model runs as fast on one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny.build_tiny_qwenimage_pipeline(seed=0, pipeline_class=CachedQwenImagePipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def bench(pipe, tmp_path_factory):
    lines = []
    configs = [NEVER, AGGRESSIVE, TaylorSeerConfig(interval=2), TOO_MANY_BLOCKS]
    result = run_benchmark(pipe, configs, PROMPTS, CALL, seed=3, repeats=1, model="tiny", progress=lines.append)
    out = tmp_path_factory.mktemp("bench")
    paths = write_json(result, out / "results.json"), out / "results.md", plot_pareto(result, out / "pareto.png")
    markdown = write_markdown(result, paths[1])
    return result, _strict_json(paths[0]), markdown, paths, lines


def test_json_records_the_run(bench, pipe):
    _, data, _, _, lines = bench
    for key in ("date", "environment", "model", "num_inference_steps", "height", "width", "prompts", "seed", "seeds",
                "repeats", "baseline", "results", "skipped", "best", "lpips_note", "thresholds"):
        assert key in data, key
    env = data["environment"]
    for key in ("device", "device_name", "cpu", "torch", "diffusers", "transformers", "torch_threads"):
        assert env[key] not in (None, ""), key
    assert (data["model"], data["num_inference_steps"], data["height"], data["width"]) == ("tiny", STEPS, 64, 64)
    assert data["prompts"] == PROMPTS and data["seeds"] == [3, 4]
    assert data["call_kwargs"]["negative_prompt"] == " "
    assert len(data["baseline"]["times_s"]) == 1 and data["baseline"]["seconds"] > 0
    assert [r["label"] for r in data["results"]] == ["fbcache", "teacache", "taylorseer"]
    for r in data["results"]:
        assert len(r["times_s"]) == 1 and r["seconds"] > 0 and r["speedup"] > 0
        assert set(r["reused_steps"]) == {"cond", "uncond"}
        assert r["forward_calls_per_step"] == 2 and r["uncached_blocks_per_step"] == 24
        assert len(r["psnr"]["per_prompt"]) == len(r["ssim"]["per_prompt"]) == 2
    assert pipe.cache_config is None  # restored
    assert any("uncached" in line for line in lines)


def test_never_reusing_config_is_identical_to_uncached(bench):
    never = bench[1]["results"][0]
    assert never["params"] == "residual_diff_threshold=0"
    assert never["block_fraction"] == 1.0 and never["ideal_speedup"] == 1.0
    assert never["blocks_per_step"] == never["uncached_blocks_per_step"]
    assert never["reused_steps"]["cond"] == {"mean": 0.0, "per_prompt": [0, 0], "of": STEPS}
    assert never["psnr"] == {"mean": "inf", "min": "inf", "per_prompt": ["inf", "inf"]}  # strict JSON: "inf"
    assert never["ssim"]["mean"] == 1.0 and never["ssim"]["min"] == 1.0


def test_aggressive_config_skips_work_and_loses_some_fidelity(bench):
    result, data = bench[:2]
    for r in data["results"][1:]:
        assert r["block_fraction"] < 1 and r["ideal_speedup"] > 1
        assert r["blocks_computed"] < r["uncached_blocks"]
        assert all(n > 0 for n in r["reused_steps"]["cond"]["per_prompt"])
        assert all(math.isfinite(v) and v > 20 for v in r["psnr"]["per_prompt"])
        assert r["psnr"]["min"] <= r["psnr"]["mean"]
        assert 0 < r["ssim"]["min"] <= r["ssim"]["mean"] < 1
    teacache = result.entries[1]
    assert teacache.block_fraction == pytest.approx(teacache.blocks_computed / teacache.uncached_blocks)


def test_config_the_model_cannot_run_is_skipped_with_its_reason(bench):
    (skipped,) = bench[1]["skipped"]
    assert skipped["label"] == "dbcache" and "Fn + Bn must be smaller" in skipped["reason"]
    assert "Skipped:\n- dbcache (1 config(s)): " in bench[2]


def test_lpips_is_null_without_local_weights(bench):
    result, data = bench[:2]
    if lpips_metric()[0] is not None:  # a machine with the weights cached
        assert data["lpips_note"] is None and all(r["lpips"]["mean"] >= 0 for r in data["results"])
        return
    assert data["lpips_note"] == LPIPS_UNAVAILABLE_NOTE
    assert data["lpips_detail"].startswith(LPIPS_UNAVAILABLE_NOTE)
    assert all(r["lpips"] is None for r in data["results"])
    assert f"LPIPS: not computed; {LPIPS_UNAVAILABLE_NOTE}." in bench[2]


def test_markdown_table_and_best_speedups(bench):
    result, data, markdown = bench[:3]
    assert "| method | parameters | time (s) | speedup | ideal speedup | block fraction | reused steps per branch |" in markdown
    assert "| uncached | |" in markdown
    assert "| fbcache | residual_diff_threshold=0 |" in markdown and "cond 0/8, uncond 0/8" in markdown
    assert "| method | best speedup at PSNR >= 30 dB | best speedup at SSIM >= 0.9 |" in markdown
    teacache = result.entries[1]
    assert f"| teacache | {teacache.speedup:.2f}x (rel_l1_thresh=0.4) | {teacache.speedup:.2f}x (rel_l1_thresh=0.4) |" in markdown
    # a config that ran every block is never "the best speedup": its measured gain is timing noise
    assert "| fbcache | none (no config skipped work) | none (no config skipped work) |" in markdown
    assert "| dbcache | skipped | skipped |" in markdown
    assert data["best"]["teacache"]["psnr>=30"]["params"] == "rel_l1_thresh=0.4"
    assert data["best"]["fbcache"] == {"psnr>=30": None, "ssim>=0.9": None}
    assert markdown == format_markdown(result)


def test_pareto_png(bench):
    path = bench[3][2]
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 400
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something was drawn


def test_default_sweep_spans_every_method(pipe):
    configs = default_sweep(pipe, num_steps=20)
    labels = [sweep_label(c) for c in configs]
    assert list(dict.fromkeys(labels)) == list(SWEEP_METHODS)
    for label in SWEEP_METHODS:
        assert labels.count(label) >= 3, label
    db = [c for c in configs if sweep_label(c) == "dbcache"]
    assert all(c.Fn == 2 and c.Bn == 0 and c.max_warmup_steps == 5 for c in db)  # 12 blocks, 20 steps
    assert [c.residual_diff_threshold for c in db] == sorted(c.residual_diff_threshold for c in db)
    scm = [c for c in configs if sweep_label(c) == "dbcache+scm"]
    assert [c.scm_steps_mask for c in scm] == ["slow", "medium", "fast", "ultra"]
    assert config_params(scm[2]).startswith("scm_steps_mask=fast")
    assert [sweep_label(c) for c in default_sweep(methods=["fbcache,taylorseer"])] == ["fbcache"] * 5 + ["taylorseer"] * 3
    with pytest.raises(ValueError, match="unknown benchmark method 'warpcache'"):
        default_sweep(methods=["warpcache"])


def test_model_without_coefficients_skips_teacache_and_magcache():
    klein = tiny.build_tiny_flux2_klein_pipeline(pipeline_class=CachedFlux2KleinPipeline)
    klein.set_progress_bar_config(disable=True)
    configs = default_sweep(klein, methods=["teacache", "magcache"])
    result = run_benchmark(klein, configs, ["a red cat"], {"num_inference_steps": 2, "height": 64, "width": 64}, repeats=1)
    assert result.entries == [] and len(result.skipped) == len(configs)
    assert {s["label"] for s in result.skipped} == {"teacache", "magcache"}
    assert all("CachedFlux2Transformer2DModel" in s["reason"] and "calibrate" in s["reason"] for s in result.skipped)
    markdown = format_markdown(result)
    assert "| teacache | skipped | skipped |" in markdown and "| magcache | skipped | skipped |" in markdown
    # calibrated data on the pipeline's own config are taken up by the sweep
    klein.cache_config = MagCacheConfig(mag_ratios=[1.0, 0.9, 0.9])
    assert all(c.mag_ratios == (1.0, 0.9, 0.9) for c in default_sweep(klein, methods=["magcache"]))


def test_ssim_of_identical_and_different_images():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert ssim(a, a) == 1.0
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert 0 < ssim(a, b) < 1
    with pytest.raises(ValueError, match="differ in size"):
        ssim(a, a[:16])


def test_run_benchmark_rejects_bad_arguments(pipe):
    with pytest.raises(ValueError, match="at least one prompt"):
        run_benchmark(pipe, [NEVER], [], CALL)
    with pytest.raises(ValueError, match="repeats must be"):
        run_benchmark(pipe, [NEVER], PROMPTS, CALL, repeats=0)
    with pytest.raises(ValueError, match="must not contain generator"):
        run_benchmark(pipe, [NEVER], PROMPTS, {**CALL, "generator": None})


def test_cli_bench(tmp_path, capsys):
    out = tmp_path / "bench"  # the default model: the trained reference model, at its 32 x 32
    argv = ["bench", "--methods", "fbcache", "--steps", "4", "--prompt", "red apple",
            "--repeats", "1", "--threads", "1", "--output-dir", str(out), "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| uncached | |" in text and "| fbcache | residual_diff_threshold=0.05 |" in text
    assert "best speedup at PSNR >= 30 dB" in text
    assert f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'pareto.png'}" in text
    data = _strict_json(out / "results.json")
    assert data["model"].startswith("reference model")
    assert data["num_inference_steps"] == 4 and data["prompts"] == ["red apple"]
    assert data["height"] == data["width"] == 32
    assert data["environment"]["torch_threads"] == 1
    assert data["call_kwargs"]["true_cfg_scale"] == 4.0  # true CFG by default on the embedded model, as `demo`
    assert [r["label"] for r in data["results"]] == ["fbcache"] * 5
    assert (out / "results.md").read_text() in text and (out / "pareto.png").stat().st_size > 10_000
    assert main(["bench", "--methods", "nocache", "--output-dir", str(out)]) == 2
    assert "unknown benchmark method 'nocache'" in capsys.readouterr().err


def test_cli_bench_with_an_explicit_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep.json"
    sweep.write_text('[{"method": "taylorseer", "interval": 2}, {"method": "none"}]')
    argv = ["bench", "--sweep", str(sweep), "--steps", "4", "--prompt", "red apple",
            "--repeats", "2", "--threads", "1", "--output-dir", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 0
    data = _strict_json(tmp_path / "out" / "results.json")
    assert [r["params"] for r in data["results"]] == ["interval=2"]
    assert len(data["baseline"]["times_s"]) == 2 and data["baseline"]["repeatable"] is True
    assert len(data["results"][0]["times_s"]) == 2
    capsys.readouterr()
    assert main(["bench", "--sweep", str(sweep), "--methods", "fbcache"]) == 2
    assert "--sweep and --methods exclude each other" in capsys.readouterr().err
    assert main(["bench", "--sweep", str(sweep), "--calibrated", str(sweep)]) == 2
    assert "--sweep and --calibrated exclude each other" in capsys.readouterr().err


def test_default_sweep_takes_calibrated_coefficients_and_ratios():
    tea = TeaCacheConfig(coefficients=(1.0, 2.0, 3.0, 4.0, 5.0))
    mag = MagCacheConfig(mag_ratios=[1.0, 0.9, 0.8])
    configs = default_sweep(None, methods=["teacache", "magcache"], calibrated=[mag, tea, TeaCacheConfig(calibrate=True)])
    assert {c.coefficients for c in configs if isinstance(c, TeaCacheConfig)} == {(1.0, 2.0, 3.0, 4.0, 5.0)}
    assert {tuple(c.mag_ratios) for c in configs if isinstance(c, MagCacheConfig)} == {(1.0, 0.9, 0.8)}


def test_cli_bench_rejects_a_missing_calibrated_file(tmp_path, capsys):
    assert main(["bench", "--calibrated", str(tmp_path / "nope.json"), "--output-dir", str(tmp_path)]) == 2
    assert "--calibrated: no such file" in capsys.readouterr().err


def test_a_speedup_above_the_ideal_one_is_flagged_as_timing_noise(bench):
    """Skipping blocks cannot save more than their time: a measured speedup above the ideal one is noise, said so
    in the row and under the table with the number of repeats."""
    result = bench[0]
    teacache = result.entries[1]
    assert teacache.ideal_speedup is not None
    clean = dataclasses.replace(teacache, speedup=teacache.ideal_speedup * 0.5)
    noisy = dataclasses.replace(teacache, speedup=teacache.ideal_speedup * 1.5)
    assert not clean.timing_noise and noisy.timing_noise and noisy.to_dict()["timing_noise"] is True
    markdown = format_markdown(dataclasses.replace(result, entries=[clean]))
    assert "(noise)" not in markdown
    markdown = format_markdown(dataclasses.replace(result, entries=[clean, noisy]))
    assert f"| {noisy.speedup:.2f}x (noise) | {noisy.ideal_speedup:.2f}x |" in markdown
    assert f"| {clean.speedup:.2f}x | {clean.ideal_speedup:.2f}x |" in markdown
    assert "(noise): 1 row(s) measured a speedup above the ideal one" in markdown
    assert "timing noise of the median of 1 repeat(s)" in markdown


def test_one_markdown_table_writer():
    from cached_diffusers.tools.files import markdown_table

    assert markdown_table(["method", "speedup"], [["uncached", ""], ["a|b", 1.5]]) == [
        "| method | speedup |", "|---|---|", "| uncached | |", "| a\\|b | 1.5 |"]


def test_the_tools_read_block_counts_from_the_stats():
    """``CacheStats.num_calls`` / ``uncached_blocks`` (what bench, tune and equal_budget sum) and ``block_fraction``."""
    from cached_diffusers.stats import CacheStats, StepRecord

    stats = CacheStats("teacache", num_blocks=4)
    stats.branch("cond").records += [StepRecord(0, False, "first-step", None, 4), StepRecord(1, True, "below", 0.1, 0)]
    stats.branch("uncond").records += [StepRecord(0, False, "first-step", None, 4)]
    assert (stats.num_calls, stats.branches["cond"].num_calls, stats.uncached_blocks) == (3, 2, 12)
    assert stats.block_fraction == pytest.approx(8 / 12)
    assert CacheStats("teacache").uncached_blocks == 0 and CacheStats("teacache").block_fraction is None


def test_the_core_says_why_a_model_cannot_run_a_config():
    """``policies.unsupported_reason``: missing model data first, then the model's own checks; ``None`` when it can."""
    from cached_diffusers import DBCacheConfig, FirstBlockCacheConfig, TeaCacheConfig
    from cached_diffusers.policies import unsupported_reason
    from cached_diffusers.spec import WHOLE_CALL, ModelCacheSpec

    spec = ModelCacheSpec(model_name="Toy", num_blocks=4)
    assert "no TeaCache coefficients for Toy" in unsupported_reason(TeaCacheConfig(), spec)
    assert unsupported_reason(TeaCacheConfig(coefficients=[0, 0, 0, 1, 0]), spec) is None
    assert "Fn + Bn" in unsupported_reason(DBCacheConfig(Fn=4), spec)
    assert "whole_call" in unsupported_reason(FirstBlockCacheConfig(), ModelCacheSpec(patterns=(WHOLE_CALL,)))
    assert unsupported_reason(DBCacheConfig(Fn=1), spec) is None


def test_stopwatch_times_a_block_and_its_laps():
    from cached_diffusers.tools.timing import Stopwatch

    calls = []
    with Stopwatch(lambda: calls.append("sync")) as watch:
        time.sleep(0.01)
        first = watch.lap()
    assert watch.seconds >= first >= 0.01
    assert calls == ["sync"] * 3  # at the start, at the lap, at the end
