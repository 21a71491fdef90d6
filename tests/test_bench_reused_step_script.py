"""`scripts/bench_reused_step.py` (the reused-step cost of block-call caching) refuses bad arguments and measures what
it says: reused steps of the tiny 12-block transformer, and computed ones, with a ratio from their medians."""

import sys

import pytest

from reference import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import bench_reused_step  # noqa: E402


@pytest.mark.parametrize("option, value", [("--side", "0"), ("--steps", "3"), ("--repeats", "0"), ("--threads", "0")])
def test_bad_arguments_are_refused_naming_the_option(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_reused_step.parse_args([option, value])
    assert exit_info.value.code == 2
    assert f"{option} must be >=" in capsys.readouterr().err


def test_it_times_reused_and_computed_steps_and_prints_their_ratio(capsys):
    result = bench_reused_step.main(["--side", "2", "--steps", "6", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "12 blocks" in out and "4 image tokens" in out and "reused / computed" in out
    assert result["computed_s"] > 0 and result["reused_s"] > 0
    assert result["ratio_percent"] == pytest.approx(100 * result["reused_s"] / result["computed_s"])
    assert "median of 6 / 4" in out  # 6 computed steps; 4 reused (the first and the last step always compute)
