"""`scripts/gpu_parallel_check.py` and `scripts/gpu_benchmark_parallel.py` parse their arguments (they run under
torchrun on several GPUs, never here) and their helpers compute what they say; their methods are the registry's
(`scripts/method_settings.py`), so a method registered later (a toy one here) is in their choices with no edit."""

import argparse
import math
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from cached_diffusers import CachedFlux2Transformer2DModel, CachedQwenImageTransformer2DModel
from cached_diffusers.configs import StepCacheConfig
from cached_diffusers.policies import CachePolicy, Decision
from cached_diffusers.registry import Sweep, cache_methods, register_cache_method, unregister_cache_method
from reference import ROOT

SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_batch_decisions  # noqa: E402
import gpu_benchmark_parallel  # noqa: E402
import gpu_parallel_check  # noqa: E402
import method_settings  # noqa: E402


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


def _parse(*argv):
    parser = argparse.ArgumentParser()
    gpu_parallel_check.add_common_arguments(parser)
    return gpu_parallel_check.resolve(parser.parse_args(list(argv)))


def test_the_methods_are_the_registry_s_with_their_run_modes():
    names = [m.name for m in cache_methods(enabled=True)]
    modes = method_settings.run_modes()
    assert [m for m in modes if m in names] == names
    assert {m for m in modes if m not in names} == {"teacache-calibrate", "magcache-calibrate", "seacache-calibrate", "scm"}
    _, chosen, thresholds = _parse("--size", "tiny")
    assert chosen == modes and thresholds == {}


