"""CFG-parallel: each guidance branch of a cached pipeline on its own rank of a ``torch.distributed`` group.

With classifier-free guidance a pipeline calls its transformer once per guidance branch and step (``"cond"`` and
``"uncond"`` for Qwen-Image and FLUX.2 [klein] base; ``"gen"``, ``"cfg_text"`` and ``"cfg_img"`` for BAGEL) and then
combines the predictions. CFG-parallel runs branch ``k`` of every step on rank ``k`` of a process group, concurrently,
and exchanges the predictions with one ``all_gather`` per step, so every rank combines the same predictions and takes
the same scheduler step as the serial run. Each branch's cache state (residuals, decision statistics) lives on its
rank only, and is exactly the serial run's state of that branch: ``pipe.cache_stats`` on rank ``k`` holds branch
``k``. The same idea as xDiT's "CFG parallel" (``xfuser``, split batch over a 2-rank group); diffusers has none.

How it runs a diffusers parent's loop unchanged: the parent calls the transformer for branch 0, may take a view of
the result (``noise_pred[:, :n]``), then calls it for branch 1 and combines. During a CFG-parallel call every
transformer call goes through :class:`CFGParallelCall` (``CachedTransformerMixin.route_calls``): the first calls of a
step only record their arguments and return a NaN placeholder of the output's shape; the last call of the step makes
each rank compute its own branch, exchanges the predictions and fills the placeholders in place (views taken of them
see the values) before returning the last branch's prediction. :func:`check_parent_loop` verifies from the parent's
source that nothing but slicing happens between the calls; a parent that does more is refused.

No hang: every rank agrees on failure before each exchange and at the end of the call (:meth:`CFGParallel.agree`,
one small ``all_gather`` of a status vector). A rank that raises (bad input, an error in its branch, out of memory)
sends its failure at the next agreement instead of the collective the others wait in, and every rank raises:
the failing rank its own exception, the others :class:`CFGParallelError` naming the rank and its message. An error
inside a collective of the transformer itself (context parallelism) is ended by the process group's timeout.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["CFGParallel", "CFGParallelCall", "CFGParallelError", "check_parent_loop", "resolve_group"]

_STATUS_LEN = 16
"""Length of the status vector all ranks exchange at each agreement: failure flag + up to 15 values."""


class CFGParallelError(RuntimeError):
    """Raised on every rank of a CFG-parallel group when another rank failed (the message names it)."""


def resolve_group(group: Any = None):
    """The process group of ``group``: ``None`` (the default group), a ``ProcessGroup``, or a 1-D ``DeviceMesh``.

    Raises:
        RuntimeError: when ``torch.distributed`` is not initialised.
        ValueError: for a device mesh with more than one dimension (pass the CFG dimension, ``mesh["cfg"]``).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "CFG-parallel needs an initialised torch.distributed process group: start the script with "
            "`torchrun --nproc_per_node=2 ...` and call `torch.distributed.init_process_group()` first"
        )
    if group is None:
        return dist.group.WORLD
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"group must be a 1-D device mesh (e.g. mesh['cfg']), got one with dimensions {group.mesh_dim_names}"
            )
        return group.get_group()
    return group


