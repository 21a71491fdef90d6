"""Multi-GPU check: the cached Qwen-Image / FLUX.2 [klein] transformers under diffusers' context and tensor parallelism.

Run it on a machine with several GPUs (never in CI), one process per GPU::

    torchrun --nproc_per_node=2 scripts/gpu_parallel_check.py --model qwen --mode ulysses
    torchrun --nproc_per_node=2 scripts/gpu_parallel_check.py --model klein --mode ring --dtype bfloat16
    torchrun --nproc_per_node=2 scripts/gpu_parallel_check.py --model klein --mode tp

What each rank does:

1. builds the cached transformer (``--size tiny`` or ``full``: the published Qwen-Image or FLUX.2 [klein] 4B shapes,
   random weights drawn from ``--seed``, identical on every rank; or ``--checkpoint DIR``, a diffusers model folder);
2. runs a two-branch (cond / uncond, CFG ``--cfg-scale``) Euler loop of ``--steps`` steps on random latents and
   prompt embeddings, once per cache method, on its own GPU without parallelism: the single-GPU reference. The
   methods are the registry's (``--methods``, default all; ``scripts/method_settings.py``): each at its published
   setting fitted to the model (``--threshold METHOD=VALUE`` sets its knob), ``<method>-calibrate`` for a method
   calibrated from runs, ``scm`` (DBCache with the "fast" steps computation mask). A setting that lacks model data
   takes it from this run's calibration, which runs first (Klein's MagCache ratios); Klein's TeaCache uses the
   identity polynomial;
3. enables parallelism on the same model (``ContextParallelConfig(ulysses_degree=N)`` or ``ring_degree=N``, or
   ``TensorParallelConfig(tp_degree=N)``, N = the number of processes) and runs the same loops;
4. checks, per method, that every rank recorded the same decisions (step, reuse, reason) as every other rank and as
   the single-GPU reference, and that the final latents match the reference within ``--atol`` (default 1e-4 in
   float32, 5e-2 in bfloat16).

Rank 0 prints one line per method and writes ``--output`` (JSON) if given; the exit status is 1 when a check fails.
Ring attention needs a backend that returns the log-sum-exp: ``--attention-backend`` defaults to ``_native_cudnn``
(bfloat16 / float16 only) for ``--mode ring`` and to ``native`` otherwise. ``--device cpu`` runs the context-parallel
modes on gloo (tiny size; diffusers refuses tensor parallelism on CPU), which is how this script was smoke-tested.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpu_benchmark_qwenimage import random_transformer  # scripts/ is on sys.path when a script runs

from method_settings import (  # scripts/ again
    CALIBRATE,
    base_method,
    calibrates_from_runs,
    mode_config,
    parse_thresholds,
    run_modes,
    threshold_help,
)

KLEIN_TEACACHE_COEFFICIENTS = (0.0, 0.0, 0.0, 1.0, 0.0)
"""Klein has no published TeaCache coefficients: the identity polynomial (decisions on the raw distance)."""

MODEL_DATA = {"klein": {"teacache": {"coefficients": KLEIN_TEACACHE_COEFFICIENTS}}}
"""Model facts: data a model lacks that a method's setting takes here instead of from a calibration run."""

QWEN_FULL = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56),
}  # fmt: skip
"""Qwen/Qwen-Image ``transformer/config.json`` (as ``scripts/gpu_benchmark_qwenimage.py``)."""

KLEIN_FULL = {
    "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 7680, "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000, "guidance_embeds": False,
}  # fmt: skip
"""black-forest-labs/FLUX.2-klein-4B ``transformer/config.json`` (shapes recorded in docs' model notes: 5 double and
20 single blocks, 24 heads of 128, text width 3 x 2560 of Qwen3-4B)."""

QWEN_TINY = {**QWEN_FULL, "num_layers": 4, "attention_head_dim": 32, "num_attention_heads": 4,
             "joint_attention_dim": 64, "axes_dims_rope": (8, 12, 12)}  # fmt: skip
KLEIN_TINY = {**KLEIN_FULL, "in_channels": 32, "num_layers": 2, "num_single_layers": 3, "attention_head_dim": 32,
              "num_attention_heads": 4, "joint_attention_dim": 96, "axes_dims_rope": (8, 8, 8, 8)}  # fmt: skip