def test_threshold_sets_the_method_s_knob_and_is_refused_naming_the_problem():
    _, _, thresholds = _parse("--threshold", "teacache=0.3", "--threshold", "taylorseer=3")
    assert thresholds == {"teacache": 0.3, "taylorseer": 3.0}
    config = gpu_parallel_check.method_config("teacache", "qwen", thresholds, {})
    assert config.rel_l1_thresh == 0.3
    assert gpu_parallel_check.method_config("taylorseer", "qwen", thresholds, {}).interval == 3
    for item, message in (("turbo=1", "METHOD one of"), ("teacache", "METHOD one of"), ("lemica=4", "no threshold"),
                          ("dbcache=x", "not a number")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            method_settings.parse_thresholds([item])


@pytest.mark.parametrize("family, num_blocks", [("qwen", 4), ("qwen", 60), ("klein", 5), ("klein", 25)])
def test_every_run_mode_builds_its_method_s_published_setting(family, num_blocks):
    calibrated = {"magcache": {"mag_ratios": (1.0, 1.1, 1.0)}}
    registry = {m.name: m for m in cache_methods(enabled=True)}
    for mode in method_settings.run_modes():
        config = gpu_parallel_check.method_config(mode, family, {}, calibrated, steps=28, num_blocks=num_blocks)
        base = method_settings.base_method(mode)
        assert config.method == base and type(config) is registry[base].config_class
        assert getattr(config, "calibrate", False) == mode.endswith("-calibrate")
        assert (config.scm_steps_mask == "fast") == (mode == "scm")
        sweep = registry[base].sweep
        if mode == base and sweep.kind != "budget":
            assert getattr(config, sweep.knob) == sweep.published[sweep.knob]
    # the published setting, except what is fitted to the model (DBCache's Fn and warm-up); the model facts
    dbcache = gpu_parallel_check.method_config("dbcache", family, {}, {}, steps=28, num_blocks=num_blocks)
    assert (dbcache.Fn, dbcache.Bn, dbcache.residual_diff_threshold) == (max(1, min(8, num_blocks // 6)), 0, 0.08)
    assert dbcache.max_warmup_steps == 7
    magcache = gpu_parallel_check.method_config("magcache", family, {}, calibrated)
    assert (magcache.mag_threshold, magcache.mag_max_reused_steps, magcache.mag_ratios) == (0.06, 2, (1.0, 1.1, 1.0))
    teacache = gpu_parallel_check.method_config("teacache", family, {}, {})
    assert teacache.coefficients == (None if family == "qwen" else (0.0, 0.0, 0.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="unknown method 'turbo'"):
        gpu_parallel_check.method_config("turbo", family, {}, calibrated)


@pytest.mark.parametrize("family, cls, needed", [("qwen", CachedQwenImageTransformer2DModel, []),
                                                 ("klein", CachedFlux2Transformer2DModel, ["magcache-calibrate"])])  # fmt: skip
def test_a_method_without_model_data_calibrates_first(family, cls, needed):
    model = argparse.Namespace(cache_spec=cls.cache_spec, num_cache_blocks=25)
    names = [m for m in method_settings.run_modes() if not m.endswith("-calibrate")]
    assert gpu_parallel_check.needed_calibrations(names, model, family, {}, 28) == needed
    assert gpu_parallel_check.needed_calibrations(["teacache", "fbcache"], model, family, {}, 28) == []


def test_a_calibration_run_gives_the_method_its_model_data():
    ratios = [1.0, 0.9, 0.95, 1.02]
    stats = argparse.Namespace(branches={b: argparse.Namespace(calibration={"mag_ratios": ratios}) for b in ("cond", "uncond")})
    data = gpu_parallel_check.calibration_data("magcache-calibrate", stats)
    assert tuple(data["mag_ratios"]) == pytest.approx(ratios)
    assert gpu_parallel_check.calibration_data("seacache-calibrate", stats) == {}


class _ToyPolicy(CachePolicy):
    """Compute every step (the scripts only list and build the toy method; nothing runs it here)."""

    def decide(self, ctx, state, measurement, gate, reason):
        return Decision(False, reason)


@dataclass(frozen=True)
class _ToyConfig(StepCacheConfig):
    """A toy method registered only inside the test below."""

    method: ClassVar[str] = "toyscripts"
    source: ClassVar[str] = "tests/test_gpu_parallel_scripts.py"
    policy_class: ClassVar[type] = _ToyPolicy
    sweep: ClassVar[Sweep] = Sweep("every", "int", 2, math.inf, values=(2, 3), published={"every": 3})

    every: int = 2


def test_a_method_registered_later_is_in_every_script_s_choices():
    register_cache_method(_ToyConfig)
    try:
        assert "toyscripts" in method_settings.run_modes()
        _, chosen, thresholds = _parse("--methods", "toyscripts", "--threshold", "toyscripts=4")
        assert chosen == ["toyscripts"] and thresholds == {"toyscripts": 4.0}
        config = gpu_parallel_check.method_config("toyscripts", "qwen", {}, {})
        assert type(config) is _ToyConfig and config.every == 3  # its published setting
        assert gpu_parallel_check.method_config("toyscripts", "qwen", thresholds, {}).every == 4
        args = bench_batch_decisions.parse_args(["--methods", "toyscripts", "--threshold", "toyscripts=5"])
        assert args.methods == ["toyscripts"] and args.thresholds == {"toyscripts": 5.0}
        assert "toyscripts" in bench_batch_decisions.parse_args([]).methods
        assert "toyscripts" in method_settings.threshold_help()
    finally:
        unregister_cache_method("toyscripts")
    assert "toyscripts" not in method_settings.run_modes()
    with pytest.raises(SystemExit):
        _parse("--methods", "toyscripts")


def test_psnr_of_the_latents():
    reference = torch.tensor([0.0, 2.0, 4.0, 6.0])
    assert gpu_benchmark_parallel.psnr(reference.clone(), reference) == math.inf
    noisy = reference + torch.tensor([0.1, -0.1, 0.1, -0.1])  # MSE 0.01, peak 6
    assert gpu_benchmark_parallel.psnr(noisy, reference) == pytest.approx(10 * math.log10(36 / 0.01))
