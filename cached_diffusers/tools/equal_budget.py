"""Equal-budget comparison: every method tuned to the same number of computed steps, fidelity against uncached.

The library behind ``cached-diffusers bench --equal-budget 25 17 10``. For each budget ``B`` (computed steps per
guidance branch, of ``N``):

* the planned methods (LeMiCa, MeanCache) run their schedule for ``B``: the budget is exact;
* every greedy method is tuned to ``B`` by bisection of its threshold (TeaCache ``rel_l1_thresh``, MagCache
  ``mag_threshold``, First-Block-Cache and DBCache ``residual_diff_threshold``, SeaCache ``threshold``, log scale): the result is the
  evaluated threshold whose measured computed steps (mean over prompts and branches) is the largest one ``<= B``
  (or the smallest measured, flagged ``reached: false``, when no threshold gets down to ``B``); TaylorSeer's
  integer ``interval`` is chosen the same way, from its exact (static) count. The budget of a greedy method is
  therefore *measured*, on the same held-out prompts the fidelity is measured on (the tuning sees only the compute
  count, never the images).

MagCache is tuned with ``mag_max_reused_steps = N`` and ``mag_retention_ratio = 0.1`` (the official FLUX.1 value), so
that its own caps do not keep it above small budgets; SeaCache likewise with ``max_consecutive_cached = 0`` (no limit;
the hook's other defaults kept: ``retention_steps = cache_end_steps = 1``, ``residual_order = 1``, ``power_exp = 3``);
the others keep their defaults (DBCache: the sweep's ``F{n}B0``
and warm-up, see :func:`cached_diffusers.tools.bench.default_sweep`).

Fidelity is PSNR / SSIM of each image against the uncached image of the same prompt and seed (computed once per
prompt), as in :mod:`cached_diffusers.tools.bench`. The transformer speedup is ``1 / block_fraction`` (blocks an uncached
run would run over blocks run; ``N / B`` for a whole-stack method), the quantity that becomes wall-clock speedup at
full size (docs/benchmark.md); wall time is not measured here.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .bench import PSNR_THRESHOLD, default_sweep, environment, finite_mean, run_prompts
from ..configs import CacheConfig
from ..planned import PlannedScheduleConfig
from ..engine import static_computed_steps  # the engine's answer; re-exported for the tools' callers
from ..registry import cache_method, cache_methods
from . import files
from .imaging import psnr, require_extra, ssim

__all__ = [
    "budget_methods",
    "BudgetRow",
    "EqualBudgetResult",
    "format_markdown",
    "plot_equal_budget",
    "run_equal_budget",
    "static_computed_steps",
    "tune_threshold",
    "write_csv",
    "write_json",
]

def budget_methods() -> tuple[str, ...]:
    """The methods tuned to each budget, from the registry: those whose sweep is a threshold (``"log"``, bisected) or
    an integer (``"int"``, TaylorSeer's interval, from its exact count); planned methods run their own schedule."""
    return tuple(m.name for m in cache_methods(enabled=True) if m.sweep is not None and m.sweep.kind in ("log", "int"))


def __getattr__(name: str) -> Any:
    """``BUDGET_METHODS`` and ``KNOBS`` (method -> bisected threshold field), read from the registry at lookup."""
    if name == "BUDGET_METHODS":
        return budget_methods()
    if name == "KNOBS":
        return {m.name: m.sweep.knob for m in cache_methods(enabled=True) if m.sweep is not None and m.sweep.kind == "log"}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class BudgetRow:
    """One method at one budget."""

    budget: int
    method: str
    config: CacheConfig
    knob: str
    value: Any
    computed_steps: float  # mean over prompts and branches
    block_fraction: float
    psnr: list[float]
    ssim: list[float]
    exact: bool  # the budget is a property of the config (static methods)
    reached: bool = True
    evaluations: int = 1

    @property
    def transformer_speedup(self) -> float:
        return 1.0 / self.block_fraction if self.block_fraction else math.nan

    @property
    def psnr_mean(self) -> float:
        return finite_mean(self.psnr)

    @property
    def ssim_mean(self) -> float:
        return float(np.mean(self.ssim))

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget, "method": self.method, "knob": self.knob, "value": self.value,
            "computed_steps": self.computed_steps, "block_fraction": self.block_fraction,
            "transformer_speedup": self.transformer_speedup, "psnr": self.psnr, "ssim": self.ssim,
            "psnr_mean": self.psnr_mean, "ssim_mean": self.ssim_mean, "exact": self.exact, "reached": self.reached,
            "evaluations": self.evaluations, "config": self.config.to_dict(),
        }


