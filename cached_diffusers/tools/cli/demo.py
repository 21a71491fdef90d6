"""``cached-diffusers demo``: cached vs uncached on the embedded default model (no download)."""

from __future__ import annotations

import argparse
import os

from ..timing import make_generator, timed_call
from .common import (
    _call_value, _check_sampling_args, _quiet_loading, _sampling_kwargs, check_output_file, with_saved_calibration,
)
from .options import _set_threads, cache_config_from_args


def cmd_demo(args: argparse.Namespace) -> int:
    import statistics

    import torch

    from ..imaging import psnr, require_extra, side_by_side
    from ..reference_model import DEMO_PROMPTS, REFERENCE_MODEL_DIR, load_reference_pipeline

    require_extra("skimage.metrics", "scikit-image")  # the PSNR, before any work

    _check_sampling_args(args)
    check_output_file("--output", args.output, image=True)
    config = cache_config_from_args(args)
    if config is None:
        raise ValueError("demo compares a cached run with an uncached one: choose a --cache method other than 'none'")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    _set_threads(args)
    if args.quiet:
        _quiet_loading()
    pipe = load_reference_pipeline()
    config = with_saved_calibration(config, pipe.cache_config)  # TeaCache with the model's calibrated coefficients
    pipe.set_progress_bar_config(disable=args.quiet)
    prompts = args.prompt or list(DEMO_PROMPTS)
    args = argparse.Namespace(**vars(args), model=os.fspath(REFERENCE_MODEL_DIR))
    kwargs = _sampling_kwargs(pipe, args, args.seed, num_prompts=len(prompts))
    kwargs.pop("generator")
    steps = _call_value(pipe, kwargs, "num_inference_steps")

    def run(cache_config):
        pipe.cache_config = cache_config
        output, seconds = timed_call(pipe, prompt=prompts, **kwargs, generator=make_generator("cpu", args.seed))
        return output, seconds, pipe.cache_stats

    print(f"reference model ({REFERENCE_MODEL_DIR.name}: Qwen-Image classes trained on emoji, offline), "
          f"{len(prompts)} prompt(s), {steps} steps, {torch.get_num_threads()} torch thread(s)")  # fmt: skip
    run(None), run(config)  # warm-up: first-call allocations and lazy initialisation, not timed
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    first: dict[str, tuple] = {}  # name -> (output, stats) of the first round
    for round_index in range(args.repeats):
        # interleaved, the order alternating per round, so that a slow phase of the machine hits both alike
        order = ("uncached", "cached") if round_index % 2 == 0 else ("cached", "uncached")
        for name in order:
            output, seconds, stats = run(None if name == "uncached" else config)
            times[name].append(seconds)
            first.setdefault(name, (output, stats))
    (uncached, _), (cached, cached_stats) = first["uncached"], first["cached"]
    ratios = sorted(u / c for u, c in zip(times["uncached"], times["cached"]))
    median = {name: statistics.median(values) for name, values in times.items()}

    def spread(values):
        return f"median of {len(values)}, range {min(values):.3f}-{max(values):.3f} s"

    print(f"uncached: {median['uncached']:.3f} s ({spread(times['uncached'])})")
    print(f"cached ({config.method}): {median['cached']:.3f} s ({spread(times['cached'])})")
    print(
        f"speedup: {median['uncached'] / median['cached']:.2f}x "
        f"(per-round ratios {ratios[0]:.2f}x-{ratios[-1]:.2f}x over {len(ratios)} interleaved rounds)"
    )
    for branch in cached_stats.branches.values():
        print(f"steps reused ({branch.branch}): {branch.num_reused} of {branch.num_calls} {branch.reused_steps}")
    for prompt, a, b in zip(prompts, uncached.images, cached.images):
        print(f"PSNR cached vs uncached, {prompt!r}: {psnr(a, b):.2f} dB")
    sheet = side_by_side([list(uncached.images), list(cached.images)])
    if max(sheet.size) < 512:  # the reference model draws 32 x 32 images: enlarge the sheet for viewing
        factor = 512 // max(sheet.size)
        sheet = sheet.resize((sheet.width * factor, sheet.height * factor), resample=0)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    sheet.save(args.output)
    print(f"wrote {args.output} (top row uncached, bottom row cached)")
    return 0
