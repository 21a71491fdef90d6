"""The ``cached-diffusers`` command line.

``cached-diffusers generate``: load a model (local directory or Hub id) as a cached pipeline and write images.
``cached-diffusers demo``: the embedded default model, generated with and without the cache, compared.

Cache method parameters are options named after the config fields (``--rel-l1-thresh 0.3``), generated from the
registered config classes; an option that does not belong to the chosen ``--cache`` method is an error.

This package is the entry point (:func:`main`, ``cached_diffusers.tools.cli:main``) and the parser
(:func:`build_parser`). Modules: :mod:`.options` (the cache options and the parent parsers of the shared options),
:mod:`.common` (input checks, generation defaults, loading the pipeline), and one per subcommand: :mod:`.generate`,
:mod:`.calibrate`, :mod:`.demo`, :mod:`.bench`, :mod:`.tune`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .bench import cmd_bench
from .calibrate import _calibrated_by, _calibration_methods, cmd_calibrate
from .demo import cmd_demo
from .generate import cmd_generate
from .options import (
    QUIET_LINES, _add_cache_arguments, _calibrated_option, _device_options, _negative_prompt_option, _run_options,
    _sampling_options,
)
from .tune import cmd_tune

# what the tests and scripts import from the command line (its entry point's module)
from .calibrate import _plan_for_strength, first_executed_step  # noqa: E402,F401
from .common import _pipeline_class_for, with_saved_calibration  # noqa: E402,F401
from .options import cache_config_from_args  # noqa: E402,F401

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cached-diffusers", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate", help="generate images with a cached pipeline",
        parents=[_run_options(default_threads=None), _sampling_options(), _device_options()],
    )
    generate.add_argument(
        "--model", required=True,
        help="diffusers pipeline directory or Hub id (e.g. Qwen/Qwen-Image, or a shipped reference model: "
        "cached_diffusers/assets/reference-qwenimage-emoji)",
    )
    generate.add_argument("--prompt", action="append", required=True, help="text prompt (repeat for several)")
    generate.add_argument("--negative-prompt", default=None, help="negative prompt (enables true CFG with --true-cfg-scale > 1)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--output", default="output.png", help="image path (numbered when several)")
    generate.add_argument(
        "--ulysses-degree", type=int, default=1,
        help="Ulysses context parallelism over this many processes (under torchrun; default: 1, off)",
    )
    generate.add_argument(
        "--cfg-parallel", action="store_true",
        help="one guidance branch per process (under torchrun; processes = branches x --ulysses-degree)",
    )
    _add_cache_arguments(generate, default_method=None)
    generate.set_defaults(func=cmd_generate)

    planned = "/".join(_calibrated_by("schedule"))
    targeted = "/".join(m.name for m in _calibration_methods() if m.config_class.calibration_target)
    calibrate = commands.add_parser(
        "calibrate",
        help="fit TeaCache coefficients or MagCache ratios, find a SeaCache threshold, or plan LeMiCa / MeanCache "
        "schedules, on uncached runs, and save the cache config(s)",
        parents=[_run_options(default_threads=None), _sampling_options(), _device_options()],
    )
    calibrate.add_argument("--model", required=True, help="diffusers directory or Hub id")
    calibrate.add_argument("--method", choices=[m.name for m in _calibration_methods()], default="teacache")
    calibrate.add_argument(
        "--computed-steps", type=int, default=None, metavar="N",
        help=f"{targeted}: the largest threshold whose replay on the uncached runs computes at least N steps per branch",
    )
    calibrate.add_argument(
        "--budget", type=int, nargs="+", default=None,
        help=f"{planned}: computed steps per schedule, first and last included (e.g. --budget 25 17 10)",
    )
    calibrate.add_argument(
        "--strength", type=float, default=None,
        help=f"{planned}: plan for img2img / inpaint at this strength in (0, 1]: the budget counts the steps "
        "that run (the first executed one and those after it), not the full schedule's (default: 1, text-to-image)",
    )
    calibrate.add_argument("--max-span", type=int, default=8, help=f"{planned}: longest DAG edge measured, in steps (default: 8)")
    calibrate.add_argument(
        "--error-matrix", default=None, metavar="FILE",
        help=f"{planned}: solve from this saved error matrix (written by an earlier run) instead of measuring",
    )
    calibrate.add_argument(
        "--windows", type=int, nargs="+", default=[1, 2, 4],
        help="meancache: averaging windows tried per gap (1 to 6; default: 1 2 4)",
    )
    calibrate.add_argument("--prompt", action="append", default=None, help="calibration prompt (repeat; default: a small built-in set)")
    calibrate.add_argument("--negative-prompt", default=None, help="negative prompt (true CFG for Qwen-Image: calibrates both branches)")
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the first prompt (then +1 per prompt)")
    calibrate.add_argument("--rel-l1-thresh", type=float, default=0.2, help="TeaCache threshold written with the fit (default: 0.2)")
    calibrate.add_argument("--mag-threshold", type=float, default=0.06, help="MagCache threshold written with the ratios (default: 0.06)")
    calibrate.add_argument(
        "--output", default=None,
        help="cache config path (default: <model>/cache_config.json for a directory; never inside the installed "
        "package's shipped models)",
    )
    calibrate.add_argument(
        "--overwrite", action="store_true",
        help="replace files that exist (each old one is kept as FILE.bak); without it, an existing file is an error",
    )
    calibrate.set_defaults(func=cmd_calibrate)

    demo = commands.add_parser(
        "demo", help="cached vs uncached on the embedded default model (no download)",
        parents=[_run_options(default_threads=1)],
    )
    demo.add_argument("--prompt", action="append", default=None, help="text prompt (repeat for several)")
    demo.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: 20, the model's)")
    demo.add_argument("--height", type=int, default=None, help="image height in pixels (default: 32, the model's)")
    demo.add_argument("--width", type=int, default=None, help="image width in pixels (default: 32, the model's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--true-cfg-scale", type=float, default=None, help="true CFG scale (default: 4.0, the model's)")
    demo.add_argument("--repeats", type=int, default=5, help="timed rounds, uncached and cached interleaved; the median counts (default: 5)")
    demo.add_argument("--output", default="demo.png", help="side-by-side PNG (default: demo.png)")
    _add_cache_arguments(demo, default_method="teacache")
    demo.set_defaults(func=cmd_demo)

    from ..bench import sweep_methods  # the registry's curves (no torch)

    bench = commands.add_parser(
        "bench", help="sweep cache methods and thresholds against uncached: time, work, PSNR/SSIM, Pareto plot",
        parents=[
            _run_options(default_threads=None, quiet=QUIET_LINES), _sampling_options(), _device_options(),
            _negative_prompt_option(), _calibrated_option("the sweep's TeaCache coefficients / MagCache ratios"),
        ],
    )
    bench.add_argument("--model", default=None, help="diffusers directory or Hub id (default: the embedded reference model)")
    bench.add_argument("--prompt", action="append", default=None, help="prompt (repeat; default: 4 captions of the reference model)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the first prompt (then +1 per prompt)")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats of every run; the median counts (default: 3)")
    bench.add_argument(
        "--methods", nargs="+", default=None, metavar="METHOD",
        help=f"methods to sweep: {' '.join(sweep_methods())} (default: all)",
    )
    bench.add_argument("--sweep", default=None, metavar="JSON_OR_FILE", help="run these configs instead: a JSON list of cache configs")
    bench.add_argument(
        "--equal-budget", type=int, nargs="+", default=None, metavar="B",
        help="compare every method at these computed-step budgets per branch (e.g. 25 17 10) instead of the sweep",
    )
    bench.add_argument(
        "--planned", nargs="+", default=None, metavar="FILE",
        help="with --equal-budget: LeMiCa / MeanCache cache configs written by `calibrate` (one per budget)",
    )
    bench.add_argument("--iterations", type=int, default=8, help="with --equal-budget: bisection steps per method and budget (default: 8)")
    bench.add_argument("--output-dir", default="bench", help="where results.json, results.md and pareto.png go (default: bench/)")
    bench.set_defaults(func=cmd_bench)

    tune = commands.add_parser(
        "tune", help="find the fastest cache config whose worst prompt keeps PSNR >= a target, check it on held-out "
        "prompts, and save it",
        parents=[
            _run_options(default_threads=None, quiet=QUIET_LINES), _sampling_options(), _device_options(),
            _negative_prompt_option(), _calibrated_option("TeaCache coefficients / MagCache ratios"),
        ],
    )
    tune.add_argument("--model", required=True, help="diffusers directory or Hub id")
    tune.add_argument("--target-psnr", type=float, required=True, metavar="DB",
                      help="worst tuning-prompt PSNR against uncached, in dB")
    tune.add_argument("--target-ssim", type=float, default=None, metavar="S", help="also require worst SSIM >= S")
    tune.add_argument(
        "--margin", default="auto", metavar="auto|DB",
        help="auto: hold the 99%% prediction bound of the tuning prompts' PSNRs (from their scatter) to --target-psnr; "
        "DB: tune the worst tuning prompt to --target-psnr + DB (0: the bare worst prompt); the held-out check stays "
        "at --target-psnr (default: auto)",
    )
    tune.add_argument("--prompts", nargs="+", default=None, metavar="P", help="tuning prompts (default: 8 built-in captions)")
    tune.add_argument(
        "--held-out-prompts", nargs="+", default=None, metavar="P",
        help="verification prompts, disjoint from --prompts (default: a built-in set without the tuning prompts)",
    )
    tune.add_argument("--seeds", type=int, default=1, metavar="K", help="seeds 0..K-1 per prompt (default: 1)")
    tune.add_argument("--methods", nargs="+", default=None, metavar="M", help="methods to search (default: every registered one)")
    tune.add_argument(
        "--error-matrix", default=None, metavar="FILE",
        help="LeMiCa's error matrix (from `calibrate --method lemica`) for the planned methods (default: measured on "
        "the first tuning prompt)",
    )
    tune.add_argument("--max-span", type=int, default=6, help="longest edge of a measured error matrix (default: 6)")
    tune.add_argument("--iterations", type=int, default=6, help="bisection steps of a threshold (default: 6)")
    tune.add_argument(
        "--measure-latency", type=int, nargs="?", const=5, default=None, metavar="R",
        help="also time the chosen config against uncached, R interleaved rounds (default R: 5)",
    )
    tune.add_argument("--compare-defaults", action="store_true",
                      help="also measure every method's default setting (what a user who does not tune gets)")
    tune.add_argument("--output", default=None, metavar="DIR",
                      help="folder of cache_config.json and its record (default: the model directory)")
    tune.add_argument("--overwrite", action="store_true", help="replace existing files (each old one is kept as FILE.bak)")
    tune.set_defaults(func=cmd_tune)
    return parser


EXIT_FAILED = 1
"""Exit status of a run that failed (a model that does not load, an error while generating)."""
EXIT_USAGE = 2
"""Exit status of a usage error (an invalid option, option value or input file), as argparse uses."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, :data:`EXIT_USAGE` or :data:`EXIT_FAILED`).

    Errors are one line on stderr naming the option or file: ``ValueError`` (bad input) exits with 2, any other
    exception (the run failed: a model directory that does not load, an error while generating) with 1. ``--debug``
    raises instead, with the traceback.
    """
    for stream in (sys.stdout, sys.stderr):  # a path or prompt the terminal cannot encode must not fail the run
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as error:  # noqa: BLE001 -- every error becomes one line unless --debug
        if getattr(args, "debug", False):
            raise
        # bad input (an option, a value, a file or a local path that does not exist) is a usage error
        usage = isinstance(error, (ValueError, FileNotFoundError))
        text = " ".join(str(error).split()) or type(error).__name__
        hint = ""
        if not usage and not isinstance(error, ImportError):  # ImportError: an optional extra is missing, said so
            text, hint = f"{type(error).__name__}: {text}", " (--debug shows the traceback)"
        print(f"cached-diffusers {args.command}: error: {text}{hint}", file=sys.stderr)
        return EXIT_USAGE if usage else EXIT_FAILED
