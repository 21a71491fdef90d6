"""What every cached transformer shares: its engine, ``cache_config``, statistics and ``cache_context``.

A cached model is ``class CachedXModel(CachedTransformerMixin, XModel)``: it adds no parameters and no constructor
arguments, so the diffusers class's checkpoints, configs and loading code apply unchanged, and an already loaded
``XModel`` can be turned into the cached class in place (:meth:`CachedTransformerMixin.from_base`).

Working with the rest of the ecosystem:

* ``torch.compile``: the engine's step (decision, residual store, statistics) is opaque to TorchDynamo
  (``torch.compiler.disable``), because its decisions are data-dependent host-side Python (``Tensor.item()`` on the
  decision indicator, per-branch counters, step indices) that would otherwise break the graph and recompile on every
  step. With caching on, the cached forward (the parent's own forward, its block calls intercepted) therefore runs
  eagerly under ``torch.compile(transformer)``; compile the blocks themselves with regional compilation,
  ``transformer.compile_repeated_blocks(fullgraph=True)`` (each block is one full graph, called compiled on the steps
  the cache computes). With caching off the parent's forward is traced as usual, ``fullgraph=True`` included.
* Block-call caching keeps the model's modules as they are: the lists of cached blocks become
  :class:`CachedBlockList` (the class of the ``nn.ModuleList`` only: same modules, state-dict keys and hooks), which
  the parent's loop iterates.
* diffusers' own cache hooks (``enable_cache``) are refused: this class caches through ``cache_config``.
* ``copy.deepcopy``, ``pickle`` and ``torch.save`` work as for the parent; the copy owns its cache state (see
  :class:`~cached_diffusers.engine.CacheEngine`).
* accelerate's offloading hooks (``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``) and PEFT LoRA
  layers (``load_lora_weights``) wrap the modules the cached forward calls, so they work unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, TextIO

import torch

from .configs import CacheConfig, available_cache_methods
from .engine import _NOT_COMPILABLE, BatchDecision, BlockStack, CacheEngine, scatter_rows, stack_indicator
from .parallel import sequence_group as _sequence_group
from .spec import BLOCK_STACK as _BLOCK_STACK
from .spec import ModelCacheSpec
from .stats import CacheStats

__all__ = [
    "CachedTransformerMixin",
    "BlockCalls",
    "BlockContext",
    "CachedBlockList",
    "diffusers_parent",
    "gather_rows",
    "row_gatherer",
    "scatter_computed",
    "property_keeping_cause",
]


def diffusers_parent(cls: type, mixin: type) -> type:
    """The first class in ``cls``'s MRO that is not ``mixin`` or one of its subclasses: the diffusers parent."""
    return next(c for c in cls.__mro__ if not issubclass(c, mixin))


def stock_class_name_json(text: str, cls: type, mixin: type) -> str:
    """A diffusers config JSON string with ``_class_name`` set to ``cls``'s diffusers parent.

    Saved directories then name only diffusers' classes and stay loadable by stock diffusers
    (``DiffusionPipeline.from_pretrained``); the cached classes load them as well.
    """
    data = json.loads(text)
    data["_class_name"] = diffusers_parent(cls, mixin).__name__
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


_NOT_OURS = object()


_FAMILY_PROPERTIES: dict[tuple[type, type], frozenset[str]] = {}


def _family_properties(cls: type, mixin: type) -> frozenset[str]:
    """Names of the properties that classes of ``mixin``'s family define on ``cls`` (memoised per class)."""
    names = _FAMILY_PROPERTIES.get((cls, mixin))
    if names is None:
        found: set[str] = set()
        for klass in reversed(cls.__mro__):  # the nearest definition wins
            for name, attribute in vars(klass).items():
                if isinstance(attribute, property) and issubclass(klass, mixin):
                    found.add(name)
                else:
                    found.discard(name)
        names = _FAMILY_PROPERTIES[(cls, mixin)] = frozenset(found)
    return names


def property_keeping_cause(obj: Any, name: str, mixin: type) -> Any:
    """For ``__getattr__``: the value of ``obj``'s property ``name`` when one of ``mixin``'s family defines it, else
    ``_NOT_OURS``.

    Python calls ``__getattr__`` when a property's getter raised ``AttributeError``, and the error it then reports
    ("object has no attribute 'cache_engine'") hides the real one; the getter is run once more here, and an
    ``AttributeError`` it raises becomes a ``RuntimeError`` naming the property, with the original as its cause.
    """
    cls = type(obj)
    if name not in _family_properties(cls, mixin):
        return _NOT_OURS
    prop = next(vars(klass)[name] for klass in cls.__mro__ if name in vars(klass))
    try:
        return prop.__get__(obj, cls)
    except AttributeError as error:
        raise RuntimeError(f"{type(obj).__name__}.{name} failed: AttributeError: {error}") from error