CONFIGS = {("qwen", "full"): QWEN_FULL, ("qwen", "tiny"): QWEN_TINY, ("klein", "full"): KLEIN_FULL,
           ("klein", "tiny"): KLEIN_TINY}  # fmt: skip


def model_class(family: str):
    from cached_diffusers import CachedFlux2Transformer2DModel, CachedQwenImageTransformer2DModel

    return CachedQwenImageTransformer2DModel if family == "qwen" else CachedFlux2Transformer2DModel


def build_transformer(family: str, size: str, checkpoint: str | None, device, dtype, seed: int):
    """The cached transformer on ``device``: from ``checkpoint`` (a diffusers model folder), else random weights
    (normal std 0.02 for matrices, 1 for norm weights, 0 otherwise) built on the meta device, the same on every rank."""
    cls = model_class(family)
    if checkpoint:
        return cls.from_pretrained(checkpoint, torch_dtype=dtype).to(device).eval()
    return random_transformer(cls, CONFIGS[(family, size)], device, dtype, seed)


def start_run(args: argparse.Namespace, dtype: torch.dtype):
    """Join torchrun's group and build what every rank runs: ``(rank, world_size, device, model, workload)``, the
    cached transformer with the attention backend the mode needs (ring: one that returns the log-sum-exp)."""
    rank, world_size, device = setup_distributed(args.device)
    if world_size < 2:
        sys.exit("run it with torchrun --nproc_per_node=N, N >= 2")
    model = build_transformer(args.model, args.size, args.checkpoint, device, dtype, args.seed)
    backend = args.attention_backend or ("_native_cudnn" if args.mode == "ring" else "native")
    model.set_attention_backend(backend)
    args.attention_backend = backend  # what the report records
    work = Workload(args.model, args.height, args.width, args.text_len, args.neg_text_len, args.steps,
                    args.cfg_scale, args.seed)  # fmt: skip
    return rank, world_size, device, model, work


@dataclass
class Workload:
    """A CFG Euler loop around the transformer alone: random latents and prompt embeddings, ``sigma`` from 1 to 0 in
    ``steps`` equal steps, ``v = uncond + cfg_scale * (cond - uncond)`` (``cfg_scale`` <= 1: the cond branch only)."""

    family: str
    height: int
    width: int
    text_len: int
    neg_text_len: int
    steps: int
    cfg_scale: float
    seed: int

    def inputs(self, model, device, dtype):
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        h, w = self.height // 16, self.width // 16  # 8x VAE, 2x2 patches (Qwen) / 2x2 packing (Klein)
        config = model.config
        latents = torch.randn(1, h * w, config.in_channels, generator=gen)
        texts = {"cond": torch.randn(1, self.text_len, config.joint_attention_dim, generator=gen),
                 "uncond": torch.randn(1, self.neg_text_len, config.joint_attention_dim, generator=gen)}  # fmt: skip
        extra = {}
        for branch, text in texts.items():
            if self.family == "qwen":
                extra[branch] = {"img_shapes": [[(1, h, w)]], "encoder_hidden_states_mask": None}
            else:
                img_ids = torch.cartesian_prod(torch.tensor([0]), torch.arange(h), torch.arange(w), torch.tensor([0]))
                txt_ids = torch.cartesian_prod(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]),
                                               torch.arange(text.shape[1]))  # fmt: skip
                extra[branch] = {"img_ids": img_ids[None].to(device), "txt_ids": txt_ids[None].to(device),
                                 "guidance": None}  # fmt: skip
        to = {"device": device, "dtype": dtype}
        return latents.to(**to), {b: t.to(**to) for b, t in texts.items()}, extra

    @torch.no_grad()
    def run(self, model, cache_config, device, dtype, sync=None):
        """One generation; returns ``(final latents, {branch: [(step, reused, reason)]}, stats)``."""
        latents, texts, extra = self.inputs(model, device, dtype)
        branches = ("cond", "uncond") if self.cfg_scale > 1 else ("cond",)
        with model.cache_generation(cache_config) as generation:
            for step in range(self.steps):
                sigma, next_sigma = 1.0 - step / self.steps, 1.0 - (step + 1) / self.steps
                timestep = torch.full((1,), sigma, device=device, dtype=dtype)
                preds = {}
                for branch in branches:
                    with model.cache_context(branch, step_index=step, num_inference_steps=self.steps):
                        preds[branch] = model(hidden_states=latents, encoder_hidden_states=texts[branch],
                                              timestep=timestep, return_dict=False, **extra[branch])[0]  # fmt: skip
                v = preds["cond"]
                if len(branches) == 2:
                    v = preds["uncond"] + self.cfg_scale * (preds["cond"] - preds["uncond"])
                latents = latents + (next_sigma - sigma) * v
        if sync is not None:
            sync()
        stats = generation.stats
        records = {b: [(r.step, r.reused, r.reason) for r in s.records] for b, s in stats.branches.items()}
        return latents.float().cpu(), records, stats


