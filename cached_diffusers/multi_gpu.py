"""Start a cached pipeline on several processes: CFG-parallel, Ulysses context parallelism, or both on a 2-D mesh.

Used by ``torchrun --nproc_per_node=N cached-diffusers generate ... --ulysses-degree K --cfg-parallel`` and usable
from Python (``docs/multi-gpu.md``)::

    rank, world_size = init_distributed()          # under torchrun; before loading, so "cuda" is this rank's GPU
    pipe = CachedQwenImagePipeline.from_pretrained(...).to("cuda")
    mesh = parallelize(pipe, cfg_parallel=True, ulysses_degree=2)   # 4 processes: CFG 2 x Ulysses 2

The mesh has the dimensions ``("cfg", "ring", "ulysses")`` (ring 1): diffusers' ``enable_parallelism`` with
``ContextParallelConfig(ulysses_degree=K, mesh=mesh, ulysses_anything=True)`` shards the sequence over ``"ulysses"``
(its documented way to share a mesh with another parallelism; ``ulysses_anything`` accepts prompts of any token
count, where an even split needs it divisible by ``K``), and :meth:`~cached_diffusers.CachedPipelineMixin.enable_cfg_parallel` runs
the guidance branches over ``"cfg"``.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["cfg_degree_of", "init_distributed", "parallelize"]


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group that ``torchrun`` set up (environment ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ...).

    Backend ``nccl`` with CUDA (and this process's GPU, ``LOCAL_RANK``, made the current device), else ``gloo``. Does
    nothing when the default group is already initialised.

    Args:
        timeout_s: the group's timeout in seconds (> 0): a collective that a rank never reaches raises after it.

    Returns:
        ``(rank, world_size)``.

    Raises:
        ValueError: when the process was not started by ``torchrun`` (no ``WORLD_SIZE`` in the environment), or for
            ``timeout_s <= 0``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "--cfg-parallel and --ulysses-degree run on several processes: start with "
            "`torchrun --nproc_per_node=N cached-diffusers generate ...` (N = CFG degree x Ulysses degree)"
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def cfg_degree_of(world_size: int, cfg_parallel: bool, ulysses_degree: int) -> int:
    """The size of the mesh's ``"cfg"`` dimension: ``world_size / ulysses_degree`` with CFG-parallel, else 1.

    Raises:
        ValueError: for ``ulysses_degree < 1``, or a world size that is not ``CFG degree x ulysses_degree`` (CFG
            degree >= 2 with ``cfg_parallel``), naming the command-line flags.
    """
    if not isinstance(ulysses_degree, int) or ulysses_degree < 1:
        raise ValueError(f"ulysses_degree (--ulysses-degree) must be an integer >= 1, got {ulysses_degree!r}")
    cfg_degree = world_size // ulysses_degree if cfg_parallel else 1
    if cfg_degree * ulysses_degree != world_size or (cfg_parallel and cfg_degree < 2):
        need = "a multiple >= 2 of" if cfg_parallel else "equal to"
        raise ValueError(
            f"the number of processes ({world_size}, torchrun --nproc_per_node) must be {need} --ulysses-degree "
            f"({ulysses_degree}){' (CFG-parallel: one rank per guidance branch)' if cfg_parallel else ''}"
        )
    return cfg_degree


def parallelize(pipe: Any, cfg_parallel: bool = False, ulysses_degree: int = 1):
    """Spread ``pipe`` over the ranks of the default group: guidance branches over ``"cfg"``, the token sequence
    over ``"ulysses"``; every rank holds the full weights.

    Args:
        pipe: a cached pipeline on this rank's device.
        cfg_parallel: one guidance branch per rank of the ``"cfg"`` dimension, whose size is
            ``world_size / ulysses_degree`` (the pipeline's branch count: 2, or 3 for BAGEL with image guidance).
        ulysses_degree: Ulysses context-parallel degree (>= 1; 1 = off); divides the world size.

    Returns:
        The ``DeviceMesh`` with dimensions ``("cfg", "ring", "ulysses")``.

    Raises:
        RuntimeError: when ``torch.distributed`` is not initialised (:func:`init_distributed`).
        ValueError: when the world size is not ``CFG degree x ulysses_degree`` (CFG degree 1 without
            ``cfg_parallel``, >= 2 with it), or for ``ulysses_degree < 1``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("parallelize needs torch.distributed initialised: call init_distributed() under torchrun")
    cfg_degree = cfg_degree_of(dist.get_world_size(), cfg_parallel, ulysses_degree)
    device_type = pipe.transformer.device.type
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (cfg_degree, 1, ulysses_degree), mesh_dim_names=("cfg", "ring", "ulysses"))
    if ulysses_degree > 1:
        from diffusers import ContextParallelConfig

        # ulysses_anything: prompts of any token count (an even split would need the text length divisible by K)
        config = ContextParallelConfig(ulysses_degree=ulysses_degree, mesh=mesh, ulysses_anything=True)
        pipe.transformer.enable_parallelism(config=config)
    if cfg_parallel:
        pipe.enable_cfg_parallel(mesh["cfg"])
    return mesh