class CFGParallel:
    """A process group whose rank ``k`` computes guidance branch ``k``.

    Args:
        group: ``None`` (the default group), a ``torch.distributed.ProcessGroup`` or a 1-D ``DeviceMesh`` (the CFG
            dimension of a 2-D mesh, e.g. ``mesh["cfg"]`` with context parallelism on ``mesh["ulysses"]``).

    Raises:
        RuntimeError: when ``torch.distributed`` is not initialised.
        ValueError: when the group has fewer than 2 ranks.
    """

    def __init__(self, group: Any = None):
        self.group = resolve_group(group)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if self.world_size < 2:
            raise ValueError(f"a CFG-parallel group needs 2 or more ranks (one per guidance branch), got {self.world_size}")
        backend = dist.get_backend(self.group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def __repr__(self) -> str:
        return f"CFGParallel(rank={self.rank}, world_size={self.world_size})"

    def agree(self, error: BaseException | None, values: Sequence[float] = ()) -> torch.Tensor:
        """All ranks exchange ``[failed, *values]``; raise on every rank when any rank failed.

        Every rank must call it at the same point (the exchange is one ``all_gather`` of ``_STATUS_LEN`` float64
        values; on a failure one more ``all_gather_object`` of the messages).

        Args:
            error: this rank's exception, or ``None``.
            values: up to ``_STATUS_LEN - 1`` numbers every rank compares (step, input checksum, output shape).

        Returns:
            ``(world_size, _STATUS_LEN - 1)`` float64 tensor on the CPU: every rank's ``values`` (NaN-padded).

        Raises:
            error: on the rank that failed.
            CFGParallelError: on the others, naming the first failed rank and its message.
        """
        if len(values) > _STATUS_LEN - 1:
            raise ValueError(f"at most {_STATUS_LEN - 1} values, got {len(values)}")
        mine = torch.full((_STATUS_LEN,), float("nan"), dtype=torch.float64)
        mine[0] = float(error is not None)
        if values:
            mine[1 : 1 + len(values)] = torch.tensor([float(v) for v in values], dtype=torch.float64)
        mine = mine.to(self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        table = torch.stack(gathered).cpu()
        failed = [r for r in range(self.world_size) if table[r, 0] != 0]
        if failed:
            messages: list[Any] = [None] * self.world_size
            text = None if error is None else f"{type(error).__name__}: {error}"
            dist.all_gather_object(messages, text, group=self.group)
            if error is not None:
                raise error
            first = failed[0]
            raise CFGParallelError(f"rank {first} of the CFG-parallel group failed: {messages[first]}")
        return table[:, 1:]

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on every rank), index = rank."""
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor, group=self.group)
        return gathered


# -- one pipeline call ----------------------------------------------------------------------------------------------
@dataclass
class _Recorded:
    branch: str
    step: int
    step_index: int | None
    num_inference_steps: int | None
    args: tuple
    kwargs: dict
    placeholder: torch.Tensor


@dataclass
class CFGParallelCall:
    """The transformer calls of one pipeline call under CFG-parallel (see the module docstring).

    Args:
        cfg: the group.
        transformer: the cached transformer the pipeline calls.
    """

    cfg: CFGParallel
    transformer: Any
    pending: list[_Recorded] = field(default_factory=list)
    expected: tuple[str, ...] | None = None
    settled: bool = False

    def expect(self, branches: Sequence[str]) -> None:
        """Declare the branches of the next step (for a loop, e.g. BAGEL's, whose branch count varies per step).

        Without a declaration a step has ``world_size`` branches. Ranks ``>= len(branches)`` idle at that step.

        Raises:
            ValueError: for more branches than ranks, or a declaration inside a step.
        """
        if self.pending:
            raise ValueError("expect() must be called between steps, not after a branch of the step ran")
        if not 1 <= len(branches) <= self.cfg.world_size:
            raise ValueError(
                f"a step has {len(branches)} guidance branches, but the CFG-parallel group has {self.cfg.world_size} "
                f"ranks (one branch per rank)"
            )
        self.expected = tuple(branches)

    # -- the router: every transformer call of the pipeline call comes here -------------------------------------------
    def __call__(self, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        engine = self.transformer.cache_engine
        context = engine._context
        if context is None:
            raise ValueError(
                "CFG-parallel needs every transformer call inside `transformer.cache_context(branch)` (a cached "
                "pipeline's loop names its branches)"
            )
        branch, step = context.name, engine.step_context().step
        names = [p.branch for p in self.pending]
        if self.pending and (branch in names or step != self.pending[0].step):
            raise ValueError(self._count_message(names, self.pending[0].step))
        if self.expected is not None and branch != self.expected[len(self.pending)]:
            raise ValueError(f"step {step}: expected branch {self.expected[len(self.pending)]!r}, got {branch!r}")
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        record = _Recorded(
            branch,
            step,
            context.step_index,
            context.num_inference_steps,
            args,
            kwargs,
            self._placeholder(hidden_states),
        )
        self.pending.append(record)
        if len(self.pending) < self._branches_per_step:
            return _wrap(record.placeholder, kwargs)
        return self._finish_step(call, kwargs)

    @property
    def _branches_per_step(self) -> int:
        """The branches of the current step: the declared ones (:meth:`expect`), else one per rank."""
        return len(self.expected) if self.expected is not None else self.cfg.world_size

    def _count_message(self, names: list[str], step: int) -> str:
        return (
            f"CFG-parallel on {self.cfg.world_size} ranks needs {self._branches_per_step} guidance branches per step "
            f"(one per rank), but "
            f"step {step} ran only {names}: turn guidance on (e.g. a negative prompt and true_cfg_scale > 1 for "
            f"Qwen-Image, guidance_scale > 1 on a FLUX.2 [klein] base checkpoint), or call pipe.disable_cfg_parallel()"
        )

    def _placeholder(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The prediction's shape: the input's tokens, the output projection's features (the input's when the model
        # has no `proj_out`, e.g. BAGEL, whose velocity has the latent tokens' shape). NaN: a value the parent read
        # before it was filled would show.
        proj_out = getattr(self.transformer, "proj_out", None)
        features = getattr(proj_out, "out_features", hidden_states.shape[-1])
        shape = (*hidden_states.shape[:-1], features)
        return torch.full(shape, float("nan"), dtype=self.transformer.dtype, device=hidden_states.device)

    def _finish_step(self, call: Callable[..., Any], kwargs: dict) -> Any:
        pending, self.pending = self.pending, []
        self.expected = None
        cfg = self.cfg
        mine = pending[cfg.rank] if cfg.rank < len(pending) else None
        out, error = None, None
        if mine is not None:
            try:
                with self.transformer.cache_context(
                    mine.branch, step_index=mine.step_index, num_inference_steps=mine.num_inference_steps
                ):
                    out = _unwrap(call(*mine.args, **mine.kwargs))
            except Exception as exc:  # agreed below: every rank raises
                error = exc
        reference = pending[0].placeholder
        # What every rank compares: the step, the branch count, the step's input, and (from the ranks that computed)
        # the prediction's dtype and shape, which must be the placeholder's.
        shape = tuple(out.shape) if out is not None else tuple(reference.shape)
        dtype = _dtype_code(out.dtype) if out is not None else -1
        values = [pending[0].step, len(pending), _checksum(pending[0]), dtype, len(shape), *shape]
        self.settled = True  # from here every rank raises the same errors, decided from the agreed table
        table = cfg.agree(error, values[: _STATUS_LEN - 1])
        if not torch.equal(table[:, :3], table[:1, :3].expand_as(table[:, :3])):
            raise ValueError(
                "the ranks of the CFG-parallel group made different calls (step, branch count, input latents: "
                f"{table[:, :3].tolist()}): run the same script with the same arguments and generator seed on every rank"
            )
        for r in range(len(pending)):  # the ranks that computed a branch
            got_shape = tuple(int(v) for v in table[r, 5 : 5 + int(table[r, 4])].tolist())
            if got_shape != tuple(reference.shape) or int(table[r, 3]) != _dtype_code(reference.dtype):
                raise RuntimeError(
                    f"CFG-parallel: branch {pending[r].branch!r} returned a prediction of shape {got_shape} (dtype code "
                    f"{int(table[r, 3])}), but its placeholder has {tuple(reference.shape)} and {reference.dtype} (the "
                    f"input's tokens, the transformer's output projection and dtype)"
                )
        self.settled = False
        gathered = cfg.all_gather(out if out is not None else torch.empty_like(reference))
        for record, prediction in zip(pending[:-1], gathered):
            record.placeholder.copy_(prediction)
        return _wrap(gathered[len(pending) - 1], kwargs)

    # -- the call's boundaries -----------------------------------------------------------------------------------
    def finish(self) -> None:
        """At the end of the pipeline call: every step complete, and every rank succeeded.

        Raises:
            ValueError: when a step ran fewer branches than the group has ranks.
            CFGParallelError: when another rank failed.
        """
        if self.pending:
            names = [p.branch for p in self.pending]
            raise ValueError(self._count_message(names, self.pending[0].step))
        self.cfg.agree(None)

    def abort(self, error: BaseException) -> None:
        """This rank raised ``error`` outside an agreement: tell the others (at their next agreement), unless the
        error already came out of one (then every rank raises it)."""
        if self.settled:
            return
        self.pending = []
        self.settled = True
        try:
            self.cfg.agree(error)
        except BaseException:
            pass  # the caller re-raises `error`


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def _checksum(record: _Recorded) -> float:
    """A number that differs when ranks hold different latents (the step's input, every branch's the same); NaN and
    infinities count as 0, so that ranks holding the same non-finite latents agree."""
    hidden = record.kwargs["hidden_states"] if "hidden_states" in record.kwargs else record.args[0]
    return float(torch.nan_to_num(hidden.detach().double(), nan=0.0, posinf=0.0, neginf=0.0).sum())


def _unwrap(output: Any) -> torch.Tensor:
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def _wrap(prediction: torch.Tensor, kwargs: dict) -> Any:
    if not kwargs.get("return_dict", True):
        return (prediction,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=prediction)


# -- the parent's loop may only slice a placeholder ------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def check_parent_loop(parent: type) -> str | None:
    """Why ``parent.__call__`` cannot run CFG-parallel, or ``None`` when it can.

    It can when its source calls the transformer in ``with self.transformer.cache_context(...)`` blocks and, between
    the end of the first branch's call and the start of the last branch's block, only slices the first prediction
    (``x = x[...]`` with slices) or tests a condition (``if ...:``). Then the placeholder the first call returns is
    only viewed, never computed with, before the last call fills it.
    """
    try:
        source = textwrap.dedent(inspect.getsource(parent.__call__))
    except (OSError, TypeError) as error:
        return f"the source of {parent.__name__}.__call__ is not readable ({error})"
    tree = ast.parse(source)
    blocks = [node for node in ast.walk(tree) if isinstance(node, ast.With) and _is_cache_context(node)]
    blocks.sort(key=lambda node: node.lineno)
    if len(blocks) < 2:
        return f"{parent.__name__}.__call__ calls the transformer in fewer than two cache_context blocks (one branch)"
    first, last = blocks[0], blocks[-1]
    call_statement = first.body[0]
    if not (isinstance(call_statement, ast.Assign) and len(call_statement.targets) == 1
            and isinstance(call_statement.targets[0], ast.Name)):  # fmt: skip
        return f"{parent.__name__}.__call__: the first branch's transformer call is not `name = self.transformer(...)`"
    name = call_statement.targets[0].id
    between = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.stmt) and node.lineno > call_statement.end_lineno and node.lineno < last.lineno
    ]
    for node in between:
        if isinstance(node, ast.If) and not _mentions(node.test, name):
            continue
        if isinstance(node, ast.With) and node in blocks:
            continue
        if _is_slice_of(node, name):
            continue
        return (
            f"{parent.__name__}.__call__ does `{ast.unparse(node).splitlines()[0]}` between the guidance branches' "
            f"transformer calls (line {node.lineno} of its source); CFG-parallel supports only slicing there"
        )
    return None


def _is_cache_context(node: ast.With) -> bool:
    for item in node.items:
        expr = item.context_expr
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "cache_context":
            return True
    return False


def _mentions(expr: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(expr))


def _is_slice_of(node: ast.stmt, name: str) -> bool:
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
        return False
    value = node.value
    if not (isinstance(value, ast.Subscript) and isinstance(value.value, ast.Name) and value.value.id == name):
        return False
    index = value.slice
    parts = index.elts if isinstance(index, ast.Tuple) else [index]
    return node.targets[0].id == name and all(isinstance(p, ast.Slice) for p in parts)
