"""MagCache: magnitude-aware cache (Ma et al., NeurIPS 2025, arXiv 2506.09045; Zehong-Ma/MagCache).

The config (:class:`MagCacheConfig`), the decision rule on the calibrated magnitude ratios (:class:`MagCachePolicy`,
state :class:`MagCacheState`, ratio resampling :func:`interpolate_ratios`), the calibration (``calibrate=True``
records per-step ratios; :meth:`MagCacheConfig.from_calibration` averages them) and the sweep metadata
(:attr:`MagCacheConfig.sweep`).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np

from ..calibration import runs_of
from ..configs import ResidualCacheConfig, _check_int, _check_number, _set_bool, register_cache_method
from ..policies import CachePolicy, Decision, Gate, StepContext, _hint
from ..registry import THRESHOLD_RANGE, Sweep
from ..spec import ModelCacheSpec
from ..validation import FrozenDict, as_sequence

if TYPE_CHECKING:
    import torch

__all__ = ["MagCacheConfig", "MagCachePolicy", "MagCacheState", "average_mag_ratios", "interpolate_ratios"]


def interpolate_ratios(ratios: tuple[float, ...], num_steps: int) -> tuple[float, ...]:
    """Nearest-neighbour resampling of per-step ratios to ``num_steps`` entries.

    ``idx_i = round(i * (L - 1) / (N - 1))`` with numpy's round-half-to-even, as Zehong-Ma/MagCache and diffusers'
    ``MagCacheConfig`` do; ``N = 1`` takes the last entry.
    """
    if num_steps == len(ratios):
        return tuple(ratios)
    if num_steps == 1:
        return (ratios[-1],)
    indices = np.round(np.linspace(0, len(ratios) - 1, num_steps)).astype(int)
    return tuple(float(ratios[i]) for i in indices)


@dataclass
class MagCacheState:
    """Per-branch MagCache state: running ratio, reused steps since the last compute (the paper's ``k``), accumulated
    error; calibration."""

    ratio: float = 1.0
    reused: int = 0
    error: float = 0.0
    previous_norm: torch.Tensor | None = None
    calibrated: list[float] = field(default_factory=list)

    def reset(self) -> None:
        self.ratio, self.reused, self.error = 1.0, 0, 0.0


class MagCachePolicy(CachePolicy):
    """MagCache's rule (see :class:`~cached_diffusers.MagCacheConfig`), with per-call ratio interpolation."""

    value_name = "accumulated magnitude error |1 - prod(mag_ratios)|"

    @property
    def samples_decide_alike(self) -> bool:
        """A calibration run (``calibrate=True``) computes every step: its samples agree by construction."""
        return self.config.calibrate

    def __init__(self, config: MagCacheConfig, spec: ModelCacheSpec):
        super().__init__(config, spec)
        ratios = config.mag_ratios if config.mag_ratios is not None else spec.mag_ratios
        if ratios is None and not config.calibrate:
            raise ValueError(
                f"MagCacheConfig.mag_ratios is None and no MagCache ratios are known for {spec.model_name}: run once "
                f"with MagCacheConfig(calibrate=True) and build the config with MagCacheConfig.from_calibration(stats)"
                + _hint(spec)
            )
        self.ratios = ratios
        self._interpolated: dict[tuple[str, int], tuple[float, ...]] = {}

    def new_state(self) -> MagCacheState:
        return MagCacheState()

    def ratios_for(self, branch: str, num_steps: int) -> tuple[float, ...]:
        """This branch's ratios at ``num_steps`` steps (a branch absent from a per-branch dict uses the first list)."""
        key = (branch, num_steps)
        if key not in self._interpolated:
            ratios = self.ratios
            if isinstance(ratios, Mapping):
                ratios = ratios.get(branch, next(iter(ratios.values())))
            self._interpolated[key] = interpolate_ratios(tuple(ratios), num_steps)
        return self._interpolated[key]

    def decide(
        self, ctx: StepContext, state: MagCacheState, measurement: float | None, gate: Gate, reason: str
    ) -> Decision:
        config = self.config
        if gate is Gate.COMPUTE:
            state.reset()
            return Decision(False, reason)
        if config.calibrate:
            return Decision(False, "calibration")
        if ctx.executed < int(config.mag_retention_ratio * ctx.num_executed + 0.5):
            state.reset()
            return Decision(False, "retention")
        state.ratio *= self.ratios_for(ctx.branch, ctx.num_steps)[ctx.step]
        state.reused += 1
        state.error += abs(1.0 - state.ratio)
        if gate is Gate.REUSE:
            return Decision(True, reason, state.error)
        if state.error <= config.mag_threshold and state.reused <= config.mag_max_reused_steps:
            return Decision(True, "below-threshold", state.error)
        error = state.error
        why = "max-reused-steps" if error <= config.mag_threshold else "above-threshold"
        state.reset()
        return Decision(False, why, error)

    def on_computed(
        self, ctx: StepContext, state: MagCacheState, indicator: torch.Tensor | None, residuals: tuple, outputs: tuple
    ) -> None:
        if not self.config.calibrate:
            return
        # ||r_t|| / ||r_{t-1}|| per token (L2 over channels) of the image-stream residual, mean over tokens, float32;
        # the first step has no previous residual and records 1.0 (Zehong-Ma/MagCache; diffusers adds 1e-8).
        # The list is indexed by denoising step and has one entry per step: a branch evaluated only at some steps
        # (BAGEL's CFG branches outside `cfg_interval`) gets 1.0 where it did not run, where its ratios are never
        # read, and its next ratio spans the steps since its last evaluation.
        from ..parallel import sequence_mean  # torch: loaded when a step runs

        norm = residuals[0].float().norm(dim=-1)
        if state.previous_norm is None or state.previous_norm.shape != norm.shape:
            ratio = 1.0
        else:
            ratio = sequence_mean(norm / (state.previous_norm + 1e-8))  # over every rank's tokens under CP
        state.previous_norm = norm
        if len(state.calibrated) != ctx.num_steps:
            state.calibrated = [1.0] * ctx.num_steps
        state.calibrated[ctx.step] = round(ratio, 5)

    def calibration(self, state: MagCacheState) -> dict[str, Any]:
        return {"mag_ratios": list(state.calibrated)} if self.config.calibrate else {}


def _check_ratio_list(owner: str, name: str, values: Any) -> tuple[float, ...]:
    values = as_sequence(f"{owner}.{name}", values, "positive numbers, one per calibration step")
    if len(values) < 2:
        raise ValueError(f"{owner}.{name} must have at least 2 entries (one per calibration step), got {len(values)}")
    ratios = tuple(_check_number(owner, f"{name}[{i}]", v, low=0.0, low_open=True) for i, v in enumerate(values))
    return ratios


RENAMED_FIELDS = {"mag_max_skip_steps": "mag_max_reused_steps"}
"""Old field name -> new one. An old name is accepted as a keyword, a ``cache_config.json`` key and an attribute,
with a ``FutureWarning`` naming the new field; ``to_dict`` writes the new name."""


def _warn_renamed(owner: str, old: str, stacklevel: int) -> None:
    new = RENAMED_FIELDS[old]
    warnings.warn(
        f"{owner}.{old} is renamed {new} (a step is 'computed' or 'reused'); {old} will be removed: use {new}",
        FutureWarning, stacklevel=stacklevel,
    )


def _renamed_fields(owner: str, params: Mapping[str, Any], stacklevel: int) -> dict[str, Any]:
    """``params`` with each old field name (:data:`RENAMED_FIELDS`) replaced by the new one, warning once per name.

    Raises:
        ValueError: when both the old and the new name are given.
    """
    params = dict(params)
    for old, new in RENAMED_FIELDS.items():
        if old in params:
            if new in params:
                raise ValueError(f"{owner}: give {new} only ({old} is its old name), got both")
            _warn_renamed(owner, old, stacklevel)
            params[new] = params.pop(old)
    return params


@register_cache_method
@dataclass(frozen=True)
class MagCacheConfig(ResidualCacheConfig):
    """MagCache: magnitude-aware cache (Ma et al., NeurIPS 2025, arXiv 2506.09045; Zehong-Ma/MagCache).

    Per guidance branch: the first ``int(mag_retention_ratio * N + 0.5)`` steps are computed. After them, each step
    multiplies a running ratio ``rho`` by the step's calibrated magnitude ratio ``gamma_i`` (``||r_i|| / ||r_{i-1}||``
    of consecutive whole-stack residuals, mean over tokens), counts ``k += 1`` and accumulates ``err += |1 - rho|``.
    The step reuses the residual of the last computed step while ``err <= mag_threshold`` and ``k <= mag_max_reused_steps``;
    otherwise it computes and resets ``rho = 1, k = 0, err = 0``. The ratios were calibrated at ``len(mag_ratios)``
    steps and are re-interpolated (nearest neighbour, ``idx_i = round(i * (L - 1) / (N - 1))``) to each call's
    ``num_inference_steps``. The decision needs no indicator from the model: it is a function of the ratios.

    Args:
        mag_threshold (`float`, defaults to 0.06, range >= 0):
            Accumulated error under which steps are reused. 0.06 is the official Qwen-Image setting (``E006K2R02``)
            and diffusers' default; the official FLUX.1 "fast" setting uses 0.24.
        mag_max_reused_steps (`int`, defaults to 3, range >= 1):
            ``K``, the most steps reused in a row: the paper's ``K`` (Zehong-Ma/MagCache's ``magcache_K``; diffusers'
            ``MagCacheConfig.max_skip_steps``), named here with the package's word for the event. Official
            Qwen-Image: 2, FLUX.1: 5; diffusers: 3. Its old name ``mag_max_skip_steps`` is still accepted (as a
            keyword, in a ``cache_config.json``, as an attribute) with a ``FutureWarning``.
        mag_retention_ratio (`float`, defaults to 0.2, range [0, 1)):
            Fraction of the first steps always computed (official Qwen-Image and diffusers: 0.2; FLUX.1: 0.1).
        mag_ratios (sequence of floats, ``{branch: sequence}`` or `None`, defaults to `None`):
            Per-step magnitude ratios, first entry 1.0 (no previous residual). A ``{branch: ratios}`` dict gives each
            guidance branch its own list (all of one length). ``None`` takes the model's published or calibrated
            ratios (e.g. :data:`cached_diffusers.models.qwenimage.QWENIMAGE_MAG_RATIOS`).
        calibrate (`bool`, defaults to `False`):
            Calibration mode: never reuse; record each branch's per-step ratios in the statistics
            (``stats.branches[b].calibration["mag_ratios"]``), see :meth:`from_calibration`.
        other fields: shared guards and calibrator, see :class:`StepCacheConfig` and :class:`ResidualCacheConfig`.
    """

    method: ClassVar[str] = "magcache"
    aliases: ClassVar[tuple[str, ...]] = ("mag_cache", "mag-cache")
    source: ClassVar[str] = "Ma et al., MagCache, NeurIPS 2025 (arXiv 2506.09045); Zehong-Ma/MagCache"
    policy_class: ClassVar[type] = MagCachePolicy
    renamed_fields: ClassVar[Mapping[str, str]] = RENAMED_FIELDS
    """Old field names still accepted (``FutureWarning``), e.g. by the command line's ``--mag-max-skip-steps``."""
    calibration: ClassVar[str] = "runs"
    sweep: ClassVar[Sweep] = Sweep(
        "mag_threshold", "log", *THRESHOLD_RANGE, values=(0.03, 0.06, 0.12, 0.24), rank=1,
        published={"mag_threshold": 0.06, "mag_max_reused_steps": 2, "mag_retention_ratio": 0.2},
        published_source="Zehong-Ma/MagCache Qwen-Image setting E006K2R02 (diffusers' defaults: 0.06, 3, 0.2)",
    )

    mag_threshold: float = 0.06
    mag_max_reused_steps: int = 3
    mag_retention_ratio: float = 0.2
    mag_ratios: tuple[float, ...] | Mapping[str, tuple[float, ...]] | None = None
    calibrate: bool = False

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        object.__setattr__(self, "mag_threshold", _check_number(owner, "mag_threshold", self.mag_threshold, low=0.0))
        object.__setattr__(
            self, "mag_max_reused_steps", _check_int(owner, "mag_max_reused_steps", self.mag_max_reused_steps, low=1)
        )
        retention = _check_number(owner, "mag_retention_ratio", self.mag_retention_ratio, low=0.0)
        if retention >= 1.0:
            raise ValueError(f"{owner}.mag_retention_ratio must be in [0, 1), got {retention!r}")
        object.__setattr__(self, "mag_retention_ratio", retention)
        _set_bool(self, "calibrate")
        ratios = self.mag_ratios
        if ratios is None:
            return
        if self.calibrate:
            raise ValueError(f"{owner}.mag_ratios must be None when calibrate=True (calibration measures them)")
        if isinstance(ratios, Mapping):
            if not ratios:
                raise ValueError(f"{owner}.mag_ratios must not be an empty dict")
            checked = {str(b): _check_ratio_list(owner, f"mag_ratios[{b!r}]", v) for b, v in ratios.items()}
            lengths = {len(v) for v in checked.values()}
            if len(lengths) != 1:
                raise ValueError(
                    f"{owner}.mag_ratios lists must all have the calibration step count's length, got lengths "
                    f"{ {b: len(v) for b, v in checked.items()} }"
                )
            object.__setattr__(self, "mag_ratios", FrozenDict(checked))
        else:
            object.__setattr__(self, "mag_ratios", _check_ratio_list(owner, "mag_ratios", ratios))

    @property
    def mag_max_skip_steps(self) -> int:
        """The old name of :attr:`mag_max_reused_steps` (``FutureWarning``)."""
        _warn_renamed(type(self).__name__, "mag_max_skip_steps", stacklevel=3)
        return self.mag_max_reused_steps

    @classmethod
    def _from_params(cls, params: dict[str, Any]) -> MagCacheConfig:
        """A ``cache_config.json``'s fields, its old names renamed (``FutureWarning``; see :data:`RENAMED_FIELDS`)."""
        return super()._from_params(_renamed_fields(cls.__name__, params, stacklevel=5))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if isinstance(self.mag_ratios, Mapping):
            out["mag_ratios"] = {b: list(v) for b, v in self.mag_ratios.items()}
        return out

    @classmethod
    def from_calibration(cls, stats: Any, **fields: Any) -> MagCacheConfig:
        """A config using the ratios ``calibrate=True`` runs recorded (``stats``: one ``CacheStats`` or a list).

        With several runs the ratios are averaged per branch and step. Identical branch lists are stored once,
        differing ones as ``{branch: ratios}``.

        Raises:
            ValueError: if ``stats`` holds no MagCache calibration, or the runs differ in step count.
        """
        recorded = average_mag_ratios(stats)
        values = list(recorded.values())
        ratios = values[0] if all(v == values[0] for v in values) else recorded
        return cls(mag_ratios=ratios, **fields)

    def calibrated_data(self) -> dict[str, Any]:
        return {"mag_ratios": self.mag_ratios} if self.mag_ratios and not self.calibrate else {}

    def missing_model_data(self, spec: ModelCacheSpec | None, model: str) -> str | None:
        if self.mag_ratios is None and not self.calibrate and (spec is None or spec.mag_ratios is None):
            return (
                f"no MagCache ratios for {model} (none published); calibrate with "
                f"`cached-diffusers calibrate --method magcache` and bench the directory holding its cache_config.json"
            )
        return None

    @classmethod
    def sweep_config(cls, value: Any, *, mag_ratios: Any = None, **context: Any) -> MagCacheConfig:
        """The sweep's config at ``mag_threshold=value`` (other fields at their defaults), with the model's
        calibrated ``mag_ratios`` if known."""
        return cls(mag_threshold=value, mag_ratios=mag_ratios)

    def for_budget_search(self, num_steps: int) -> MagCacheConfig:
        """``mag_max_reused_steps = N`` and ``mag_retention_ratio = 0.1`` (the official FLUX.1 value), so that
        MagCache's own caps do not keep it above small budgets."""
        return self.replace(mag_max_reused_steps=num_steps, mag_retention_ratio=0.1)

    @classmethod
    def calibrated(cls, runs: list[Any], options: Mapping[str, Any]) -> tuple[MagCacheConfig, dict[str, Any], list[str]]:
        """``calibrate --method magcache``: the runs' averaged ratios, with ``options["mag_threshold"]``."""
        config = cls.from_calibration(runs, mag_threshold=options["mag_threshold"])
        ratios = config.mag_ratios if isinstance(config.mag_ratios, Mapping) else {"all branches": config.mag_ratios}
        return config, {}, [f"MagCache ratios ({branch}): {list(values)}" for branch, values in ratios.items()]


def _accept_old_names(init):
    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **_renamed_fields(type(self).__name__, kwargs, stacklevel=4))

    return __init__


