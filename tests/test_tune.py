"""``cached-diffusers tune`` and ``cached_diffusers.tune``: the fastest cache config that keeps PSNR >= a target on the
tuning prompts, checked on held-out ones (issue 21). Short step counts on the shipped reference models; the 50-step
runs belong to ``scripts/tune_reference_models.sh`` and docs/tuning.md."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

import cached_diffusers
from cached_diffusers.configs import available_cache_methods
from cached_diffusers.hub import read_cache_config
from cached_diffusers.tools import reference_model as ref
from cached_diffusers.tools.tune import (
    CALIBRATION_PROMPTS,
    DEFAULT_CONFIDENCE,
    DEFAULT_HELD_OUT_PROMPTS,
    DEFAULT_MARGIN,
    DEFAULT_TUNING_PROMPTS,
    Candidate,
    TuneResult,
    UnreachableTarget,
    _passes,
    psnr_prediction_bound,
    tunable,
    tune,
    write_outputs,
)

from reference import ROOT
from test_cli_input_checks import assert_one_line_error, model_copy, run

STEPS = 8
KWARGS = {"height": 32, "width": 32, "true_cfg_scale": 4.0, "negative_prompt": " ", "num_inference_steps": STEPS}
METHODS = ["teacache", "lemica"]
PROMPTS = ["red apple"]
HELD_OUT = ["dog face"]


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from cached_diffusers import CachedDiffusionPipeline

    pipe = CachedDiffusionPipeline.from_pretrained(os.fspath(ref.REFERENCE_MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def matrix(pipe):
    """LeMiCa's error matrix at 8 steps on the tuning prompt, measured once for the module."""
    from cached_diffusers.calibration_schedules import measure_edge_errors

    call = {k: v for k, v in KWARGS.items() if k != "num_inference_steps"}
    return measure_edge_errors(pipe, PROMPTS, call, STEPS, max_span=6), {"prompts": PROMPTS, "max_span": 6}


@pytest.fixture(scope="module")
def results(pipe, matrix):
    """The Python API at three targets, loosening: 45, 35 and 25 dB."""
    return {
        target: tune(pipe, target, prompts=PROMPTS, held_out_prompts=HELD_OUT, call_kwargs=KWARGS, methods=METHODS,
                     error_matrix=matrix, iterations=3, model="reference-qwenimage-emoji")
        for target in (45.0, 35.0, 25.0)
    }


def test_the_python_api_returns_the_choice_every_candidate_and_the_held_out_check(pipe, results):
    result = results[35.0]
    assert isinstance(result, TuneResult) and cached_diffusers.tune is tune
    assert result.config.method == result.chosen.method and result.chosen.passes
    assert result.chosen.worst_psnr >= 35.0 and result.chosen.reuses
    assert pipe.cache_config is not None and pipe.cache_config.method == "teacache"  # the pipeline's config is restored
    for c in result.candidates:
        assert c.method in METHODS and c.knob in ("rel_l1_thresh", "budget")
        assert set(c.computed_steps) == {"cond", "uncond"} and c.ideal_speedup >= 1.0
        assert len(c.psnr) == len(c.ssim) == len(PROMPTS)
        assert c.passes == (c.reuses and c.worst_psnr >= 35.0)
    assert {c.method for c in result.candidates} == set(METHODS)
    assert max(c.ideal_speedup for c in result.candidates if c.passes) == result.chosen.ideal_speedup
    held = result.held_out
    assert held["prompts"] == HELD_OUT and list(held["psnr"]) == ["dog face (seed 0)"]
    assert held["held"] == (held["worst_psnr"] >= 35.0)
    # one uncached generation per (prompt, seed) serves every candidate; the count adds up
    g = result.generations
    assert g["uncached references"] == len(PROMPTS) + len(HELD_OUT)
    assert g["candidates"] == len(result.candidates) * len(PROMPTS) and g["held-out"] == len(HELD_OUT)
    assert g["total"] == sum(v for k, v in g.items() if k != "total")
    data = json.loads(json.dumps(result.to_dict(), default=str))
    assert data["chosen"]["method"] == result.chosen.method and len(data["candidates"]) == len(result.candidates)


