"""Under diffusers' tensor parallelism every cache decision reads replicated activations (CPU check of the TP plans).

diffusers applies ``TensorParallelConfig`` on accelerators only, so this test does not shard: it follows, through one
cached generation per method, which tensors the parents' ``_tp_plan`` would leave sharded. A ``"colwise"`` Linear's
output is a shard of its features (torch's ``ColwiseParallel``: ``Shard(-1)``); a ``"rowwise"`` Linear all-reduces
to a replicated output (``RowwiseParallel``: ``Replicate()``); any other op's output is sharded when one of its inputs
is. Every tensor a policy reads (``observe``'s signal, ``on_computed``'s signal, residuals and outputs) must be
replicated, so that every TP rank takes the same decision without communication. ``scripts/gpu_parallel_check.py``
runs the real thing on GPUs.
"""

import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from cached_diffusers import policies
from conftest import decides_per_sample, matrix_methods
from test_context_parallel import _generate, _model, method_configs

from diffusers.hooks.tensor_parallel import PackedColwiseParallel, PackedRowwiseParallel, _resolve_tp_plan


class ShardTracker(TorchFunctionMode):
    """Marks the tensors a TP plan leaves sharded while a forward runs (see the module docstring)."""

    def __init__(self, model, plan):
        super().__init__()
        self.sharded: dict[int, weakref.ref] = {}
        self.handles = []
        self.num_marked = 0
        for block, relative_plan in _resolve_tp_plan(model, plan):
            for path, style in relative_plan.items():
                module = block.get_submodule(path)
                if style == "colwise" or isinstance(style, PackedColwiseParallel):
                    self.handles.append(module.register_forward_hook(self._shard_output))
                elif style == "rowwise" or isinstance(style, PackedRowwiseParallel):
                    self.handles.append(module.register_forward_hook(self._replicate_output))
                else:
                    raise AssertionError(f"unknown TP style {style!r} at {path}")

    def is_sharded(self, tensor):
        ref = self.sharded.get(id(tensor))
        return ref is not None and ref() is tensor

    def _mark(self, tensor):
        self.sharded[id(tensor)] = weakref.ref(tensor)
        self.num_marked += 1

    def _shard_output(self, module, args, output):
        self._mark(output)

    def _replicate_output(self, module, args, output):
        self.sharded.pop(id(output), None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs, _ = tree_flatten((args, kwargs or {}))
        if any(isinstance(t, torch.Tensor) and self.is_sharded(t) for t in inputs):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._mark(t)
        return out

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def decision_inputs(monkeypatch):
    """Wraps every policy's ``observe`` and ``on_computed`` to collect ``(method, what, tensor)`` they read."""
    seen = []

    def wrap(cls, name, label):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            seen.extend((type(self).__name__, label, t) for t in tensors)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    for cls in {policies.CachePolicy, *[m.policy_class for m in matrix_methods()]}:
        for name in ("observe", "on_computed"):
            if name in vars(cls):
                wrap(cls, name, name)
    return seen


def _track(family, plan, names, decision_inputs):
    model = _model(family)
    tracker = ShardTracker(model, plan)
    configs = deciding_configs(family)
    try:
        with tracker:
            for name in names:
                _generate(model, family, configs[name])
    finally:
        tracker.remove()
    return tracker


def deciding_configs(family):
    """name -> config of every registered method that decides from an indicator (:func:`conftest.decides_per_sample`;
    a config that reuses and computes, ``test_context_parallel.method_configs``) and of every method calibrated from
    runs (``calibrate=True``, whose calibration reads activations)."""
    configs = method_configs(family, [m for m in matrix_methods() if decides_per_sample(m)])
    for m in matrix_methods():
        if m.calibration == "runs":
            configs[f"{m.name}-calibrate"] = m.config_class(calibrate=True)
    return configs


DECIDING = tuple(
    [m.name for m in matrix_methods() if decides_per_sample(m)]
    + [f"{m.name}-calibrate" for m in matrix_methods() if m.calibration == "runs"]
)


@pytest.mark.parametrize("family", ["qwen", "klein"])
def test_no_decision_input_is_sharded_by_the_tp_plan(family, decision_inputs):
    model_class = type(_model(family))
    tracker = _track(family, model_class._tp_plan, DECIDING, decision_inputs)
    assert tracker.num_marked > 0  # the plan does shard activations inside the blocks
    kinds = {(policy, what) for policy, what, _ in decision_inputs}
    assert {("TeaCachePolicy", "observe"), ("TeaCachePolicy", "on_computed"), ("DBCachePolicy", "observe")} <= kinds
    assert ("MagCachePolicy", "on_computed") in kinds
    sharded = [(policy, what, tuple(t.shape)) for policy, what, t in decision_inputs if tracker.is_sharded(t)]
    assert sharded == []


def test_a_plan_that_shards_the_teacache_modulation_is_caught(decision_inputs):
    """The check can fail: sharding block 0's image modulation (which the parents keep replicated) shards the signal."""
    model_class = type(_model("qwen"))
    plan = {**model_class._tp_plan, "transformer_blocks.*.img_mod.1": "colwise"}
    tracker = _track("qwen", plan, ("teacache",), decision_inputs)
    assert any(tracker.is_sharded(t) for policy, what, t in decision_inputs if what == "observe")
