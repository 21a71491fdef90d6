"""LeMiCa: lexicographic-minimax path caching (Gao et al., NeurIPS 2025, arXiv 2511.00090; UnicomAI/LeMiCa), a
planned schedule. The config (:class:`LeMiCaConfig`), the policy (:class:`LeMiCaPolicy`: a reused step adds the last
computed residual) and the sweep metadata (the budget). The schedule is solved by
:func:`cached_diffusers.schedules.solve_lexicographic_minimax` from the error matrix that
:func:`cached_diffusers.calibration_schedules.measure_edge_errors` measures (``cached-diffusers calibrate --method
lemica``); the planned-schedule base is :mod:`cached_diffusers.planned`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..configs import register_cache_method
from ..planned import PlannedScheduleConfig, PlannedSchedulePolicy
from ..registry import Sweep
from ..spec import ModelCacheSpec

__all__ = ["LeMiCaConfig", "LeMiCaPolicy"]


class LeMiCaPolicy(PlannedSchedulePolicy):
    """LeMiCa (see :class:`~cached_diffusers.configs.LeMiCaConfig`): a reused step adds the last computed residual."""

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