_CALL_ROUTES: contextvars.ContextVar[dict[int, Callable[..., Any]]] = contextvars.ContextVar(
    "cached_diffusers_call_routes", default={}
)
"""``{id(transformer): route}`` of the transformers whose calls are routed in this thread (see ``route_calls``)."""


@functools.lru_cache(maxsize=None)
def _parent_context_takes_kwargs() -> bool:
    """Whether diffusers' ``CacheMixin.cache_context`` takes the loop's keywords (0.41 on; 0.40 takes the name only)."""
    import inspect

    from diffusers.models.cache_utils import CacheMixin

    parameters = inspect.signature(CacheMixin.cache_context).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


@dataclass(frozen=True)
class BlockContext:
    """What the blocks of one forward share: the one type a block-stack model's ``forward`` hands
    :meth:`CachedTransformerMixin._run_parent_forward` / :meth:`CachedTransformerMixin._run_block_stack`, and that its
    hooks get back (``_block_io``, ``_block_indicators``, ``_prepare_first_block_call``, ``_cache_indicators``,
    ``_run_blocks``, ``_context_rows``). A model fills the fields its hooks read; the others stay ``None``.

    Attributes:
        raw_latent: the latent tokens entering the model as it received them, ``(B, L_img, C * p * p)`` (under
            context parallelism: this rank's shard where the parent's plan shards at the model's input), from which
            the ``"sea_latent"`` indicator unpacks the latent grid.
        latent_layout: where ``raw_latent``'s tokens lie on the grid: Qwen-Image's ``img_shapes`` (per sample,
            ``[(frames, h, w), ...]``), FLUX.2's ``img_ids`` (``(L_img, 4)``), BAGEL's token grid ``(h, w)``.
        sequence_group: under context parallelism, the ``torch.distributed`` group the streams' sequence is sharded
            over (:attr:`BlockStack.sequence_group <cached_diffusers.engine.BlockStack>`: decision statistics are
            summed over it); ``None``: the whole sequence is on this rank.
        text_length: tokens of the text part of a joint ``[text; image]`` stream (FLUX.2's single-stream blocks).
        rope: the rotary ``(cos, sin)`` the blocks apply (BAGEL: each ``(B, 1, head_dim)``).
        kv_cache: the branch's prompt K/V cache the blocks attend to (BAGEL's ``BagelKVCache``).
        attention_mask: the blocks' attention mask (BAGEL: ``(B, 1, 1, L + N)`` bool, ``None`` when no row is padded).
    """

    raw_latent: torch.Tensor | None = None
    latent_layout: Any = None
    sequence_group: Any = None
    text_length: int | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    kv_cache: Any = None
    attention_mask: torch.Tensor | None = None


