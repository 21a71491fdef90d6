"""GPU smoke test and step timing: the full-size BAGEL-7B-MoT architecture with random bf16 weights.

Run it whenever a GPU is available (never in CI)::

    python scripts/gpu_bagel_smoke.py                       # full size, bf16, CUDA (about 27 GB of weights)
    python scripts/gpu_bagel_smoke.py --tiny --device cpu   # dry run of the same protocol on a tiny config

What it does:

1. builds ``CachedBagelTransformer2DModel`` at the release's configuration (Qwen2.5-7B dims, 28 MoT layers with both
   experts, ``max_latent_size=64``; about 13.6 B parameters, the vision tower and ``lm_head`` are not built) with
   random weights created directly in bfloat16 on the device (no checkpoint, no float32 copy);
2. prefills the ``"gen"`` branch with a random 32-token prompt and the ``"cfg_text"`` branch with the empty context;
3. runs ``--steps`` denoising steps at ``--height`` x ``--width`` (1024 x 1024 = 4096 latent tokens) with both branches
   per step (CFG on every step, as inside the reference's CFG interval), once uncached and once per registered cache
   method at its published setting (``scripts/method_settings.py``: ``smoke_configs``; TeaCache with the shipped
   coefficients; a method the model lacks data for runs its calibration, one it cannot run is listed as skipped;
   ``--methods`` picks some);
4. prints the prefill time, the median time per step, the steps reused per branch, peak GPU memory, and checks the
   velocities are finite.

Random weights make the outputs meaningless and the reuse decisions of the adaptive methods arbitrary: the numbers
to read are the computed-step time, the reused-step time and the memory. ``--tiny`` runs the same protocol on a
2-layer model on any device (its timings mean nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from cached_diffusers import CachedBagelTransformer2DModel
from cached_diffusers.tools.timing import Stopwatch, cuda_sync

sys.path.insert(0, str(Path(__file__).resolve().parent))
from method_settings import method_names, smoke_configs  # noqa: E402

FULL = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, max_latent_size=64,
)  # fmt: skip
TINY = dict(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_latent_size=64, vision_start_token_id=309, vision_end_token_id=310,
)  # fmt: skip


def build(config: dict, device: torch.device, dtype: torch.dtype) -> CachedBagelTransformer2DModel:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = CachedBagelTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


@torch.no_grad()
def run(model, caches, steps: int, grid: tuple[int, int], device: torch.device) -> tuple[list[float], bool]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, grid[0] * grid[1], 64, generator=generator).to(device)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    sigmas = 3.0 * sigmas / (1 + 2.0 * sigmas)
    times, finite = [], True
    model.reset_cache()
    for i in range(steps):
        with Stopwatch(cuda_sync(device)) as watch:
            t = sigmas[i].to(device)
            velocities = {}
            for branch in ("gen", "cfg_text"):
                with model.cache_context(branch, step_index=i, num_inference_steps=steps):
                    velocities[branch] = model(x, t, caches[branch], grid).sample.float()
            v = velocities["cfg_text"] + 4.0 * (velocities["gen"] - velocities["cfg_text"])
            x = x - v * (sigmas[i] - sigmas[i + 1]).item()
        times.append(watch.seconds)
        finite &= bool(torch.isfinite(v).all())
    return times, finite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (dry run on any device)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--methods", nargs="+", default=None, choices=method_names(), help="default: every registered one")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.tiny and args.height == 1024 and args.width == 1024:
        args.height, args.width = 64, 96
    config = TINY if args.tiny else FULL

    with Stopwatch() as watch:
        model = build(config, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params / 1e9:.2f} B parameters in {args.dtype} on {device} in {watch.seconds:.1f} s")

    grid = (args.height // 16, args.width // 16)
    ids = torch.randint(0, config["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(1)).to(device)
    with Stopwatch(cuda_sync(device)) as watch:
        caches = {"gen": model.prefill(ids), "cfg_text": model.prefill(ids[:, :0])}
    print(f"prefill (32 tokens + empty context): {1000 * watch.seconds:.1f} ms")

    configs = [("uncached", None)]
    for name, cache_config, reason in smoke_configs(model, args.steps, args.methods):
        if reason is None:
            configs.append((name, cache_config))
        else:
            print(f"{name}: skipped ({reason})")
    for name, cache_config in configs:
        model.cache_config = cache_config
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run(model, caches, args.steps, grid, device)  # warm-up (the run's step count: a planned schedule holds for it)
        times, finite = run(model, caches, args.steps, grid, device)
        reused = {b: s.reused_steps for b, s in model.cache_stats.branches.items()} if cache_config else {}
        memory = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(
            f"{name}: {args.steps} steps x 2 branches at {args.height}x{args.width}: median step "
            f"{1000 * statistics.median(times):.1f} ms, total {sum(times):.2f} s, reused {reused}, finite {finite}{memory}"
        )


if __name__ == "__main__":
    main()
