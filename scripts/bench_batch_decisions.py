#!/usr/bin/env python
"""Per-sample cache decisions against one decision per batch, on the shipped reference models (CPU).

    python scripts/bench_batch_decisions.py [--models qwenimage klein] [--methods fbcache teacache ...]
        [--threshold fbcache=0.3 ...] [--batch 4] [--steps 20] [--size 32] [--repeats 3] [--threads 1] [--json out.json] [--invariance]

For each reference model (``cached_diffusers/assets/reference-*``, at their generation defaults: 32 x 32, CFG 4) and
each registered cache method (``cached_diffusers.registry``; the reference model's shipped ``cache_config.json`` for its
method, else the method's published setting fitted to the model, ``--threshold METHOD=VALUE`` setting its knob; a
planned schedule computes steps 0, 1, 2, every third from 4 and the last; a method the model lacks coefficients or
ratios for is skipped), a batch of ``--batch`` prompts (``--size``: another image side, to weigh the blocks' work against
the per-call overhead) (one seed each) is generated with ``batch_decisions="per_sample"``
and with ``"shared"``: one warm-up call of each, then ``--repeats`` interleaved repeats. It prints per method the
median time of a call in each mode and their ratio, the share of samples computed per step (mean over the steps and
guidance branches; with ``"shared"`` a step computes all samples or none), the steps where the samples disagreed
("mixed"), the time the per-sample mode spent gathering the computing samples' rows of the blocks' inputs and
scattering their results back (summed over the call, median over the repeats) and its share of the call, and the
largest difference of any sample's latents from its own call (per-sample should be float noise; shared is not).

``--invariance`` runs the measurement of issue 22 instead: Qwen-Image reference model, 20 steps, CFG 4,
First-Block-Cache ``residual_diff_threshold=0.3``, ``prompt=["rocket", "red apple"]`` with seeds 0 and 1 against each
prompt alone with its own seed; it prints the apple's largest latent difference in both modes.

No target is asserted here: the numbers are printed (``docs/batch-invariance.md`` quotes a run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cached_diffusers.tools.timing import Stopwatch  # noqa: E402
from method_settings import knob, method_names, parse_thresholds, published_config, threshold_help  # noqa: E402

MODELS = ("qwenimage", "klein")
PROMPTS = ("red apple", "rocket", "dog face", "green heart", "sun with face", "snowflake", "grapes", "crab")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="reference models")
    methods = method_names()
    parser.add_argument("--methods", nargs="+", choices=methods, default=methods, help="cache methods (the registry's)")
    parser.add_argument("--threshold", action="append", default=[], metavar="METHOD=VALUE", help=threshold_help())
    parser.add_argument("--batch", type=int, default=4, help=f"samples per call, 2 to {len(PROMPTS)} (default 4)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps, >= 4 (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats after the warm-up, >= 1 (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, >= 1 (default 1)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels, a multiple of 16 (default 32, the training size)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--invariance", action="store_true", help="run the measurement of issue 22 only")
    args = parser.parse_args(argv)
    for name, low in (("batch", 2), ("steps", 4), ("repeats", 1), ("threads", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if args.size < 16 or args.size % 16:
        parser.error(f"--size must be a positive multiple of 16, got {args.size}")
    if args.batch > len(PROMPTS):
        parser.error(f"--batch must be <= {len(PROMPTS)}, got {args.batch}")
    try:
        args.thresholds = parse_thresholds(args.threshold)
    except ValueError as error:
        parser.error(str(error))
    return args


def method_config(method: str, steps: int, mode: str, model_dir, transformer=None, thresholds=None):
    """The benchmark's config of ``method``: the reference model's shipped ``cache_config.json`` when it is of this
    method (Qwen-Image's calibrated TeaCache; a ``thresholds`` value replaces its knob), else :func:`method_settings.published_config` fitted to
    ``transformer``'s block count (knob from ``thresholds``); with ``batch_decisions=mode``."""
    from cached_diffusers.configs import cache_config_from_dict

    value = (thresholds or {}).get(method)
    shipped = Path(model_dir) / "cache_config.json"
    if shipped.exists():
        data = json.loads(shipped.read_text())
        if data.get("method") == method:
            config = cache_config_from_dict({**data, "batch_decisions": mode})
            return config if value is None else config.replace(**{knob(method): value})
    num_blocks = getattr(transformer, "num_cache_blocks", None)
    config = published_config(method, value=value, steps=steps, num_blocks=num_blocks)
    return config.replace(batch_decisions=mode)


def load(model: str, size: int = 32):
    from cached_diffusers import CachedFlux2KleinPipeline, CachedQwenImagePipeline
    from cached_diffusers.tools.reference_model import REFERENCE_KLEIN_DIR, REFERENCE_MODEL_DIR

    if model == "qwenimage":
        pipe = CachedQwenImagePipeline.from_pretrained(REFERENCE_MODEL_DIR, cache_config=None)
        call = dict(true_cfg_scale=4.0, height=size, width=size)
        directory = REFERENCE_MODEL_DIR
    else:
        pipe = CachedFlux2KleinPipeline.from_pretrained(REFERENCE_KLEIN_DIR, cache_config=None)
        call = dict(guidance_scale=4.0, height=size, width=size, max_sequence_length=32)
        directory = REFERENCE_KLEIN_DIR
    pipe.set_progress_bar_config(disable=True)
    return pipe, call, directory


def call_kwargs(model: str, call: dict[str, Any], prompts, seeds, steps: int) -> dict[str, Any]:
    import torch

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    kwargs = dict(call, prompt=list(prompts), num_inference_steps=steps, output_type="latent")
    kwargs["generator"] = generators if len(generators) > 1 else generators[0]
    if model == "qwenimage":
        kwargs["negative_prompt"] = [" "] * len(prompts)
    return kwargs


class RowTimer:
    """Times the gather and scatter of a mixed per-sample step (``model_mixin``'s ``gather_rows``, the scatter of
    the span's intermediate outputs and of its last output), by wrapping them for the duration of a call."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            watch = Stopwatch()
            try:
                with watch:
                    return fn(*args, **kwargs)
            finally:
                self.seconds += watch.seconds

        return wrapper

    @contextlib.contextmanager
    def active(self):
        from cached_diffusers import model_mixin

        names = ("gather_rows", "scatter_rows", "scatter_computed")
        originals = {name: getattr(model_mixin, name) for name in names}
        try:
            for name, fn in originals.items():
                setattr(model_mixin, name, self._timed(fn))
            yield self
        finally:
            for name, fn in originals.items():
                setattr(model_mixin, name, fn)


def computed_share(stats) -> tuple[float, int]:
    """(mean share of samples computed per step over steps and branches, steps where the samples disagreed)."""
    shares, mixed = [], 0
    for branch in stats.branches.values():
        if branch.samples:
            by_step: dict[int, list[bool]] = {}
            for sample in branch.samples:
                for record in sample.records:
                    by_step.setdefault(record.step, []).append(not record.reused)
            for flags in by_step.values():
                shares.append(sum(flags) / len(flags))
                mixed += 0 < sum(flags) < len(flags)
        else:
            shares.extend(0.0 if r.reused else 1.0 for r in branch.records)
    return (sum(shares) / len(shares) if shares else 1.0), mixed


def bench_model(model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    pipe, call, directory = load(model, args.size)
    prompts, seeds = PROMPTS[: args.batch], list(range(args.batch))
    results = []
    thresholds = getattr(args, "thresholds", {})
    for method in args.methods:
        configs = {mode: method_config(method, args.steps, mode, directory, pipe.transformer, thresholds)
                   for mode in ("per_sample", "shared")}  # fmt: skip
        missing = configs["shared"].missing_model_data(pipe.transformer.cache_spec, model)
        if missing is not None:
            print(f"{model} {method}: skipped ({missing.split(';')[0]}: none ship with this reference model)")
            continue
        times: dict[str, list[float]] = {mode: [] for mode in configs}
        overhead: list[float] = []
        outputs, stats = {}, {}
        for repeat in range(args.repeats + 1):  # the first round is the warm-up
            for mode, config in configs.items():
                pipe.cache_config = config
                timer = RowTimer()
                with timer.active(), torch.no_grad(), Stopwatch() as watch:
                    outputs[mode] = pipe(**call_kwargs(model, call, prompts, seeds, args.steps)).images.float()
                elapsed = watch.seconds
                stats[mode] = pipe.cache_stats
                if repeat:
                    times[mode].append(elapsed)
                    if mode == "per_sample":
                        overhead.append(timer.seconds)
        difference = {mode: 0.0 for mode in configs}
        for mode, config in configs.items():
            pipe.cache_config = config
            for row, (prompt, seed) in enumerate(zip(prompts, seeds)):
                alone = pipe(**call_kwargs(model, call, [prompt], [seed], args.steps)).images.float()
                difference[mode] = max(difference[mode], (outputs[mode][row] - alone[0]).abs().max().item())
        per_sample, shared = (statistics.median(times[m]) for m in ("per_sample", "shared"))
        share_ps, mixed = computed_share(stats["per_sample"])
        share_shared, _ = computed_share(stats["shared"])
        row_s = statistics.median(overhead)
        result = dict(
            model=model, method=method, batch=args.batch, steps=args.steps, size=args.size, per_sample_s=per_sample, shared_s=shared,
            ratio=per_sample / shared, computed_share_per_sample=share_ps, computed_share_shared=share_shared,
            mixed_steps=mixed, gather_scatter_s=row_s, gather_scatter_share=row_s / per_sample,
            max_difference_per_sample=difference["per_sample"], max_difference_shared=difference["shared"],
        )  # fmt: skip
        results.append(result)
        print(
            f"{model:9s} {method:10s} per-sample {per_sample:6.3f} s  shared {shared:6.3f} s  ratio {result['ratio']:.3f}"
            f"  computed {100 * share_ps:5.1f}% / {100 * share_shared:5.1f}%  mixed steps {mixed:2d}"
            f"  gather+scatter {1000 * row_s:6.1f} ms ({100 * result['gather_scatter_share']:.1f}%)"
            f"  max diff vs own call {difference['per_sample']:.1e} / {difference['shared']:.1e}",
            flush=True,
        )
    return results


def invariance(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from cached_diffusers import FirstBlockCacheConfig

    pipe, call, _ = load("qwenimage")
    results = {}
    for mode in ("per_sample", "shared", "off"):
        pipe.cache_config = None if mode == "off" else FirstBlockCacheConfig(residual_diff_threshold=0.3, batch_decisions=mode)
        with torch.no_grad():
            both = pipe(**call_kwargs("qwenimage", call, ["rocket", "red apple"], [0, 1], 20)).images.float()
            apple = pipe(**call_kwargs("qwenimage", call, ["red apple"], [1], 20)).images.float()
        results[mode] = (both[1] - apple[0]).abs().max().item()
        print(f"batch_decisions={mode:10s} apple's max abs latent difference, batched vs alone: {results[mode]:.3g}")
    return results


def main(argv: list[str] | None = None) -> Any:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.invariance:
        out: Any = invariance(args)
    else:
        print(
            f"batch {args.batch}, {args.steps} steps, {args.size} x {args.size}, {args.repeats} interleaved repeats after a warm-up, "
            f"{args.threads} thread(s); times are medians of a whole pipeline call (latents out)"
        )
        out = [r for model in args.models for r in bench_model(model, args)]
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2)
    return out


if __name__ == "__main__":
    main()