class CachedTransformerMixin:
    """Mixin for a diffusers ``ModelMixin`` subclass whose overridden ``forward`` calls :attr:`cache_engine`.

    Class attributes:
        cache_spec: the model's :class:`~cached_diffusers.spec.ModelCacheSpec` (TeaCache coefficients, MagCache
            ratios and their sources, calibration hint, wiring patterns); the engine gets it with ``num_blocks`` set
            to this instance's :attr:`num_cache_blocks`.
        cached_block_lists: for a model whose cached ``forward`` runs its diffusers parent's own ``forward`` and
            caches through the calls of the parent's blocks (:class:`BlockCalls`), the names of the ``nn.ModuleList``
            attributes holding the cached stack, in execution order (``()``: none).
    """

    cache_spec: ClassVar[ModelCacheSpec] = ModelCacheSpec()
    cached_block_lists: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The engine is created with the model (its constructor, `from_base`, a copy), never on first use inside a
        # forward that TorchDynamo traces (`torch.compile(fullgraph=True)` cannot trace the engine's lock). The
        # parent's constructor keeps its signature (`functools.wraps`), which diffusers reads to build configs.
        super().__init_subclass__(**kwargs)
        parent = next((c for c in cls.__mro__ if not issubclass(c, CachedTransformerMixin)), None)
        forward = getattr(parent, "forward", None)
        # The parent's own forward, found in the MRO when the class is made (whatever the installed diffusers' is),
        # without its `apply_lora_scale` decorator (the cached forward applies the scale once). A plain function on
        # the class: TorchDynamo traces it with caching off (`torch.compile(transformer, fullgraph=True)`).
        cls._parent_forward = staticmethod(getattr(forward, "__wrapped__", forward))
        init = cls.__init__
        if getattr(init, "_creates_cache_engine", False):
            return

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            if "_cache_engine" not in self.__dict__:
                self.__dict__["_cache_engine"] = self._new_cache_engine()

        __init__._creates_cache_engine = True
        cls.__init__ = __init__

    def __getattr__(self, name: str) -> Any:
        # Python re-routes an AttributeError raised inside a property getter to `__getattr__`, whose own error
        # ("object has no attribute 'cache_engine'") would hide the real one: for this class's properties, run the
        # getter again and report what it raises, with its cause.
        value = property_keeping_cause(self, name, CachedTransformerMixin)
        return super().__getattr__(name) if value is _NOT_OURS else value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A call routed by `route_calls` (CFG-parallel) goes to its route, which decides when and whether to run it;
        # otherwise (and while TorchDynamo traces, which cannot read a ContextVar) nn.Module's own call.
        if not torch.compiler.is_compiling():
            route = _CALL_ROUTES.get().get(id(self))
            if route is not None:
                return route(super().__call__, args, kwargs)
        return super().__call__(*args, **kwargs)

    @contextlib.contextmanager
    def route_calls(self, route: Callable[[Callable[..., Any], tuple, dict], Any]) -> Iterator[None]:
        """Send this model's calls made in this thread inside the block to ``route(call, args, kwargs)``, where
        ``call(*args, **kwargs)`` is the ordinary module call (hooks included). Used by CFG-parallel pipelines
        (:class:`~cached_diffusers.cfg_parallel.CFGParallelCall`)."""
        token = _CALL_ROUTES.set({**_CALL_ROUTES.get(), id(self): route})
        try:
            yield
        finally:
            _CALL_ROUTES.reset(token)

    @property
    def num_cache_blocks(self) -> int:
        """Blocks of the cached stack, in execution order (what DBCache's ``Fn`` and ``Bn`` count)."""
        raise NotImplementedError

    # -- pattern BLOCK_STACK: block-stack caching inside forward ---------------------------------------------------
    # A block-stack model implements ``_run_blocks(start, end, streams, context) -> streams``: run blocks
    # ``start .. end - 1`` of the cached stack on the residual streams exactly as the parent's loop does, returning the
    # same structure and shapes (``context``: the forward's :class:`BlockContext`, what its blocks share: RoPE, masks,
    # KV caches). It is not declared here, so that a parent class that already has it (BAGEL's) is not shadowed.

    def _cache_indicators(self, context: BlockContext) -> Mapping[str, Callable[[tuple[torch.Tensor, ...]], torch.Tensor]]:
        """The decision indicators the model computes at the stack's input (``{"teacache_indicator": fn(streams)}``),
        for this forward's ``context``. Default: none."""
        return {}

    def _run_block_stack(self, streams: tuple[torch.Tensor, ...], context: BlockContext) -> tuple[torch.Tensor, ...]:
        """The block stack of one forward: the one call a block-stack model's ``forward`` makes between its
        embeddings and its output head. With caching on, ``CacheEngine.run`` decides, runs or skips the cached span
        and returns the streams at the stack's output; off, every block runs.

        ``context.sequence_group``: under context parallelism, the group the streams' sequence is sharded over
        (:attr:`BlockStack.sequence_group <cached_diffusers.engine.BlockStack>`), so that decisions are taken from
        statistics summed over it.
        """
        if not self.cache_engine.active:
            return self._run_blocks(0, self.num_cache_blocks, streams, context)
        run_blocks = functools.partial(self._run_blocks, context=context)
        run_rows = None
        context_rows = getattr(self, "_context_rows", None)
        if context_rows is not None:

            def run_rows(start, end, streams, rows):
                return self._run_blocks(start, end, streams, context_rows(context, rows))

        stack = BlockStack(
            self.num_cache_blocks, run_blocks, self._cache_indicators(context), context.sequence_group,
            run_rows=run_rows,
        )
        return self.cache_engine.run(stack, streams)

    # -- pattern BLOCK_STACK through the parent's own forward (the diffusers models) ------------------------------
    # The model's ``forward`` keeps its parent's signature and returns ``self._run_parent_forward(call, context)``
    # (``context``: the forward's :class:`BlockContext`),
    # where ``call()`` runs the parent's own forward; it declares ``cached_block_lists`` and implements
    # ``_block_io()`` (one :class:`BlockIO` per list) and ``_block_indicators``.

    def _block_io(self, context: BlockContext) -> tuple[BlockIO, ...]:
        """One :class:`BlockIO` per list of ``cached_block_lists``, for this forward's ``context``."""
        raise NotImplementedError

    def _block_indicators(
        self, args: tuple, kwargs: dict, context: BlockContext
    ) -> Mapping[str, Callable[[tuple], torch.Tensor]]:
        """The decision indicators (``{"teacache_indicator": fn(streams)}``, ...) of this forward, from the call of
        block 0 (``args``, ``kwargs``) and the ``context`` the model's ``forward`` passed. Default: none."""
        return {}

    def _prepare_first_block_call(self, args: tuple, kwargs: dict, context: BlockContext) -> tuple[tuple, dict]:
        """Block 0's call arguments as the stack receives them (e.g. sharded under context parallelism). Default: as
        given."""
        return args, kwargs

    @torch.compiler.disable(reason=_NOT_COMPILABLE)
    def _run_parent_forward(self, call: Callable[[], Any], context: BlockContext | None = None) -> Any:
        """Run ``call()`` (the parent's own forward) with its block calls intercepted by a :class:`BlockCalls`
        (``context``: the forward's :class:`BlockContext`; ``None``: an empty one).

        Runs eagerly (``torch.compiler.disable``): the decision is data-dependent host-side Python; blocks compiled
        on their own (``compile_repeated_blocks``) run compiled inside it.
        """
        kind = self.__dict__.get("_block_calls_type", BlockCalls)  # a test may record through a subclass
        context = context if context is not None else BlockContext()
        calls = kind(self, self._block_io(context), context)
        with calls.active():
            return call()

    @property
    def cache_engine(self) -> CacheEngine:
        """This model's :class:`~cached_diffusers.engine.CacheEngine` (created with the model; a model whose
        ``__dict__`` lost it, e.g. a shallow copy, gets a new one here)."""
        engine = self.__dict__.get("_cache_engine")
        if engine is None:
            engine = self.__dict__["_cache_engine"] = self._new_cache_engine()
        return engine

    def _new_cache_engine(self) -> CacheEngine:
        """A new engine (caching off) with this model's spec and block count."""
        for name in self.cached_block_lists:  # the parent's loops iterate them: see CachedBlockList
            blocks = getattr(self, name)
            if type(blocks) is torch.nn.ModuleList:
                blocks.__class__ = CachedBlockList
        spec = self.cache_spec
        if spec.model_name == ModelCacheSpec.model_name:
            spec = dataclasses.replace(spec, model_name=type(self).__name__)
        return CacheEngine(dataclasses.replace(spec, num_blocks=self.num_cache_blocks))

    @property
    def cache_config(self) -> CacheConfig | None:
        """The cache config of direct calls; ``None`` means no caching. Assign a config, a dict, a method name or
        ``None``. A cached pipeline's calls use the pipeline's own ``cache_config`` (assigning that sets this too).

        Raises:
            ValueError: on assignment of an invalid config, or one this model cannot run (e.g. TeaCache without
                coefficients for this model).
        """
        return self.cache_engine.config

    @cache_config.setter
    def cache_config(self, value: CacheConfig | Mapping[str, Any] | str | None) -> None:
        self.cache_engine.config = value

    @property
    def cache_stats(self) -> CacheStats:
        """Statistics of the generation running in this thread, else of the last one started on this transformer."""
        return self.cache_engine.stats

    def cache_generation(self, cache_config: CacheConfig | Mapping[str, Any] | str | None | object = ...):
        """Context manager: the transformer calls made in this thread inside it form one generation of their own.

        Cached pipelines open one per call. Open one yourself to drive a shared transformer directly from several
        threads: each thread's generation keeps its own branch states and statistics. ``cache_config`` (default:
        :attr:`cache_config`) is this generation's. Yields the :class:`~cached_diffusers.engine.Generation`.

        Raises:
            ValueError: for an invalid ``cache_config``.
        """
        return self.cache_engine.generation(cache_config)

    def reset_cache(self) -> None:
        """Forget all cached residuals and statistics; the next call starts a new generation."""
        self.cache_engine.reset()

    def cache_summary(self, file: TextIO | None = None, details: bool = True) -> CacheStats:
        """Print the last generation's per-branch cache statistics and return them (see :func:`~cached_diffusers.progress.summary`)."""
        from .progress import summary

        return summary(self, file=file, details=details)

    def enable_cache(self, config: Any) -> None:
        """Refused: this transformer caches steps itself, through :attr:`cache_config`.

        diffusers' cache hooks (``FirstBlockCacheConfig``, ``MagCacheConfig``, ``TaylorSeerCacheConfig``,
        ``FasterCacheConfig``, ``PyramidAttentionBroadcastConfig``, ...) on top of the cached forward would cache
        twice: each cache would reuse (or forecast) residuals computed from blocks that the other one did not run, and a
        step could be reused by both. The refusal holds whether or not ``cache_config`` is set, so that a later
        ``cache_config`` cannot silently stack onto a hook.

        Raises:
            ValueError: always, saying how to get the wanted method.
        """
        from .progress import config_repr

        parent = diffusers_parent(type(self), CachedTransformerMixin).__name__
        raise ValueError(
            f"{type(self).__name__} caches denoising steps itself, through its cache_config (now "
            f"{config_repr(self.cache_config)}), so diffusers' cache hooks ({type(config).__name__}) cannot be enabled "
            f"on it, whether or not its own caching is on: two caches on one transformer "
            f"would reuse steps twice, each reusing residuals computed from blocks the other one did not run. Choose the "
            f"method with `pipe.cache_config = ...` (or `transformer.cache_config = ...`; available: "
            f"{', '.join(available_cache_methods())}), or use the stock diffusers class {parent} for diffusers' hooks."
        )

    def to_json_string(self) -> str:
        """The config as JSON, naming the diffusers parent class so that stock diffusers can load a saved model."""
        return stock_class_name_json(super().to_json_string(), type(self), CachedTransformerMixin)

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """Mark the guidance branch ``name`` (and optionally ``step_index``, ``num_inference_steps``) of the calls inside.

        Also forwards the context to diffusers' own cache hooks, as the parent's ``cache_context`` does.
        """
        step_index = kwargs.get("step_index")
        num_inference_steps = kwargs.get("num_inference_steps")
        with self.cache_engine.context(name, step_index=step_index, num_inference_steps=num_inference_steps):
            # diffusers before 0.41 takes the name only (its hooks know no step)
            with super().cache_context(name, **(kwargs if _parent_context_takes_kwargs() else {})):
                yield

    def stock_view(self):
        """This model as an instance of its diffusers parent class, sharing its parameters, buffers and submodules
        (no copy) but not its cache: what diffusers' ``QwenImagePipeline.from_pipe(cached_pipe)`` gets (it carries
        over only components of exactly the annotated class; see ``CachedPipelineMixin.components``). A module
        replaced later in one of the two (e.g. by LoRA loading) is seen by both, as for any shared component;
        accelerate's offloading hooks are not carried over to the view.
        """
        import copy

        view = copy.copy(self)
        view.__dict__.pop("_cache_engine", None)
        view.__class__ = diffusers_parent(type(self), CachedTransformerMixin)
        return view

    @classmethod
    def from_base(cls, model):
        """Turn a loaded instance of the diffusers parent class into this cached class, in place, and return it.

        The weights, device placement, dtype and hooks stay as they are (no copy). Caching starts off.

        Raises:
            TypeError: if ``model``'s class is not an ancestor of ``cls`` (the swap would change its architecture).
            ValueError: if diffusers' own cache hooks are enabled on ``model`` (see :meth:`enable_cache`).
        """
        if isinstance(model, cls):
            return model
        if type(model) not in cls.__mro__:
            parent = diffusers_parent(cls, CachedTransformerMixin)
            raise TypeError(f"{cls.__name__}.from_base expects a {parent.__name__}, got {type(model).__name__}")
        if getattr(model, "is_cache_enabled", False):
            raise ValueError(
                f"{type(model).__name__} has diffusers' cache hooks enabled ({type(model._cache_config).__name__}); "
                f"{cls.__name__} caches steps itself and would cache twice. Call `model.disable_cache()` first."
            )
        model.__class__ = cls
        model.__dict__["_cache_engine"] = model._new_cache_engine()
        if "_old_forward" in model.__dict__:
            # accelerate's hooks (device_map, offloading) call the forward they wrapped: point it at ours.
            model._old_forward = cls.forward.__get__(model)
        return model


