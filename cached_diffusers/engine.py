"""The cache engine: per-branch state, the compute-or-reuse step, statistics.

The engine knows no model. A cached model hands it, once per forward, a :class:`BlockStack` (how many blocks, how to
run a span of them on a tuple of residual streams, and the decision signals it can compute) plus the streams at the
stack's input; the engine decides for the current step and branch, runs the blocks or reuses the stored residual,
and returns the streams at the stack's output.

Where the denoising loop is comes from the model's ``cache_context(name, step_index=..., num_inference_steps=...)``
(the branch name is the context's name) or, for the fields a pipeline's loop does not pass, from a step source that
the cached pipeline installs for the duration of its ``__call__``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

from .configs import CacheConfig, resolve_cache_config
from .policies import CachePolicy, Gate, StepContext
from .residuals import ResidualStore
from .stats import CacheStats, StepRecord

__all__ = ["BlockStack", "BranchState", "CacheEngine", "DEFAULT_BRANCH", "Generation"]

Streams = tuple[torch.Tensor, ...]

DEFAULT_BRANCH = "default"
"""Branch name used when a call carries no cache context (a single-branch loop)."""


@dataclass
class BlockStack:
    """One forward's view of a model's cacheable block stack.

    Attributes:
        num_blocks: blocks in the stack, in execution order.
        run_blocks: ``run_blocks(start, end, streams) -> streams`` runs blocks ``start .. end - 1``. ``streams`` is a
            tuple of tensors (e.g. ``(image_tokens (B, L_img, D), text_tokens (B, L_txt, D))``) and the returned
            tuple has the same structure and shapes, so that ``out - in`` is each stream's residual.
        signals: ``{kind: fn(streams) -> Tensor}``, the decision signals the model can compute cheaply at the stack's
            input (``"modulated_input"``: block 0's modulated image input, TeaCache's indicator). The engine itself
            provides ``"front_residual"`` (image-stream residual of the front blocks, DBCache's probe).
    """

    num_blocks: int
    run_blocks: Callable[[int, int, Streams], Streams]
    signals: Mapping[str, Callable[[Streams], torch.Tensor]] = field(default_factory=dict)


@dataclass
class BranchState:
    """Cache state of one guidance branch within one generation."""

    method_state: Any
    store: ResidualStore
    num_reused: int = 0
    consecutive_reused: int = 0
    last_step: int | None = None
    invalidated: bool = False


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
            signal_name=policy.signal_name if policy is not None else "",
        )

    def invalidate(self) -> None:
        """Make every branch compute at its next step and restart its residual store (see ``CacheEngine.invalidate``)."""
        for state in self.branches.values():
            state.invalidated = True


_OPEN_GENERATIONS: contextvars.ContextVar[Mapping[int, Generation]] = contextvars.ContextVar(
    "cached_diffusers_open_generations", default={}
)
"""``{id(engine): Generation}`` of the generations open in the current thread (or asyncio task)."""

_CALL_CONTEXTS: contextvars.ContextVar[Mapping[int, _CallContext]] = contextvars.ContextVar(
    "cached_diffusers_call_contexts", default={}
)
"""``{id(engine): _CallContext}``: the branch (and step) marked by ``cache_context`` in the current thread."""


class CacheEngine:
    """Holds a model's cache config and policy; the cache state itself lives in a :class:`Generation`.

    Every method that reads or changes cache state (``run``, ``context``, ``step_source``, ``step_context``,
    ``stats``, ``reset``, ``invalidate``) acts on the generation open in the calling thread for this engine
    (:meth:`generation`, which cached pipelines open per call), or, when none is open, on the engine's own
    generation, which a transformer driven directly uses.

    Args:
        defaults: model-provided values the configs may need: ``"model_name"``, ``"num_blocks"``,
            ``"teacache_coefficients"``, ``"mag_ratios"``, and ``"calibration_hint"`` (how to calibrate the model,
            appended to the error raised when a method lacks its model data).
    """

    def __init__(self, defaults: Mapping[str, Any] | None = None):
        self.defaults = dict(defaults or {})
        self._own_config: CacheConfig | None = None
        self._own_policy: CachePolicy | None = None
        self._own = Generation(None, None)
        self._last_stats: CacheStats = self._own.stats
        self._open_caching = 0  # generations open (in any thread) whose config caches; see `active`
        self._open_lock = threading.Lock()

    # -- configuration -------------------------------------------------------------------------------------------
    @property
    def config(self) -> CacheConfig | None:
        """The engine's cache config (what the transformer uses outside a pipeline's generation; ``None``: off)."""
        return self._own_config

    @config.setter
    def config(self, value: CacheConfig | Mapping[str, Any] | str | None) -> None:
        config, policy = self.make_policy(value)
        self._own_config, self._own_policy = config, policy
        self._own = Generation(config, policy)
        self._last_stats = self._own.stats

    def make_policy(self, value: CacheConfig | Mapping[str, Any] | str | None) -> tuple[CacheConfig | None, CachePolicy | None]:
        """``(config, policy)`` for a config, dict, method name or ``None``, with this model's defaults.

        Raises:
            ValueError: for an invalid config or one this model cannot run (see ``CacheConfig.make_policy``).
        """
        config = resolve_cache_config(value)
        return config, (config.make_policy(self.defaults) if config is not None else None)

    @property
    def current(self) -> Generation:
        """The generation open in this thread for this engine, else the engine's own."""
        return _OPEN_GENERATIONS.get().get(id(self), self._own)

    @property
    def active(self) -> bool:
        """Whether the current generation caches (its config is not ``None``).

        While TorchDynamo traces the model's ``forward`` (``torch.compile``), which cannot read a ``ContextVar``, it is
        whether any generation of this engine caches (the own config, or one open in any thread), from plain
        attributes: with caching off everywhere the parent's forward compiles, ``fullgraph=True`` included; with
        caching on anywhere the traced forward reaches :meth:`run`, which refuses ``fullgraph`` with its reason.
        """
        if torch.compiler.is_compiling():
            return self._own_policy is not None or self._open_caching > 0
        return self.current.policy is not None

    @property
    def stats(self) -> CacheStats:
        """Statistics of the generation open in this thread, else of the last one started on this engine."""
        open_generation = _OPEN_GENERATIONS.get().get(id(self))
        return open_generation.stats if open_generation is not None else self._last_stats

    # Read-only views of the current generation, for introspection.
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

    def step_context(self) -> StepContext:
        """The current step, step count and branch.

        Raises:
            ValueError: when neither the cache context nor a step source tells the denoising step, or the step is
                outside ``[0, num_inference_steps)``.
        """
        generation = self.current
        ctx = self._context
        branch = ctx.name if ctx is not None else DEFAULT_BRANCH
        step = ctx.step_index if ctx is not None else None
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

    # -- the cached forward --------------------------------------------------------------------------------------
    @torch.compiler.disable(
        reason=(
            "cached-diffusers: the cache engine decides each step in host-side Python, so with caching on the "
            "transformer cannot be compiled with fullgraph=True; compile it without fullgraph (one graph break "
            "around the block stack), or its blocks with transformer.compile_repeated_blocks(fullgraph=True), or set "
            "cache_config=None"
        )
    )
    def run(self, stack: BlockStack, streams: Streams) -> Streams:
        """Run (or skip) the block stack for the current step and branch; return the streams at its output.

        The stack is split into ``front`` blocks (always run), the cached span, and ``back`` blocks (always run);
        methods without front/back blocks cache the whole stack. On a reused step the cached span's stored (or
        forecast) residual is added to its input, once per stream.

        Opaque to ``torch.compile`` (``torch.compiler.disable``): the decision is data-dependent host-side Python
        (``Tensor.item()`` of the signal, per-branch counters, the step index), which TorchDynamo would otherwise
        break the graph on and recompile for at every step. Blocks compiled on their own
        (``compile_repeated_blocks``) still run compiled inside it.
        """
        generation = self.current
        policy = generation.policy
        num_blocks = stack.num_blocks
        if policy is None:
            return stack.run_blocks(0, num_blocks, streams)
        ctx = self.step_context()
        state = self._branch_state(generation, ctx, num_blocks)
        ctx = dataclasses.replace(ctx, first_step=generation.stats.first_step)
        front, back = policy.front_blocks, policy.back_blocks
        if front + back >= num_blocks:
            raise ValueError(
                f"cache method {generation.config.method!r} runs {front} front and {back} back blocks, which leaves "
                f"no block to cache in a stack of {num_blocks}"
            )

        span_in = stack.run_blocks(0, front, streams) if front else streams
        signal = self._signal(generation, policy.signal_kind, stack, streams, span_in)
        measurement = policy.observe(state.method_state, signal)
        gate, reason = policy.gate(
            ctx,
            has_residual=state.store.fits(span_in),
            num_reused=state.num_reused,
            consecutive_reused=state.consecutive_reused,
        )
        if state.last_step is not None and ctx.step <= state.last_step:
            # The same step again, or an earlier one: the stored residual belongs to a later point of the trajectory.
            gate, reason = Gate.COMPUTE, "repeated-step" if ctx.step == state.last_step else "step-went-back"
        if state.invalidated:
            # The inputs were changed behind the cache (a callback replaced the latents, the schedule changed): the
            # stored residual (and a TaylorSeer forecast's history) no longer describe this trajectory.
            gate, reason = Gate.COMPUTE, "input-changed"
            state.store = policy.make_store(0, generation.sigma_source)
            state.invalidated = False
        decision = policy.decide(ctx, state.method_state, measurement, gate, reason)

        if decision.reuse:
            span_out = tuple(s + r for s, r in zip(span_in, state.store.get(ctx.step)))
            state.num_reused += 1
            state.consecutive_reused += 1
            blocks = front + back
        else:
            span_out = stack.run_blocks(front, num_blocks - back, span_in)
            residuals = tuple(o - s for o, s in zip(span_out, span_in))
            state.store.update(ctx.step, span_in, residuals)
            policy.on_computed(ctx, state.method_state, signal, residuals, span_out)
            state.consecutive_reused = 0
            blocks = num_blocks
        out = stack.run_blocks(num_blocks - back, num_blocks, span_out) if back else span_out
        state.last_step = ctx.step
        branch_stats = generation.stats.branch(ctx.branch)
        branch_stats.records.append(StepRecord(ctx.step, decision.reuse, decision.reason, decision.signal, blocks))
        calibration = policy.calibration(state.method_state)
        if calibration:
            branch_stats.calibration = calibration
        return out

    def _signal(
        self, generation: Generation, kind: str | None, stack: BlockStack, streams: Streams, span_in: Streams
    ) -> torch.Tensor | None:
        if kind is None:
            return None
        if kind == "front_residual":
            return span_in[0] - streams[0]
        if kind not in stack.signals:
            raise ValueError(
                f"cache method {generation.config.method!r} needs the {kind!r} signal, which "
                f"{self.defaults.get('model_name', 'this model')} does not provide"
            )
        return stack.signals[kind](streams)

    def _branch_state(self, generation: Generation, ctx: StepContext, num_blocks: int) -> BranchState:
        stats = generation.stats
        known = generation.branches.get(ctx.branch)
        new_generation = stats.num_steps is not None and (
            stats.num_steps != ctx.num_steps
            or (ctx.step == 0 and known is not None and known.last_step is not None)
            or (known is not None and known.last_step is not None and ctx.step < known.last_step)
        )
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
