"""The ``cached-diffusers`` command line."""

import re
import subprocess
import sys

import pytest
from PIL import Image

from cached_diffusers.tools.cli import build_parser, cache_config_from_args, main
from cached_diffusers import TeaCacheConfig
from cached_diffusers.tools.tiny import save_tiny_qwenimage_pipeline


@pytest.mark.slow  # over 4 s
def test_demo_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "demo.png"
    code = main(["demo", "--output", str(out), "--quiet", "--repeats", "3"])  # 20 steps: the model's default
    assert code == 0
    text = capsys.readouterr().out
    assert "4 prompt(s), 20 steps, 1 torch thread(s)" in text  # the thread count is set (default 1) and printed
    assert re.search(r"uncached: \d+\.\d+ s \(median of 3, range \d+\.\d+-\d+\.\d+ s\)", text)
    assert re.search(r"cached \(teacache\): \d+\.\d+ s \(median of 3, range \d+\.\d+-\d+\.\d+ s\)", text)
    assert re.search(r"speedup: \d+\.\d+x \(per-round ratios \d+\.\d+x-\d+\.\d+x over 3 interleaved rounds\)", text)
    skipped = re.findall(r"steps reused \((cond|uncond)\): (\d+) of 20", text)
    assert {b for b, _ in skipped} == {"cond", "uncond"}
    assert all(int(n) > 0 for _, n in skipped)  # the demo's default really skips transformer work
    assert re.search(r"PSNR cached vs uncached, .*: (\d+\.\d+|inf) dB", text)
    assert "reference model" in text  # the trained model is the demo's default
    sheet = Image.open(out)  # uncached row over cached row, 4 images of 32 x 32 each, enlarged for viewing
    factor = 512 // (4 * 32 + 3 * 4)
    assert sheet.size == ((4 * 32 + 3 * 4) * factor, (2 * 32 + 4) * factor)


def test_generate_from_a_local_directory(tmp_path, capsys):
    model = save_tiny_qwenimage_pipeline(tmp_path / "model")
    out = tmp_path / "out.png"
    args = ["generate", "--model", str(model), "--prompt", "a red cat", "--prompt", "a blue bird", "--steps", "6",
            "--height", "64", "--width", "64", "--negative-prompt", " ", "--cache", "teacache", "--rel-l1-thresh", "1000",
            "--max-continuous-cached-steps", "2", "--output", str(out), "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "out-0.png").exists() and (tmp_path / "out-1.png").exists()
    assert "cond: computed 3, reused 3; reused steps [1, 2, 4]" in text
    assert "uncond: computed 3, reused 3" in text
    assert re.search(r"wall time: \d+\.\d+ s", text)


def test_cache_options_map_to_configs():
    parser = build_parser()
    args = parser.parse_args(["demo", "--rel-l1-thresh", "0.4", "--no-compute-last-step", "--coefficients", "1", "2", "3", "4", "5"])
    assert cache_config_from_args(args) == TeaCacheConfig(0.4, coefficients=(1, 2, 3, 4, 5), compute_last_step=False)
    args = parser.parse_args(["demo", "--cache-config", '{"method": "teacache", "rel_l1_thresh": 0.3}', "--max-cached-steps", "4"])
    assert cache_config_from_args(args) == TeaCacheConfig(0.3, max_cached_steps=4)
    args = parser.parse_args(["demo", "--cache", "none"])
    assert cache_config_from_args(args) is None


def test_a_renamed_option_still_works_and_warns():
    """``--mag-max-skip-steps`` (MagCache's old field name, ``renamed_fields``) sets ``mag_max_reused_steps``."""
    from cached_diffusers import MagCacheConfig

    parser = build_parser()
    assert "--mag-max-skip-steps" not in parser._subparsers._group_actions[0].choices["demo"].format_help()
    args = parser.parse_args(["demo", "--cache", "magcache", "--mag-max-skip-steps", "4"])
    with pytest.warns(FutureWarning, match="mag_max_reused_steps"):
        assert cache_config_from_args(args) == MagCacheConfig(mag_max_reused_steps=4)
    args = parser.parse_args(["demo", "--cache", "magcache", "--mag-max-skip-steps", "4", "--mag-max-reused-steps", "4"])
    with pytest.raises(ValueError, match="give mag_max_reused_steps only"):
        cache_config_from_args(args)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--cache", "warpcache"], r"unknown cache method 'warpcache'"),
        (["demo", "--rel-l1-thresh", "-1"], r"rel_l1_thresh must be a finite number > 0"),
        (["demo", "--cache", "none"], r"choose a --cache method other than 'none'"),
        (["demo", "--cache", "none", "--rel-l1-thresh", "0.2"], r"unknown field\(s\) rel_l1_thresh for cache method 'none'"),
        (["demo", "--repeats", "0"], r"--repeats must be >= 1, got 0"),
        (["demo", "--threads", "0"], r"--threads must be >= 1, got 0"),
    ],
)
def test_bad_cache_options_are_clear_errors(argv, message, capsys):
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_console_entry_point_is_installed():
    result = subprocess.run(
        [sys.executable, "-c", "from importlib.metadata import entry_points; "
         "print([e.value for e in entry_points(group='console_scripts') if e.name == 'cached-diffusers'])"],
        capture_output=True, text=True, check=True,
    )
    assert "cached_diffusers.tools.cli:main" in result.stdout