# -- block-call caching: the parent's own forward runs, the calls of its blocks are intercepted ----------------------
_BLOCK_CALLS: contextvars.ContextVar[dict[int, tuple["BlockCalls", int]]] = contextvars.ContextVar(
    "cached_diffusers_block_calls", default={}
)
"""``{id(block list): (this forward's BlockCalls, index of the list's first block in the stack)}`` in this thread."""


class CachedBlockList(torch.nn.ModuleList):
    """The ``nn.ModuleList`` of a cached transformer's blocks (its class only is swapped, in place: same modules,
    same state-dict keys, same hooks). Iterated by the parent's ``forward`` inside the cached ``forward``, it yields
    each block's intercepted call (:class:`BlockCalls`) instead of the block; everywhere else (caching off, another
    thread, TorchDynamo tracing, indexing) it is the plain list."""

    def __iter__(self):
        if not torch.compiler.is_compiling():
            entry = _BLOCK_CALLS.get().get(id(self))
            if entry is not None:
                calls, offset = entry
                return calls.iterate(self, offset)
        return super().__iter__()


class _InterceptedBlock:
    """What the parent's loop gets for one block: calling it goes through :meth:`BlockCalls.call`; attributes are the
    block's."""

    __slots__ = ("_calls", "_index", "_block")

    def __init__(self, calls: "BlockCalls", index: int, block: torch.nn.Module) -> None:
        self._calls, self._index, self._block = calls, index, block

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._calls.call(self._index, self._block, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._block, name)


