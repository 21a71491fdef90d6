"""GPU benchmark: the full-size Qwen-Image transformer replaying the reference model's reuse schedules.

Run it whenever a GPU is available (never in CI)::

    python scripts/gpu_benchmark_qwenimage.py --schedules benchmarks/reference-model/results.json

What it does, on one CUDA device:

1. builds ``CachedQwenImageTransformer2DModel`` at the published Qwen-Image size (60 dual-stream blocks, 24 heads of
   128, text width 3584; about 20 B parameters) with random bf16 weights (normal, std 0.02; no checkpoint needed);
2. runs 50-step denoising loops with true CFG (a ``"cond"`` and an ``"uncond"`` transformer call per step) on
   1024 x 1024 latents (4096 image tokens) and random prompt embeddings, with diffusers'
   ``FlowMatchEulerDiscreteScheduler`` at Qwen-Image's settings;
3. for each configuration of the reference-model benchmark (``cached-diffusers bench`` JSON at the same step count),
   forces that configuration's reuse schedule (the steps it reused on the first prompt, per branch: ``"cond"``'s
   schedule for both branches when they differ, which the report says) through a static SCM mask on the same method,
   so the reused steps cost what that method's reused steps cost (TeaCache: the embeddings, the indicator and the
   head; DBCache: also its ``Fn`` front blocks; TaylorSeer: the forecast);
4. reports per configuration: the median time of a computed and of a reused step (both branches), their ratio
   ``cost_ratio``, the whole-run time (median of ``--repeats``), the measured speedup over the uncached run, the
   ideal speedup ``N / (computed + reused * cost_ratio)``, and the per-step bookkeeping overhead of the engine (a
   run with caching on that computes every step, minus the uncached run, over N).

Results go to ``--output-dir`` as ``gpu-<date>-<device>.json`` and ``.md`` (commit them). ``--tiny`` runs the same
protocol on a small transformer on any device (a smoke test; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from cached_diffusers.configs import cache_config_from_dict
from cached_diffusers.models.qwenimage import CachedQwenImageTransformer2DModel
from cached_diffusers.tools.bench import environment
from cached_diffusers.tools.files import markdown_table
from cached_diffusers.tools.tiny import SCHEDULER_CONFIG
from cached_diffusers.tools.timing import Stopwatch, cuda_sync

FULL_CONFIG = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
"""Qwen/Qwen-Image ``transformer/config.json`` (the published model)."""

TINY_CONFIG = {**FULL_CONFIG, "num_layers": 4, "attention_head_dim": 32, "num_attention_heads": 2,
               "joint_attention_dim": 64, "axes_dims_rope": (8, 12, 12)}  # fmt: skip


def build_transformer(config: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """The cached transformer with random weights: built on the meta device, materialised on ``device``."""
    return random_transformer(CachedQwenImageTransformer2DModel, config, device, dtype, seed)


def random_transformer(cls: type, config: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """``cls(**config)`` with random weights (normal std 0.02 for matrices, 1 for norm weights, 0 otherwise; the same
    for a given ``seed`` on every device), built on the meta device and materialised on ``device`` in ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in ``dtype``: 20 B float32 parameters would not fit
    try:
        with torch.device("meta"):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.02, generator=gen)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
        for module in model.modules():  # non-persistent buffers (RoPE tables) are rebuilt on the device
            if hasattr(module, "pos_freqs"):
                fresh = type(module)(module.theta, module.axes_dim, getattr(module, "scale_rope", False))
                for key, value in fresh.__dict__.items():
                    if isinstance(value, torch.Tensor):
                        setattr(module, key, value.to(device))
    return model.to(dtype).eval()


