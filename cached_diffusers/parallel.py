"""Rank-identical cache decisions under diffusers' context parallelism.

With ``transformer.enable_parallelism(config=ContextParallelConfig(...))`` (Ulysses or ring) every rank of the
context-parallel group holds one shard of the token sequence between the plan's split and its gather, so the cached
stack's streams, the residuals a rank stores and the decision indicators it computes are that rank's shard. A decision
taken from a shard would differ between ranks: one rank would run the blocks (and their attention collectives) while
another reuses, and the run hangs. Every statistic a decision reads is therefore a ratio of sums over the sequence,
and each sum is all-reduced over the group before the ratio (:func:`sequence_sums`), so that every rank takes the
single-process decision, up to the rounding of the summation order. cache-dit does the same for its
residual-difference threshold (``CachedContextManager.similarity`` all-reduces the means of ``|t1 - t2|`` and
``|t1|`` with ``ReduceOp.AVG`` before the ratio, equal to the sums' ratio for equal shards); vllm-omni likewise for
TeaCache's L1 distance over its sequence-parallel group.

The engine marks the group while it decides (:func:`sequence_group`, from ``BlockStack.sequence_group``); a model
finds its group with :func:`context_parallel_group` and shards a tensor as its plan would with
:func:`shard_sequence`. Without a group (a single process, or tensor parallelism, whose activations are replicated)
the sums are the local ones, with no communication.

Imports no model: it reads diffusers' ``ParallelConfig`` recorded on the model by ``enable_parallelism``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import torch

__all__ = [
    "context_parallel_group",
    "gather_sequence",
    "sequence_group",
    "sequence_mean",
    "sequence_sums",
    "shard_sequence",
]

_SEQUENCE_GROUP: contextvars.ContextVar[Any] = contextvars.ContextVar("cached_diffusers_sequence_group", default=None)
"""The process group the sequence of the current decision is sharded over, or ``None`` (whole sequence here)."""


def _context_parallel_config(model: torch.nn.Module):
    config = getattr(model, "_parallel_config", None)
    return getattr(config, "context_parallel_config", None) if config is not None else None


def context_parallel_group(model: torch.nn.Module):
    """The ``torch.distributed`` process group ``model``'s token sequence is sharded over, or ``None``.

    It is the flattened ring x Ulysses mesh of the ``ContextParallelConfig`` that ``model.enable_parallelism``
    (or ``from_pretrained(..., parallel_config=...)``) recorded; ``None`` for a model without context parallelism
    (none, or tensor parallelism only) or a group of one rank.
    """
    cp_config = _context_parallel_config(model)
    mesh = getattr(cp_config, "_flattened_mesh", None) if cp_config is not None else None
    if mesh is None or mesh.size() == 1:
        return None
    return mesh.get_group()


def shard_sequence(model: torch.nn.Module, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This rank's shard of ``tensor`` along ``dim``, exactly as ``model``'s context-parallel plan splits an input.

    Uses diffusers' own splitter (``ContextParallelSplitHook._prepare_cp_input``: equal chunks, or
    ``tensor_split`` with ``ulysses_anything`` / ``ring_anything``), so a tensor sharded here lines up with the ones
    the plan's hooks shard. Returns ``tensor`` unchanged when ``model`` has no context parallelism.

    Raises:
        AssertionError: from diffusers, when ``tensor.shape[dim]`` is not divisible by the group size (without the
            ``*_anything`` modes).
    """
    cp_config = _context_parallel_config(model)
    if cp_config is None or context_parallel_group(model) is None:
        return tensor
    from diffusers.hooks.context_parallel import ContextParallelSplitHook
    from diffusers.models._modeling_parallel import ContextParallelInput

    splitter = ContextParallelSplitHook({}, cp_config)
    return splitter._prepare_cp_input(tensor, ContextParallelInput(split_dim=dim, expected_dims=tensor.dim()))


@contextlib.contextmanager
def sequence_group(group: Any) -> Iterator[None]:
    """Inside the block, :func:`sequence_sums` sums over ``group`` (``None``: local sums, no communication)."""
    token = _SEQUENCE_GROUP.set(group)
    try:
        yield
    finally:
        _SEQUENCE_GROUP.reset(token)


def sequence_sums(*partial_sums: torch.Tensor) -> tuple[float, ...]:
    """The given scalar tensors (sums over this rank's tokens), summed over the current sequence group, as floats.

    Without a group (see :func:`sequence_group`) each is ``tensor.item()``, as a single process computes it. With one,
    the scalars are stacked in float64 and reduced by one ``torch.distributed.all_reduce`` (SUM), so every rank
    returns the same values: the sums over the whole sequence. Every rank of the group must call it with the same
    number of values at the same point (the engine guarantees it: the calls depend only on the step, the branch and
    shapes, which the ranks share).
    """
    group = _SEQUENCE_GROUP.get()
    if group is None:
        return tuple(t.item() for t in partial_sums)
    stacked = torch.stack([t.detach().reshape(()).to(torch.float64) for t in partial_sums])
    torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.SUM, group=group)
    return tuple(stacked.tolist())


def sequence_mean(values: torch.Tensor) -> float:
    """Mean of ``values`` (this rank's part of a per-token quantity) over the whole sequence of the current group.

    Without a group it is ``values.mean().item()``; with one, the sum and the element count are reduced together
    (:func:`sequence_sums`) and divided, so unequal shards (``ulysses_anything``) weigh every token alike.
    """
    if _SEQUENCE_GROUP.get() is None:
        return values.mean().item()
    total, count = sequence_sums(values.sum(), values.new_tensor(float(values.numel())))
    return total / count


def gather_sequence(tensor: torch.Tensor, group: Any, dim: int = 1) -> torch.Tensor:
    """The whole sequence of a tensor sharded along ``dim`` over ``group``: every rank's shard, in rank order.

    The inverse of the plan's split (equal chunks, or the uneven ones of ``ulysses_anything`` / ``ring_anything``):
    the shards' lengths are exchanged first, then the shards, padded to the longest. ``group=None`` returns
    ``tensor`` unchanged. Every rank of ``group`` must call it at the same point (SeaCache's indicator under context
    parallelism, which needs the whole latent grid for its FFT).
    """
    if group is None:
        return tensor
    import torch.distributed as dist

    world = dist.get_world_size(group)
    length = torch.tensor([tensor.shape[dim]], device=tensor.device, dtype=torch.int64)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    lengths = [int(n.item()) for n in lengths]
    longest = max(lengths)
    moved = tensor.movedim(dim, 0).contiguous()
    if moved.shape[0] < longest:
        padding = moved.new_zeros((longest - moved.shape[0], *moved.shape[1:]))
        moved = torch.cat([moved, padding], dim=0)
    shards = [torch.empty_like(moved) for _ in range(world)]
    dist.all_gather(shards, moved, group=group)
    whole = torch.cat([shard[:n] for shard, n in zip(shards, lengths)], dim=0)
    return whole.movedim(0, dim)