@dataclass(frozen=True)
class BlockIO:
    """How a cached model reads the residual streams from one block list's calls and builds what its blocks return.

    Attributes:
        streams: ``streams(args, kwargs) -> tuple``: the streams entering a call, in the stack's canonical order
            (the same structure for every block of the stack, e.g. ``(image tokens, text tokens)``).
        result_streams: ``result_streams(result, args, kwargs) -> tuple``: the streams a call returned.
        result: ``result(streams, args, kwargs)``: what a block of this list returns for the canonical ``streams``.
        passthrough: ``passthrough(args, kwargs)``: what a skipped block returns: its inputs, untouched (no copy).
        gather: ``gather(args, kwargs, rows, batch) -> (args, kwargs) or None``: the same call on the sub-batch
            ``rows`` (a 1-d ``torch.long`` tensor of batch indices) of a batch of ``batch`` samples: every argument
            with a batch dimension (the streams, attention masks, modulations and time embeddings, per-sample rotary
            or position data) taken at those rows, the shared ones as they are (see :func:`row_gatherer`, which
            builds one from the declared per-sample arguments). ``None`` (the field, or its answer for a call): the
            call cannot run on a sub-batch, so on a step where some samples compute and the others reuse
            (``batch_decisions="per_sample"``) the block runs on the whole batch and the computing rows are kept.
    """

    streams: Callable[[tuple, dict], tuple]
    result_streams: Callable[[Any, tuple, dict], tuple]
    result: Callable[[tuple, tuple, dict], Any]
    passthrough: Callable[[tuple, dict], Any]
    gather: Callable[[tuple, dict, torch.Tensor, int], tuple[tuple, dict] | None] | None = None


