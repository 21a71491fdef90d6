"""The command line's checks of what comes from elsewhere (files, folders, Hub ids, sizes, output paths) and of its
own options, before any work: one line naming the option, file or key and the valid range, exit 2 (issue 23)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from cached_diffusers.hub import CACHE_CONFIG_NAME, GENERATION_DEFAULTS_NAME
from cached_diffusers.stats import CacheStats
from cached_diffusers.tools import reference_model as ref
from cached_diffusers.tools.cli import build_parser, main
from cached_diffusers.validation import MAX_STEPS

MODEL = ref.REFERENCE_MODEL_DIR
COPIED = (GENERATION_DEFAULTS_NAME, CACHE_CONFIG_NAME, "cache_config.calibration.json")
"""Files of the reference model a test may change: copied, the weights linked."""


@pytest.fixture(autouse=True)
def torch_threads():
    """``--threads`` changes the test process's torch threads: put them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def model_copy(tmp_path, **defaults) -> str:
    """The reference model in ``tmp_path/model``: weights linked, its small files copied; ``defaults`` replace keys of
    its ``generation_defaults.json``."""
    model = tmp_path / "model"
    model.mkdir()
    for entry in os.listdir(MODEL):
        if entry in COPIED:
            shutil.copy(MODEL / entry, model / entry)
        else:
            os.symlink(MODEL / entry, model / entry)
    data = json.loads((model / GENERATION_DEFAULTS_NAME).read_text())
    (model / GENERATION_DEFAULTS_NAME).write_text(json.dumps({**data, **defaults}))
    return os.fspath(model)


def run(argv, capsys):
    """``(exit status, stdout, stderr)`` of ``main(argv)`` in this process."""
    code = main([os.fspath(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# -- files from elsewhere ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_inference_steps", 0, f"'num_inference_steps' must be an integer in [1, {MAX_STEPS}], got 0"),
        ("num_inference_steps", 10**12, f"'num_inference_steps' must be an integer in [1, {MAX_STEPS}]"),
        ("height", -32, "'height' must be an integer >= 1 (pixels), got -32"),
        ("width", 32.5, "'width' must be an integer >= 1 (pixels), got 32.5"),
        ("true_cfg_scale", "four", "'true_cfg_scale' must be a finite number, got 'four'"),
        ("negative_prompt", 3, "'negative_prompt' must be a string or a list of strings, got 3"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "calibrate"])
def test_generation_defaults_values_are_checked_naming_the_file_and_key(command, key, value, message, tmp_path, capsys):
    model = model_copy(tmp_path, **{key: value})
    argv = [command, "--model", model, "--prompt", "rocket", "--output", tmp_path / ("o.png" if command == "generate" else "c.json")]
    start = time.perf_counter()
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, os.path.join(model, GENERATION_DEFAULTS_NAME), message)
    assert time.perf_counter() - start < 10  # checked before any weight is loaded


def test_a_size_that_is_not_a_multiple_of_the_pipelines_is_refused(tmp_path, capsys):
    out = tmp_path / "o.png"
    argv = ["generate", "--model", MODEL, "--prompt", "rocket", "--quiet", "--output", out]
    code, _, err = run(argv + ["--height", "30"], capsys)  # the pipeline would draw 24 pixels high
    assert_one_line_error(code, err, "--height must be a multiple of 8 pixels for CachedQwenImagePipeline, got 30 "
                          "(nearest: 24 or 32)")
    model = model_copy(tmp_path, width=36)  # the same rule for the directory's defaults, naming the file
    code, _, err = run(["generate", "--model", model, "--prompt", "rocket", "--quiet", "--output", out], capsys)
    assert_one_line_error(code, err, f"{os.path.join(model, GENERATION_DEFAULTS_NAME)}: 'width' must be a multiple of 8")
    assert not out.exists()


def test_a_cache_config_file_that_does_not_exist_is_named(tmp_path, capsys):
    argv = ["generate", "--model", MODEL, "--prompt", "rocket", "--output", tmp_path / "o.png"]
    code, _, err = run(argv + ["--cache-config", "nosuchfile.json"], capsys)
    assert_one_line_error(code, err, "--cache-config: no such file 'nosuchfile.json'")
    code, _, err = run(argv + ["--cache-config", "{not json"], capsys)  # inline JSON that does not parse: said so
    assert_one_line_error(code, err, "--cache-config is neither a JSON object nor a readable JSON file")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux), where no folder can be created")
def test_an_output_folder_that_cannot_be_created_is_named(tmp_path, capsys):
    code, _, err = run(["generate", "--model", MODEL, "--prompt", "rocket", "--output", "/proc/nope/out.png"], capsys)
    assert_one_line_error(code, err, "the folder '/proc/nope' does not exist and cannot be created")