class Loop:
    """A Qwen-Image denoising loop with true CFG around the transformer alone (no text encoder, no VAE)."""

    def __init__(self, model, steps: int, tokens_side: int, text_len: int, neg_text_len: int, device, dtype, seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.model, self.steps, self.device = model, steps, device
        dim, channels = model.config.joint_attention_dim, model.config.in_channels
        self.latents = torch.randn(1, tokens_side**2, channels, generator=gen, device=device, dtype=dtype)
        self.prompt = torch.randn(1, text_len, dim, generator=gen, device=device, dtype=dtype)
        self.negative = torch.randn(1, neg_text_len, dim, generator=gen, device=device, dtype=dtype)
        self.img_shapes = [[(1, tokens_side, tokens_side)]]
        self.scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
        self.mu = calculate_shift(tokens_side**2, 256, 8192, 0.5, 0.9)

    @torch.no_grad()
    def run(self, step_times: list[float] | None = None) -> float:
        """One generation; returns its wall time in seconds. ``step_times`` receives each step's time."""
        scheduler = self.scheduler
        scheduler.set_timesteps(self.steps, device=self.device, mu=self.mu)
        scheduler.set_begin_index(0)
        self.model.reset_cache()
        latents = self.latents.clone()
        sync = cuda_sync(self.device)
        per_step = sync if step_times is not None else None  # each step synchronised only when its time is wanted
        with Stopwatch(sync) as generation:
            for i, t in enumerate(scheduler.timesteps):
                with Stopwatch(per_step) as step:
                    timestep = t.expand(1).to(latents.dtype) / 1000
                    preds = []
                    for branch, text in (("cond", self.prompt), ("uncond", self.negative)):
                        with self.model.cache_context(branch, step_index=i, num_inference_steps=self.steps):
                            preds.append(
                                self.model(
                                    hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                                    encoder_hidden_states_mask=None, img_shapes=self.img_shapes, return_dict=False,
                                )[0]
                            )  # fmt: skip
                    cond, uncond = preds
                    comb = uncond + 4.0 * (cond - uncond)
                    noise_pred = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
                    latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if step_times is not None:
                    step_times.append(step.seconds)
        return generation.seconds


def load_schedules(path: Path, steps: int) -> list[dict[str, Any]]:
    """The benchmark entries at ``steps`` steps with their first prompt's reuse schedule per branch.

    Raises:
        ValueError: when the file has no entry at ``steps`` steps or lacks ``reuse_schedules`` (re-run
            ``cached-diffusers bench`` with this version).
    """
    data = json.loads(Path(path).read_text())
    found = data.get("num_inference_steps")
    if found != steps:
        raise ValueError(f"{path} was run at num_inference_steps={found}; this benchmark runs {steps} (--steps)")
    out = []
    for entry in data["results"]:
        if "reuse_schedules" not in entry:
            raise ValueError(f"{path} has no reuse_schedules: regenerate it with `cached-diffusers bench`")
        schedules = {branch: lists[0] for branch, lists in entry["reuse_schedules"].items()}
        out.append({"label": entry["label"], "params": entry["params"], "config": entry["config"],
                    "schedules": schedules, "reference_speedup": entry["speedup"],
                    "reference_psnr": entry["psnr"]["mean"]})  # fmt: skip
    return out


def forced(config_dict: dict, reused: list[int], steps: int):
    """The entry's config with its schedule forced by a static SCM mask (1 = compute, 0 = reuse)."""
    config = cache_config_from_dict(config_dict)
    mask = tuple(0 if i in set(reused) else 1 for i in range(steps))
    changes = {"scm_steps_mask": mask, "scm_steps_policy": "static"}
    if hasattr(config, "max_warmup_steps"):
        changes["max_warmup_steps"] = 0
    return dataclasses.replace(config, **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", type=Path, default=Path("benchmarks/reference-model/results.json"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--text-len", type=int, default=64, help="prompt tokens of the conditional branch")
    parser.add_argument("--neg-text-len", type=int, default=8, help="prompt tokens of the negative prompt")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small transformer (smoke test)")
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/gpu"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark needs a GPU (use --tiny --device cpu for a smoke test)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    entries = load_schedules(args.schedules, args.steps)
    config = TINY_CONFIG if args.tiny else FULL_CONFIG
    model = build_transformer(config, device, dtype, args.seed)
    side = args.height // 16  # 8x VAE, 2x2 patches
    loop = Loop(model, args.steps, side, args.text_len, args.neg_text_len, device, dtype, args.seed)
    n = args.steps

    def timed(cache_config) -> tuple[float, list[float], Any]:
        model.cache_config = cache_config
        loop.run()  # warm-up
        step_times: list[float] = []
        loop.run(step_times)
        stats = model.cache_stats
        runs = [loop.run() for _ in range(args.repeats)]
        return statistics.median(runs), step_times, stats

    uncached, uncached_steps, _ = timed(None)
    print(f"uncached: {uncached:.3f} s, {statistics.median(uncached_steps) * 1000:.1f} ms/step", flush=True)
    results = []
    bookkeeping = None
    for entry in entries:
        cond = entry["schedules"].get("cond", [])
        differ = any(s != cond for s in entry["schedules"].values())
        cache_config = forced(entry["config"], cond, n)
        seconds, step_times, stats = timed(cache_config)
        reused_idx = set(stats.branch("cond").reused_steps)
        computed_t = [t for i, t in enumerate(step_times) if i not in reused_idx]
        reused_t = [t for i, t in enumerate(step_times) if i in reused_idx]
        t_comp = statistics.median(computed_t)
        t_reuse = statistics.median(reused_t) if reused_t else None
        ratio = t_reuse / t_comp if t_reuse is not None else None
        computed, reused = n - len(reused_idx), len(reused_idx)
        ideal = n / (computed + reused * ratio) if ratio is not None else 1.0
        if bookkeeping is None:  # the same method computing every step: the engine's own cost
            always, _, _ = timed(forced(entry["config"], [], n))
            bookkeeping = (always - uncached) / n
        results.append({
            **{k: entry[k] for k in ("label", "params", "reference_speedup", "reference_psnr")},
            "reused_steps": sorted(reused_idx), "computed": computed, "reused": reused,
            "branches_differ_on_reference": differ, "computed_step_ms": t_comp * 1000,
            "reused_step_ms": None if t_reuse is None else t_reuse * 1000, "cost_ratio": ratio,
            "seconds": seconds, "speedup": uncached / seconds, "ideal_speedup": ideal,
        })  # fmt: skip
        r = results[-1]
        print(f"{r['label']} {r['params']}: {computed}+{reused} steps, {seconds:.3f} s, {r['speedup']:.2f}x "
              f"(ideal {ideal:.2f}x, cost ratio {ratio if ratio is None else round(ratio, 4)})", flush=True)  # fmt: skip

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    report = {
        "date": date,
        "device": name,
        "torch": torch.__version__,
        "dtype": str(dtype),
        "transformer_config": config,
        "num_inference_steps": n,
        "image_tokens": side * side,
        "text_tokens": [args.text_len, args.neg_text_len],
        "repeats": args.repeats,
        "schedules_from": str(args.schedules),
        "uncached_seconds": uncached,
        "uncached_step_ms": statistics.median(uncached_steps) * 1000,
        "bookkeeping_ms_per_step": None if bookkeeping is None else bookkeeping * 1000,
        "results": results,
        "environment": environment(device),  # CPU, OS, driver and versions (torch.utils.collect_env)
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{date}-{name.replace(' ', '_')}" + ("-tiny" if args.tiny else "")
    (args.output_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Qwen-Image transformer ({'tiny' if args.tiny else 'full size'}, random {dtype}), {n} steps, true CFG",
        "",
        f"{date}, {name}, torch {torch.__version__}; {side * side} image tokens; uncached {uncached:.3f} s "
        f"({report['uncached_step_ms']:.1f} ms/step); engine bookkeeping "
        f"{report['bookkeeping_ms_per_step'] if bookkeeping is None else round(bookkeeping * 1000, 3)} ms/step.",
        "",
    ]
    table = []
    for r in results:
        reuse_ms = "-" if r["reused_step_ms"] is None else f"{r['reused_step_ms']:.1f}"
        ratio = "-" if r["cost_ratio"] is None else f"{r['cost_ratio']:.3f}"
        table.append([
            r["label"], r["params"], f"{r['computed']} + {r['reused']}", f"{r['computed_step_ms']:.1f}", reuse_ms,
            ratio, f"{r['seconds']:.3f}", f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x",
            f"{r['reference_speedup']:.2f}x",
        ])
    lines += markdown_table(["method", "params", "computed + reused", "computed step ms", "reused step ms",
                             "cost ratio", "run s", "speedup", "ideal", "CPU reference speedup"], table)
    (args.output_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output_dir / stem}.json and .md")


if __name__ == "__main__":
    main()