MagCacheConfig.__init__ = _accept_old_names(MagCacheConfig.__init__)  # MagCacheConfig(mag_max_skip_steps=...) still works


# -- calibration ------------------------------------------------------------------------------------------------------
def average_mag_ratios(stats: Any) -> dict[str, tuple[float, ...]]:
    """Per branch, the mean over runs of the per-step ratios recorded by MagCache calibration runs (5 decimals).

    Raises:
        ValueError: if no run holds a MagCache calibration, or the runs differ in step count.
    """
    per_branch: dict[str, list[Sequence[float]]] = {}
    for run in runs_of(stats):
        for name, branch in run.branches.items():
            if "mag_ratios" in branch.calibration:
                per_branch.setdefault(name, []).append(branch.calibration["mag_ratios"])
    if not per_branch:
        raise ValueError("these statistics hold no MagCache calibration: run once with MagCacheConfig(calibrate=True)")
    averaged = {}
    for name, runs in per_branch.items():
        if len({len(r) for r in runs}) != 1:
            raise ValueError(f"MagCache calibration runs of branch {name!r} differ in step count: {[len(r) for r in runs]}")
        averaged[name] = tuple(round(float(v), 5) for v in np.mean(np.asarray(runs, dtype=np.float64), axis=0))
    return averaged
