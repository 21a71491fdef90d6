"""``cached-diffusers generate``: load a model as a cached pipeline and write images."""

from __future__ import annotations

import argparse
import os

from ..timing import timed_call
from .common import (
    _call_value, _check_model, _check_sampling_args, _checked_generation_defaults, _device_and_dtype,
    _load_pipeline, _output_paths, _sampling_kwargs, check_output_file,
)
from .options import _check_threads, _set_threads, cache_config_from_args


def cmd_generate(args: argparse.Namespace) -> int:
    _check_threads(args)
    _check_sampling_args(args)
    check_output_file("--output", args.output, image=True)
    config = cache_config_from_args(args)
    _set_threads(args)
    _device_and_dtype(args.device, args.dtype)
    _check_model(args.model)  # after the options: they are quicker to fix, and a Hub id may take seconds
    _checked_generation_defaults(args.model)
    rank = 0
    if args.cfg_parallel or args.ulysses_degree != 1:  # under torchrun: join the group before loading (device)
        from ...multi_gpu import cfg_degree_of, init_distributed, parallelize

        if args.ulysses_degree < 1:
            raise ValueError(f"--ulysses-degree must be >= 1, got {args.ulysses_degree}")
        rank, world_size = init_distributed()
        cfg_degree_of(world_size, args.cfg_parallel, args.ulysses_degree)  # before any weight is loaded
    pipe = _load_pipeline(args, config)
    if args.cfg_parallel or args.ulysses_degree != 1:
        parallelize(pipe, cfg_parallel=args.cfg_parallel, ulysses_degree=args.ulysses_degree)
    kwargs = {"prompt": args.prompt, **_sampling_kwargs(pipe, args, args.seed, num_prompts=len(args.prompt))}
    output, seconds = timed_call(pipe, **kwargs)
    if rank != 0:  # every rank returns the same images; rank 0 writes them. Each rank's stats are its branches'.
        print(f"rank {rank}: {pipe.cache_stats.summary()}")
        return 0
    paths = _output_paths(args.output, len(output.images))
    for image, path in zip(output.images, paths):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        image.save(path)
    print(f"wrote {', '.join(paths)}")
    print(f"wall time: {seconds:.2f} s ({_call_value(pipe, kwargs, 'num_inference_steps')} steps)")
    print(pipe.cache_stats.summary())
    return 0