_MISSING = object()


def block_argument(args: tuple, kwargs: dict, position: int, name: str, default: Any = _MISSING) -> Any:
    """A block call's argument ``name``: the keyword, else the positional at ``position`` (gradient checkpointing
    passes positionals), else ``default``.

    Raises:
        TypeError: when the call has no such argument and no ``default`` is given.
    """
    if name in kwargs:
        return kwargs[name]
    if position < len(args):
        return args[position]
    if default is _MISSING:
        raise TypeError(f"block call without {name!r}")
    return default


def gather_rows(value: Any, rows: torch.Tensor, batch: int, name: str = "argument") -> Any:
    """The rows ``rows`` of a per-sample block argument of a batch of ``batch`` samples.

    A tensor with ``batch`` rows is taken at ``rows``; one with 1 row is the same for every sample (broadcast) and
    stays as it is; one with ``m * batch`` rows holds ``m`` groups of the batch concatenated along dim 0 (e.g.
    Qwen-Image-Edit's ``zero_cond_t`` time embedding ``[temb(t); temb(0)]``) and is taken at ``rows`` in every
    group; ``None`` stays ``None``.

    Raises:
        ValueError: for a tensor whose first dimension is none of those, naming the argument.
    """
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"per-sample block argument {name!r} must be a tensor or None, got {type(value).__name__}")
    size = value.shape[0] if value.ndim else 0
    if size == batch:
        return value.index_select(0, rows.to(value.device))
    if size == 1:
        return value
    if size and size % batch == 0:
        groups = size // batch
        index = torch.cat([rows + g * batch for g in range(groups)]).to(value.device)
        return value.index_select(0, index)
    raise ValueError(
        f"per-sample block argument {name!r} has {size} rows for a batch of {batch} (expected {batch}, 1 or a "
        f"multiple of {batch})"
    )


