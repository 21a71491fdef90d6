"""`scripts/gpu_parallel_check.py` and `scripts/gpu_benchmark_parallel.py` parse their arguments (they run under
torchrun on several GPUs, never here) and their helpers compute what they say."""

import math
import subprocess
import sys

import pytest
import torch

from reference import ROOT

SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import gpu_benchmark_parallel  # noqa: E402
import gpu_parallel_check  # noqa: E402


def _run(script, *args):
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "script, options",
    [("gpu_parallel_check.py", ("--mode", "--atol", "--checkpoint")), ("gpu_benchmark_parallel.py", ("--repeats", "--output-dir"))],
)
@pytest.mark.slow  # over 4 s
def test_help_lists_the_options(script, options):
    done = _run(script, "--help")
    assert done.returncode == 0, done.stderr
    assert all(option in done.stdout for option in (*options, "--model", "--methods", "--size"))


@pytest.mark.slow  # over 4 s
def test_bad_arguments_are_refused_before_any_process_group():
    done = _run("gpu_parallel_check.py", "--methods", "teacache,turbo")
    assert done.returncode != 0 and "unknown ['turbo']" in done.stderr
    done = _run("gpu_benchmark_parallel.py", "--repeats", "0")
    assert done.returncode != 0 and "--repeats must be >= 1" in done.stderr
    done = _run("gpu_parallel_check.py", "--mode", "pipeline")
    assert done.returncode != 0 and "invalid choice" in done.stderr


@pytest.mark.parametrize("family", ["qwen", "klein"])
def test_every_method_name_builds_a_config(family):
    calibrations = {"magcache": (1.0, 1.1, 1.0)}
    thresholds = {"teacache": 0.2, "magcache": 0.06, "dbcache": 0.08}
    methods = {name: gpu_parallel_check.method_config(name, family, thresholds, calibrations).method
               for name in gpu_parallel_check.METHODS}  # fmt: skip
    assert methods == {"teacache": "teacache", "teacache-calibrate": "teacache", "magcache": "magcache",
                       "magcache-calibrate": "magcache", "dbcache": "dbcache", "fbcache": "fbcache",
                       "taylorseer": "taylorseer", "scm": "dbcache", "seacache": "seacache"}  # fmt: skip
    with pytest.raises(ValueError, match="unknown method 'turbo'"):
        gpu_parallel_check.method_config("turbo", family, thresholds, calibrations)


def test_psnr_of_the_latents():
    reference = torch.tensor([0.0, 2.0, 4.0, 6.0])
    assert gpu_benchmark_parallel.psnr(reference.clone(), reference) == math.inf
    noisy = reference + torch.tensor([0.1, -0.1, 0.1, -0.1])  # MSE 0.01, peak 6
    assert gpu_benchmark_parallel.psnr(noisy, reference) == pytest.approx(10 * math.log10(36 / 0.01))
