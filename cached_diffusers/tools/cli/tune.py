"""``cached-diffusers tune``: the fastest cache config that keeps a PSNR target, checked on held-out prompts."""

from __future__ import annotations

import argparse
import math
import os
import sys

from .bench import _load_config_file
from .calibrate import _check_calibration_output
from .common import (
    _call_value, _check_model, _check_sampling_args, _checked_generation_defaults, _device_and_dtype,
    _load_pipeline, _sampling_kwargs,
)
from .options import UNSET, _check_threads, _set_threads


def cmd_tune(args: argparse.Namespace) -> int:
    """``tune``: the fastest cache config whose worst tuning prompt keeps PSNR >= --target-psnr (see
    :mod:`cached_diffusers.tools.tune`); writes it with its record, then checks it on held-out prompts."""
    from ..imaging import require_extra

    require_extra("skimage.metrics", "scikit-image"), require_extra("matplotlib", "matplotlib")  # before any work
    _check_threads(args)
    _check_sampling_args(args)
    if not math.isfinite(args.target_psnr):
        raise ValueError(f"--target-psnr must be a finite number of dB, got {args.target_psnr}")
    if args.target_ssim is not None and not 0 <= args.target_ssim <= 1:
        raise ValueError(f"--target-ssim must be in [0, 1], got {args.target_ssim}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.margin != "auto":
        try:
            args.margin = float(args.margin)
        except ValueError:
            raise ValueError(f"--margin must be 'auto' or a number of dB >= 0, got {args.margin!r}") from None
        if not (math.isfinite(args.margin) and args.margin >= 0):
            raise ValueError(f"--margin must be 'auto' or a number of dB >= 0, got {args.margin}")
    if args.measure_latency is not None and args.measure_latency < 1:
        raise ValueError(f"--measure-latency must be >= 1 (timed rounds), got {args.measure_latency}")
    if args.prompts and args.held_out_prompts:
        overlap = sorted(set(args.prompts) & set(args.held_out_prompts))
        if overlap:
            raise ValueError(f"--held-out-prompts must be disjoint from --prompts; both have {overlap}")
    if args.methods:
        from ...configs import available_cache_methods

        registered = available_cache_methods()
        for m in args.methods:
            if m not in registered:
                raise ValueError(f"--methods {m}: not a registered cache method ({', '.join(registered)})")
    output = args.output or (args.model if os.path.isdir(args.model) else "tuned")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output!r} is a file, not a folder")
    from ..tune import OUTPUT_FILES

    for name in OUTPUT_FILES[:2]:  # never overwrite without --overwrite; never into the shipped models
        _check_calibration_output(os.path.join(output, name), args.overwrite)
    calibrated = [_load_config_file("--calibrated", path) for path in args.calibrated or ()]
    if args.error_matrix is not None and not os.path.isfile(args.error_matrix):
        raise ValueError(f"--error-matrix: no such file {args.error_matrix!r}")
    _check_model(args.model)
    _checked_generation_defaults(args.model)
    _set_threads(args)
    _device_and_dtype(args.device, args.dtype)
    from ..tune import tune, write_outputs

    args = argparse.Namespace(**vars(args))
    pipe = _load_pipeline(args, UNSET)  # a cache_config.json beside the model supplies calibrated data
    pipe.set_progress_bar_config(disable=True)
    kwargs = _sampling_kwargs(pipe, args, 0)
    kwargs.pop("generator")
    steps = int(_call_value(pipe, kwargs, "num_inference_steps"))
    kwargs["num_inference_steps"] = steps
    progress = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = tune(
        pipe, args.target_psnr, prompts=args.prompts, held_out_prompts=args.held_out_prompts, seeds=args.seeds,
        target_ssim=args.target_ssim, methods=args.methods, call_kwargs=kwargs, calibrated=calibrated,
        error_matrix=args.error_matrix, max_span=args.max_span, iterations=args.iterations,
        measure_latency=args.measure_latency or 0, compare_defaults=args.compare_defaults, margin=args.margin,
        model=args.model,
        progress=progress,
    )
    paths = write_outputs(result, output, overwrite=args.overwrite)
    for item in result.skipped:
        print(f"skipped {item['method']}: {item['reason']}")
    print(f"wrote {', '.join(paths)}")
    print(result.summary())
    margin = result.held_out["worst_psnr"] - args.target_psnr
    if result.held:
        print(f"target {args.target_psnr:g} dB held on every held-out prompt (worst margin {margin:+.2f} dB)")
    else:
        print(
            f"WARNING: target {args.target_psnr:g} dB did NOT hold on every held-out prompt (worst "
            f"{result.held_out['worst_psnr']:.2f} dB, margin {margin:+.2f} dB); the config was written anyway"
        )
    return 0