def test_a_folder_that_is_not_a_model_is_refused_before_loading(capsys):
    start = time.perf_counter()
    code, _, err = run(["generate", "--model", MODEL.parent, "--prompt", "rocket"], capsys)
    assert_one_line_error(code, err, f"--model {os.fspath(MODEL.parent)!r} is not a diffusers model directory: it has "
                          "no model_index.json")
    code, _, err = run(["calibrate", "--model", MODEL / GENERATION_DEFAULTS_NAME, "--output", "x.json"], capsys)
    assert_one_line_error(code, err, "is a file; give a diffusers model directory or a Hub id")
    assert time.perf_counter() - start < 10


@pytest.fixture
def no_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", os.fspath(tmp_path / "hub-cache"))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return constants


def test_a_hub_id_with_the_hub_offline_is_refused_in_seconds(no_hub_cache, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(no_hub_cache, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    code, _, err = run(["generate", "--model", "Qwen/Qwen-Image", "--prompt", "x", "--output", tmp_path / "o.png"], capsys)
    assert_one_line_error(code, err, "--model 'Qwen/Qwen-Image' is not a local directory", "HF_HUB_OFFLINE is set")
    assert time.perf_counter() - start < 10


def test_a_hub_id_with_the_hub_out_of_reach_is_refused_in_seconds(no_hub_cache, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(no_hub_cache, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(no_hub_cache, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    start = time.perf_counter()
    code, _, err = run(["generate", "--model", "Qwen/Qwen-Image", "--prompt", "x", "--output", tmp_path / "o.png"], capsys)
    assert_one_line_error(code, err, "is not a local directory", "the Hub (http://127.0.0.1:9) cannot be reached")
    assert time.perf_counter() - start < 10


# -- calibrate's outputs -------------------------------------------------------------------------------------------
def test_calibrate_never_writes_into_the_shipped_models(capsys):
    before = (MODEL / CACHE_CONFIG_NAME).read_bytes()
    for extra in ([], ["--overwrite"]):
        code, _, err = run(["calibrate", "--model", MODEL, "--steps", "3", *extra], capsys)
        assert_one_line_error(code, err, "is inside the installed package's shipped models", "give --output a path")
    assert (MODEL / CACHE_CONFIG_NAME).read_bytes() == before
    assert not (MODEL / (CACHE_CONFIG_NAME + ".bak")).exists()


def test_calibrate_overwrites_only_when_told_and_keeps_a_backup(tmp_path, capsys):
    model = model_copy(tmp_path)
    config = os.path.join(model, CACHE_CONFIG_NAME)
    before = open(config, "rb").read()
    argv = ["calibrate", "--model", model, "--steps", "4", "--prompt", "rocket", "--threads", "1", "--quiet"]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, f"--output {config!r} exists: pass --overwrite to replace it (the old file is "
                          f"kept as {config}.bak)")
    assert open(config, "rb").read() == before
    code, out, err = run(argv + ["--overwrite"], capsys)
    assert code == 0, err
    assert open(config + ".bak", "rb").read() == before and open(config, "rb").read() != before
    assert json.loads(open(config).read())["method"] == "teacache"
    assert os.path.exists(os.path.join(model, "cache_config.calibration.json.bak"))


def test_calibrate_checks_the_budget_before_importing_torch():
    code = (
        "import sys\n"
        "from cached_diffusers.tools.cli import main\n"
        f"status = main(['calibrate', '--model', {os.fspath(MODEL)!r}, '--method', 'lemica', '--budget', '25', '17', "
        "'10', '--output', 'unused.json'])\n"
        "print(status, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert f"--budget must be in [2, 20] (num_inference_steps, from {os.path.join(MODEL, GENERATION_DEFAULTS_NAME)}), " \
           "got 25" in done.stderr


def test_calibrate_plans_for_the_steps_that_run_at_a_strength(tmp_path, capsys):
    """At strength 0.5 of 10 steps, steps 5..9 run: the plan is step 0 (never run), step 5 and B - 1 later steps."""
    import numpy as np

    from cached_diffusers import LeMiCaConfig, cache_config_from_dict
    from cached_diffusers.calibration_schedules import save_error_matrix

    steps = 10
    span = np.subtract.outer(np.arange(steps), np.arange(steps)).T.astype(float)  # errors[i, j] = j - i
    matrix = tmp_path / "m.json"
    save_error_matrix(matrix, np.where(span > 0, span, np.inf), {"model": "synthetic"})
    out = tmp_path / "lemica.json"
    argv = ["calibrate", "--model", MODEL, "--method", "lemica", "--budget", "3", "--strength", "0.5",
            "--error-matrix", matrix, "--output", out]
    code, text, err = run(argv, capsys)
    assert code == 0, err
    config = cache_config_from_dict(json.loads(out.read_text()))
    assert isinstance(config, LeMiCaConfig) and config.num_inference_steps == steps
    assert config.computed_steps[:2] == (0, 5) and len([s for s in config.computed_steps if s >= 5]) == 3
    record = json.loads((tmp_path / "lemica.calibration.json").read_text())
    assert record["first_executed_step"] == 5 and record["strength"] == 0.5
    code, _, err = run(argv[:-2] + ["--budget", "6", "--output", tmp_path / "b.json"], capsys)
    assert_one_line_error(code, err, "--budget must be in [2, 5] (the steps run at --strength 0.5 of 10")


# -- options -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "calibrate", "bench", "demo"])
def test_every_command_takes_threads(command, tmp_path, capsys):
    argv = [command, "--threads", "0"] + (["--model", MODEL] if command in ("generate", "calibrate") else [])
    argv += ["--prompt", "rocket"] if command == "generate" else []
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "--threads must be >= 1, got 0")


def test_generate_runs_on_the_threads_it_is_given(tmp_path, capsys):
    torch.set_num_threads(2)
    argv = ["generate", "--model", MODEL, "--prompt", "rocket", "--steps", "2", "--threads", "1", "--quiet",
            "--output", tmp_path / "o.png"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert torch.get_num_threads() == 1


def test_calibrate_help_names_every_method(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split()).lower()
    line = text[text.index("calibrate fit") :].split(" bench ")[0]  # the calibrate command's help line
    parser = build_parser()
    calibrate = next(a for a in parser._subparsers._group_actions[0].choices["calibrate"]._actions if a.dest == "method")
    missing = [m for m in calibrate.choices if m not in line.replace(" ", "")]
    assert not missing, f"calibrate's help line does not name {missing}: {line!r}"


def test_a_run_without_caching_says_what_ran(tmp_path, capsys):
    assert CacheStats("none").summary() == "cache: none (caching off; no denoising step recorded yet)"
    argv = ["generate", "--model", MODEL, "--prompt", "rocket", "--steps", "3", "--cache", "none", "--threads", "1",
            "--quiet", "--output", tmp_path / "o.png"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "cache: none (caching off): 3 of 3 steps run, every step computed" in out and "None" not in out


# -- the process ---------------------------------------------------------------------------------------------------
@pytest.mark.slow  # over 4 s
def test_printing_never_fails_a_run_that_succeeded(tmp_path):
    """A stdout that cannot encode the output path (``PYTHONIOENCODING=ascii``) still exits 0 after writing."""
    argv = ["-m", "cached_diffusers", "generate", "--model", os.fspath(MODEL), "--prompt", "rocket", "--steps", "2",
            "--threads", "1", "--quiet", "--output", "bild ü.png"]
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bild ü.png").exists()
    assert "wrote bild \\xfc.png" in done.stdout


def test_a_plan_for_a_strength_computes_exactly_its_budget_there():
    """Run on the img2img pipeline at strength 0.6 (steps 4..9 of 10 run), the plan computes exactly ``B`` steps per
    branch; the plan for the full schedule computes another number."""
    import numpy as np

    from cached_diffusers import LeMiCaConfig
    from cached_diffusers.tools.cli import _plan_for_strength, first_executed_step

    sys.path.insert(0, os.path.dirname(__file__))
    from families import CASES_BY_NAME, small_working_sizes

    steps, budget, strength = 10, 3, 0.6
    first = first_executed_step(steps, strength)
    assert first == 4
    errors = np.subtract.outer(np.arange(steps), np.arange(steps)).T.astype(float) ** 2  # longer edges cost more
    errors = np.where(errors > 0, errors, np.inf)
    case = CASES_BY_NAME["qwen-img2img"]
    pipe = case.cached(**case.components())
    computed = {}
    for name, first_step in (("strength", first), ("full", 0)):
        plan = _plan_for_strength(errors, [budget], first_step)[budget]
        pipe.cache_config = LeMiCaConfig(computed_steps=plan, num_inference_steps=steps)
        with small_working_sizes():
            pipe(**case.inputs(steps=steps, strength=strength))
        assert pipe.cache_stats.first_step == first
        computed[name] = {b.branch: b.num_computed for b in pipe.cache_stats.branches.values()}
    assert computed["strength"] and set(computed["strength"].values()) == {budget}
    assert set(computed["full"].values()) != {budget}
