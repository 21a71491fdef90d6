"""Cache statistics of one generation, per guidance branch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["BranchStats", "CacheStats", "StepRecord"]


@dataclass(frozen=True)
class StepRecord:
    """What happened at one denoising step of one branch.

    Attributes:
        step: denoising step index.
        reused: whether the step reused the cache (the cached blocks did not run).
        reason: the decision's reason (see :class:`~cached_diffusers.policies.Decision`).
        value: the method's decision value (TeaCache: accumulated rescaled distance), ``None`` if not tested.
        blocks_computed: transformer blocks that actually ran at this step.
    """

    step: int
    reused: bool
    reason: str
    value: float | None
    blocks_computed: int


@dataclass
class BranchStats:
    """Per-branch record of one generation.

    Attributes:
        branch: the guidance branch's name (a sample's record: ``"<branch>[<row>]"``).
        records: one :class:`StepRecord` per step. With per-sample decisions (``batch_decisions="per_sample"``,
            batch size > 1) the branch's record of a step says ``reused`` when every sample reused, with the
            samples' common reason, else ``"mixed"``, and no value.
        calibration: what a calibration run recorded for the branch; with per-sample decisions and batch size > 1
            it stays empty and each sample's is in ``samples[i].calibration``.
        samples: with per-sample decisions and batch size > 1, each sample's own record, in batch order (its
            computed and reused steps, reasons, decision values and calibration); empty otherwise.
    """

    branch: str
    records: list[StepRecord] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    samples: list[BranchStats] = field(default_factory=list)

    def sample(self, row: int) -> BranchStats:
        """Sample ``row``'s record (created on first use, with those of the rows before it)."""
        while len(self.samples) <= row:
            self.samples.append(BranchStats(f"{self.branch}[{len(self.samples)}]"))
        return self.samples[row]

    @property
    def computed_steps(self) -> list[int]:
        """Step indices at which the cached blocks ran."""
        return [r.step for r in self.records if not r.reused]

    @property
    def reused_steps(self) -> list[int]:
        """Step indices at which the step reused the cache (the cached blocks did not run)."""
        return [r.step for r in self.records if r.reused]

    @property
    def num_computed(self) -> int:
        """Computed steps of this branch (``len(computed_steps)``)."""
        return len(self.computed_steps)

    @property
    def num_reused(self) -> int:
        """Reused steps of this branch (``len(reused_steps)``)."""
        return len(self.reused_steps)

    @property
    def num_calls(self) -> int:
        """Transformer calls of this branch: ``num_computed + num_reused``."""
        return len(self.records)

    @property
    def values(self) -> dict[int, float]:
        """The method's decision value per tested step (``{step: value}``), to tune thresholds from one run."""
        return {r.step: r.value for r in self.records if r.value is not None}

    @property
    def blocks_computed(self) -> int:
        return sum(r.blocks_computed for r in self.records)

    def to_dict(self) -> dict[str, Any]:
        return {
            "branch": self.branch,
            "computed_steps": self.computed_steps,
            "reused_steps": self.reused_steps,
            "values": {str(k): v for k, v in self.values.items()},
            "reasons": {str(r.step): r.reason for r in self.records},
            "blocks_computed": self.blocks_computed,
            **({"calibration": self.calibration} if self.calibration else {}),
            **({"samples": [s.to_dict() for s in self.samples]} if self.samples else {}),
        }


@dataclass
class CacheStats:
    """Statistics of one generation: one :class:`BranchStats` per guidance branch, in order of first use.

    Attributes:
        method: the cache method's name.
        value_name: what the per-step decision ``values`` measure.
        num_steps: denoising steps of the generation's full schedule (``None`` before the first transformer call;
            with caching off, a pipeline call records it when the call ends).
        first_step: the first executed step (0 for a full schedule; ``> 0`` for img2img / inpaint at
            ``strength < 1``, which run steps ``first_step .. num_steps - 1``). Step indices in the records are
            absolute indices of the full schedule.
        num_blocks: transformer blocks per full forward.
        branches: ``{branch name: BranchStats}``.
    """

    method: str
    value_name: str = ""
    num_steps: int | None = None
    num_blocks: int | None = None
    first_step: int | None = None
    branches: dict[str, BranchStats] = field(default_factory=dict)

    def branch(self, name: str) -> BranchStats:
        if name not in self.branches:
            self.branches[name] = BranchStats(name)
        return self.branches[name]

    @property
    def num_computed(self) -> int:
        """Transformer calls (over all branches) whose cached blocks ran."""
        return sum(b.num_computed for b in self.branches.values())

    @property
    def num_reused(self) -> int:
        """Transformer calls (over all branches) that reused the cache."""
        return sum(b.num_reused for b in self.branches.values())

    @property
    def blocks_computed(self) -> int:
        return sum(b.blocks_computed for b in self.branches.values())

    @property
    def num_calls(self) -> int:
        """Transformer calls (over all branches): ``num_computed + num_reused``."""
        return self.num_computed + self.num_reused

    @property
    def uncached_blocks(self) -> int:
        """Blocks a run with caching off would have run over the same transformer calls: ``num_calls * num_blocks``
        (0 while ``num_blocks`` is unknown). The denominator of :attr:`block_fraction`; the tools sum it over runs to
        get the fraction of a prompt set."""
        return self.num_calls * (self.num_blocks or 0)

    @property
    def block_fraction(self) -> float | None:
        """Blocks that ran divided by the blocks an uncached run would have run (1.0 = no saving), in ``[0, 1]``;
        ``None`` before any call or while ``num_blocks`` is unknown."""
        if not self.uncached_blocks:
            return None
        return self.blocks_computed / self.uncached_blocks

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "value_name": self.value_name,
            "num_steps": self.num_steps,
            "first_step": self.first_step,
            "num_blocks": self.num_blocks,
            "num_computed": self.num_computed,
            "num_reused": self.num_reused,
            "block_fraction": self.block_fraction,
            "branches": {name: b.to_dict() for name, b in self.branches.items()},
        }

    def summary(self) -> str:
        """A few human-readable lines: per branch, computed and reused steps with their indices."""
        start = f" (from step {self.first_step}: a partial schedule)" if self.first_step else ""
        if self.method == "none":
            if self.num_steps is None:
                return "cache: none (caching off; no denoising step recorded yet)"
            ran = self.num_steps - (self.first_step or 0)
            return f"cache: none (caching off): {ran} of {self.num_steps} steps run{start}, every step computed"
        lines = [f"cache: {self.method}, {self.num_steps} steps{start}, {self.num_blocks} blocks"]
        for b in self.branches.values():
            lines.append(
                f"  {b.branch}: computed {b.num_computed}, reused {b.num_reused}; reused steps {b.reused_steps}"
            )
            for sample in b.samples:
                lines.append(
                    f"    {sample.branch}: computed {sample.num_computed}, reused {sample.num_reused}; "
                    f"reused steps {sample.reused_steps}"
                )
        if self.block_fraction is not None:
            lines.append(f"  transformer blocks run: {100 * self.block_fraction:.1f}% of uncached")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
