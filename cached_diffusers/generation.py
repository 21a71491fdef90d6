"""Where a generation's cache state lives and where the denoising loop is.

A :class:`Generation` is the cache state of one generation (branch states, statistics, the step and sigma sources),
owned by its caller: a cached pipeline opens one per ``__call__`` through :meth:`GenerationScope.generation`, scoped
to the calling thread (or asyncio task) by a ``contextvars.ContextVar``, so concurrent generations on a shared
transformer keep their own state. :class:`GenerationScope` (a base of :class:`~cached_diffusers.engine.CacheEngine`)
finds the current generation, marks the branch and step of the calls made inside ``cache_context``
(:meth:`GenerationScope.context`) and resolves the current step (:meth:`GenerationScope.step_context`).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

from .configs import CacheConfig
from .policies import CachePolicy, Decision, StepContext
from .residuals import ResidualStore
from .stats import CacheStats

__all__ = ["BranchState", "DEFAULT_BRANCH", "Generation", "GenerationScope"]

Streams = tuple[torch.Tensor, ...]

DEFAULT_BRANCH = "cond"
"""The branch of a call that names none (no ``cache_context``: a single-branch loop, e.g. ``Flux2Pipeline``'s): the
name diffusers' loops give the conditional (or only) branch, so a loop's single branch has one name whether or not it
calls ``cache_context``."""


@dataclass(frozen=True)
class _Pending:
    """A decision taken by ``CacheEngine.decide`` and not yet committed or recalled."""

    ctx: StepContext
    decision: Decision
    indicator: torch.Tensor | None
    inputs: Streams
    num_blocks: int  # blocks a compute runs
    cached_around: int  # blocks a reuse still runs (front + back)


@dataclass
class BranchState:
    """Cache state of one guidance branch within one generation (``pending``: a decision awaiting its commit or
    recall)."""

    method_state: Any
    store: ResidualStore
    num_reused: int = 0
    consecutive_reused: int = 0
    last_step: int | None = None
    invalidated: bool = False
    pending: _Pending | None = None
    samples: list[BranchState] | None = None  # per-sample states (batch_decisions="per_sample", batch > 1)
    last_batch: Streams | None = None  # the last commit of every sample at once (recalled without a copy)


@dataclass(frozen=True)
class _CallContext:
    name: str
    step_index: int | None
    num_inference_steps: int | None


@dataclass
class Generation:
    """The cache state of one generation: what a cached residual depends on, owned by the caller, not the model.

    A cached pipeline opens one per ``__call__`` (:meth:`CacheEngine.generation`), so that concurrent generations
    on pipelines that share a transformer (threads, or a pipeline called from another one's callback) each keep
    their own branch states, step source and statistics. A transformer driven directly, outside any generation,
    uses its engine's own generation, which restarts when the steps wrap to 0 or the step count changes.

    Attributes:
        config: the cache config of this generation (``None``: no caching).
        policy: its decision policy (built once per generation; ``None`` when caching is off).
        branches: ``{branch name: BranchState}``, the stored residuals and the method state per guidance branch.
        stats: this generation's statistics.
    """

    config: CacheConfig | None
    policy: CachePolicy | None
    branches: dict[str, BranchState] = field(default_factory=dict)
    stats: CacheStats = field(default_factory=lambda: CacheStats("none"))
    step_source: Callable[[], tuple[int, int]] | None = None
    sigma_source: Callable[[], Any] | None = None  # the running scheduler's sigmas (MeanCache's time weights)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every branch's state and start new statistics."""
        self.branches = {}
        policy = self.policy
        self.stats = CacheStats(
            self.config.method if self.config is not None else "none",
            value_name=policy.value_name if policy is not None else "",
        )

    def invalidate(self) -> None:
        """Make every branch compute at its next step and restart its residual store (see ``CacheEngine.invalidate``)."""
        for state in self.branches.values():
            state.invalidated = True
            for sample in state.samples or ():
                sample.invalidated = True


_OPEN_GENERATIONS: contextvars.ContextVar[Mapping[int, Generation]] = contextvars.ContextVar(
    "cached_diffusers_open_generations", default={}
)
"""``{id(engine): Generation}`` of the generations open in the current thread (or asyncio task)."""


_CALL_CONTEXTS: contextvars.ContextVar[Mapping[int, _CallContext]] = contextvars.ContextVar(
    "cached_diffusers_call_contexts", default={}
)
"""``{id(engine): _CallContext}``: the branch (and step) marked by ``cache_context`` in the current thread."""


class GenerationScope:
    """The per-thread generation scoping and step resolution of a :class:`~cached_diffusers.engine.CacheEngine` (its
    base class): which :class:`Generation` a call acts on, the branch and step marked by ``cache_context``, and the
    step source a cached pipeline installs.

    The host class provides ``_own`` (its own :class:`Generation`), ``_own_config`` / ``_own_policy``,
    ``_last_stats``, ``_open_caching`` with its ``_open_lock``, and ``make_policy(config)``.
    """

    @property
    def current(self) -> Generation:
        """The generation open in this thread for this engine, else the engine's own."""
        return _OPEN_GENERATIONS.get().get(id(self), self._own)

    @property
    def stats(self) -> CacheStats:
        """Statistics of the generation open in this thread, else of the last one started on this engine."""
        open_generation = _OPEN_GENERATIONS.get().get(id(self))
        return open_generation.stats if open_generation is not None else self._last_stats

    @property
    def _config(self) -> CacheConfig | None:
        return self.current.config

    @property
    def _policy(self) -> CachePolicy | None:
        return self.current.policy

    @property
    def _branches(self) -> dict[str, BranchState]:
        return self.current.branches

    @property
    def _context(self) -> _CallContext | None:
        return _CALL_CONTEXTS.get().get(id(self))

    def reset(self) -> None:
        """Forget every branch's state and start new statistics (of the current generation)."""
        generation = self.current
        generation.reset()
        self._last_stats = generation.stats

    def invalidate(self) -> None:
        """The inputs changed behind the cache's back (latents replaced by a callback, a changed schedule): every
        branch of the current generation computes its next step, and its residual store restarts."""
        self.current.invalidate()

    @contextlib.contextmanager
    def generation(
        self, config: CacheConfig | Mapping[str, Any] | str | None | object = ..., *, policy: CachePolicy | None = None
    ) -> Iterator[Generation]:
        """Open a new generation for the calls made in this thread (or asyncio task) inside the block.

        Args:
            config: this generation's cache config; omitted, the engine's own (:attr:`config`).
            policy: the policy of ``config`` if already built (else built here).

        Yields:
            The :class:`Generation`; its ``stats`` stay readable after the block, the branch states are dropped.

        Raises:
            ValueError: for an invalid ``config``.
        """
        if config is ...:
            config, policy = self._own_config, self._own_policy
        elif policy is None:
            config, policy = self.make_policy(config)
        generation = Generation(config, policy)
        self._last_stats = generation.stats
        caching = int(policy is not None)
        with self._open_lock:
            self._open_caching += caching
        token = _OPEN_GENERATIONS.set({**_OPEN_GENERATIONS.get(), id(self): generation})
        try:
            yield generation
        finally:
            _OPEN_GENERATIONS.reset(token)
            with self._open_lock:
                self._open_caching -= caching
            generation.branches = {}  # free the stored residuals; the statistics stay

    # -- where the loop is ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def context(
        self, name: str, step_index: int | None = None, num_inference_steps: int | None = None
    ) -> Iterator[None]:
        """Mark the branch (``name``) and, optionally, the step of the transformer calls made inside (in this thread;
        a generation opened inside, e.g. by a pipeline called within, sees the mark too)."""
        token = _CALL_CONTEXTS.set({**_CALL_CONTEXTS.get(), id(self): _CallContext(name, step_index, num_inference_steps)})
        try:
            yield
        finally:
            _CALL_CONTEXTS.reset(token)

    @contextlib.contextmanager
    def step_source(self, source: Callable[[], tuple[int, int]]) -> Iterator[None]:
        """Install ``source() -> (step_index, num_inference_steps)`` for calls whose context lacks them."""
        generation = self.current
        previous, generation.step_source = generation.step_source, source
        try:
            yield
        finally:
            generation.step_source = previous

    def step_context(
        self, branch: str | None = None, step_index: int | None = None, num_inference_steps: int | None = None
    ) -> StepContext:
        """The current step, step count and branch: each argument given wins, else the cache context's, else (step
        and count) the step source's, else (branch) :data:`DEFAULT_BRANCH`.

        Raises:
            ValueError: when neither the arguments, the cache context nor a step source tell the denoising step, or
                the step is outside ``[0, num_inference_steps)``.
        """
        generation = self.current
        ctx = self._context
        branch = self._branch_name(branch)
        step = step_index if step_index is not None else (ctx.step_index if ctx is not None else None)
        num_steps = num_inference_steps
        if num_steps is None:
            num_steps = ctx.num_inference_steps if ctx is not None else None
        if (step is None or num_steps is None) and generation.step_source is not None:
            source_step, source_num_steps = generation.step_source()
            step = source_step if step is None else step
            num_steps = source_num_steps if num_steps is None else num_steps
        if step is None or num_steps is None:
            raise ValueError(
                "caching needs the denoising step: call the transformer through a cached pipeline, or wrap each call "
                "in `transformer.cache_context(branch, step_index=i, num_inference_steps=N)`"
            )
        if not 0 <= step < num_steps:
            raise ValueError(f"step_index must be in [0, num_inference_steps={num_steps}), got {step}")
        return StepContext(int(step), int(num_steps), branch)

    def _branch_name(self, branch: str | None) -> str:
        """``branch``, else the cache context's name, else :data:`DEFAULT_BRANCH`."""
        if branch is not None:
            return branch
        ctx = self._context
        return ctx.name if ctx is not None else DEFAULT_BRANCH

    @staticmethod
    def _starts_new_generation(generation: Generation, ctx: StepContext) -> bool:
        """Whether a call at ``ctx`` starts the next generation of a directly driven transformer."""
        stats = generation.stats
        known = generation.branches.get(ctx.branch)
        return stats.num_steps is not None and (
            stats.num_steps != ctx.num_steps
            or (ctx.step == 0 and known is not None and known.last_step is not None)
            or (known is not None and known.last_step is not None and ctx.step < known.last_step)
        )

    def _branch_state(self, generation: Generation, ctx: StepContext, num_blocks: int) -> BranchState:
        new_generation = self._starts_new_generation(generation, ctx)
        stats = generation.stats
        if new_generation:
            # A transformer driven directly (no pipeline) starts its next generation: steps wrap to 0 or go back (or the
            # step count changed, e.g. a callback changed the schedule).
            generation.reset()
            stats = generation.stats
        if generation is self._own or new_generation:
            self._last_stats = stats
        if stats.first_step is None:
            # The generation's first transformer call is at its first executed step (0, or the strength-dependent
            # begin index of img2img / inpaint): guards and TaylorSeer count executed steps from it.
            stats.first_step = ctx.step
        stats.num_steps, stats.num_blocks = ctx.num_steps, num_blocks
        if ctx.branch not in generation.branches:
            policy = generation.policy
            store = policy.make_store(stats.first_step, generation.sigma_source)
            generation.branches[ctx.branch] = BranchState(policy.new_state(), store)
        return generation.branches[ctx.branch]