def test_the_choice_gets_no_slower_as_the_target_loosens(results):
    speedups = [results[t].chosen.ideal_speedup for t in (45.0, 35.0, 25.0)]
    assert speedups == sorted(speedups), speedups
    assert speedups[0] < speedups[-1]
    for target, result in results.items():
        assert result.chosen.worst_psnr >= target


def test_planned_methods_solve_every_budget_from_one_matrix(results):
    budgets = [c for c in results[35.0].candidates if c.method == "lemica"]
    assert len(budgets) >= 2
    for c in budgets:  # the budget is exact: the plan's length, in every branch
        assert c.config["num_inference_steps"] == STEPS and len(c.config["computed_steps"]) == c.value
        assert set(c.computed_steps.values()) == {float(c.value)}
    assert "error-matrix calibration" not in results[35.0].generations  # the matrix was given: no run measured it


def test_an_unreachable_target_names_the_best_psnr_seen(pipe, matrix):
    with pytest.raises(UnreachableTarget, match=r"target PSNR 200 dB is unreachable .* best worst-prompt PSNR of any "
                       r"config reusing a step was [0-9.]+ dB"):
        tune(pipe, 200.0, prompts=PROMPTS, held_out_prompts=HELD_OUT, call_kwargs=KWARGS,
             methods=["teacache", "lemica"], error_matrix=matrix, iterations=2)


def test_a_trivially_loose_target_picks_the_fastest_and_names_the_guard(pipe, matrix):
    result = tune(pipe, 0.0, prompts=PROMPTS, held_out_prompts=HELD_OUT, call_kwargs=KWARGS, methods=METHODS,
                  error_matrix=matrix)
    assert all(c.passes for c in result.candidates if c.reuses)
    assert result.chosen.ideal_speedup == max(c.ideal_speedup for c in result.candidates)
    assert result.bound is not None and "fast end of its search range" in result.bound
    assert "first-step" in result.bound and "last-step" in result.bound  # the guards that forced the steps left
    assert result.held


def test_held_out_prompts_are_disjoint_from_the_tuning_prompts(pipe, capsys):
    with pytest.raises(ValueError, match="disjoint"):
        tune(pipe, 30.0, prompts=["red apple", "rocket"], held_out_prompts=["rocket"], call_kwargs=KWARGS)
    code, _, err = run(["tune", "--model", ref.REFERENCE_MODEL_DIR, "--target-psnr", "30", "--prompts", "a", "b",
                        "--held-out-prompts", "b", "--output", "unused"], capsys)
    assert_one_line_error(code, err, "--held-out-prompts must be disjoint from --prompts")
    # the default held-out set leaves out a tuning prompt it contains
    result = tune(pipe, 0.0, prompts=["dog face"], call_kwargs=KWARGS, methods=["taylorseer"])
    assert result.held_out["prompts"] == [p for p in DEFAULT_HELD_OUT_PROMPTS if p != "dog face"]
    assert not set(result.held_out["prompts"]) & set(result.info["prompts"])


def test_a_method_the_model_cannot_run_is_skipped_with_its_reason():
    torch.set_num_threads(1)
    from cached_diffusers import CachedDiffusionPipeline

    klein = CachedDiffusionPipeline.from_pretrained(os.fspath(ref.REFERENCE_KLEIN_DIR))
    klein.set_progress_bar_config(disable=True)
    result = tune(klein, 0.0, prompts=PROMPTS, held_out_prompts=HELD_OUT, methods=["teacache", "taylorseer"],
                  call_kwargs={"height": 32, "width": 32, "guidance_scale": 4.0, "max_sequence_length": 32},
                  num_inference_steps=6)
    assert [s["method"] for s in result.skipped] == ["teacache"]
    assert "no TeaCache coefficients" in result.skipped[0]["reason"]
    assert result.chosen.method == "taylorseer"


def test_every_registered_method_with_a_knob_is_searched():
    assert set(available_cache_methods()) - {"none"} <= set(tunable())


