"""Multi-GPU benchmark: context-parallel degree x cache method, speedup and PSNR against the single-GPU uncached run.

Run it on a machine with several GPUs (never in CI), once per degree::

    torchrun --nproc_per_node=2 scripts/gpu_benchmark_parallel.py --model qwen --mode ulysses
    torchrun --nproc_per_node=4 scripts/gpu_benchmark_parallel.py --model qwen --mode ulysses
    torchrun --nproc_per_node=8 scripts/gpu_benchmark_parallel.py --model klein --mode ring --dtype bfloat16

The workload is ``scripts/gpu_parallel_check.py``'s: the cached transformer alone (random weights at the published
size, or ``--checkpoint``), a CFG Euler loop on random latents and prompt embeddings. Each rank first runs every
configuration on its own GPU without parallelism (all ranks at once, rank 0's times are reported): the
single-GPU rows. Then the model gets ``ContextParallelConfig(ulysses_degree=N)`` (or ``ring_degree=N``), N = the
number of processes, and every configuration runs again on all N GPUs: the N-GPU rows.

Per row: the median wall time of ``--repeats`` generations after one warm-up, the speedup over the single-GPU
uncached run, the PSNR of the final latents against the single-GPU uncached latents (the latents, not decoded
images: no VAE runs; peak = the reference latents' max - min), and the reused steps per branch. Results go to
``--output-dir`` as ``gpu-parallel-<date>-<model>-<mode><N>.json`` and ``.md``. No numbers are claimed before a run.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
from pathlib import Path

import torch

from cached_diffusers.tools.bench import environment
from cached_diffusers.tools.files import markdown_table, write_json
from cached_diffusers.tools.timing import Stopwatch
from gpu_parallel_check import (
    add_common_arguments,
    calibration_data,
    method_config,
    needed_calibrations,
    parallel_config,
    resolve,
    start_run,
)
from method_settings import CALIBRATE, base_method


def psnr(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """``10 log10(peak^2 / MSE)`` in dB with ``peak = reference.max() - reference.min()``; ``inf`` when equal."""
    mse = torch.mean((latents.double() - reference.double()) ** 2).item()
    peak = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--mode", choices=("ulysses", "ring"), default="ulysses")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/gpu"))
    args = parser.parse_args()
    if args.repeats < 1:
        sys.exit("--repeats must be >= 1")
    dtype, names, thresholds = resolve(args)
    names = [n for n in names if not n.endswith(CALIBRATE)]  # calibration runs are not a speed setting

    import torch.distributed as dist

    rank, world_size, device, model, work = start_run(args, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    def timed(config, parallel: bool):
        work.run(model, config, device, dtype, sync)  # warm-up
        times, result = [], None
        for _ in range(args.repeats):
            if parallel:
                dist.barrier()
            with Stopwatch() as watch:  # work.run synchronises (sync) itself
                result = work.run(model, config, device, dtype, sync)
            times.append(watch.seconds)
        return statistics.median(times), result

    calibrated = {}
    for name in needed_calibrations(names, model, args.model, thresholds, args.steps):  # e.g. Klein's MagCache ratios
        _, (_, _, stats) = timed(method_config(name, args.model, thresholds, {}), False)
        calibrated[base_method(name)] = calibration_data(name, stats)
    shape = {"steps": args.steps, "num_blocks": model.num_cache_blocks}
    configs = {"none": None, **{n: method_config(n, args.model, thresholds, calibrated, **shape) for n in names}}
    rows, reference, baseline = [], None, None
    for gpus, parallel in ((1, False), (world_size, True)):
        if parallel:
            model.enable_parallelism(config=parallel_config(args.mode, world_size))
        for name, config in configs.items():
            seconds, (latents, records, _) = timed(config, parallel)
            if reference is None:
                reference, baseline = latents, seconds
            row = {"gpus": gpus, "method": name, "config": None if config is None else config.to_dict(),
                   "seconds": seconds, "speedup": baseline / seconds, "psnr_db": psnr(latents, reference),
                   "reused_steps": {b: [r[0] for r in rs if r[1]] for b, rs in records.items()}}  # fmt: skip
            rows.append(row)
            if rank == 0:
                print(f"{gpus} GPU(s) {name}: {seconds:.3f} s, {row['speedup']:.2f}x, PSNR {row['psnr_db']:.2f} dB, "
                      f"reused {sum(len(s) for s in row['reused_steps'].values())}", flush=True)  # fmt: skip

    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        date = datetime.date.today().isoformat()
        report = {
            "date": date, "device": name, "torch": torch.__version__, "model": args.model, "size": args.size,
            "checkpoint": args.checkpoint, "dtype": args.dtype, "mode": args.mode, "degree": world_size,
            "attention_backend": args.attention_backend, "steps": args.steps, "height": args.height, "width": args.width,
            "text_tokens": [args.text_len, args.neg_text_len], "cfg_scale": args.cfg_scale, "repeats": args.repeats,
            "single_gpu_uncached_seconds": baseline, "results": rows,
            "environment": environment(device),  # CPU, OS, driver and versions (torch.utils.collect_env)
        }  # fmt: skip
        args.output_dir.mkdir(parents=True, exist_ok=True)
        stem = f"gpu-parallel-{date}-{args.model}-{args.mode}{world_size}"
        write_json(report, args.output_dir / f"{stem}.json", indent=2)  # an infinite PSNR (identical latents): "inf"
        lines = [
            f"# {args.model} transformer ({args.checkpoint or args.size}, {args.dtype}), {args.mode} x {world_size}, "
            f"{args.steps} steps, CFG {args.cfg_scale}",
            "",
            f"{date}, {world_size} x {name}, torch {torch.__version__}, attention backend {args.attention_backend}; "
            f"single-GPU uncached {baseline:.3f} s. PSNR of the final latents against the single-GPU uncached run.",
            "",
        ]
        lines += markdown_table(["GPUs", "method", "run s", "speedup", "PSNR dB", "reused steps"], [
            [r["gpus"], r["method"], f"{r['seconds']:.3f}", f"{r['speedup']:.2f}x", f"{r['psnr_db']:.2f}",
             sum(len(s) for s in r["reused_steps"].values())] for r in rows])
        (args.output_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {args.output_dir / stem}.json and .md")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
