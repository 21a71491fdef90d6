"""Runs cache-dit 1.5.3 (the peer implementation of DBCache / TaylorSeer / SCM) in a process of its own.

cache-dit's pipeline mode patches the pipeline *class*'s ``__call__`` (``CachedAdapter.create_context``), which would
leak into every other test of the same process, so the differential tests (``tests/test_peers_cachedit.py``) run it
through this script::

    python -m tests.peers.cachedit_runner request.json result.pt     # from the repository root
    python tests/peers/cachedit_runner.py request.json result.pt     # same thing
    python -m tests.peers.cachedit_runner --masks result.pt          # only steps_mask, every preset, 1..60 steps

cache-dit is a test-only dependency: ``pip install --no-deps cache-dit==1.5.3`` (it needs ``packaging`` and ``pyyaml``
besides torch and diffusers).

Request (JSON; every key optional)::

    {
      "seed": 0,                          # weights seed of cached_diffusers.tools.tiny.build_tiny_qwenimage_pipeline
      "num_threads": 2,                   # torch.set_num_threads (default: torch's own default)
      "height": 64, "width": 64,
      "prompt": "...",                    # default: cached_diffusers.tools.tiny.DEFAULT_PROMPTS[0]
      "negative_prompt": " ", "true_cfg_scale": 4.0,
      "generator_seed": 0,                # torch.Generator().manual_seed(generator_seed) for every run
      "references": [12, 20],             # num_inference_steps of uncached runs (made before cache-dit is enabled)
      "runs": [
        {"name": "fbc-0.7",               # key of the result
         "num_inference_steps": 12,
         "cache": {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 0,
                   "residual_diff_threshold": 0.7, ...},   # cache_dit.DBCacheConfig fields, as named there
         "taylorseer_order": null,        # an int: calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=...)
         "call": {"true_cfg_scale": 1.0, "negative_prompt": null}}   # optional per-run pipeline kwargs overrides
      ],
      "masks": {"policies": ["slow", "medium", "fast", "ultra"], "steps": [1, 2, ..., 60]},
      "mask_calls": [{"compute_bins": [4, 2], "cache_bins": [1, 3], "total_steps": 9}, ...]
    }

In a run's ``cache``, ``enable_separate_cfg`` defaults to True (the QwenImage adapter's own default: cond and uncond
calls are separate branches, assigned by call parity), and ``steps_computation_mask`` may be given as a list of 0/1,
as ``{"mask_policy": "fast"}`` or as ``{"compute_bins": [...], "cache_bins": [...]}``; the last two are turned into a
list with ``cache_dit.steps_mask(..., total_steps=num_inference_steps)``.

Without ``runs`` and ``references`` no pipeline is built (masks only).

Result (``torch.save`` of a dict; load with ``torch.load(path, weights_only=True)``)::

    {
      "cache_dit_version": "1.5.3",
      "references": {num_steps: latents},                       # float32, (1, tokens, 64)
      "runs": {name: {
          "num_inference_steps": int,
          "config": str, "calibrator": str | None,              # cache-dit's strify() of the two configs
          "mask": list[int] | None,                             # the steps_computation_mask actually used
          "latents": tensor | None,                             # output_type="latent"
          "cached_steps": list[int],                            # cond (non-CFG) branch, denoising step indices from 0
          "cfg_cached_steps": list[int],                        # uncond (CFG) branch, denoising step indices from 0
          "residual_diffs": {step: float},                      # cond branch, one per tested step (see docs)
          "cfg_residual_diffs": {step: float},                  # uncond branch
          "block_calls": list[int],                             # forwards of each transformer block over the run
          "transformer_calls": int,
          "max_abs_diff_vs_reference": float | None,            # vs the reference of the same step count (no "call")
          "error": str | None,                                  # "ExceptionType: message" if the run raised
      }},
      "masks": {(policy, total_steps): list[int] | "ExceptionType: message"},
      "mask_calls": [list[int] | "ExceptionType: message", ...],
    }
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")

import torch  # noqa: E402

if __package__ in (None, ""):  # run as a script path: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MASK_POLICIES = ("slow", "medium", "fast", "ultra")
DEFAULT_MASK_STEPS = tuple(range(1, 61))


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def compute_masks(policies=MASK_POLICIES, steps=DEFAULT_MASK_STEPS) -> dict[tuple[str, int], list[int] | str]:
    """``cache_dit.steps_mask(mask_policy=p, total_steps=n)`` for every (p, n), or the error it raises."""
    import cache_dit

    out: dict[tuple[str, int], list[int] | str] = {}
    for policy in policies:
        for n in steps:
            try:
                out[(policy, int(n))] = [int(m) for m in cache_dit.steps_mask(mask_policy=policy, total_steps=int(n))]
            except Exception as exc:  # noqa: BLE001 - the error is the result
                out[(policy, int(n))] = _error(exc)
    return out


def compute_mask_calls(calls: list[dict[str, Any]]) -> list[list[int] | str]:
    """``cache_dit.steps_mask(**kwargs)`` for each kwargs dict, or the error it raises."""
    import cache_dit

    out: list[list[int] | str] = []
    for kwargs in calls:
        try:
            out.append([int(m) for m in cache_dit.steps_mask(**kwargs)])
        except Exception as exc:  # noqa: BLE001
            out.append(_error(exc))
    return out


def _resolve_mask(spec: Any, num_steps: int) -> list[int] | None:
    import cache_dit

    if spec is None:
        return None
    if isinstance(spec, dict):
        return [int(m) for m in cache_dit.steps_mask(**spec, total_steps=num_steps)]
    return [int(m) for m in spec]


class _BlockCounter:
    """Counts the forwards of every transformer block (forward pre-hooks on the original block modules).

    cache-dit runs the original block modules inside its ``CachedBlocks`` wrapper, so the hooks see exactly the
    blocks that really ran: Fn + Bn blocks on a cached call, all blocks on a computed one.
    """

    def __init__(self, blocks: torch.nn.ModuleList):
        self.counts = [0] * len(blocks)
        self.handles = [blk.register_forward_pre_hook(self._hook(i)) for i, blk in enumerate(blocks)]

    def _hook(self, i: int):
        def hook(module, args):
            self.counts[i] += 1

        return hook

    def reset(self) -> None:
        self.counts = [0] * len(self.counts)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def run_request(request: dict[str, Any]) -> dict[str, Any]:
    import cache_dit

    result: dict[str, Any] = {
        "cache_dit_version": getattr(cache_dit, "__version__", "unknown"),
        "references": {},
        "runs": {},
        "masks": {},
        "mask_calls": [],
    }

    masks = request.get("masks")
    if masks:
        result["masks"] = compute_masks(masks.get("policies", MASK_POLICIES), masks.get("steps", DEFAULT_MASK_STEPS))
    if request.get("mask_calls"):
        result["mask_calls"] = compute_mask_calls(request["mask_calls"])

    if request.get("num_threads"):
        # Intra-op parallelism can change float reduction order: match the caller's process for bitwise comparisons.
        torch.set_num_threads(int(request["num_threads"]))

    runs = request.get("runs") or []
    references = [int(n) for n in request.get("references") or []]
    if not runs and not references:
        return result

    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    from cached_diffusers.tools.tiny import DEFAULT_PROMPTS, build_tiny_qwenimage_pipeline

    pipe = build_tiny_qwenimage_pipeline(seed=int(request.get("seed", 0)))
    pipe.set_progress_bar_config(disable=True)
    counter = _BlockCounter(pipe.transformer.transformer_blocks)

    def call(num_steps: int, overrides: dict[str, Any] | None = None) -> torch.Tensor:
        kwargs = {
            "prompt": request.get("prompt", DEFAULT_PROMPTS[0]),
            "negative_prompt": request.get("negative_prompt", " "),
            "true_cfg_scale": float(request.get("true_cfg_scale", 4.0)),
            "height": int(request.get("height", 64)),
            "width": int(request.get("width", 64)),
            "generator_seed": int(request.get("generator_seed", 0)),
        }
        kwargs.update(overrides or {})
        seed = int(kwargs.pop("generator_seed"))
        out = pipe(
            **kwargs,
            num_inference_steps=num_steps,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        )
        return out.images.detach().to("cpu").clone()

    # QwenImagePipeline.__call__ runs under torch.no_grad() itself.
    for n in references:
        result["references"][n] = call(n)

    for spec in runs:
        name = spec["name"]
        n = int(spec["num_inference_steps"])
        cache_kwargs = dict(spec.get("cache") or {})
        cache_kwargs.setdefault("enable_separate_cfg", True)
        entry: dict[str, Any] = {
            "num_inference_steps": n,
            "config": None,
            "calibrator": None,
            "mask": None,
            "latents": None,
            "cached_steps": [],
            "cfg_cached_steps": [],
            "residual_diffs": {},
            "cfg_residual_diffs": {},
            "block_calls": [],
            "transformer_calls": 0,
            "max_abs_diff_vs_reference": None,
            "error": None,
        }
        result["runs"][name] = entry
        try:
            mask = _resolve_mask(cache_kwargs.pop("steps_computation_mask", None), n)
            entry["mask"] = mask
            cache_config = DBCacheConfig(**cache_kwargs, steps_computation_mask=mask)
            order = spec.get("taylorseer_order")
            calibrator = None if order is None else TaylorSeerCalibratorConfig(taylorseer_order=int(order))
            entry["config"] = cache_config.strify()
            entry["calibrator"] = None if calibrator is None else calibrator.strify(details=True)
            cache_dit.enable_cache(pipe, cache_config=cache_config, calibrator_config=calibrator)
            try:
                counter.reset()
                latents = call(n, spec.get("call"))
                entry["latents"] = latents
                entry["block_calls"] = list(counter.counts)
                entry["transformer_calls"] = counter.counts[0]
                # One CacheStats per block list, then the transformer-level one (same values for QwenImage).
                stats = cache_dit.summary(pipe, details=False, logging=False)[0]
                entry["cached_steps"] = [int(s) for s in stats.cached_steps]
                entry["cfg_cached_steps"] = [int(s) for s in stats.cfg_cached_steps]
                entry["residual_diffs"] = {int(k): float(v) for k, v in stats.residual_diffs.items()}
                entry["cfg_residual_diffs"] = {int(k): float(v) for k, v in stats.cfg_residual_diffs.items()}
                if n in result["references"]:
                    ref = result["references"][n]
                    entry["max_abs_diff_vs_reference"] = float((latents - ref).abs().max())
            finally:
                cache_dit.disable_cache(pipe)
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            entry["error"] = _error(exc)

    counter.remove()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--masks", action="store_true", help="only steps_mask of every preset for 1..60 steps")
    parser.add_argument("paths", nargs="+", help="request.json result.pt (with --masks: result.pt)")
    args = parser.parse_args(argv)
    if args.masks:
        if len(args.paths) != 1:
            parser.error("--masks takes exactly one path: the result file")
        request: dict[str, Any] = {"masks": {"policies": list(MASK_POLICIES), "steps": list(DEFAULT_MASK_STEPS)}}
        out_path = args.paths[0]
    else:
        if len(args.paths) != 2:
            parser.error("expected: request.json result.pt")
        request = json.loads(Path(args.paths[0]).read_text())
        out_path = args.paths[1]
    result = run_request(request)
    torch.save(result, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