def test_the_cli_writes_a_loadable_config_and_overwrites_only_when_told(tmp_path, capsys):
    model = model_copy(tmp_path)
    out = tmp_path / "tuned"
    argv = ["tune", "--model", model, "--target-psnr", "20", "--steps", "6", "--prompts", "red apple",
            "--held-out-prompts", "dog face", "--methods", "taylorseer", "teacache", "--iterations", "2",
            "--threads", "1", "--quiet", "--output", out]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert "target 20 dB" in lines[-1] and ("held on every held-out prompt" in lines[-1] or "did NOT hold" in lines[-1])
    assert "cost:" in stdout and "generations" in stdout
    config_path = out / "cache_config.json"
    record = json.loads((out / "cache_config.tuning.json").read_text())
    assert (out / "tuning_pareto.png").stat().st_size > 0
    assert record["target_psnr"] == 20.0 and record["num_inference_steps"] == 6 and record["candidates"]
    assert record["versions"]["torch"] == torch.__version__ and record["environment"]["device"] == "cpu"
    assert record["generations"]["total"] > 0 and record["held_out"]["prompts"] == ["dog face"]
    config = read_cache_config(config_path)
    assert config is not None and config.to_dict() == record["chosen"]["config"]
    before = config_path.read_bytes()
    code, _, err = run(argv, capsys)  # exists: refused before any work
    assert_one_line_error(code, err, "exists: pass --overwrite")
    assert config_path.read_bytes() == before and not os.path.exists(f"{config_path}.bak")
    code, _, err = run(argv + ["--overwrite"], capsys)
    assert code == 0, err
    assert open(f"{config_path}.bak", "rb").read() == before
    # the written config, beside the model, is what from_pretrained loads
    os.replace(config_path, os.path.join(model, "cache_config.json"))
    from cached_diffusers import CachedDiffusionPipeline

    loaded = CachedDiffusionPipeline.from_pretrained(model)
    assert loaded.cache_config == config


def test_the_cli_never_writes_into_the_shipped_models_and_reports_an_unreachable_target(tmp_path, capsys):
    code, _, err = run(["tune", "--model", ref.REFERENCE_MODEL_DIR, "--target-psnr", "30"], capsys)
    assert_one_line_error(code, err, "shipped models")
    code, _, err = run(["tune", "--model", ref.REFERENCE_MODEL_DIR, "--target-psnr", "200", "--steps", "5",
                        "--prompts", "red apple", "--held-out-prompts", "dog face", "--methods", "taylorseer",
                        "--threads", "1", "--quiet", "--output", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "target PSNR 200 dB is unreachable", "best worst-prompt PSNR")
    assert not (tmp_path / "out" / "cache_config.json").exists()


def test_write_outputs_refuses_an_existing_config(results, tmp_path):
    (tmp_path / "cache_config.json").write_text("{}")
    with pytest.raises(ValueError, match="exists: pass --overwrite"):
        write_outputs(results[35.0], tmp_path)
    paths = write_outputs(results[35.0], tmp_path, overwrite=True)
    assert (tmp_path / "cache_config.json.bak").read_text() == "{}" and len(paths) == 3


def test_the_gpu_script_parses_its_arguments():
    spec = importlib.util.spec_from_file_location("gpu_tune", ROOT / "scripts" / "gpu_tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--model", "Qwen/Qwen-Image", "--targets", "40", "35", "--steps", "50",
                              "--output-dir", "out"])
    assert args.model == "Qwen/Qwen-Image" and args.targets == [40.0, 35.0] and args.steps == 50
    argv = module.tune_argv(args, 40.0)
    assert argv[:5] == ["tune", "--model", "Qwen/Qwen-Image", "--target-psnr", "40"]
    assert "--measure-latency" in argv and os.path.join("out", "psnr40") in argv


