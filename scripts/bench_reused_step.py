#!/usr/bin/env python
"""What a reused step costs next to a computed one, on the tiny 12-block cached Qwen-Image transformer (CPU).

    python scripts/bench_reused_step.py [--side 16] [--steps 40] [--repeats 3] [--threads 1] [--method M]

Direct transformer calls (no pipeline) with a threshold method of the registry (``--method``; default: the first
registered one whose sweep knob is a threshold, TeaCache today) at its published setting with the threshold at two
extremes: one that computes every step and one that reuses every step it may (the first and last steps compute,
and the method's own caps). Each repeat runs both generations, interleaved, after
one warm-up generation of each; the script prints the median time of a computed step and of a reused step and their
ratio in percent. A reused step still runs the embeddings, the output head and the decision indicator; the cached
blocks are passed through (block-call caching, ``cached_diffusers.model_mixin.BlockCalls``), so the ratio measures
what the pass-through and the engine add. No target is asserted here: the numbers are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from method_settings import method_names, published_config  # noqa: E402

COMPUTE_ALL, REUSE_ALL = 1e-12, 1e6
"""The threshold values of the two generations: no step's indicator is below the first; every step's is below the
second."""


def threshold_methods() -> list[str]:
    """The registered methods whose sweep knob is a threshold (``Sweep.kind == \"log\"``), in the registry's order."""
    from cached_diffusers.registry import cache_method

    return [n for n in method_names() if (s := cache_method(n).sweep) is not None and s.kind == "log"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=16, help="latent tokens per side: side x side image tokens (default 16)")
    parser.add_argument("--steps", type=int, default=40, help="steps per generation, >= 4 (default 40)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats after the warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    methods = threshold_methods()
    parser.add_argument("--method", choices=methods, default=methods[0], help=f"the cache method (default {methods[0]})")
    args = parser.parse_args(argv)
    for name, low in (("side", 1), ("steps", 4), ("repeats", 1), ("threads", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    import torch

    from cached_diffusers import CachedQwenImageTransformer2DModel
    from cached_diffusers.tools.timing import Stopwatch
    from cached_diffusers.tools.tiny import build_tiny_qwenimage_components

    torch.set_num_threads(args.threads)
    model = CachedQwenImageTransformer2DModel.from_base(build_tiny_qwenimage_components()["transformer"])
    generator = torch.Generator().manual_seed(0)
    tokens, text = args.side * args.side, 12
    inputs = dict(
        hidden_states=torch.randn(1, tokens, model.config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(1, text, model.config.joint_attention_dim, generator=generator),
        encoder_hidden_states_mask=torch.ones(1, text, dtype=torch.long),
        timestep=torch.tensor([0.5]),
        img_shapes=[[(1, args.side, args.side)]],
        return_dict=False,
    )
    shape = {"steps": args.steps, "num_blocks": model.num_cache_blocks}
    configs = {
        "computed": published_config(args.method, value=COMPUTE_ALL, **shape),
        "reused": published_config(args.method, value=REUSE_ALL, **shape),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}

    def generation(name: str, record: bool) -> None:
        model.cache_config = configs[name]
        model.reset_cache()
        with torch.no_grad():
            for step in range(args.steps):
                with model.cache_context("cond", step_index=step, num_inference_steps=args.steps):
                    with Stopwatch() as watch:
                        model(**inputs)
                    elapsed = watch.seconds
                reused = step in model.cache_stats.branches["cond"].reused_steps
                if record and reused == (name == "reused"):
                    times[name].append(elapsed)

    for name in configs:  # warm-up
        generation(name, record=False)
    for _ in range(args.repeats):
        for name in configs:
            generation(name, record=True)
    if not times["reused"]:
        raise SystemExit("no step was reused: the reuse config did not take effect")
    computed, reused = statistics.median(times["computed"]), statistics.median(times["reused"])
    ratio = 100 * reused / computed
    print(
        f"tiny Qwen-Image, {args.method}, {model.num_cache_blocks} blocks, {tokens} image tokens, {args.threads} thread(s), "
        f"{args.repeats} interleaved repeats: computed step {computed * 1e3:.3f} ms, reused step {reused * 1e3:.3f} ms "
        f"(median of {len(times['computed'])} / {len(times['reused'])}), reused / computed = {ratio:.2f} %"
    )
    return {"computed_s": computed, "reused_s": reused, "ratio_percent": ratio}


if __name__ == "__main__":
    main()