def method_config(name: str, family: str, thresholds: dict[str, float], calibrated: dict[str, dict[str, Any]],
                  *, steps: int = 28, num_blocks: int | None = None):
    """The cache config a run mode stands for (:func:`method_settings.mode_config`: the method's published setting
    fitted to ``num_blocks`` and ``steps``, its knob at ``thresholds[method]`` when given), with the model data of
    :data:`MODEL_DATA` and of this run's calibrations (``calibrated[method]``, e.g. Klein's MagCache ratios)."""
    if name not in run_modes():
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(run_modes())}")
    base = base_method(name)
    data = {**MODEL_DATA.get(family, {}).get(base, {}), **calibrated.get(base, {})}
    if name.endswith(CALIBRATE):
        data = {}
    return mode_config(name, value=thresholds.get(base), steps=steps, num_blocks=num_blocks, **data)


def needed_calibrations(names: list[str], model, family: str, thresholds: dict[str, float], steps: int) -> list[str]:
    """The ``-calibrate`` run modes that must run first: those of the methods in ``names`` whose setting lacks model
    data (``missing_model_data``: no published coefficients or ratios for this model, e.g. Klein's MagCache)."""
    needed = []
    for name in names:
        base = base_method(name)
        if name.endswith(CALIBRATE) or not calibrates_from_runs(base) or base + CALIBRATE in needed:
            continue
        config = method_config(name, family, thresholds, {}, steps=steps, num_blocks=model.num_cache_blocks)
        if config.missing_model_data(model.cache_spec, family) is not None:
            needed.append(base + CALIBRATE)
    return needed


def calibration_data(name: str, stats) -> dict[str, Any]:
    """The model data a ``-calibrate`` run of ``name`` measured (``from_calibration(stats).calibrated_data()``);
    ``{}`` for a method that builds none from one run."""
    from cached_diffusers.registry import cache_method

    cls = cache_method(base_method(name)).config_class
    if not hasattr(cls, "from_calibration"):
        return {}
    return cls.from_calibration(stats).calibrated_data()


def setup_distributed(device_arg: str):
    """Join the torchrun group (NCCL on CUDA, gloo on CPU); returns ``(rank, world_size, device)``."""
    import torch.distributed as dist

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device_arg == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device (use --device cpu --size tiny for a smoke test on gloo)")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        if torch.accelerator.device_count() == 0:
            # diffusers 0.42 computes the device index as rank % torch.accelerator.device_count(), which is 0 on a
            # CPU-only host: the CPU counts as one device.
            torch.accelerator.device_count = lambda: 1
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=600))
    return rank, world_size, device


def parallel_config(mode: str, degree: int):
    from diffusers import ContextParallelConfig, TensorParallelConfig

    if mode == "ulysses":
        return ContextParallelConfig(ulysses_degree=degree)
    if mode == "ring":
        return ContextParallelConfig(ring_degree=degree)
    return TensorParallelConfig(tp_degree=degree)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("qwen", "klein"), default="qwen")
    parser.add_argument("--size", choices=("tiny", "full"), default="full", help="random weights at this size")
    parser.add_argument("--checkpoint", help="a diffusers transformer folder instead of random weights")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: float32 on CPU and for --size tiny, else bfloat16")  # fmt: skip
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--attention-backend", default=None, help="diffusers attention backend (see above)")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--text-len", type=int, default=64, help="prompt tokens (divisible by the CP degree)")
    parser.add_argument("--neg-text-len", type=int, default=16, help="negative prompt tokens (likewise)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="<= 1: no unconditional branch")
    modes = run_modes()
    parser.add_argument("--methods", default=",".join(modes), help=f"comma-separated, from {', '.join(modes)}")
    parser.add_argument("--threshold", action="append", default=[], metavar="METHOD=VALUE", help=threshold_help())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="JSON report (written by rank 0)")