def test_published_defaults_are_measured_beside_the_choice(pipe):
    result = tune(pipe, 0.0, prompts=PROMPTS, held_out_prompts=HELD_OUT, call_kwargs=KWARGS,
                  methods=["teacache", "dbcache"], compare_defaults=True)
    assert [d.method for d in result.defaults] == ["teacache"]
    shipped = tuple(pipe.cache_config.coefficients)  # the reference model's calibrated TeaCache coefficients
    assert result.defaults[0].config["rel_l1_thresh"] == 0.2
    assert tuple(result.defaults[0].config["coefficients"]) == shipped
    assert all(tuple(c.config["coefficients"]) == shipped for c in result.candidates if c.method == "teacache")
    # DBCache's published Fn=8 cannot run on the 8-block reference model: recorded, not raised
    assert any(s["method"] == "dbcache (default)" and "Fn + Bn" in s["reason"] for s in result.skipped)
    assert result.generations["defaults"] == len(PROMPTS)


def test_a_margin_tightens_the_search_but_not_the_held_out_check(pipe, matrix, results):
    result = tune(pipe, 25.0, margin=10.0, prompts=PROMPTS, held_out_prompts=HELD_OUT, call_kwargs=KWARGS,
                  methods=METHODS, error_matrix=matrix, iterations=3)
    assert result.chosen.worst_psnr >= 35.0 and result.info["margin"] == 10.0
    assert result.held_out["held"] == (result.held_out["worst_psnr"] >= 25.0)
    assert "margin 10 dB" in result.summary()
    assert result.chosen.ideal_speedup <= results[25.0].chosen.ideal_speedup


def test_the_default_tuning_prompts_are_the_documented_draw_disjoint_from_held_out_and_calibration():
    captions = json.loads((ref.REFERENCE_DATASET_DIR / "captions.json").read_text(encoding="utf-8"))["captions"]
    excluded = set(DEFAULT_HELD_OUT_PROMPTS) | set(CALIBRATION_PROMPTS)
    pool = [c for c in captions if c not in excluded]
    draw = [pool[i] for i in sorted(np.random.default_rng(0).choice(len(pool), 8, replace=False))]
    assert list(DEFAULT_TUNING_PROMPTS) == draw
    assert not set(DEFAULT_TUNING_PROMPTS) & excluded and len(set(DEFAULT_TUNING_PROMPTS)) == 8
    assert DEFAULT_MARGIN == "auto"


def test_the_prediction_bound_covers_an_unseen_draw_at_its_confidence():
    rng = np.random.default_rng(1)
    trials, n = 4000, 8
    samples = rng.normal(40.0, 2.0, size=(trials, n + 1))  # n tuning prompts and one unseen prompt per trial
    below = np.mean([row[n] < psnr_prediction_bound(row[:n]) for row in samples])
    assert below <= 1 - DEFAULT_CONFIDENCE + 0.005, below  # min(worst, ...) can only make it more conservative
    assert below >= (1 - DEFAULT_CONFIDENCE) / 3, below  # and it is not vacuous
    # more scatter about the same worst and mean gives a lower bound; more prompts at the same scatter a higher one
    assert psnr_prediction_bound([38, 40, 42]) < psnr_prediction_bound([38, 41, 41]) <= 38
    assert psnr_prediction_bound([39, 41] * 6) > psnr_prediction_bound([39, 41] * 2)
    assert psnr_prediction_bound([37.5]) == 37.5 and psnr_prediction_bound([30.0, float("inf")]) == 30.0
    assert psnr_prediction_bound([float("inf")] * 2) == float("inf")
    with pytest.raises(ValueError, match="at least one"):
        psnr_prediction_bound([])
    with pytest.raises(ValueError, match="confidence must be in"):
        psnr_prediction_bound([1.0, 2.0], confidence=1.0)


def test_the_auto_margin_rejects_a_candidate_whose_prompts_scatter():
    def candidate(psnr):
        return Candidate("teacache", "rel_l1_thresh", 0.3, {}, {"cond": 5.0}, 0.2, list(psnr), [0.99] * len(psnr))

    tight = candidate([40.6, 41.0, 41.4, 40.8, 41.2, 40.9, 41.1, 41.0])
    scattered = candidate([40.6, 48.0, 52.0, 44.0, 41.0, 50.0, 46.0, 43.0])  # same worst, far more spread
    assert tight.worst_psnr == scattered.worst_psnr
    assert _passes(tight, 40.0, None, 0.0) and _passes(scattered, 40.0, None, 0.0)
    assert _passes(tight, 40.0, None, "auto") and not _passes(scattered, 40.0, None, "auto")
    assert not _passes(tight, 40.0, None, 1.0)  # a fixed margin moves the worst prompt's bar for both alike


