"""LeMiCa: lexicographic-minimax path caching (Gao et al., NeurIPS 2025, arXiv 2511.00090; UnicomAI/LeMiCa), a
planned schedule. The config (:class:`LeMiCaConfig`), the policy (:class:`LeMiCaPolicy`: a reused step adds the last
computed residual), its calibration (the error matrix, :func:`measure_edge_errors`) and the sweep metadata (the
budget). The schedule is solved by :func:`cached_diffusers.schedules.solve_lexicographic_minimax` from the error matrix
(``cached-diffusers calibrate --method lemica``; MeanCache plans on the same matrix); the planned-schedule base is
:mod:`cached_diffusers.planned`.

:func:`measure_edge_errors`: LeMiCa's DAG edge costs (Gao et al., NeurIPS 2025, arXiv 2511.00090). For every edge
``i -> j`` with ``2 <= j - i <= max_span``, a run computes every step except ``i+1 .. j-1`` (which reuse the residual
of step ``i``, :class:`LeMiCaConfig`), and ``E[i, j]`` is the relative L1 distance ``sum|x - x_ref| / sum|x_ref|`` of
its final latents ``x`` (``output_type="latent"``, before the VAE) from the uncached run's ``x_ref``
(:func:`cached_diffusers.calibration_schedules.latent_error`), averaged over the calibration prompts: the *global*
error that this one gap causes. ``E[i, i+1] = 0`` (nothing reused); longer edges than ``max_span`` are not measured
(``inf``), which bounds the cost to about ``N * (max_span - 1)`` runs per prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from ..calibration_schedules import final_latents, latent_error
from ..configs import register_cache_method
from ..planned import PlannedScheduleConfig, PlannedSchedulePolicy
from ..registry import Sweep
from ..spec import ModelCacheSpec

__all__ = ["LeMiCaConfig", "LeMiCaPolicy", "measure_edge_errors"]


class LeMiCaPolicy(PlannedSchedulePolicy):
    """LeMiCa (see :class:`LeMiCaConfig`): a reused step adds the last computed residual."""

    def __init__(self, config: LeMiCaConfig, spec: ModelCacheSpec):
        super().__init__(config, spec)


@register_cache_method
@dataclass(frozen=True, kw_only=True)
class LeMiCaConfig(PlannedScheduleConfig):
    """LeMiCa: lexicographic-minimax path caching (Gao et al., NeurIPS 2025, arXiv 2511.00090; UnicomAI/LeMiCa).

    A static schedule: the steps in ``computed_steps`` run the block stack; every other step adds the block-stack
    residual of the branch's last computed step (as TeaCache does on a reused step). The schedule is the path of
    ``B`` nodes through the DAG of steps whose edge costs (the global error of the final output when only the steps
    strictly between the edge's ends reuse) are lexicographically minimax, solved exactly by
    :func:`cached_diffusers.schedules.solve_lexicographic_minimax` from the error matrix that
    ``cached-diffusers calibrate --method lemica`` measures on the model.

    Args:
        computed_steps, num_inference_steps: the plan, see :class:`PlannedScheduleConfig`.
        other fields: shared guards, see :class:`StepCacheConfig`.

    Raises:
        ValueError: for a schedule that is not strictly increasing, misses step 0 or the last step, or (when run)
            a call whose step count differs from ``num_inference_steps``.
    """

    method: ClassVar[str] = "lemica"
    aliases: ClassVar[tuple[str, ...]] = ("le_mi_ca", "lexicographic-minimax")
    source: ClassVar[str] = (
        "Gao et al., LeMiCa: Lexicographic Minimax Path Caching, NeurIPS 2025 (arXiv 2511.00090); UnicomAI/LeMiCa"
    )
    policy_class: ClassVar[type] = LeMiCaPolicy
    calibration: ClassVar[str] = "schedule"
    sweep: ClassVar[Sweep] = Sweep("budget", "budget", 2, math.inf, faster_up=False, rank=6)


# -- calibration: the error matrix ------------------------------------------------------------------------------------
class _Replay:
    """Record a pipeline's transformer outputs per ``(branch, step)`` on the uncached run, and replay them for the
    steps before ``start`` of a later run with the same prompt and seed: those steps are computed identically (the
    cache reuses only after ``start``), so replaying them changes nothing but the time. Installed as an instance
    ``forward`` of the transformer; removed by :meth:`close`."""

    def __init__(self, transformer) -> None:
        self.transformer = transformer
        self.forward = transformer.forward  # the bound class method
        self.outputs: dict[tuple[str, int], Any] = {}
        self.recording = False
        self.start = 0
        transformer.forward = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ctx = self.transformer.cache_engine.step_context()
        key = (ctx.branch, ctx.step)
        if not self.recording and ctx.step < self.start and key in self.outputs:
            return self.outputs[key]
        output = self.forward(*args, **kwargs)
        if self.recording:
            self.outputs[key] = output
        return output

    def close(self) -> None:
        self.transformer.__dict__.pop("forward", None)


def _check_span(max_span: int, num_steps: int) -> int:
    if isinstance(max_span, bool) or not isinstance(max_span, int) or max_span < 2:
        raise ValueError(f"max_span must be an integer >= 2 (the longest edge measured, in steps), got {max_span!r}")
    return min(max_span, num_steps - 1)


def measure_edge_errors(
    pipe,
    prompts: Sequence[str],
    call_kwargs: Mapping[str, Any],
    num_steps: int,
    *,
    max_span: int = 8,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> np.ndarray:
    """LeMiCa's edge-cost matrix ``E`` (``N x N``, float64) of ``pipe`` at ``num_steps`` steps.

    Args:
        pipe: a cached pipeline (its cache config is restored at the end).
        prompts: calibration prompts (prompt ``p`` runs with seed ``seed + p``).
        call_kwargs: the other call arguments (size, CFG, negative prompt, ...); ``num_inference_steps`` is set here.
        num_steps: ``N``.
        max_span: longest edge measured; longer edges are ``inf``.
        progress: called with a line now and then.

    Returns:
        ``E`` with ``E[i, j]`` for ``i < j`` as in the module docstring; 0 on and below the diagonal.

    Raises:
        ValueError: no prompts, ``num_steps < 3`` or ``max_span < 2``.
    """
    if not prompts:
        raise ValueError("measure_edge_errors needs at least one calibration prompt")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 3:
        raise ValueError(f"num_steps must be an integer >= 3 (an edge needs a reused step), got {num_steps!r}")
    span = _check_span(max_span, num_steps)
    say = progress or (lambda line: None)
    kwargs = {**call_kwargs, "num_inference_steps": num_steps}
    original = pipe.cache_config
    errors = np.full((num_steps, num_steps), math.inf)
    errors[np.tril_indices(num_steps)] = 0.0
    for i in range(num_steps - 1):
        errors[i, i + 1] = 0.0
    edges = [(i, j) for i in range(num_steps) for j in range(i + 2, min(i + span, num_steps - 1) + 1)]
    replay = _Replay(pipe.transformer)
    try:
        references, recorded = [], []
        for k, p in enumerate(prompts):
            replay.outputs, replay.recording = {}, True
            references.append(final_latents(pipe, p, kwargs, seed + k, None))
            recorded.append(replay.outputs)
        replay.recording = False
        values = np.zeros((len(prompts), len(edges)))
        for k, p in enumerate(prompts):
            replay.outputs = recorded[k]
            for n, (i, j) in enumerate(edges):
                # Steps before i are computed as in the uncached run: replayed. Step i is computed for real (the
                # first step the cache sees), i+1 .. j-1 reuse its residual, j .. N-1 are computed.
                replay.start = i
                steps = [s for s in range(num_steps) if not i < s < j]
                config = LeMiCaConfig(computed_steps=steps, num_inference_steps=num_steps)
                values[k, n] = latent_error(final_latents(pipe, p, kwargs, seed + k, config), references[k])
                if (n + 1) % 25 == 0 or n + 1 == len(edges):
                    say(f"prompt {k + 1}/{len(prompts)}: edges measured {n + 1}/{len(edges)}")
        for n, (i, j) in enumerate(edges):
            errors[i, j] = float(values[:, n].mean())
    finally:
        replay.close()
        pipe.cache_config = original
    return errors
