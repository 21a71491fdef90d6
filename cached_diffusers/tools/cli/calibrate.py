"""``cached-diffusers calibrate``: fit TeaCache coefficients or MagCache ratios, find a SeaCache threshold, or plan
LeMiCa / MeanCache schedules on uncached runs, and save the cache config(s)."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

from ..files import keep_backup, refuse_existing
from .common import (
    SAMPLING_OPTIONS, _call_value, _check_model, _check_sampling_args, _checked_generation_defaults,
    _device_and_dtype, _load_pipeline, _sampling_kwargs, check_output_file,
)
from .options import _check_threads, _set_threads


def _shipped_models_folder() -> str:
    """The installed package's folder of shipped models (``cached_diffusers/assets``), resolved."""
    import cached_diffusers

    return os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(cached_diffusers.__file__)), "assets"))


def _check_calibration_output(path: str, overwrite: bool) -> None:
    """A file ``calibrate`` is about to write: never inside the shipped models, never an existing file unless
    ``--overwrite`` (which keeps the old one as ``.bak``, see :func:`_write_json`).

    Raises:
        ValueError: naming ``--output`` and the path.
    """
    shipped = _shipped_models_folder()
    if os.path.commonpath([os.path.realpath(path), shipped]) == shipped:
        raise ValueError(
            f"--output {path!r} is inside the installed package's shipped models ({shipped}), which calibrate never "
            "changes: give --output a path elsewhere"
        )
    check_output_file("--output", path)
    refuse_existing(path, overwrite, "--output")


