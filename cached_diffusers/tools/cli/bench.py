"""``cached-diffusers bench``: sweep cache methods against uncached (or compare them at equal budgets)."""

from __future__ import annotations

import argparse
import os
import sys

from .calibrate import _calibration_methods
from .common import (
    _call_value, _check_model, _check_sampling_args, _device_and_dtype, _generation_defaults, _pipeline_class_for,
    _quiet_loading, _sampling_kwargs, check_output_dir, check_output_file,
)
from .options import _json_argument, _set_threads


EMBEDDED_MODEL = "reference model (cached_diffusers/assets/reference-qwenimage-emoji: Qwen-Image classes trained on emoji)"


def _load_config_file(flag: str, path: str):
    """A cache config from a JSON file; raises ``ValueError`` naming ``flag`` and the file."""
    from ...configs import cache_config_from_dict

    if not os.path.isfile(path):
        raise ValueError(f"{flag}: no such file {path!r}")
    try:
        return cache_config_from_dict(_json_argument(flag, path, "a JSON object"))
    except ValueError as error:
        raise ValueError(f"{flag} {path}: {error}") from None


def _bench_sweep(text: str) -> list:
    """Configs from ``--sweep``: a JSON list of cache config dicts, inline or in a file."""
    from ...configs import cache_config_from_dict

    data = _json_argument("--sweep", text, "a JSON list")
    if not isinstance(data, list) or not data:
        raise ValueError("--sweep must be a non-empty JSON list of cache configs ({\"method\": ..., ...})")
    return [cache_config_from_dict(item) for item in data]


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import check_methods, default_sweep, plot_pareto, run_benchmark, write_json, write_markdown
    from ..imaging import require_extra
    from ..reference_model import DEMO_PROMPTS

    require_extra("skimage.metrics", "scikit-image"), require_extra("matplotlib", "matplotlib")  # before any work
    _check_sampling_args(args)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output-dir {args.output_dir!r} is a file, not a folder")
    check_output_dir("--output-dir", args.output_dir)
    for name in ("results.json", "results.md", "pareto.png"):
        check_output_file("--output-dir", os.path.join(args.output_dir, name))
    if args.equal_budget is None and args.planned:
        raise ValueError("--planned is for --equal-budget: the LeMiCa / MeanCache schedules to compare")
    if args.equal_budget is not None:
        if args.sweep:
            raise ValueError("--sweep and --equal-budget exclude each other")
        for name in EQUAL_BUDGET_FILES:
            check_output_file("--output-dir", os.path.join(args.output_dir, name))
        planned = [_load_config_file("--planned", path) for path in args.planned or ()]
        for path, config in zip(args.planned or (), planned):
            if config is None or config.calibration != "schedule":
                names = " or ".join(
                    m.config_class.__name__.removesuffix("Config") for m in _calibration_methods() if m.calibration == "schedule"
                )
                raise ValueError(f"--planned {path}: not a {names} config")
    if args.sweep and args.methods:
        raise ValueError("--sweep and --methods exclude each other: --sweep lists the configs to run")
    if args.sweep and args.calibrated:
        raise ValueError("--sweep and --calibrated exclude each other: --calibrated feeds the default sweep")
    configs = _bench_sweep(args.sweep) if args.sweep else None
    methods = check_methods(args.methods)  # before loading anything
    if args.equal_budget is not None:
        from ..equal_budget import budget_methods

        known = budget_methods()
        methods = tuple(m for m in (methods if args.methods else known))
        for m in methods:
            if m not in known:
                raise ValueError(f"--methods {m}: not tunable to a budget; valid with --equal-budget: {', '.join(known)}")
    calibrated = [_load_config_file("--calibrated", path) for path in args.calibrated or ()]
    _set_threads(args)
    device, dtype = _device_and_dtype(args.device, args.dtype)
    args = argparse.Namespace(**vars(args))
    if args.quiet:
        _quiet_loading()
    if args.model is None:
        from ..reference_model import REFERENCE_MODEL_DIR, load_reference_pipeline

        pipe = load_reference_pipeline().to(device)
        if pipe.transformer.dtype != dtype:
            pipe = pipe.to(dtype=dtype)
        model = EMBEDDED_MODEL
        args.model = os.fspath(REFERENCE_MODEL_DIR)  # its generation_defaults.json: 32 x 32, true CFG 4, 20 steps
    else:
        # No cache_config argument: a cache_config.json saved with the model (e.g. by `calibrate`) is loaded, and
        # the sweep takes its TeaCache coefficients / MagCache ratios.
        _check_model(args.model)
        pipeline_class = _pipeline_class_for(args.model)
        _generation_defaults(pipeline_class, args.model)  # a bad file fails before any weight is loaded
        pipe = pipeline_class.from_pretrained(args.model, dtype=dtype).to(device)
        model = args.model
    pipe.set_progress_bar_config(disable=True)
    kwargs = _sampling_kwargs(pipe, args, args.seed)
    kwargs.pop("generator")  # run_benchmark seeds each prompt itself
    if configs is None:
        steps = _call_value(pipe, kwargs, "num_inference_steps")
        configs = default_sweep(pipe, methods=methods, num_steps=steps, calibrated=calibrated)
    prompts = args.prompt or list(DEMO_PROMPTS)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    if args.equal_budget is not None:
        return _bench_equal_budget(args, pipe, kwargs, prompts, model, methods, planned, calibrated, progress)
    result = run_benchmark(
        pipe, configs, prompts, kwargs, seed=args.seed, repeats=args.repeats, model=model, progress=progress
    )
    paths = [os.path.join(args.output_dir, name) for name in ("results.json", "results.md", "pareto.png")]
    write_json(result, paths[0])
    text = write_markdown(result, paths[1])
    plot_pareto(result, paths[2])
    print(text)
    print(f"wrote {', '.join(paths)}")
    return 0


EQUAL_BUDGET_FILES = ("equal_budget.json", "equal_budget.md", "equal_budget.csv", "equal_budget.png")


def _bench_equal_budget(args, pipe, kwargs, prompts, model, methods, planned, calibrated, progress) -> int:
    """``bench --equal-budget``: see :mod:`cached_diffusers.tools.equal_budget`."""
    from ..equal_budget import format_markdown, plot_equal_budget, run_equal_budget, write_csv, write_json

    kwargs = {**kwargs, "num_inference_steps": int(_call_value(pipe, kwargs, "num_inference_steps"))}
    result = run_equal_budget(
        pipe, prompts, kwargs, args.equal_budget, planned=planned, methods=methods, calibrated=calibrated,
        seed=args.seed, iterations=args.iterations, model=model, progress=progress,
    )
    paths = [os.path.join(args.output_dir, name) for name in EQUAL_BUDGET_FILES]
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(result, paths[0])
    text = format_markdown(result)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(text)
    write_csv(result, paths[2])
    plot_equal_budget(result, paths[3])
    print(text)
    print(f"wrote {', '.join(paths)}")
    return 0
