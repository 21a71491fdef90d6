"""HunyuanImage-3.0 per-step timing with and without caching, on a reduced-depth random-weight model.

GPU run (default): the release width (hidden 4096, 32 heads / 8 KV heads x 128, 64 experts top-8 + shared MLP,
patch_embed 1024, 32 latent channels) with ``--layers`` of the 32 decoder layers (default 2), in bfloat16, at
1024x1024 (4096 image tokens), CFG 5.0 (2 rows per call), through ``CachedHunyuanImage3Pipeline``'s real loop (KV
cache, per-branch caching). Weights are random: the numbers are speed, not quality. It prints the mean time of step 0
(full sequence), of computed steps >= 1 and of reused steps, and the total loop time, uncached and per registered
cache method at its published setting (``scripts/method_settings.py``: ``smoke_configs``; a method the model lacks
data for runs its calibration, one it cannot run is listed as skipped; ``--methods`` picks some).

``--dry-run``: the same on CPU with a tiny config (hidden 64, 2 layers, 4 experts, base size 64), to check the script.

Usage::

    python scripts/gpu_hunyuanimage3_smoke.py                 # GPU, 2 layers at full width, 50 steps
    python scripts/gpu_hunyuanimage3_smoke.py --layers 4 --steps 30
    python scripts/gpu_hunyuanimage3_smoke.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cached_diffusers.models.hunyuanimage3 import HunyuanImage3Transformer2DModel
from cached_diffusers.models.hunyuanimage3_vae import AutoencoderKLHunyuanImage3
from cached_diffusers.pipelines.hunyuanimage3 import CachedHunyuanImage3Pipeline
from cached_diffusers.tools.timing import Stopwatch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from method_settings import method_names, smoke_configs  # noqa: E402

PROMPT = "a red cat sitting on a blue sofa in a sunny living room, photo"


def make_tokenizer(base_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with the HunyuanImage-3.0 special tokens (ids are arbitrary: weights are random)."""
    specials = ["<unk>", "<|endoftext|>", "<|startoftext|>", "<boi>", "<eoi>", "<img>", "<pad>", "<cfg>", "<timestep>",
                f"<img_size_{base_size}>"] + [f"<img_ratio_{k}>" for k in range(33)]
    words = sorted(set(PROMPT.replace(",", " ,").split()))
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=specials[3:],
    )


def build_pipeline(dry_run: bool, layers: int) -> CachedHunyuanImage3Pipeline:
    device = "cpu" if dry_run else "cuda"
    dtype = torch.float32 if dry_run else torch.bfloat16
    if dry_run:
        config = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      attention_head_dim=16, num_experts=4, moe_topk=2, moe_intermediate_size=32,
                      patch_embed_hidden_dim=32, latent_channels=16, image_base_size=64)
        vae = dict(latent_channels=16, block_out_channels=(32,) * 5, layers_per_block=1)
    else:
        config = dict(num_hidden_layers=layers)  # everything else: the release values (class defaults)
        vae = dict(latent_channels=32, block_out_channels=(32,) * 5, layers_per_block=1)  # unused: latents out
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = HunyuanImage3Transformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    for layer in transformer.model.layers:  # routers in float32, as the release
        layer.mlp.gate.float()
    transformer.eval()
    vae_model = AutoencoderKLHunyuanImage3(**vae).to(device)
    return CachedHunyuanImage3Pipeline(
        transformer=transformer, vae=vae_model, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        tokenizer=make_tokenizer(transformer.config.image_base_size),
    )


def timed_run(pipe, steps: int, size: int, sync) -> dict:
    times = []
    watch = Stopwatch(sync)

    def callback(p, i, t, tensors):
        times.append(watch.lap())
        return {}

    with watch:
        pipe(PROMPT, height=size, width=size, num_inference_steps=steps, seed=0, output_type="latent",
             callback_on_step_end=callback)
    total = watch.seconds
    stats = pipe.cache_stats
    reused = set()
    if stats.branches:
        per_branch = [{r.step for r in b.records if r.reused} for b in stats.branches.values()]
        reused = set.intersection(*per_branch)  # steps with no transformer call at all
    computed_later = [t for i, t in enumerate(times) if i > 0 and i not in reused]
    reused_times = [t for i, t in enumerate(times) if i in reused]
    mean = lambda xs: round(1000 * statistics.mean(xs), 2) if xs else None  # noqa: E731
    return {
        "total_s": round(total, 3),
        "step0_ms": round(1000 * times[0], 2),
        "computed_step_ms": mean(computed_later),
        "reused_step_ms": mean(reused_times),
        "steps_without_transformer_call": sorted(reused),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny config on CPU")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of 32 (GPU run)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50, dry run 8)")
    parser.add_argument("--methods", nargs="+", default=None, choices=method_names(), help="default: every registered one")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run, or on a GPU machine")
    steps = args.steps or (8 if args.dry_run else 50)
    pipe = build_pipeline(args.dry_run, args.layers)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.transformer.config.image_base_size
    sync = (lambda: None) if args.dry_run else torch.cuda.synchronize
    configs = {"none": None}
    for name, config, reason in smoke_configs(pipe.transformer, steps, args.methods):
        if reason is None:
            configs[name] = config
        else:
            print(json.dumps({"cache": name, "skipped": reason}))
    timed_run(pipe, min(steps, 3), size, sync)  # warm-up
    device = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    print(json.dumps({"device": device, "layers": pipe.transformer.config.num_hidden_layers,
                      "hidden": pipe.transformer.config.hidden_size, "experts": pipe.transformer.config.num_experts,
                      "size": size, "steps": steps, "dtype": str(pipe.transformer.dtype)}))
    for name, config in configs.items():
        pipe.cache_config = config
        print(json.dumps({"cache": name, **timed_run(pipe, steps, size, sync)}))


if __name__ == "__main__":
    main()
