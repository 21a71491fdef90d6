#!/usr/bin/env python
"""Tune a full-size checkpoint to several PSNR targets on a GPU and record the results (issue 21).

For each target, runs ``cached-diffusers tune --model MODEL --target-psnr T --steps N --measure-latency R`` into
``OUTPUT_DIR/psnr<T>/`` (``cache_config.json``, ``cache_config.tuning.json``, ``tuning_pareto.png``, the log), then
writes ``OUTPUT_DIR/gpu_tune.json``: per target, the chosen method and setting, computed steps per branch, ideal and
measured speedup, held-out worst and mean PSNR, generations run and seconds taken, with the device and versions.

    python scripts/gpu_tune.py --model Qwen/Qwen-Image --targets 40 35 30 --steps 50 --output-dir gpu-tune

No number from this script is claimed anywhere before it has run on the hardware it names.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys

from cached_diffusers.tools.files import write_json
from cached_diffusers.tools.timing import Stopwatch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="diffusers directory or Hub id of a full-size checkpoint")
    parser.add_argument("--targets", type=float, nargs="+", default=[40.0, 35.0, 30.0], help="PSNR targets in dB")
    parser.add_argument("--steps", type=int, default=50, help="num_inference_steps (default: 50)")
    parser.add_argument("--prompts", nargs="+", default=None, help="tuning prompts (default: tune's 8 built-in captions)")
    parser.add_argument("--held-out-prompts", nargs="+", default=None, help="held-out prompts (default: tune's)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--calibrated", action="append", default=None, metavar="FILE")
    parser.add_argument("--error-matrix", default=None, metavar="FILE",
                        help="LeMiCa's error matrix at --steps (default: tune measures one, N * 5 runs)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU")
    parser.add_argument("--output-dir", default="gpu-tune")
    return parser.parse_args(argv)


def _label(target: float) -> str:
    return f"{target:g}"


def tune_argv(args: argparse.Namespace, target: float) -> list[str]:
    """The ``cached-diffusers`` command line of one target."""
    argv = ["tune", "--model", args.model, "--target-psnr", _label(target), "--steps", str(args.steps),
            "--seeds", str(args.seeds), "--measure-latency", str(args.latency_repeats), "--compare-defaults",
            "--output", os.path.join(args.output_dir, f"psnr{_label(target)}"), "--overwrite"]
    for flag, value in (("--prompts", args.prompts), ("--held-out-prompts", args.held_out_prompts),
                        ("--methods", args.methods)):
        if value:
            argv += [flag, *value]
    for path in args.calibrated or ():
        argv += ["--calibrated", path]
    for flag, value in (("--error-matrix", args.error_matrix), ("--negative-prompt", args.negative_prompt),
                        ("--dtype", args.dtype)):
        if value is not None:
            argv += [flag, value]
    return argv


def main(argv=None) -> int:
    args = parse_args(argv)
    from cached_diffusers.tools.cli import main as cli

    os.makedirs(args.output_dir, exist_ok=True)
    runs = []
    for target in args.targets:
        command = tune_argv(args, target)
        print("cached-diffusers " + " ".join(command), flush=True)
        out = io.StringIO()
        with Stopwatch() as watch, contextlib.redirect_stdout(out):
            code = cli(command)
        text = out.getvalue()
        print(text, flush=True)
        folder = os.path.join(args.output_dir, f"psnr{_label(target)}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "tune.log"), "w", encoding="utf-8") as f:
            f.write(text)
        entry = {"target_psnr": target, "exit_status": code, "seconds": round(watch.seconds, 1)}
        record_path = os.path.join(folder, "cache_config.tuning.json")
        if code == 0 and os.path.exists(record_path):
            with open(record_path, encoding="utf-8") as f:
                record = json.load(f)
            chosen = record["chosen"]
            entry.update(
                method=chosen["method"], setting=chosen["setting"], computed_steps=chosen["computed_steps"],
                ideal_speedup=chosen["ideal_speedup"], measured_speedup=(record.get("latency") or {}).get("speedup"),
                held_out_worst_psnr=record["held_out"]["worst_psnr"], held_out_mean_psnr=record["held_out"]["mean_psnr"],
                held=record["held_out"]["held"], generations=record["generations"],
                environment=record.get("environment"),
            )
        runs.append(entry)
    path = os.path.join(args.output_dir, "gpu_tune.json")
    write_json({"model": args.model, "steps": args.steps, "runs": runs}, path, indent=1)
    print(f"wrote {path}")
    return 0 if all(r["exit_status"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