def _write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON, after :func:`~cached_diffusers.tools.files.keep_backup`."""
    keep_backup(path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _calibration_methods():
    """The registered methods ``calibrate`` knows (those with a ``calibration``), in listing order."""
    from ...registry import cache_methods

    return [m for m in cache_methods(enabled=True) if m.calibration is not None]


def _calibrated_by(kind: str) -> list[str]:
    """Names of the methods calibrated by ``kind`` (``"runs"`` or ``"schedule"``)."""
    return [m.name for m in _calibration_methods() if m.calibration == kind]


def _default_output(args: argparse.Namespace) -> str:
    return args.output or (
        os.path.join(args.model, "cache_config.json") if os.path.isdir(args.model) else "cache_config.json"
    )


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ...registry import cache_method

    method = args.method
    cls = cache_method(method).config_class
    _check_threads(args)
    if cls.calibration == "schedule":
        return _calibrate_schedule(args)
    given = [flag for flag, value in (("--budget", args.budget), ("--strength", args.strength),
                                      ("--error-matrix", args.error_matrix)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: for --method {' or '.join(_calibrated_by('schedule'))} only, not {method}")
    if (cls.calibration_target is not None) != (args.computed_steps is not None):
        targets = " or ".join(m.name for m in _calibration_methods() if m.config_class.calibration_target)
        raise ValueError(
            f"--method {targets} needs --computed-steps N (the target computed steps per branch), and only it takes it"
        )
    _check_sampling_args(args)
    output = _default_output(args)
    provenance = os.path.splitext(output)[0] + ".calibration.json"
    _check_calibration_output(output, args.overwrite)
    _check_calibration_output(provenance, args.overwrite)
    _check_model(args.model)
    _checked_generation_defaults(args.model)
    from ..tiny import DEFAULT_PROMPTS  # torch, after every check

    _set_threads(args)
    _device_and_dtype(args.device, args.dtype)
    calibration = cls(calibrate=True)
    pipe = _load_pipeline(args, calibration)
    pipe.cache_config = calibration  # whatever the directory held: calibration never reuses
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    runs = []
    for i, prompt in enumerate(prompts):
        kwargs = _sampling_kwargs(pipe, args, args.seed + i)
        pipe(prompt=prompt, **kwargs)
        runs.append(pipe.cache_stats)
    branches = sorted({b for run in runs for b in run.branches})
    settings = {name: _call_value(pipe, kwargs, name) for name in SAMPLING_OPTIONS.values()}
    print(
        f"calibrated {method} on {len(prompts)} prompt(s), {settings['num_inference_steps']} steps, "
        f"branches {', '.join(branches)}"
    )
    config, quality, lines = cls.calibrated(runs, vars(args))
    for line in lines:
        print(line)
    _write_json(output, config.to_dict())
    _write_json(provenance, {
        "model": args.model, "method": method, "prompts": prompts, **settings, "seed": args.seed,
        "fit": quality, "date": time.strftime("%Y-%m-%d"), "calibrated_with": "cached-diffusers calibrate",
    })
    print(f"wrote {output} (and its provenance, {provenance})")
    return 0


def _schedule_outputs(args: argparse.Namespace, budgets: list[int]) -> tuple[dict[int, str], str, str]:
    """``({budget: cache config path}, error matrix path, provenance path)`` of a planned-schedule calibration."""
    output = _default_output(args)
    stem, ext = os.path.splitext(output)
    configs = {b: output for b in budgets} if len(budgets) == 1 else {b: f"{stem}-b{b}{ext or '.json'}" for b in budgets}
    return configs, f"{stem}.error_matrix.json", f"{stem}.calibration.json"


def first_executed_step(num_steps: int, strength: float | None) -> int:
    """The first step that runs at ``strength`` (``None``: 1) of an ``num_steps`` schedule, as diffusers' img2img and
    inpaint pipelines compute it (``get_timesteps``: ``t_start = int(max(N - min(N * strength, N), 0))``)."""
    if strength is None:
        return 0
    return int(max(num_steps - min(num_steps * strength, num_steps), 0))


def _check_budgets(budgets: list[int], num_steps: int, source: str, strength: float | None = None) -> None:
    """``--budget`` values against the steps that run (``ValueError`` naming the step count and where it came from)."""
    executed = num_steps - first_executed_step(num_steps, strength)
    where = f"{source}" if strength is None else f"the steps run at --strength {strength:g} of {num_steps}, {source}"
    if executed < 2:
        raise ValueError(f"--strength {strength:g} runs {executed} of {num_steps} steps: a schedule needs at least 2")
    for b in budgets:
        if not 2 <= b <= executed:
            raise ValueError(f"--budget must be in [2, {executed}] ({where}), got {b}")


def _plan_for_strength(errors, budgets: list[int], first: int) -> dict[int, list[int]]:
    """``{budget: computed steps}``: the lexicographic-minimax plan over the executed steps ``first .. N-1`` (the
    error matrix's lower right block), with step 0 in front when ``first > 0`` (never executed; configs start at 0)."""
    from ...schedules import solve_budgets

    solved = solve_budgets(errors[first:, first:], budgets)
    return {b: ([0] if first else []) + [first + s for s in steps] for b, steps in solved.items()}


def _calibrate_schedule(args: argparse.Namespace) -> int:
    """``calibrate --method lemica|meancache``: measure (or load) the error matrix, solve every budget, write one cache
    config per budget, the matrix and the provenance (see :mod:`cached_diffusers.calibration_schedules`)."""
    from ...calibration_schedules import load_error_matrix, save_error_matrix
    from ...methods.lemica import measure_edge_errors
    from ...registry import cache_method
    from ...schedules import path_costs

    method = args.method
    cls = cache_method(method).config_class
    needs_model = cls.calibration_needs_model
    if args.computed_steps is not None:
        targets = " or ".join(m.name for m in _calibration_methods() if m.config_class.calibration_target)
        raise ValueError(f"--computed-steps: for --method {targets} only, not {method} (its budget is --budget)")
    budgets = sorted(set(args.budget or ()), reverse=True)
    if not budgets:
        raise ValueError(f"--method {method} needs --budget B [B ...]: the computed steps per schedule (e.g. 25 17 10)")
    if args.strength is not None and not (math.isfinite(args.strength) and 0 < args.strength <= 1):
        raise ValueError(f"--strength must be a number in (0, 1], got {args.strength:g}")
    _check_sampling_args(args)
    configs, matrix_path, provenance_path = _schedule_outputs(args, budgets)
    for path in (*configs.values(), provenance_path, *(() if args.error_matrix else (matrix_path,))):
        _check_calibration_output(path, args.overwrite)
    if args.error_matrix is None or needs_model:  # these load the model
        _check_model(args.model)
    if args.error_matrix is None:
        defaults, source = _checked_generation_defaults(args.model)
        known = (args.steps, "--steps") if args.steps is not None else (defaults.get("num_inference_steps"), source)
        if known[0] is not None:  # the budgets, before torch is imported and the model loaded
            _check_budgets(budgets, known[0], f"num_inference_steps, from {known[1]}", args.strength)
    os.makedirs(os.path.dirname(os.path.abspath(provenance_path)), exist_ok=True)
    loaded = None
    if args.error_matrix is not None:
        errors, loaded = load_error_matrix(args.error_matrix)
        num_steps = errors.shape[0]
        if args.steps is not None and args.steps != num_steps:
            raise ValueError(f"--steps {args.steps} differs from the {num_steps} steps of --error-matrix {args.error_matrix}")
        _check_budgets(budgets, num_steps, f"num_inference_steps, from --error-matrix {args.error_matrix}", args.strength)
        first = first_executed_step(num_steps, args.strength)
        solved = _plan_for_strength(errors, budgets, first)  # fails before any model is loaded
    say = (lambda line: None) if args.quiet else print
    pipe = None
    if loaded is None or needs_model:  # runs the model (torch, after every check)
        from ..tiny import DEFAULT_PROMPTS

        prompts = args.prompt or list(DEFAULT_PROMPTS)
        _set_threads(args)
        _device_and_dtype(args.device, args.dtype)
        pipe = _load_pipeline(args, None)
        kwargs = _sampling_kwargs(pipe, args, args.seed)
        kwargs.pop("generator")
        if loaded is None:
            num_steps = int(_call_value(pipe, kwargs, "num_inference_steps"))
        kwargs.pop("num_inference_steps", None)
        _check_budgets(budgets, num_steps, "num_inference_steps", args.strength)
        settings = {name: _call_value(pipe, {**kwargs, "num_inference_steps": num_steps}, name)
                    for name in SAMPLING_OPTIONS.values()}
    if loaded is None:
        errors = measure_edge_errors(
            pipe, prompts, kwargs, num_steps, max_span=args.max_span, seed=args.seed, progress=say
        )
        provenance = {
            "model": args.model, "prompts": prompts, **settings, "seed": args.seed, "max_span": args.max_span,
            "metric": "relative L1 of the final latents against the uncached run, mean over prompts",
            "date": time.strftime("%Y-%m-%d"),
        }
        keep_backup(matrix_path)
        save_error_matrix(matrix_path, errors, provenance)
        first = first_executed_step(num_steps, args.strength)
        solved = _plan_for_strength(errors, budgets, first)
    else:
        provenance = loaded
        matrix_path = args.error_matrix
    record = {"model": args.model, "method": method, "error_matrix": matrix_path, "budgets": {},
              "strength": args.strength, "first_executed_step": first,
              "date": time.strftime("%Y-%m-%d"), "calibrated_with": "cached-diffusers calibrate",
              "matrix_provenance": {k: v for k, v in provenance.items() if k != "schema"}}
    for b in budgets:
        steps = solved[b]
        executed = [s for s in steps if s >= first]  # the plan's edges that run
        entry = {"computed_steps": steps, "sorted_edge_errors": list(path_costs(errors, executed))}
        config, extra = cls.planned(
            steps, num_steps, pipe=pipe, prompts=prompts if pipe is not None else None,
            kwargs=kwargs if pipe is not None else None, candidates=tuple(args.windows), seed=args.seed, progress=say,
        )
        entry.update(extra)
        _write_json(configs[b], config.to_dict())
        record["budgets"][str(b)] = {"cache_config": configs[b], **entry}
        print(f"{method} B={b}: computed steps {steps}; largest edge error {entry['sorted_edge_errors'][0]:.4g}")
    _write_json(provenance_path, record)
    print(f"wrote {', '.join(configs[b] for b in budgets)}, {matrix_path} and {provenance_path}")
    return 0