def resolve(args: argparse.Namespace) -> tuple[torch.dtype, list[str], dict[str, float]]:
    """``(dtype, method names, thresholds)`` from the arguments; exits with a message on a bad value."""
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" or args.size == "tiny" else "bfloat16"
    names = [m for m in args.methods.split(",") if m]
    modes = run_modes()
    unknown = [m for m in names if m not in modes]
    if unknown:
        sys.exit(f"--methods: unknown {unknown}; valid: {', '.join(modes)}")
    try:
        thresholds = parse_thresholds(args.threshold)
    except ValueError as error:
        sys.exit(str(error))
    return getattr(torch, args.dtype), names, thresholds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--mode", choices=("ulysses", "ring", "tp"), default="ulysses")
    parser.add_argument("--atol", type=float, default=None, help="default: 1e-4 in float32, 5e-2 in bfloat16")
    args = parser.parse_args()
    dtype, names, thresholds = resolve(args)
    atol = args.atol if args.atol is not None else (1e-4 if dtype == torch.float32 else 5e-2)

    import torch.distributed as dist

    rank, world_size, device, model, work = start_run(args, dtype)

    calibrated: dict[str, dict[str, Any]] = {}
    reference, configs = {}, {}
    needed = needed_calibrations(names, model, args.model, thresholds, args.steps)
    for name in ["none", *needed, *[n for n in names if n not in needed]]:
        config = None if name == "none" else method_config(name, args.model, thresholds, calibrated, steps=args.steps,
                                                           num_blocks=model.num_cache_blocks)  # fmt: skip
        latents, records, stats = work.run(model, config, device, dtype)
        reference[name], configs[name] = (latents, records), config
        if name in needed:  # the data the method's setting lacks on this model
            calibrated[base_method(name)] = calibration_data(name, stats)

    model.enable_parallelism(config=parallel_config(args.mode, world_size))
    report, failed = [], False
    for name, config in configs.items():
        latents, records, _ = work.run(model, config, device, dtype)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, records)
        ref_latents, ref_records = reference[name]
        error = (latents - ref_latents).abs().max().item()
        errors = [None] * world_size
        dist.all_gather_object(errors, error)
        ranks_agree = all(g == gathered[0] for g in gathered)
        same_as_reference = gathered[0] == ref_records
        ok = ranks_agree and same_as_reference and max(errors) <= atol
        failed |= not ok
        reused = {b: sum(r[1] for r in rs) for b, rs in ref_records.items()}
        report.append({"method": name, "ok": ok, "ranks_agree": ranks_agree, "same_as_single_gpu": same_as_reference,
                       "max_abs_error": max(errors), "reused_steps": reused})  # fmt: skip
        if rank == 0:
            print(f"{'ok  ' if ok else 'FAIL'} {name}: ranks agree {ranks_agree}, decisions as single GPU "
                  f"{same_as_reference}, max |latents - single GPU| {max(errors):.2e} (atol {atol:g}), "
                  f"reused {reused}", flush=True)  # fmt: skip
    if rank == 0 and args.output:
        from cached_diffusers.tools.bench import environment  # CPU, OS, driver and versions (torch.utils.collect_env)

        args.output.write_text(json.dumps({
            "model": args.model, "size": args.size, "checkpoint": args.checkpoint, "mode": args.mode,
            "degree": world_size, "dtype": args.dtype, "attention_backend": args.attention_backend, "steps": args.steps,
            "height": args.height, "width": args.width, "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else "cpu", "torch": torch.__version__, "results": report,
            "environment": environment(device),
        }, indent=2) + "\n")  # fmt: skip
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