def row_gatherer(
    per_sample: Mapping[str, int], opaque: Mapping[str, int] = {}
) -> Callable[[tuple, dict, torch.Tensor, int], tuple[tuple, dict] | None]:
    """A :attr:`BlockIO.gather` from a block's declared arguments.

    Args:
        per_sample: ``{name: position}`` of the arguments with a batch dimension (taken at the rows with
            :func:`gather_rows`); every other argument is shared by the samples and passed as it is.
        opaque: ``{name: position}`` of arguments (dicts, e.g. attention kwargs) whose content is not declared: a
            call where one holds any value other than ``None`` is not gathered (``None``: the block runs on the
            whole batch).
    """

    def gather(args: tuple, kwargs: dict, rows: torch.Tensor, batch: int) -> tuple[tuple, dict] | None:
        for name, position in opaque.items():
            value = block_argument(args, kwargs, position, name, None)
            if value and any(v is not None for v in (value.values() if isinstance(value, Mapping) else (value,))):
                return None
        args, kwargs = list(args), dict(kwargs)
        for name, position in per_sample.items():
            if name in kwargs:
                kwargs[name] = gather_rows(kwargs[name], rows, batch, name)
            elif position < len(args):
                args[position] = gather_rows(args[position], rows, batch, name)
        return tuple(args), kwargs

    return gather


def scatter_computed(streams: tuple, rows: torch.Tensor, computed: tuple) -> tuple:
    """Whole-batch streams from a block's inputs ``streams`` ``(B, ...)`` with rows ``rows`` replaced by ``computed``
    (the block's outputs for those samples): inside a cached span on a mixed per-sample step, the reusing rows carry
    their inputs through (the span's last block replaces them by their span input plus their recalled residual)."""
    return tuple(s.index_copy(0, rows, c.to(s.dtype)) for s, c in zip(streams, computed))


