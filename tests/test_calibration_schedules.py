"""`calibrate --method lemica|meancache` and `bench --equal-budget` on the tiny Qwen-Image pipeline (few steps)."""

import csv
import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch

from cached_diffusers import CachedQwenImagePipeline, LeMiCaConfig, MeanCacheConfig, TaylorSeerConfig, cache_config_from_dict
from cached_diffusers.calibration_schedules import final_latents, latent_error, load_error_matrix, measure_edge_errors
from cached_diffusers.tools.cli import main
from cached_diffusers.tools.equal_budget import static_computed_steps, tune_threshold
from cached_diffusers.schedules import path_costs, solve_lexicographic_minimax
from cached_diffusers.tools.tiny import save_tiny_qwenimage_pipeline

STEPS = 6
SAMPLING = ["--steps", str(STEPS), "--height", "64", "--width", "64", "--negative-prompt", " ", "--quiet"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_qwenimage_pipeline(tmp_path_factory.mktemp("model") / "tiny-qwenimage")


@pytest.fixture(scope="module")
def calibrated(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("lemica")
    argv = ["calibrate", "--model", str(model), "--method", "lemica", "--budget", "4", "3", "--max-span", "3",
            "--prompt", "a red cat", *SAMPLING, "--output", str(out / "lemica.json")]
    assert main(argv) == 0
    return out


@pytest.mark.slow  # over 20 s on the 2-core machine (measured: --durations)
def test_lemica_calibration_writes_one_config_per_budget_the_matrix_and_the_provenance(calibrated):
    errors, provenance = load_error_matrix(calibrated / "lemica.error_matrix.json")
    assert errors.shape == (STEPS, STEPS) and provenance["num_inference_steps"] == STEPS
    assert provenance["max_span"] == 3 and provenance["prompts"] == ["a red cat"]
    for i in range(STEPS - 1):
        assert errors[i, i + 1] == 0.0  # nothing reused
        for j in range(i + 2, STEPS):
            assert (errors[i, j] > 0) if j - i <= 3 else math.isinf(errors[i, j])
    record = json.loads((calibrated / "lemica.calibration.json").read_text())
    for budget in (4, 3):
        config = cache_config_from_dict(json.loads((calibrated / f"lemica-b{budget}.json").read_text()))
        assert isinstance(config, LeMiCaConfig) and config.num_inference_steps == STEPS
        assert list(config.computed_steps) == solve_lexicographic_minimax(errors, budget)
        entry = record["budgets"][str(budget)]
        assert entry["computed_steps"] == list(config.computed_steps)
        assert entry["sorted_edge_errors"] == pytest.approx(list(path_costs(errors, config.computed_steps)))


@pytest.mark.slow  # over 20 s on the 2-core machine (measured: --durations)
def test_an_edge_cost_is_the_final_error_of_reusing_only_inside_the_edge(model, calibrated):
    errors, _ = load_error_matrix(calibrated / "lemica.error_matrix.json")
    pipe = CachedQwenImagePipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(negative_prompt=" ", height=64, width=64, num_inference_steps=STEPS)
    reference = final_latents(pipe, "a red cat", kwargs, 0, None)
    gap = LeMiCaConfig(computed_steps=[0, 1, 4, 5], num_inference_steps=STEPS)  # edge 1 -> 4, without any replay
    assert errors[1, 4] == pytest.approx(latent_error(final_latents(pipe, "a red cat", kwargs, 0, gap), reference), rel=1e-6)
    # the measurement leaves the pipeline as it found it
    before = pipe.cache_config
    errors_again = measure_edge_errors(pipe, ["a red cat"], {k: v for k, v in kwargs.items() if k != "num_inference_steps"},
                                       STEPS, max_span=2)
    assert np.allclose(errors_again[np.isfinite(errors_again)], errors[np.isfinite(errors_again)])
    assert pipe.cache_config is before and pipe.transformer.forward.__self__ is pipe.transformer


def test_another_budget_from_the_saved_matrix_needs_no_model(calibrated, tmp_path):
    out = tmp_path / "b5.json"
    argv = ["calibrate", "--model", "/nonexistent/model", "--method", "lemica", "--budget", "5",
            "--error-matrix", str(calibrated / "lemica.error_matrix.json"), "--output", str(out), "--quiet"]
    assert main(argv) == 0  # a model that does not exist: only the saved matrix is read
    errors, _ = load_error_matrix(calibrated / "lemica.error_matrix.json")
    config = cache_config_from_dict(json.loads(out.read_text()))
    assert list(config.computed_steps) == solve_lexicographic_minimax(errors, 5)


def test_unreachable_budget_from_a_short_span_is_a_clear_error(calibrated, capsys):
    argv = ["calibrate", "--model", "/nonexistent/model", "--method", "lemica", "--budget", "2",
            "--error-matrix", str(calibrated / "lemica.error_matrix.json"), "--output", "/tmp/unused.json", "--quiet"]
    assert main(argv) == 2
    assert "no path of 2 computed steps" in capsys.readouterr().err


def test_meancache_calibration_chooses_a_window_per_gap(model, calibrated, tmp_path):
    out = tmp_path / "meancache.json"
    argv = ["calibrate", "--model", str(model), "--method", "meancache", "--budget", "3", "--windows", "1", "2",
            "--error-matrix", str(calibrated / "lemica.error_matrix.json"), "--prompt", "a red cat", *SAMPLING,
            "--output", str(out)]
    assert main(argv) == 0
    config = cache_config_from_dict(json.loads(out.read_text()))
    assert isinstance(config, MeanCacheConfig) and config.budget == 3
    assert all(w in (1, 2) for w in config.windows) and len(config.windows) == 2
    record = json.loads((tmp_path / "meancache.calibration.json").read_text())["budgets"]["3"]
    assert record["windows"] == list(config.windows) and record["final_latent_error"] > 0
    assert record["final_latent_error"] <= record["final_latent_error_windows_1"]  # a window is kept only if it helps


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "lemica"], "needs --budget"),
        (["--method", "teacache", "--budget", "3"], "--budget: for --method lemica or meancache only, not teacache"),
        (["--method", "magcache", "--strength", "0.5"], "--strength: for --method lemica or meancache only"),
        (["--method", "lemica", "--budget", "3", "--strength", "0"], r"--strength must be a number in \(0, 1\], got 0"),
        (["--method", "lemica", "--budget", "9"], r"--budget must be in \[2, 6\]"),
    ],
)
def test_bad_calibration_options_are_clear_errors(model, argv, message, capsys, tmp_path):
    assert main(["calibrate", "--model", str(model), *argv, *SAMPLING, "--output", str(tmp_path / "c.json")]) == 2
    assert re.search(message, capsys.readouterr().err)


