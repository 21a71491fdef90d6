"""Per-sample decisions within a batch (``batch_decisions="per_sample"``): the batch-level view of the samples'
decisions and the row bookkeeping of a step where some samples compute and the others reuse.

Each sample of a branch keeps its own method state and residual store (:class:`~cached_diffusers.generation.BranchState`
``.samples``), so the policies decide on one sample at a time; this module holds what the engine and the models need
to act on such a step: :class:`BatchDecision` (each sample's decision and the computing rows), :func:`computing_rows`,
and :func:`scatter_rows` (the whole-batch streams from the computed and the reused rows). See
``docs/batch-invariance.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .policies import Decision

__all__ = ["BatchDecision", "Streams", "computing_rows", "scatter_rows"]

Streams = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class BatchDecision(Decision):
    """The decision of one step of one branch for a batch whose samples decide for themselves
    (``batch_decisions="per_sample"``, batch size > 1).

    ``reuse`` is ``True`` when every sample reuses; ``reason`` is the samples' common reason, else ``"mixed"``;
    ``value`` is ``None`` (each sample's value is in ``samples``).

    Attributes:
        samples: each sample's own :class:`~cached_diffusers.policies.Decision`, in batch order.
        computing: the batch rows that compute, ascending (every row on an all-compute step, none on an all-reuse
            step). After the compute, :meth:`CacheEngine.commit` takes these rows' residuals (row ``j`` of each
            tensor is sample ``computing[j]``'s); :meth:`CacheEngine.recall` returns the rows of ``reusing``.
    """

    samples: tuple[Decision, ...] = ()
    computing: tuple[int, ...] = ()

    @property
    def batch_size(self) -> int:
        return len(self.samples)

    @property
    def reusing(self) -> tuple[int, ...]:
        """The batch rows that reuse, ascending."""
        computing = set(self.computing)
        return tuple(i for i in range(len(self.samples)) if i not in computing)

    @property
    def mixed(self) -> bool:
        """Whether some samples compute and the others reuse at this step."""
        return 0 < len(self.computing) < len(self.samples)


def computing_rows(decision: Decision, batch_size: int) -> tuple[int, ...]:
    """The batch rows that compute under ``decision`` (all of them for a batch-level compute, none for a reuse)."""
    if isinstance(decision, BatchDecision):
        return decision.computing
    return () if decision.reuse else tuple(range(batch_size))


def _batch_size(inputs: Streams) -> int:
    """The batch size of a decision's inputs (their first dimension; 1 without inputs)."""
    return int(inputs[0].shape[0]) if inputs and inputs[0].ndim else 1


def _sample_rows(indicator: torch.Tensor | None, row: int, batch: int) -> torch.Tensor | None:
    """Sample ``row``'s part of a decision indicator: its row of a ``(batch, ...)`` tensor; a ``(1, ...)`` one is the
    same for every sample (e.g. a timestep embedding broadcast over the batch).

    Raises:
        ValueError: for an indicator whose first dimension is neither ``batch`` nor 1.
    """
    if indicator is None or indicator.ndim == 0:
        return indicator
    if indicator.shape[0] == batch:
        return indicator[row : row + 1]
    if indicator.shape[0] == 1:
        return indicator
    raise ValueError(
        f"per-sample cache decisions need the decision indicator per sample, (batch={batch}, ...) or (1, ...), got "
        f"shape {tuple(indicator.shape)}; set batch_decisions='shared' for one decision per batch"
    )


def _rows_of(base: Streams, parts: list[Streams]) -> bool:
    """Whether ``parts[i][k]`` is row ``i`` of ``base[k]`` (a view of it) for every sample ``i`` and stream ``k``."""
    if len(parts) != base[0].shape[0] or any(len(p) != len(base) for p in parts):
        return False
    for k, tensor in enumerate(base):
        for i, part in enumerate(parts):
            row = tensor[i : i + 1]
            value = part[k]
            if (
                value.data_ptr() != row.data_ptr()
                or value.shape != row.shape
                or value.stride() != row.stride()
                or value.dtype != row.dtype
            ):
                return False
    return True


def scatter_rows(
    span_in: Streams, rows: torch.Tensor, computed: Streams, others: torch.Tensor, recalled: Streams
) -> Streams:
    """Whole-batch streams at a cached span's output on a mixed step: rows ``rows`` are ``computed`` (the span's
    output for those samples), rows ``others`` are their span input plus their ``recalled`` residual.

    Args:
        span_in: the span's input streams, ``(B, ...)`` each.
        rows, others: 1-d ``torch.long`` tensors of the computing and the reusing batch rows (together ``0 .. B-1``).
        computed: ``(len(rows), ...)`` per stream; recalled: ``(len(others), ...)`` per stream.
    """
    out = []
    for s, c, r in zip(span_in, computed, recalled):
        full = s.index_add(0, others, r.to(s.dtype))
        out.append(full.index_copy_(0, rows, c.to(s.dtype)))
    return tuple(out)
