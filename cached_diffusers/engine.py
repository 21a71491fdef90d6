"""The cache engine: per-branch state, the compute-or-reuse step, statistics.

The engine knows no model. Its step has two phases: :meth:`CacheEngine.decide` answers, for the current step and
guidance branch, compute or reuse; after a compute the caller hands the result to :meth:`CacheEngine.commit`, on a
reuse it takes the stored (or forecast) one from :meth:`CacheEngine.recall`. A model wires them in one of two ways
(``docs/development.md``, "Wiring a model"):

* block-stack caching inside ``forward`` (:data:`~cached_diffusers.spec.BLOCK_STACK`): the model hands
  :meth:`CacheEngine.run` a :class:`BlockStack` (how many blocks, how to run a span of them on a tuple of residual
  streams, and the decision indicators it can compute) plus the streams at the stack's input; ``run`` is exactly the
  composition of the two phases and returns the streams at the stack's output;
* whole-call caching in the denoising loop (:data:`~cached_diffusers.spec.WHOLE_CALL`): the loop decides for every
  branch, runs one batched transformer call for the branches that compute, commits their predictions and recalls
  the others'.

Where the denoising loop is comes from the model's ``cache_context(name, step_index=..., num_inference_steps=...)``
(the branch name is the context's name) or, for the fields a pipeline's loop does not pass, from a step source that
the cached pipeline installs for the duration of its ``__call__``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .configs import CacheConfig, resolve_cache_config
from .parallel import sequence_group
from .policies import CachePolicy, Decision, Gate, StepContext
from .spec import BLOCK_STACK, WHOLE_CALL, ModelCacheSpec
from .stats import CacheStats, StepRecord
from .batching import BatchDecision, Streams, _batch_size, _rows_of, _sample_rows, computing_rows, scatter_rows
from .generation import (  # _OPEN_GENERATIONS and _CALL_CONTEXTS: re-exported for introspection and the tests
    _CALL_CONTEXTS,  # noqa: F401
    _OPEN_GENERATIONS,  # noqa: F401
    DEFAULT_BRANCH,
    BranchState,
    Generation,
    GenerationScope,
    _Pending,
)

__all__ = [
    "BatchDecision",
    "BlockStack",
    "BranchState",
    "CacheEngine",
    "DEFAULT_BRANCH",
    "Decision",
    "Generation",
    "computing_rows",
    "scatter_rows",
    "static_computed_steps",
]



_NOT_COMPILABLE = (
    "cached-diffusers: the cache engine decides each step in host-side Python, so with caching on the "
    "transformer cannot be compiled with fullgraph=True; compile it without fullgraph (the cached forward "
    "then runs eagerly), or its blocks with transformer.compile_repeated_blocks(fullgraph=True), or set "
    "cache_config=None"
)


def stack_indicator(
    kind: str | None, stack_in: Streams, span_in: Streams, indicators: Mapping[str, Callable[[Streams], torch.Tensor]]
) -> torch.Tensor | Callable[[], torch.Tensor] | None:
    """The indicator of kind ``kind`` (the policy's ``indicator_kind``) at a block stack's cached span, for
    :meth:`CacheEngine.decide`: ``"front_residual"`` is made here (the first stream's residual over the policy's front
    blocks, ``span_in[0] - stack_in[0]``); another kind is the model's ``indicators[kind]`` applied to the stack's
    input ``stack_in``, deferred until the policy asks for it; ``None`` when the model offers no such kind (``decide``
    then names the missing kind) or ``kind`` is ``None``."""
    if kind == "front_residual":
        return span_in[0] - stack_in[0]
    if kind in indicators:
        return functools.partial(indicators[kind], stack_in)
    return None


@dataclass
class BlockStack:
    """One forward's view of a model's cacheable block stack.

    Attributes:
        num_blocks: blocks in the stack, in execution order.
        run_blocks: ``run_blocks(start, end, streams) -> streams`` runs blocks ``start .. end - 1``. ``streams`` is a
            tuple of tensors (e.g. ``(image_tokens (B, L_img, D), text_tokens (B, L_txt, D))``) and the returned
            tuple has the same structure and shapes, so that ``out - in`` is each stream's residual.
        indicators: ``{kind: fn(streams) -> Tensor}``, the decision indicators the model can compute cheaply at the
            stack's input (``"teacache_indicator"``: TeaCache's, e.g. block 0's modulated image input). The engine
            itself provides ``"front_residual"`` (image-stream residual of the front blocks, DBCache's indicator).
        sequence_group: under context parallelism, the ``torch.distributed`` process group the streams' token
            sequence is sharded over (``cached_diffusers.parallel.context_parallel_group(model)``): the streams and
            indicators are this rank's shard, and every decision statistic is summed over the group
            (:mod:`cached_diffusers.parallel`) so that all ranks decide alike. ``None``: the whole sequence is here.
        run_rows: optional ``run_rows(start, end, streams, rows) -> streams``: runs the same blocks on a sub-batch,
            ``streams`` being the rows ``rows`` (a 1-d ``torch.long`` tensor of batch indices, ascending) of the
            stack's streams, with every per-sample input the blocks read (masks, modulations, KV caches, rotary data)
            gathered at the same rows. Used on a step where some samples compute and the others reuse
            (``batch_decisions="per_sample"``); without it such a step runs ``run_blocks`` on the whole batch and
            keeps the computing rows (the same outputs, at the whole batch's cost).
    """

    num_blocks: int
    run_blocks: Callable[[int, int, Streams], Streams]
    indicators: Mapping[str, Callable[[Streams], torch.Tensor]] = field(default_factory=dict)
    sequence_group: Any = None
    run_rows: Callable[[int, int, Streams, torch.Tensor], Streams] | None = None


class CacheEngine(GenerationScope):
    """Holds a model's cache config and policy; the cache state itself lives in a :class:`Generation`.

    Every method that reads or changes cache state (``run``, ``context``, ``step_source``, ``step_context``,
    ``stats``, ``reset``, ``invalidate``) acts on the generation open in the calling thread for this engine
    (:meth:`generation`, which cached pipelines open per call), or, when none is open, on the engine's own
    generation, which a transformer driven directly uses.

    Args:
        spec: the model's :class:`~cached_diffusers.spec.ModelCacheSpec` (its name, block count, TeaCache
            coefficients, MagCache ratios, calibration hint and wiring patterns); ``None``: a model providing none.

    Copies (``copy.deepcopy``, ``pickle``, ``torch.save`` of the model) own their cache state: they keep the config,
    policy and the engine's own generation (its stored residuals and statistics, copied), get a lock of their own
    and no open generation (those belong to the callers that opened them, in the original's threads).

    Raises:
        TypeError: when ``spec`` is not a ``ModelCacheSpec``.
    """

    def __init__(self, spec: ModelCacheSpec | None = None):
        if spec is None:
            spec = ModelCacheSpec()
        if not isinstance(spec, ModelCacheSpec):
            raise TypeError(f"CacheEngine(spec=...) takes a ModelCacheSpec, got {type(spec).__name__}")
        self.spec = spec
        self._own_config: CacheConfig | None = None
        self._own_policy: CachePolicy | None = None
        self._own = Generation(None, None)
        self._last_stats: CacheStats = self._own.stats
        self._open_caching = 0  # generations open (in any thread) whose config caches; see `active`
        self._open_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_open_lock"]  # a lock cannot be copied or pickled; the copy gets its own (`__setstate__`)
        state["_open_caching"] = 0  # generations opened on this engine stay with it
        own = copy.copy(self._own)  # the step and sigma sources are installed by a caller's context, not copied
        own.step_source = own.sigma_source = None
        state["_own"] = own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
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
        """``(config, policy)`` for a config, dict, method name or ``None``, with this model's spec.

        Raises:
            ValueError: for an invalid config or one this model cannot run (see ``CacheConfig.make_policy``).
        """
        config = resolve_cache_config(value)
        return config, (config.make_policy(self.spec) if config is not None else None)

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

    # -- the two-phase step: decide, then commit or recall ------------------------------------------------------
    @torch.compiler.disable(reason=_NOT_COMPILABLE)
    def decide(
        self,
        branch: str | None = None,
        step_index: int | None = None,
        num_inference_steps: int | None = None,
        *,
        inputs: Streams,
        indicator: torch.Tensor | Callable[[], torch.Tensor] | Mapping[str, Any] | None = None,
        num_blocks: int = 1,
        pattern: str = WHOLE_CALL,
    ) -> Decision:
        """Decide whether ``branch`` computes or reuses at this step; then call :meth:`commit` or :meth:`recall`.

        Args:
            branch: the guidance branch (default: the ``cache_context`` name, else :data:`DEFAULT_BRANCH`).
            step_index, num_inference_steps: the denoising step and the schedule's length (default: the
                ``cache_context``'s, else the installed step source's).
            inputs: the tensors the cached quantity is computed from; a stored one is reused only for inputs of the
                same shapes (block stack: the cached span's input streams; whole call: e.g. ``(latents,)``).
            indicator: the method's decision indicator (kind ``policy.indicator_kind``): TeaCache's
                ``"teacache_indicator"`` (e.g. block 0's modulated input ``(B, L, D)``; any shape constant over the
                steps), DBCache's ``"front_residual"`` (the image-stream residual of the front blocks, block stack
                only), SeaCache's ``"sea_latent"`` (the raw latent on its grid ``(B, C, H, W)``); a tensor, or a
                function computing it, called only when the method needs one, or ``{kind: tensor or function}``
                offering several kinds.
            num_blocks: blocks a compute runs, for the statistics (a whole call counts as 1).
            pattern: the wiring pattern of the caller (:data:`~cached_diffusers.spec.BLOCK_STACK` or
                :data:`~cached_diffusers.spec.WHOLE_CALL`).

        Returns:
            The :class:`~cached_diffusers.policies.Decision`: ``reuse=False``: compute, then :meth:`commit` the
            result; ``reuse=True``: :meth:`recall` the stored (or TaylorSeer-forecast) one.

        Raises:
            RuntimeError: caching is off, or this branch was decided already and neither committed nor recalled.
            ValueError: the step is unknown or out of range, the method does not support ``pattern``, runs no block
                in between its front and back blocks, or needs an ``indicator`` the caller did not give.
        """
        generation = self.current
        policy = generation.policy
        if policy is None:
            raise RuntimeError("CacheEngine.decide: caching is off (cache_config is None); check `engine.active` first")
        policy.check_pattern(pattern, self.spec.model_name)
        ctx = self.step_context(branch, step_index, num_inference_steps)
        pending = generation.branches.get(ctx.branch)
        if pending is not None and pending.pending is not None and not self._starts_new_generation(generation, ctx):
            raise RuntimeError(
                f"CacheEngine.decide: branch {ctx.branch!r} was decided at step {pending.pending.ctx.step} and neither "
                f"committed nor recalled; call commit(...) after computing or recall() on a reuse first"
            )
        state = self._branch_state(generation, ctx, num_blocks)
        ctx = dataclasses.replace(ctx, first_step=generation.stats.first_step)
        self._check_span(generation, num_blocks)
        indicator = self._indicator(generation, policy.indicator_kind, indicator)
        inputs = tuple(inputs)
        cached_around = policy.front_blocks + policy.back_blocks
        batch = _batch_size(inputs)
        # A policy whose samples decide alike by construction (a calibration run computes every step) keeps one state
        # and records one calibration over the batch, as with batch-level decisions.
        if generation.config.batch_decisions == "per_sample" and batch > 1 and not policy.samples_decide_alike:
            decision = self._decide_samples(generation, ctx, state, inputs, indicator, batch, num_blocks)
        else:
            decision = self._decide_one(generation, ctx, state, inputs, indicator)
        state.pending = _Pending(ctx, decision, indicator, inputs, num_blocks, cached_around)
        return decision

    @staticmethod
    def _decide_one(
        generation: Generation, ctx: StepContext, state: BranchState, inputs: Streams, indicator: torch.Tensor | None
    ) -> Decision:
        """The policy's decision for one state (a branch, or one sample of it) on its inputs and indicator."""
        policy = generation.policy
        measurement = policy.observe_step(ctx, generation.sigma_source, state.method_state, indicator)
        gate, reason = policy.gate(
            ctx,
            has_residual=state.store.fits(inputs),
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
        return policy.decide(ctx, state.method_state, measurement, gate, reason)

    def _decide_samples(
        self,
        generation: Generation,
        ctx: StepContext,
        state: BranchState,
        inputs: Streams,
        indicator: torch.Tensor | None,
        batch: int,
        num_blocks: int,
    ) -> BatchDecision:
        """Every sample decides for itself, on its own rows of the inputs and indicator, with its own method state,
        residual store and counters (``batch_decisions="per_sample"``). Under context parallelism every rank loops
        over the samples in the same order, so each sample's statistics are reduced over the group alike."""
        policy = generation.policy
        if state.samples is None or len(state.samples) != batch:
            first_step = generation.stats.first_step
            state.samples = [
                BranchState(policy.new_state(), policy.make_store(first_step, generation.sigma_source))
                for _ in range(batch)
            ]
            state.last_batch = None
        if state.invalidated:
            for sample in state.samples:
                sample.invalidated = True
            state.invalidated = False
        cached_around = policy.front_blocks + policy.back_blocks
        decisions = []
        for row, sample in enumerate(state.samples):
            sample_inputs = tuple(s[row : row + 1] for s in inputs)
            sample_indicator = _sample_rows(indicator, row, batch)
            decision = self._decide_one(generation, ctx, sample, sample_inputs, sample_indicator)
            sample.pending = _Pending(ctx, decision, sample_indicator, sample_inputs, num_blocks, cached_around)
            decisions.append(decision)
        computing = tuple(i for i, d in enumerate(decisions) if not d.reuse)
        reasons = {d.reason for d in decisions}
        reason = reasons.pop() if len(reasons) == 1 else "mixed"
        return BatchDecision(not computing, reason, None, samples=tuple(decisions), computing=computing)

    @torch.compiler.disable(reason=_NOT_COMPILABLE)
    def commit(self, residuals: Streams, outputs: Streams | None = None, *, branch: str | None = None) -> None:
        """Store what ``branch`` computed after a compute decision (:meth:`decide`), and record the step.

        Args:
            residuals: the cached quantity, one tensor per stream (block stack: each stream's output minus its
                input over the cached span; whole call: the prediction itself). Shapes may differ from ``inputs``.
                After a :class:`BatchDecision` (per-sample decisions), the rows of its ``computing`` samples only,
                in that order.
            outputs: the cached span's outputs per stream (default: ``residuals``), read by calibration
                (TeaCache's ``y``: the relative change of ``outputs[0]`` between steps).
            branch: as in :meth:`decide`.

        Raises:
            RuntimeError: the branch has no pending decision, or it was a reuse (call :meth:`recall`); the pending
                decision stays.
        """
        generation, state, pending = self._pending("commit", branch)
        if pending.decision.reuse:
            raise RuntimeError(
                f"CacheEngine.commit: branch {pending.ctx.branch!r} decided to reuse at step {pending.ctx.step} "
                f"({pending.decision.reason}); call recall() instead"
            )
        residuals = tuple(residuals)
        if isinstance(pending.decision, BatchDecision):
            self._commit_samples(generation, state, pending, residuals, outputs)
            return
        state.pending = None
        policy = generation.policy
        state.store.update(pending.ctx.step, pending.inputs, residuals)
        outputs = residuals if outputs is None else tuple(outputs)
        policy.on_computed(pending.ctx, state.method_state, pending.indicator, residuals, outputs)
        state.consecutive_reused = 0
        self._record(generation, state, pending, pending.num_blocks)

    @torch.compiler.disable(reason=_NOT_COMPILABLE)
    def recall(self, *, branch: str | None = None) -> Streams:
        """The stored (or TaylorSeer-forecast) quantity of ``branch`` after a reuse decision (:meth:`decide`).

        Returns:
            One tensor per stream, as last committed (shapes and dtypes of the committed ``residuals``).

        Raises:
            RuntimeError: the branch has no pending decision, or it was a compute (nothing stored to recall for
                this step: compute, then :meth:`commit`); the pending decision stays.

        With a :class:`BatchDecision` (per-sample decisions) the rows returned are those of its ``reusing`` samples,
        in batch order; when every sample reuses the residuals their last common commit stored, that batched tensor
        itself is returned (no copy).
        """
        generation, state, pending = self._pending("recall", branch)
        if isinstance(pending.decision, BatchDecision) and pending.decision.mixed:
            return self._recall_samples(generation, state, pending)
        if not pending.decision.reuse:
            raise RuntimeError(
                f"CacheEngine.recall: branch {pending.ctx.branch!r} decided to compute at step {pending.ctx.step} "
                f"({pending.decision.reason}), so there is nothing to recall; compute, then commit(...)"
            )
        if isinstance(pending.decision, BatchDecision):
            return self._recall_samples(generation, state, pending)
        state.pending = None
        residuals = state.store.get(pending.ctx.step)
        state.num_reused += 1
        state.consecutive_reused += 1
        self._record(generation, state, pending, pending.cached_around)
        return residuals

    def _commit_samples(
        self, generation: Generation, state: BranchState, pending: _Pending, residuals: Streams, outputs: Streams | None
    ) -> None:
        decision = pending.decision
        rows = decision.computing
        samples = state.samples
        if any(samples[i].pending is None for i in rows):
            raise RuntimeError(
                f"CacheEngine.commit: branch {pending.ctx.branch!r} already committed step {pending.ctx.step}"
            )
        outputs = residuals if outputs is None else tuple(outputs)
        for r in residuals + outputs:
            if r.shape[0] != len(rows):
                raise ValueError(
                    f"CacheEngine.commit: the step's per-sample decision computes rows {list(rows)}, so commit takes "
                    f"{len(rows)} rows per tensor, got shape {tuple(r.shape)}"
                )
        policy = generation.policy
        state.last_batch = tuple(r.detach() for r in residuals) if len(rows) == decision.batch_size else None
        for j, row in enumerate(rows):
            sample = samples[row]
            sample_pending, sample.pending = sample.pending, None
            sample_residuals = tuple(r[j : j + 1] for r in residuals)
            sample_outputs = tuple(o[j : j + 1] for o in outputs)
            sample.store.update(sample_pending.ctx.step, sample_pending.inputs, sample_residuals)
            policy.on_computed(
                sample_pending.ctx, sample.method_state, sample_pending.indicator, sample_residuals, sample_outputs
            )
            sample.consecutive_reused = 0
            self._record_sample(generation, row, sample, sample_pending, sample_pending.num_blocks)
        self._finish_samples(generation, state, pending)

    def _recall_samples(self, generation: Generation, state: BranchState, pending: _Pending) -> Streams:
        decision = pending.decision
        rows = decision.reusing
        samples = state.samples
        if not rows or any(samples[i].pending is None for i in rows):
            raise RuntimeError(
                f"CacheEngine.recall: branch {pending.ctx.branch!r} has no sample left to recall at step "
                f"{pending.ctx.step} (computing rows {list(decision.computing)}); compute, then commit(...)"
            )
        parts = []
        for row in rows:
            sample = samples[row]
            sample_pending, sample.pending = sample.pending, None
            parts.append(sample.store.get(sample_pending.ctx.step))
            sample.num_reused += 1
            sample.consecutive_reused += 1
            self._record_sample(generation, row, sample, sample_pending, sample_pending.cached_around)
        self._finish_samples(generation, state, pending)
        base = state.last_batch
        if base is not None and len(rows) == decision.batch_size and _rows_of(base, parts):
            return base
        return tuple(torch.cat([part[k] for part in parts]) for k in range(len(parts[0])))

    def _finish_samples(self, generation: Generation, state: BranchState, pending: _Pending) -> None:
        """Close the branch's step once every sample committed or recalled: the branch-level counters and record."""
        if any(sample.pending is not None for sample in state.samples):
            return
        state.pending = None
        if pending.decision.reuse:
            state.num_reused += 1
            state.consecutive_reused += 1
            blocks = pending.cached_around
        else:
            state.consecutive_reused = 0
            blocks = pending.num_blocks
        self._record(generation, state, pending, blocks, calibration=False)  # each sample records its own

    @staticmethod
    def _record_sample(generation: Generation, row: int, sample: BranchState, pending: _Pending, blocks: int) -> None:
        ctx, decision, policy = pending.ctx, pending.decision, generation.policy
        sample.last_step = ctx.step
        stats = generation.stats.branch(ctx.branch).sample(row)
        stats.records.append(StepRecord(ctx.step, decision.reuse, decision.reason, decision.value, blocks))
        calibration = policy.calibration(sample.method_state)
        if calibration:
            stats.calibration = calibration

    def _abandon(self, branch: str) -> None:
        """Forget the pending decision of ``branch`` and of its samples: the step did not happen, the next one
        decides anew."""
        state = self.current.branches.get(branch)
        if state is not None:
            state.pending = None
            for sample in state.samples or ():
                sample.pending = None

    # -- the cached forward: block-stack caching ----------------------------------------------------------------
    @torch.compiler.disable(reason=_NOT_COMPILABLE)
    def run(self, stack: BlockStack, streams: Streams) -> Streams:
        """Run (or skip) the block stack for the current step and branch; return the streams at its output.

        The composition of the two-phase step (pattern :data:`~cached_diffusers.spec.BLOCK_STACK`): the stack is split
        into ``front`` blocks (always run), the cached span, and ``back`` blocks (always run); methods without
        front/back blocks cache the whole stack. ``run`` runs the front blocks, calls :meth:`decide`, then either runs
        the span and passes its residuals (output minus input, per stream) to :meth:`commit`, or adds the ones
        :meth:`recall` returns to its input; then it runs the back blocks.

        Opaque to ``torch.compile`` (``torch.compiler.disable``): the decision is data-dependent host-side Python
        (``Tensor.item()`` of the indicator, per-branch counters, the step index), which TorchDynamo would otherwise
        break the graph on and recompile for at every step. Blocks compiled on their own
        (``compile_repeated_blocks``) still run compiled inside it.
        """
        with sequence_group(stack.sequence_group):
            return self._run(stack, streams)

    def _run(self, stack: BlockStack, streams: Streams) -> Streams:
        generation = self.current
        policy = generation.policy
        num_blocks = stack.num_blocks
        if policy is None:
            return stack.run_blocks(0, num_blocks, streams)
        ctx = self.step_context()  # an unknown step is reported first, before any block runs
        self._check_span(generation, num_blocks)
        front, back = policy.front_blocks, policy.back_blocks
        span_in = stack.run_blocks(0, front, streams) if front else streams
        indicator = stack_indicator(policy.indicator_kind, streams, span_in, stack.indicators)
        decision = self.decide(
            ctx.branch,
            ctx.step,
            ctx.num_steps,
            inputs=span_in,
            indicator=indicator,
            num_blocks=num_blocks,
            pattern=BLOCK_STACK,
        )
        if decision.reuse:
            span_out = tuple(s + r for s, r in zip(span_in, self.recall(branch=ctx.branch)))
        elif isinstance(decision, BatchDecision) and decision.mixed:
            span_out = self._run_mixed(stack, ctx, decision, span_in, front, num_blocks - back)
        else:
            try:
                span_out = stack.run_blocks(front, num_blocks - back, span_in)
            except BaseException:
                self._abandon(ctx.branch)  # the step did not happen; the next one decides anew
                raise
            self.commit(tuple(o - s for o, s in zip(span_out, span_in)), span_out, branch=ctx.branch)
        return stack.run_blocks(num_blocks - back, num_blocks, span_out) if back else span_out

    def _run_mixed(
        self, stack: BlockStack, ctx: StepContext, decision: BatchDecision, span_in: Streams, start: int, end: int
    ) -> Streams:
        """A step where some samples compute and the others reuse: the span runs on the computing rows (gathered,
        when the stack can run on a sub-batch), their residuals are committed, the reusing rows add their recalled
        residuals, and the two are scattered back into whole-batch streams."""
        device = span_in[0].device
        rows = torch.tensor(decision.computing, dtype=torch.long, device=device)
        others = torch.tensor(decision.reusing, dtype=torch.long, device=device)
        sub_in = tuple(s.index_select(0, rows) for s in span_in)
        try:
            if stack.run_rows is not None:
                sub_out = stack.run_rows(start, end, sub_in, rows)
            else:
                sub_out = tuple(o.index_select(0, rows) for o in stack.run_blocks(start, end, span_in))
        except BaseException:
            self._abandon(ctx.branch)
            raise
        self.commit(tuple(o - s for o, s in zip(sub_out, sub_in)), sub_out, branch=ctx.branch)
        recalled = self.recall(branch=ctx.branch)
        return scatter_rows(span_in, rows, sub_out, others, recalled)

    @staticmethod
    def _check_span(generation: Generation, num_blocks: int) -> None:
        """Raise ``ValueError`` when the method's front and back blocks leave no block of ``num_blocks`` to cache."""
        front, back = generation.policy.front_blocks, generation.policy.back_blocks
        if front + back >= num_blocks:
            raise ValueError(
                f"cache method {generation.config.method!r} runs {front} front and {back} back blocks, which leaves "
                f"no block to cache in a stack of {num_blocks}"
            )

    def _pending(self, what: str, branch: str | None) -> tuple[Generation, BranchState, _Pending]:
        generation = self.current
        name = self._branch_name(branch)
        state = generation.branches.get(name)
        if generation.policy is None or state is None or state.pending is None:
            raise RuntimeError(
                f"CacheEngine.{what}: branch {name!r} has no pending decision; call decide(...) for it first"
            )
        return generation, state, state.pending

    def _record(
        self, generation: Generation, state: BranchState, pending: _Pending, blocks: int, calibration: bool = True
    ) -> None:
        ctx, decision, policy = pending.ctx, pending.decision, generation.policy
        state.last_step = ctx.step
        branch_stats = generation.stats.branch(ctx.branch)
        branch_stats.records.append(StepRecord(ctx.step, decision.reuse, decision.reason, decision.value, blocks))
        if not calibration:
            return
        calibration = policy.calibration(state.method_state)
        if calibration:
            branch_stats.calibration = calibration

    def _indicator(
        self, generation: Generation, kind: str | None, indicator: torch.Tensor | Callable[[], torch.Tensor] | None
    ) -> torch.Tensor | None:
        if kind is None:
            return None
        if isinstance(indicator, Mapping):  # {kind: tensor or function}: the caller offers several kinds
            indicator = indicator.get(kind)
        if indicator is None:
            raise ValueError(
                f"cache method {generation.config.method!r} needs the {kind!r} indicator, which "
                f"{self.spec.model_name} does not provide"
            )
        return indicator() if callable(indicator) else indicator


def static_computed_steps(config: CacheConfig, num_steps: int) -> int:
    """The steps a config with no indicator computes on a full schedule (TaylorSeer's interval, a planned schedule such
    as LeMiCa's or MeanCache's): the engine itself decides one guidance branch over ``num_steps`` steps of a one-block
    identity stack, so the count is the engine's, shared guards included (no replay of its bookkeeping).

    Args:
        config: a config whose policy decides without an indicator (a config that needs one, e.g. TeaCache's, raises
            as :meth:`CacheEngine.decide` does when a model offers no such indicator).
        num_steps: denoising steps of the full schedule (>= 1).

    Returns:
        The computed steps of the branch, in ``1 .. num_steps``.
    """
    engine = CacheEngine(ModelCacheSpec(model_name="static schedule", num_blocks=1))
    engine.config = config
    stack = BlockStack(1, lambda start, end, streams: streams, {})
    streams = (torch.zeros(1, 1, 1),)
    for step in range(num_steps):
        with engine.context("branch", step_index=step, num_inference_steps=num_steps):
            engine.run(stack, streams)
    return engine.stats.branches["branch"].num_computed