@dataclass
class EqualBudgetResult:
    info: dict[str, Any]
    rows: list[BudgetRow] = field(default_factory=list)

    def best_speedup(self, threshold: float = PSNR_THRESHOLD) -> dict[str, BudgetRow | None]:
        """Per method, the row with the highest transformer speedup whose mean PSNR is ``>= threshold``."""
        best: dict[str, BudgetRow | None] = {}
        for row in self.rows:
            best.setdefault(row.method, None)
            if row.psnr_mean >= threshold and (
                best[row.method] is None or row.transformer_speedup > best[row.method].transformer_speedup
            ):
                best[row.method] = row
        return best

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "cached-diffusers-equal-budget/1", "info": self.info, "rows": [r.to_dict() for r in self.rows]}


# -- evaluation --------------------------------------------------------------------------------------------------------
class _Evaluator:
    """Runs configs on the held-out prompts and measures them against the uncached images (computed once)."""

    def __init__(self, pipe, prompts: Sequence[str], call_kwargs: Mapping[str, Any], seed: int, say):
        self.pipe, self.prompts, self.kwargs, self.seed, self.say = pipe, list(prompts), dict(call_kwargs), seed, say
        self.reference = [image for image, _ in self._run(None)]
        self.runs = 0

    def _run(self, config):
        self.pipe.cache_config = config
        _, images, stats = run_prompts(self.pipe, self.prompts, self.kwargs, self.seed, collect=True)
        return list(zip(images, stats))

    def __call__(self, config) -> dict[str, Any]:
        self.runs += 1
        results = self._run(config)
        computed, blocks, uncached = [], 0, 0
        for _, stats in results:
            computed += [b.num_computed for b in stats.branches.values()]
            blocks += stats.blocks_computed
            uncached += stats.uncached_blocks
        images = [image for image, _ in results]
        return {
            "computed_steps": float(np.mean(computed)),
            "block_fraction": blocks / uncached if uncached else math.nan,
            "psnr": [psnr(a, b) for a, b in zip(self.reference, images)],
            "ssim": [ssim(a, b) for a, b in zip(self.reference, images)],
        }


def tune_threshold(
    evaluate: Callable[[float], float], budget: float, low: float, high: float, iterations: int = 8
) -> tuple[float, float, bool, dict[float, float]]:
    """Bisection (geometric) of a threshold ``t`` whose count ``evaluate(t)`` (non-increasing in ``t``) is the largest
    ``<= budget``.

    Returns:
        ``(t, count, reached, evaluated)``: the chosen threshold and its count, whether the count is ``<= budget``,
        and every ``{threshold: count}`` evaluated. With no count ``<= budget`` the threshold with the smallest count
        is returned and ``reached`` is False.
    """
    evaluated: dict[float, float] = {}

    def count(t: float) -> float:
        if t not in evaluated:
            evaluated[t] = evaluate(t)
        return evaluated[t]

    if count(high) <= budget and count(low) > budget:
        for _ in range(iterations):
            mid = math.sqrt(low * high)
            if count(mid) > budget:
                low = mid
            else:
                high = mid
            if count(high) == budget:
                break
    under = [(c, -t) for t, c in evaluated.items() if c <= budget]
    if under:
        c, neg_t = max(under)
        return -neg_t, c, True, evaluated
    t, c = min(evaluated.items(), key=lambda item: (item[1], item[0]))
    return t, c, False, evaluated


def _greedy_base(pipe, method: str, num_steps: int, calibrated: Sequence[CacheConfig]) -> CacheConfig:
    """The first config of the method's sweep, its own caps lifted for a budget search (``for_budget_search``)."""
    config = default_sweep(pipe, methods=[method], num_steps=num_steps, calibrated=calibrated)[0]
    return config.for_budget_search(num_steps)


