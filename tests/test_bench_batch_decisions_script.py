"""``scripts/bench_batch_decisions.py`` (per-sample against shared cache decisions on the reference models) refuses bad
arguments naming the option, and measures what it says on a small run: both modes timed, the computed share, the
mixed steps, the gather and scatter time, and each sample's difference from its own call."""

import re
import shlex
import sys

import pytest

from reference import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import bench_batch_decisions  # noqa: E402


@pytest.mark.parametrize(
    "option, value, message",
    [("--batch", "1", ">= 2"), ("--batch", "9", "<= 8"), ("--steps", "3", ">= 4"), ("--repeats", "0", ">= 1"),
     ("--threads", "0", ">= 1"), ("--size", "40", "multiple of 16")],
)  # fmt: skip
def test_bad_arguments_are_refused_naming_the_option(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_batch_decisions.parse_args([option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{option} must be" in err and message in err


def test_the_documented_command_lines_parse():
    text = (ROOT / "docs" / "batch-invariance.md").read_text(encoding="utf-8")
    lines = [line for line in re.findall(r"^python scripts/bench_batch_decisions\.py.*$", text, re.M)]
    assert lines
    for line in lines:
        bench_batch_decisions.parse_args(shlex.split(line)[2:])


def test_a_small_run_measures_both_modes_and_the_invariance(capsys):
    (result,) = bench_batch_decisions.main(
        ["--models", "qwenimage", "--methods", "fbcache", "--threshold", "fbcache=0.3", "--batch", "2", "--steps", "6",
         "--repeats", "1"]
    )
    out = capsys.readouterr().out
    assert "qwenimage fbcache" in out and "per-sample" in out and "gather+scatter" in out
    assert result["per_sample_s"] > 0 and result["shared_s"] > 0
    assert result["ratio"] == pytest.approx(result["per_sample_s"] / result["shared_s"])
    assert 0 < result["computed_share_per_sample"] <= 1 and 0 < result["computed_share_shared"] <= 1
    assert result["max_difference_per_sample"] <= 1e-4
    if result["mixed_steps"]:
        assert result["gather_scatter_s"] > 0


def test_the_methods_are_the_registry_s_and_each_builds_its_setting(tmp_path):
    from cached_diffusers.registry import cache_methods
    from cached_diffusers.tools.reference_model import REFERENCE_KLEIN_DIR, REFERENCE_MODEL_DIR

    names = [m.name for m in cache_methods(enabled=True)]
    assert bench_batch_decisions.parse_args([]).methods == names
    for name in names:  # the shipped calibrated TeaCache on Qwen-Image; else the published setting
        config = bench_batch_decisions.method_config(name, 20, "shared", REFERENCE_MODEL_DIR)
        assert config.method == name and config.batch_decisions == "shared"
    teacache = bench_batch_decisions.method_config("teacache", 20, "per_sample", REFERENCE_MODEL_DIR)
    assert teacache.coefficients is not None
    assert bench_batch_decisions.method_config("teacache", 20, "per_sample", REFERENCE_KLEIN_DIR).coefficients is None
    args = bench_batch_decisions.parse_args(["--threshold", "fbcache=0.3", "--threshold", "teacache=0.4"])
    fbcache = bench_batch_decisions.method_config("fbcache", 20, "shared", REFERENCE_MODEL_DIR, None, args.thresholds)
    assert fbcache.residual_diff_threshold == 0.3
    teacache = bench_batch_decisions.method_config("teacache", 20, "shared", REFERENCE_MODEL_DIR, None, args.thresholds)
    assert teacache.rel_l1_thresh == 0.4 and teacache.coefficients is not None  # the shipped coefficients kept


@pytest.mark.parametrize("item", ["turbo=1", "lemica=3", "fbcache=x"])
def test_a_bad_threshold_is_refused(item, capsys):
    with pytest.raises(SystemExit):
        bench_batch_decisions.parse_args(["--threshold", item])
    assert "--threshold" in capsys.readouterr().err