# -- equal budget -----------------------------------------------------------------------------------------------------
def test_bisection_finds_the_largest_count_within_the_budget():
    count = lambda t: float(max(2, round(20 - 5 * math.log10(t * 1000))))  # noqa: E731, non-increasing in t
    t, c, reached, evaluated = tune_threshold(count, 10, 1e-3, 10.0, iterations=12)
    assert reached and c == 10 and count(t) == 10
    assert all(v > 10 or v <= c for v in evaluated.values())
    t, c, reached, _ = tune_threshold(count, 1, 1e-3, 10.0)
    assert not reached and c == 2


def test_static_counts_match_the_engine():
    assert static_computed_steps(LeMiCaConfig(computed_steps=[0, 2, 7], num_inference_steps=8), 8) == 3
    assert static_computed_steps(TaylorSeerConfig(order=1, interval=3, max_warmup_steps=2), 12) == 6


@pytest.mark.slow  # over 20 s on the 2-core machine (measured: --durations)
def test_equal_budget_bench_tunes_every_method_and_writes_table_csv_and_plot(model, calibrated, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(model), "--prompt", "a blue bird", *SAMPLING, "--equal-budget", "4", "3",
            "--planned", str(calibrated / "lemica-b4.json"), str(calibrated / "lemica-b3.json"),
            "--methods", "fbcache", "taylorseer", "--iterations", "3", "--output-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "equal_budget.json").read_text())
    rows = {(r["budget"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(b, m) for b in (4, 3) for m in ("lemica", "fbcache", "taylorseer")}
    for budget in (4, 3):
        lemica = rows[(budget, "lemica")]
        assert lemica["exact"] and lemica["computed_steps"] == budget
        assert lemica["transformer_speedup"] == pytest.approx(STEPS / budget)
        fb = rows[(budget, "fbcache")]
        assert not fb["exact"] and (fb["computed_steps"] <= budget or not fb["reached"])
        assert all(p == "inf" or math.isfinite(p) for p in fb["psnr"])  # identical images: "inf", not null
    with open(out / "equal_budget.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    text = (out / "equal_budget.md").read_text()
    assert "| 4 | lemica | planned | 4.0 |" in text and "Best transformer speedup" in text
    assert (out / "equal_budget.png").read_bytes()[:4] == b"\x89PNG"



def test_a_method_the_model_cannot_run_is_skipped_with_its_reason(model, monkeypatch):
    from cached_diffusers.tools.equal_budget import format_markdown, run_equal_budget

    pipe = CachedQwenImagePipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    engine = pipe.transformer.cache_engine
    monkeypatch.setattr(engine, "spec", dataclasses.replace(engine.spec, teacache_coefficients=None))
    kwargs = dict(negative_prompt=" ", height=64, width=64, num_inference_steps=STEPS)
    result = run_equal_budget(pipe, ["a red cat"], kwargs, [3], methods=["teacache"])
    assert result.rows == [] and result.info["skipped"][0]["method"] == "teacache"
    assert "no TeaCache coefficients are known" in result.info["skipped"][0]["reason"]
    assert "Skipped teacache" in format_markdown(result)