def test_generate_on_a_flux2_klein_directory(tmp_path, capsys):
    from cached_diffusers.tools.tiny import save_tiny_flux2_klein_pipeline

    model = save_tiny_flux2_klein_pipeline(tmp_path / "klein")
    out = tmp_path / "klein.png"
    args = ["generate", "--model", str(model), "--prompt", "a red cat", "--steps", "5", "--height", "64", "--width",
            "64", "--guidance-scale", "4.0", "--cache", "fbcache", "--residual-diff-threshold", "100",
            "--max-continuous-cached-steps", "1", "--output", str(out), "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert out.exists()
    assert "cond: computed 3, reused 2; reused steps [1, 3]" in text
    assert "uncond: computed 3, reused 2; reused steps [1, 3]" in text
    # an option the Klein pipeline does not take is an error, not silently dropped
    assert main(args + ["--true-cfg-scale", "4.0"]) == 2
    assert "--true-cfg-scale is not an argument of CachedFlux2KleinPipeline" in capsys.readouterr().err


def test_calibrate_writes_a_loadable_cache_config(tmp_path, capsys):
    import json

    from cached_diffusers import (
        CachedQwenImagePipeline,
        MagCacheConfig,
        SeaCacheConfig,
        TeaCacheConfig,
        cache_config_from_dict,
    )

    model = save_tiny_qwenimage_pipeline(tmp_path / "model")
    base = ["calibrate", "--model", str(model), "--steps", "6", "--height", "64", "--width", "64",
            "--negative-prompt", " ", "--prompt", "a red cat", "--prompt", "a blue bird", "--quiet"]
    assert main(base) == 0
    text = capsys.readouterr().out
    assert "calibrated teacache on 2 prompt(s), 6 steps, branches cond, uncond" in text
    # 2 prompts x 2 branches x (6 - 1) consecutive pairs
    assert re.search(r"TeaCache fit on 20 pairs, .* RMSE [0-9.e-]+, R\^2 -?[0-9.]+", text)
    config = cache_config_from_dict(json.loads((model / "cache_config.json").read_text()))
    assert isinstance(config, TeaCacheConfig) and len(config.coefficients) == 5 and config.rel_l1_thresh == 0.2
    provenance = json.loads((model / "cache_config.calibration.json").read_text())
    assert provenance["fit"]["num_pairs"] == 20 and provenance["prompts"] == ["a red cat", "a blue bird"]
    pipe = CachedQwenImagePipeline.from_pretrained(model, cache_config=config)  # the fitted config runs
    assert pipe.cache_config == config

    out = tmp_path / "mag.json"
    assert main(base + ["--method", "magcache", "--output", str(out)]) == 0
    config = cache_config_from_dict(json.loads(out.read_text()))
    assert isinstance(config, MagCacheConfig) and set(config.mag_ratios) == {"cond", "uncond"}  # branches differ
    assert all(len(r) == 6 and r[0] == 1.0 for r in config.mag_ratios.values())

    out = tmp_path / "sea.json"
    assert main(base + ["--method", "seacache", "--computed-steps", "4", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    config = cache_config_from_dict(json.loads(out.read_text()))
    assert isinstance(config, SeaCacheConfig) and config.threshold > 0
    assert re.search(r"SeaCache threshold [0-9.e-]+: [0-9, ]+ computed steps per branch \(target at least 4\)", text)
    replayed = json.loads((tmp_path / "sea.calibration.json").read_text())["fit"]["replayed_computed_steps"]
    assert len(replayed) == 2 and all(n >= 4 for run in replayed for n in run.values())
    assert main(base + ["--method", "seacache", "--output", str(out)]) == 2
    assert "--method seacache needs --computed-steps N" in capsys.readouterr().err
    assert main(base + ["--computed-steps", "4", "--output", str(out)]) == 2


def test_generate_uses_the_directorys_cache_config_unless_told_otherwise(tmp_path, capsys):
    import json

    model = save_tiny_qwenimage_pipeline(tmp_path / "model")
    (model / "cache_config.json").write_text(json.dumps({"method": "fbcache", "residual_diff_threshold": 100.0}))
    base = ["generate", "--model", str(model), "--prompt", "a red cat", "--steps", "4", "--height", "64", "--width",
            "64", "--output", str(tmp_path / "o.png"), "--quiet"]
    assert main(base) == 0
    assert "cache: fbcache, 4 steps" in capsys.readouterr().out
    assert main(base + ["--cache", "none"]) == 0
    assert "cache: none" in capsys.readouterr().out
    assert main(base + ["--rel-l1-thresh", "0.3"]) == 2
    assert "--rel-l1-thresh: choose the cache method with --cache METHOD" in capsys.readouterr().err


def test_a_method_given_on_the_command_line_keeps_the_directory_calibration():
    from cached_diffusers import MagCacheConfig
    from cached_diffusers.tools.cli import with_saved_calibration

    saved = TeaCacheConfig(rel_l1_thresh=0.2, coefficients=(1.0, 2.0, 3.0, 4.0, 5.0))
    assert with_saved_calibration(TeaCacheConfig(rel_l1_thresh=0.4), saved) == TeaCacheConfig(
        rel_l1_thresh=0.4, coefficients=(1.0, 2.0, 3.0, 4.0, 5.0)
    )
    given = TeaCacheConfig(rel_l1_thresh=0.4, coefficients=(0.0, 0.0, 0.0, 1.0, 0.0))
    assert with_saved_calibration(given, saved) == given  # the command line wins
    assert with_saved_calibration(TeaCacheConfig(calibrate=True), saved) == TeaCacheConfig(calibrate=True)
    assert with_saved_calibration(MagCacheConfig(mag_threshold=0.1), saved) == MagCacheConfig(mag_threshold=0.1)
    ratios = MagCacheConfig(mag_ratios=[1.0, 1.1, 0.9])
    assert with_saved_calibration(MagCacheConfig(mag_threshold=0.1), ratios).mag_ratios == ratios.mag_ratios