def test_the_auto_margin_picks_a_slower_config_when_the_tuning_prompts_scatter(pipe):
    prompts = ["red apple", "rocket", "ghost"]
    runs = {
        margin: tune(pipe, 30.0, margin=margin, prompts=prompts, held_out_prompts=HELD_OUT, call_kwargs=KWARGS,
                     methods=["teacache"], iterations=4)
        for margin in ("auto", 0.0)
    }
    auto, bare = runs["auto"], runs[0.0]
    for c in auto.candidates:
        assert c.passes == (c.reuses and psnr_prediction_bound(c.psnr) >= 30.0)
    assert psnr_prediction_bound(auto.chosen.psnr) >= 30.0 and auto.info["margin"] == "auto"
    assert auto.info["psnr_floor"] == psnr_prediction_bound(auto.chosen.psnr)
    # these three prompts scatter at TeaCache's fastest setting (worst ~45 dB, far above 30, but ~13 dB apart): the
    # bare worst-prompt rule takes it, the prediction bound does not
    assert auto.chosen.ideal_speedup < bare.chosen.ideal_speedup
    assert any(c.reuses and c.worst_psnr >= 30.0 and not c.passes for c in auto.candidates)
    assert "margin auto" in auto.summary() and "prediction bound" in auto.info["margin_rule"]
    assert auto.held_out["held"] == (auto.held_out["worst_psnr"] >= 30.0)  # the held-out check stays at the target


def test_a_bad_margin_is_a_clear_error(pipe, capsys):
    with pytest.raises(ValueError, match="margin must be 'auto' or a finite number of dB >= 0"):
        tune(pipe, 30.0, margin="wide", prompts=PROMPTS, held_out_prompts=HELD_OUT, call_kwargs=KWARGS)
    for bad in ("wide", "-1"):
        code, _, err = run(["tune", "--model", ref.REFERENCE_MODEL_DIR, "--target-psnr", "30", "--margin", bad,
                            "--output", "unused"], capsys)
        assert_one_line_error(code, err, "--margin must be 'auto' or a number of dB >= 0")


def test_one_json_writer_keeps_infinities_and_the_report_reads_old_and_new_records(tmp_path):
    from cached_diffusers.tools.files import json_float, strict_json, write_json

    assert strict_json({1: [math.inf, -math.inf, math.nan, np.float32(2.5), (1, "a")]}) == {
        "1": ["inf", "-inf", None, 2.5, [1, "a"]]}
    path = write_json({"psnr": [math.inf, 30.0], "other": object()}, tmp_path / "sub" / "r.json", indent=1, default=str)
    data = json.loads((tmp_path / "sub" / "r.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert path.endswith("r.json") and data["psnr"] == ["inf", 30.0] and data["other"].startswith("<object")
    assert [json_float(v) for v in data["psnr"]] == [math.inf, 30.0] and math.isnan(json_float(None))
    assert json_float(None, null=math.inf) == math.inf and json_float("-inf") == -math.inf

    # scripts/tuning_report.py: an infinite held-out PSNR written as "inf" (now) or null (committed older records)
    spec = importlib.util.spec_from_file_location("tuning_report", ROOT / "scripts" / "tuning_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    chosen = {"method": "lemica", "setting": "budget=4", "computed_steps": {"cond": 4}, "ideal_speedup": 2.0,
              "worst_psnr": 40.0}
    for target, infinite in ((40.0, "inf"), (35.0, None)):
        record = {"target_psnr": target, "num_inference_steps": 8, "chosen": chosen, "margin": 0,
                  "held_out": {"worst_psnr": infinite, "mean_psnr": infinite, "held": True},
                  "generations": {"total": 3}, "seconds": 1.0}
        write_json(record, tmp_path / "tuning" / f"psnr{target:g}" / "cache_config.tuning.json")
    text = module.report(str(tmp_path / "tuning"))
    assert text.count("| inf / inf dB | yes |") == 2