def _dual_stream_streams(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    return block_argument(args, kwargs, 0, "hidden_states"), block_argument(args, kwargs, 1, "encoder_hidden_states")


DUAL_STREAM_IO = BlockIO(
    streams=_dual_stream_streams,
    result_streams=lambda result, args, kwargs: (result[1], result[0]),
    result=lambda streams, args, kwargs: (streams[1], streams[0]),
    passthrough=lambda args, kwargs: _dual_stream_streams(args, kwargs)[::-1],
)
"""The calls of a dual-stream (MMDiT) block, ``block(hidden_states, encoder_hidden_states, ...) ->
(encoder_hidden_states, hidden_states)`` (Qwen-Image's blocks, FLUX.2's double-stream blocks), as the stack's streams
``(image tokens, text tokens)``."""


class BlockCalls:
    """One cached forward's interception of its parent's block calls: :meth:`CacheEngine.run
    <cached_diffusers.engine.CacheEngine.run>`'s step, taken call by call.

    The front blocks run as usual; the first block of the cached span measures the indicator and decides (block 0's
    call gives the stack's input and the model's indicators, :meth:`CachedTransformerMixin._block_indicators`). The
    cached span runs from its first block's input to its last block's output, whatever the parent's loop does
    between its blocks (e.g. Qwen-Image's ControlNet residuals). On a computed step the span's blocks run and the last
    one's output minus the first one's input is committed. On a reused step the span's blocks are not run: each
    returns its inputs untouched (no copy), and the last returns the span's input plus the recalled residual. Then
    the back blocks run as usual, and what the parent's loop does after the span's last block, it does on every step.
    """

    def __init__(self, model: "CachedTransformerMixin", io: tuple[BlockIO, ...], context: BlockContext) -> None:
        self.model, self.io, self.context, self.group = model, io, context, context.sequence_group
        self.engine = engine = model.cache_engine
        self.generation = engine.current
        self.policy = policy = self.generation.policy
        self.num_blocks = num_blocks = model.num_cache_blocks
        self.lists = tuple(getattr(model, name) for name in model.cached_block_lists)
        if policy is not None:
            self.ctx = engine.step_context()  # an unknown step is reported first, before any block runs
            engine._check_span(self.generation, num_blocks)
            self.front, self.end = policy.front_blocks, num_blocks - policy.back_blocks
        self.stack_in = self.indicators = self.span_in = self.recalled = None
        self.reuse = None
        self.rows = self.others = None  # a mixed per-sample step: the computing and the reusing batch rows
        self.open = False  # a compute decision awaiting its commit

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        offsets, offset = {}, 0
        for blocks in self.lists:
            offsets[id(blocks)] = (self, offset)
            offset += len(blocks)
        token = _BLOCK_CALLS.set({**_BLOCK_CALLS.get(), **offsets})
        try:
            yield
        except BaseException:
            if self.open:  # the step did not happen; the next one decides anew
                state = self.generation.branches[self.ctx.branch]
                state.pending = None
                for sample in state.samples or ():
                    sample.pending = None
            raise
        finally:
            _BLOCK_CALLS.reset(token)

    def iterate(self, blocks: torch.nn.ModuleList, offset: int) -> Iterator[_InterceptedBlock]:
        for index, block in enumerate(torch.nn.ModuleList.__iter__(blocks)):
            yield _InterceptedBlock(self, offset + index, block)

    def _io(self, index: int) -> BlockIO:
        for io, blocks in zip(self.io, self.lists):
            if index < len(blocks):
                return io
            index -= len(blocks)
        raise IndexError(index)

    def call(self, index: int, block: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        if index == 0:
            args, kwargs = self.model._prepare_first_block_call(args, kwargs, self.context)
        if self.policy is None or not (index == 0 or self.front <= index < self.end):
            return block(*args, **kwargs)
        io = self._io(index)
        if index == 0:
            self.stack_in = io.streams(args, kwargs)
            self.indicators = self.model._block_indicators(args, kwargs, self.context)
            if self.front > 0:
                return block(*args, **kwargs)
        if index == self.front:
            self._decide(io.streams(args, kwargs) if index else self.stack_in)
        if self.reuse:
            if index < self.end - 1:
                return io.passthrough(args, kwargs)
            return io.result(tuple(s + r for s, r in zip(self.span_in, self.recalled)), args, kwargs)
        if self.rows is not None:
            return self._call_rows(index, io, block, args, kwargs)
        result = block(*args, **kwargs)
        if index == self.end - 1:
            self._commit(io.result_streams(result, args, kwargs))
        return result

    @torch.compiler.disable
    def _decide(self, span_in: tuple) -> None:
        indicator = stack_indicator(self.policy.indicator_kind, self.stack_in, span_in, self.indicators)
        with _sequence_group(self.group):
            decision = self.engine.decide(
                self.ctx.branch, self.ctx.step, self.ctx.num_steps, inputs=span_in, indicator=indicator,
                num_blocks=self.num_blocks, pattern=_BLOCK_STACK,
            )  # fmt: skip
            self.span_in, self.reuse = span_in, decision.reuse
            if decision.reuse:
                self.recalled = self.engine.recall(branch=self.ctx.branch)
            else:
                self.open = True
                if isinstance(decision, BatchDecision) and decision.mixed:
                    device = span_in[0].device
                    self.rows = torch.tensor(decision.computing, dtype=torch.long, device=device)
                    self.others = torch.tensor(decision.reusing, dtype=torch.long, device=device)
                    self.recalled = self.engine.recall(branch=self.ctx.branch)

    def _call_rows(self, index: int, io: BlockIO, block: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        """A cached block's call on a mixed per-sample step: the block runs on the computing rows (gathered by
        ``io.gather``; on the whole batch when the call cannot be gathered), the results are scattered back into the
        whole batch (reusing rows keep their inputs), and the span's last block returns the computing rows' outputs
        with the reusing rows' span input plus their recalled residual."""
        rows, batch = self.rows, self.span_in[0].shape[0]
        gathered = io.gather(args, kwargs, rows, batch) if io.gather is not None else None
        if gathered is None:
            result = block(*args, **kwargs)
            if index < self.end - 1:
                return result
            computed = tuple(s.index_select(0, rows) for s in io.result_streams(result, args, kwargs))
        else:
            sub_args, sub_kwargs = gathered
            computed = io.result_streams(block(*sub_args, **sub_kwargs), sub_args, sub_kwargs)
        if index < self.end - 1:
            return io.result(scatter_computed(io.streams(args, kwargs), rows, computed), args, kwargs)
        self._commit(computed, tuple(s.index_select(0, rows) for s in self.span_in))
        return io.result(scatter_rows(self.span_in, rows, computed, self.others, self.recalled), args, kwargs)

    @torch.compiler.disable
    def _commit(self, span_out: tuple, span_in: tuple | None = None) -> None:
        span_in = self.span_in if span_in is None else span_in
        residuals = tuple(o - s for o, s in zip(span_out, span_in))
        with _sequence_group(self.group):
            self.engine.commit(residuals, span_out, branch=self.ctx.branch)
        self.open = False