def run_equal_budget(
    pipe,
    prompts: Sequence[str],
    call_kwargs: Mapping[str, Any],
    budgets: Sequence[int],
    *,
    planned: Sequence[PlannedScheduleConfig] = (),
    methods: Sequence[str] | None = None,
    calibrated: Sequence[CacheConfig] = (),
    seed: int = 0,
    iterations: int = 8,
    model: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> EqualBudgetResult:
    """Tune every method to every budget and measure it (see the module docstring). A greedy method the model
    cannot run (TeaCache without coefficients, MagCache without ratios) is skipped, with the reason in
    ``info["skipped"]``.

    Args:
        pipe: a cached pipeline.
        prompts: held-out prompts (prompt ``i`` runs with seed ``seed + i``).
        call_kwargs: the other call arguments; must hold ``num_inference_steps``.
        budgets: computed steps per branch, each in ``[2, num_inference_steps]``.
        planned: LeMiCa / MeanCache configs; each runs at the budget equal to its length (others are ignored).
        methods: greedy methods of :func:`budget_methods` to tune (default: all of them).
        calibrated: configs carrying calibrated TeaCache coefficients / MagCache ratios (as ``bench --calibrated``).
        iterations: bisection steps per method and budget.

    Raises:
        ValueError: no prompts, no ``num_inference_steps``, a budget out of range, an unknown method, or a planned
            config for another step count.
    """
    if not prompts:
        raise ValueError("run_equal_budget needs at least one prompt")
    num_steps = call_kwargs.get("num_inference_steps")
    if not isinstance(num_steps, int) or num_steps < 3:
        raise ValueError(f"call_kwargs['num_inference_steps'] must be an integer >= 3, got {num_steps!r}")
    budgets = sorted({int(b) for b in budgets}, reverse=True)
    for b in budgets:
        if not 2 <= b <= num_steps:
            raise ValueError(f"budgets must be in [2, {num_steps}] (num_inference_steps), got {b}")
    known = budget_methods()
    methods = known if methods is None else methods
    for m in methods:
        if m not in known:
            raise ValueError(f"unknown equal-budget method {m!r}; valid: {', '.join(known)}")
    for config in planned:
        if config.num_inference_steps != num_steps:
            raise ValueError(
                f"a {config.method} schedule planned for {config.num_inference_steps} steps cannot run at {num_steps}"
            )
    say = progress or (lambda line: None)
    original = pipe.cache_config
    result = EqualBudgetResult(info={})
    skipped: list[dict[str, str]] = []
    try:
        evaluate = _Evaluator(pipe, prompts, call_kwargs, seed, say)
        for budget in budgets:
            for config in planned:
                if config.budget != budget:
                    continue
                m = evaluate(config)
                result.rows.append(BudgetRow(budget, config.method, config, "computed_steps", "planned",
                                             m["computed_steps"], m["block_fraction"], m["psnr"], m["ssim"], True))
                say(f"B={budget} {config.method}: {m['computed_steps']:g} computed, PSNR {result.rows[-1].psnr_mean:.2f}")
        for method in methods:
            base = _greedy_base(pipe, method, num_steps, calibrated)
            try:  # the model's data and checks (TeaCache coefficients, MagCache ratios, Fn + Bn)
                base.make_policy(pipe.transformer.cache_engine.spec)
            except ValueError as error:
                skipped.append({"method": method, "reason": str(error)})
                say(f"skipped {method}: {error}")
                continue
            sweep = cache_method(method).sweep
            knob = sweep.knob
            measured: dict[Any, dict[str, Any]] = {}  # shared by the budgets: the bisection ends are evaluated once

            def measure(value: Any) -> dict[str, Any]:
                if value not in measured:
                    measured[value] = evaluate(base.replace(**{knob: value}))
                return measured[value]

            for budget in budgets:
                if sweep.kind == "int":  # an integer knob with an exact (static) count: TaylorSeer's interval
                    counts = {k: static_computed_steps(base.replace(interval=k), num_steps) for k in range(1, num_steps)}
                    under = [(c, -k) for k, c in counts.items() if c <= budget]
                    value = -(max(under) if under else min((c, -k) for k, c in counts.items()))[1]
                    reached, exact, evaluations = bool(under), True, 1
                else:
                    value, _, reached, evaluated = tune_threshold(
                        lambda t: measure(t)["computed_steps"], budget, sweep.low, sweep.high, iterations=iterations
                    )
                    exact, evaluations = False, len(evaluated)
                m = measure(value)
                row = BudgetRow(budget, method, base.replace(**{knob: value}), knob, value, m["computed_steps"],
                                m["block_fraction"], m["psnr"], m["ssim"], exact, reached, evaluations)
                result.rows.append(row)
                say(f"B={budget} {method}: {knob}={value:g} -> {row.computed_steps:g} computed, PSNR {row.psnr_mean:.2f}")
        order = {b: i for i, b in enumerate(budgets)}
        result.rows.sort(key=lambda r: order[r.budget])  # stable: planned methods first within a budget
    finally:
        pipe.cache_config = original
    env = environment(pipe.device)
    result.info = {
        "date": env["date"], "model": model or type(pipe).__name__, "pipeline": type(pipe).__name__,
        "num_inference_steps": num_steps, "budgets": budgets, "prompts": list(prompts),
        "seeds": [seed + i for i in range(len(prompts))], "call_kwargs": {k: v for k, v in call_kwargs.items()
                                                                        if isinstance(v, (int, float, str))},
        "iterations": iterations, "environment": env, "skipped": skipped,
        "protocol": (
            "planned methods run their schedule for the budget (exact); greedy methods are tuned by geometric "
            "bisection of their threshold in [1e-3, 10] to the largest measured computed-step count <= budget "
            "(mean over prompts and branches, on the same prompts); TaylorSeer's interval from its exact count. "
            "PSNR/SSIM of uint8 images against the uncached image of the same prompt and seed."
        ),
    }
    return result


# -- output ------------------------------------------------------------------------------------------------------------
def _value_text(row: BudgetRow) -> str:
    return row.value if isinstance(row.value, str) else f"{row.knob}={row.value:.4g}"


def format_markdown(result: EqualBudgetResult) -> str:
    """The table (one row per budget and method) and the best-speedup-at-PSNR >= 30 dB summary, as Markdown."""
    info = result.info
    lines = [
        f"{info['model']}: {info['num_inference_steps']} steps, {len(info['prompts'])} held-out prompt(s)",
        "",
    ]
    rows = []
    for row in result.rows:
        finite = [p for p in row.psnr if math.isfinite(p)]
        kind = "exact" if row.exact and row.reached else ("measured" if row.reached else "not reached")
        rows.append([
            row.budget, row.method, _value_text(row), f"{row.computed_steps:.1f}", f"{row.transformer_speedup:.2f}x",
            f"{row.psnr_mean:.2f} / {min(finite) if finite else math.inf:.2f}",
            f"{row.ssim_mean:.4f} / {min(row.ssim):.4f}", kind,
        ])
    lines += files.markdown_table(["budget", "method", "setting", "computed steps / branch", "transformer speedup",
                                   "PSNR mean / min (dB)", "SSIM mean / min", "budget"], rows)
    for item in info.get("skipped", []):
        lines.append(f"\nSkipped {item['method']}: {item['reason']}")
    lines += ["", f"Best transformer speedup per method at mean PSNR >= {PSNR_THRESHOLD:g} dB:", ""]
    lines += files.markdown_table(["method", "speedup", "at budget"], [
        [method, f"{row.transformer_speedup:.2f}x", row.budget] if row else [method, "-", "-"]
        for method, row in result.best_speedup().items()])
    return "\n".join(lines) + "\n"


def write_json(result: EqualBudgetResult, path: str | os.PathLike) -> str:
    """Write ``result.to_dict()`` as standard JSON (an infinite PSNR as ``"inf"``, NaN as ``null``: see
    :func:`~cached_diffusers.tools.files.write_json`); return the path."""
    return files.write_json(result.to_dict(), path, indent=1)


def write_csv(result: EqualBudgetResult, path: str | os.PathLike) -> str:
    columns = ("budget", "method", "knob", "value", "computed_steps", "transformer_speedup", "psnr_mean", "ssim_mean",
               "exact", "reached")
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in result.rows:
            data = row.to_dict()
            writer.writerow([data[c] for c in columns])
    return str(path)


def plot_equal_budget(result: EqualBudgetResult, path: str | os.PathLike) -> str:
    """Mean PSNR against computed steps per branch, one line per method, as a PNG (matplotlib's Agg canvas)."""
    FigureCanvasAgg = require_extra("matplotlib.backends.backend_agg", "matplotlib").FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5), dpi=110)
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for method in dict.fromkeys(r.method for r in result.rows):
        rows = sorted((r for r in result.rows if r.method == method), key=lambda r: r.computed_steps)
        points = [(r.computed_steps, r.psnr_mean) for r in rows if math.isfinite(r.psnr_mean)]
        if points:
            xs, ys = zip(*points)
            exact = rows[0].exact and cache_method(method).calibration == "schedule"  # a planned schedule
            ax.plot(xs, ys, marker="o" if exact else ".", label=method, linewidth=2.2 if exact else 1.2)
    ax.axhline(PSNR_THRESHOLD, color="gray", linestyle="--", linewidth=1)
    for b in result.info["budgets"]:
        ax.axvline(b, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel(f"computed steps per branch (of {result.info['num_inference_steps']})")
    ax.set_ylabel("mean PSNR against uncached (dB)")
    ax.set_title(f"{result.info['model']}: equal-budget comparison", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, format="png")
    return str(path)
