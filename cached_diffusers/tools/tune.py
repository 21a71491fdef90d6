"""Tuning to a stated fidelity: the fastest cache config whose worst prompt keeps PSNR >= a target.

The library behind ``cached-diffusers tune`` and ``cached_diffusers.tune(pipe, target_psnr=...)``.

* **Search.** Every registered method (:func:`cached_diffusers.registry.cache_methods`) with a sweep (its config
  class's ``sweep``, :class:`cached_diffusers.registry.Sweep`) is searched; a method without one, or one the model
  cannot run (TeaCache without coefficients, MagCache without ratios), is skipped with its reason. The knob is the
  parameter a sweep varies, with its range and the direction that goes faster: the greedy methods' thresholds (the
  ones :mod:`cached_diffusers.tools.equal_budget` bisects, same range, geometric), TaylorSeer's interval and the
  planned methods' budget ``B`` (computed steps; LeMiCa and MeanCache solve every budget from *one* error matrix,
  :func:`cached_diffusers.schedules.solve_lexicographic_minimax`, with no new measurement run). Per method, a
  bisection finds the fastest setting whose *worst* (prompt, seed) PSNR against uncached is ``>= target`` (and SSIM
  ``>= target_ssim`` when given); monotonicity is approximate for greedy methods, so every candidate measured is
  kept and the fastest passing one wins. The fastest method wins overall (ties: the higher worst PSNR).
* **Margin.** Unseen prompts scatter around the search's boundary, so by default (``margin="auto"``) a candidate
  passes when the 99 % one-sided prediction bound of its tuning PSNRs (:func:`psnr_prediction_bound`: the worst, or
  mean less Student's t times their spread when lower) meets the target; a number of dB instead holds the worst
  tuning prompt to target + margin. The default tuning prompts (:data:`DEFAULT_TUNING_PROMPTS`) are 8 captions
  drawn at random from the reference models' training set, so the scatter can be estimated.
* **Reuse.** One uncached generation per (prompt, seed) is the reference of every candidate; a candidate whose config
  was measured before is not rerun. Generations are counted (:attr:`TuneResult.generations`).
* **Held-out check.** The chosen config is re-run on held-out prompts, disjoint from the tuning prompts (default:
  :data:`DEFAULT_HELD_OUT_PROMPTS`), and each one's PSNR is reported with whether the target held.
* **Ideal speedup** = transformer blocks an uncached run would run over blocks run, from ``pipe.cache_stats``.
* **Limits.** A target that no config reusing at least one step reaches raises :class:`UnreachableTarget` naming the
  best worst-prompt PSNR seen; when the fastest config of the search passes, :attr:`TuneResult.bound` names what
  bounded it (the knob's range end and the guards that forced the computed steps).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..configs import CacheConfig, available_cache_methods
from ..registry import Sweep, cache_method, cache_methods
from .bench import _unsupported, environment, finite_mean, lpips_metric
from .equal_budget import _greedy_base
from .files import keep_backup, refuse_existing, write_json
from .imaging import psnr, ssim, to_uint8
from .timing import Stopwatch, make_generator, timed_call

__all__ = [
    "CALIBRATION_PROMPTS",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_HELD_OUT_PROMPTS",
    "DEFAULT_MARGIN",
    "DEFAULT_TUNING_PROMPTS",
    "Candidate",
    "Knob",
    "TuneResult",
    "UnreachableTarget",
    "plot_tuning",
    "psnr_prediction_bound",
    "tunable",
    "tune",
    "write_outputs",
]

SCHEMA = "cached-diffusers-tuning/1"

DEFAULT_TUNING_PROMPTS = (
    "trade mark sign", "white medium square", "black heart suit", "clapper board", "stadium",
    "speaker with three sound waves", "tired face", "turkey",
)
"""Tuning prompts when none are given: 8 captions of the shipped reference models' training set
(``assets/reference-emoji-dataset/captions.json``), drawn uniformly without replacement by
``numpy.random.default_rng(0).choice(len(pool), 8, replace=False)`` (in pool order) from the captions that are
neither held-out prompts (:data:`DEFAULT_HELD_OUT_PROMPTS`) nor calibration prompts of the shipped calibrated data
(:data:`CALIBRATION_PROMPTS`): a random draw makes them exchangeable with other prompts of the same population, which
is what the margin rule (:func:`psnr_prediction_bound`) assumes."""

DEFAULT_HELD_OUT_PROMPTS = ("dog face", "sun with face", "snowman", "cat face")
"""Held-out prompts when none are given; those equal to a tuning prompt are dropped (the sets are disjoint)."""

CALIBRATION_PROMPTS = ("white smiling face", "dragon face", "pig face", "ghost", "snowman", "winking face",
                       "unicorn face", "zebra face")
"""Captions the shipped reference models' TeaCache / MagCache data and error matrices were calibrated on
(``scripts/bench_reference_model.sh``, ``scripts/bench_equal_budget.sh``); kept out of the default tuning prompts."""

DEFAULT_MARGIN = "auto"
"""``margin`` when none is given: the prediction bound of :func:`psnr_prediction_bound` (a number of dB instead adds
a fixed margin to the worst tuning prompt's PSNR, the rule before it; ``0`` is the bare worst-prompt rule)."""

DEFAULT_CONFIDENCE = 0.99
"""One-sided confidence of the ``"auto"`` margin's prediction bound: under its normal model an unseen prompt falls
below the bound with probability 1 %, so 4 held-out prompts all clear it with probability >= 96 %."""


def psnr_prediction_bound(psnr: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> float:
    """Lower one-sided prediction bound of an unseen prompt's PSNR from the tuning (prompt, seed) PSNRs, in dB.

    ``min(worst, mean - t * s * sqrt(1 + 1 / n))`` with ``n`` values, their mean and sample standard deviation ``s``
    and ``t`` the ``confidence`` quantile of Student's t with ``n - 1`` degrees of freedom: the textbook prediction
    interval for one new draw of a normal population of unknown mean and variance (e.g. Hahn & Meeker, *Statistical
    Intervals*, 1991, sec. 4.4; NIST/SEMATECH e-Handbook 7.1.6). Prompt-to-prompt scatter widens it; more tuning prompts
    narrow it (``t * sqrt(1 + 1/n)`` is 5.08 at 4 values, 3.18 at 8, 2.83 at 12 for ``confidence=0.99``). An
    infinite PSNR (an image equal to the uncached one) counts as the largest finite one (or the bound is infinite
    when all are); with one value the bound is that value (no scatter can be estimated).

    Raises:
        ValueError: when ``psnr`` is empty or ``confidence`` is not in (0.5, 1).
    """
    from scipy.stats import t as student_t

    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence!r}")
    values = np.asarray(list(psnr), dtype=np.float64)
    if values.size == 0:
        raise ValueError("psnr must hold at least one value")
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float(values.min())
    values = np.where(np.isposinf(values), finite.max(), values)
    worst = float(values.min())
    n = values.size
    if n < 2:
        return worst
    spread = float(values.std(ddof=1))
    bound = float(values.mean()) - float(student_t.ppf(confidence, n - 1)) * spread * math.sqrt(1 + 1 / n)
    return min(worst, bound)


Knob = Sweep
"""The parameter a sweep varies (:class:`cached_diffusers.registry.Sweep`: ``knob``, ``kind``, ``low``, ``high``,
``faster_up``); a method declares it as its config class's ``sweep``."""


def tunable() -> dict[str, Sweep]:
    """Method -> its sweep, for every registered method that declares one (the registry's sweep metadata). A
    registered method without one is skipped ("no knob known")."""
    return {m.name: m.sweep for m in cache_methods(enabled=True) if m.sweep is not None}


def __getattr__(name: str) -> Any:
    if name == "TUNABLE":  # the registry's sweeps at the time of the lookup
        return tunable()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class UnreachableTarget(ValueError):
    """No config that reuses at least one step meets the target on the tuning prompts."""


@dataclass
class Candidate:
    """One config measured on the tuning prompts (or the held-out ones)."""

    method: str
    knob: str
    value: Any
    config: dict[str, Any]
    computed_steps: dict[str, float]  # per branch, mean over (prompt, seed)
    block_fraction: float
    psnr: list[float]
    ssim: list[float]
    lpips: list[float] | None = None
    passes: bool = False

    @property
    def ideal_speedup(self) -> float:
        return 1.0 / self.block_fraction if self.block_fraction else math.nan

    @property
    def reuses(self) -> bool:
        return self.block_fraction < 1.0 - 1e-12

    @property
    def worst_psnr(self) -> float:
        return min(self.psnr)

    @property
    def mean_psnr(self) -> float:
        return finite_mean(self.psnr)

    @property
    def worst_ssim(self) -> float:
        return min(self.ssim)

    def setting(self) -> str:
        if self.knob == "budget":
            return f"budget={self.value}"
        return f"{self.knob}={self.value:.4g}" if isinstance(self.value, float) else f"{self.knob}={self.value}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "knob": self.knob, "value": self.value, "setting": self.setting(),
            "computed_steps": self.computed_steps, "block_fraction": self.block_fraction,
            "ideal_speedup": self.ideal_speedup, "psnr": self.psnr, "ssim": self.ssim, "lpips": self.lpips,
            "worst_psnr": self.worst_psnr, "mean_psnr": self.mean_psnr, "worst_ssim": self.worst_ssim,
            "passes": self.passes, "config": self.config,
        }


@dataclass
class TuneResult:
    """What :func:`tune` found: the chosen config, every candidate, the held-out check and the cost."""

    target_psnr: float
    target_ssim: float | None
    chosen: Candidate
    config: CacheConfig
    candidates: list[Candidate]
    best_per_method: dict[str, Candidate | None]
    skipped: list[dict[str, str]]
    held_out: dict[str, Any]
    generations: dict[str, int]
    bound: str | None
    info: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] | None = None
    defaults: list[Candidate] = field(default_factory=list)

    @property
    def held(self) -> bool:
        """Whether the target held on every held-out prompt."""
        return bool(self.held_out["held"])

    def summary(self) -> str:
        c = self.chosen
        steps = ", ".join(f"{b} {v:g}" for b, v in c.computed_steps.items())
        lines = [
            f"chosen: {c.method} {c.setting()} (computed steps per branch: {steps}; ideal speedup "
            f"{c.ideal_speedup:.2f}x; tuning worst PSNR {c.worst_psnr:.2f} dB, mean {c.mean_psnr:.2f} dB)",
        ]
        if self.latency:
            lat = self.latency
            lines.append(
                f"measured speedup: {lat['speedup']:.2f}x (median of {lat['repeats']} interleaved rounds, per-round "
                f"{lat['ratio_min']:.2f}x-{lat['ratio_max']:.2f}x) beside ideal {c.ideal_speedup:.2f}x"
            )
        margin = self.info.get("margin")
        if margin == "auto":
            lines.append(f"margin auto: the {DEFAULT_CONFIDENCE:.0%} prediction bound of the tuning PSNRs "
                         f"({psnr_prediction_bound(c.psnr):.2f} dB over {len(c.psnr)} tuning (prompt, seed) values) "
                         f"is held to the target {self.target_psnr:g} dB")
        elif margin:
            lines.append(f"tuned to {self.target_psnr + margin:g} dB on the tuning prompts (target "
                         f"{self.target_psnr:g} dB + margin {margin:g} dB)")
        if self.bound:
            lines.append(f"every setting searched passed: {self.bound}")
        for d in self.defaults:
            steps_d = ", ".join(f"{b} {v:g}" for b, v in d.computed_steps.items())
            lines.append(f"default {d.method}: computed steps {steps_d}; ideal speedup {d.ideal_speedup:.2f}x; "
                         f"tuning worst PSNR {d.worst_psnr:.2f} dB, mean {d.mean_psnr:.2f} dB")
        cost = ", ".join(f"{k} {v}" for k, v in self.generations.items() if k != "total")
        lines.append(f"cost: {self.generations['total']} generations ({cost})")
        ho = self.held_out
        margin = ho["worst_psnr"] - self.target_psnr
        verdict = "held" if ho["held"] else "DID NOT HOLD"
        lines.append(
            f"held-out check on {len(ho['prompts'])} prompt(s) x {len(ho['seeds'])} seed(s): target "
            f"{self.target_psnr:g} dB {verdict} (worst {ho['worst_psnr']:.2f} dB, mean {ho['mean_psnr']:.2f} dB, "
            f"margin {margin:+.2f} dB)"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "target_psnr": self.target_psnr, "target_ssim": self.target_ssim,
            "chosen": self.chosen.to_dict(), "bound": self.bound,
            "best_per_method": {m: (c.to_dict() if c else None) for m, c in self.best_per_method.items()},
            "skipped": self.skipped, "held_out": self.held_out, "generations": self.generations,
            "latency": self.latency, "defaults": [d.to_dict() for d in self.defaults], **self.info,
            "candidates": [c.to_dict() for c in self.candidates],
        }


# -- measuring -----------------------------------------------------------------------------------------------------
class _Runner:
    """Runs configs on (prompt, seed) pairs against uncached references computed once; counts generations."""

    def __init__(self, pipe, call_kwargs: Mapping[str, Any], seeds: Sequence[int], lpips_fn, say):
        self.pipe, self.kwargs, self.seeds, self.lpips_fn, self.say = pipe, dict(call_kwargs), list(seeds), lpips_fn, say
        self.count: Counter = Counter()
        self.references: dict[tuple[str, int], np.ndarray] = {}
        self.memo: dict[tuple[str, str], Candidate] = {}

    def generate(self, prompt: str, seed: int, config, kind: str):
        self.pipe.cache_config = config
        generator = make_generator(self.pipe.device.type, seed)
        output, _ = timed_call(self.pipe, prompt=prompt, generator=generator, output_type="np", **self.kwargs)
        self.count[kind] += 1
        return to_uint8(output.images[0]), self.pipe.cache_stats

    def reference(self, prompt: str, seed: int) -> np.ndarray:
        if (prompt, seed) not in self.references:
            self.references[(prompt, seed)] = self.generate(prompt, seed, None, "uncached references")[0]
        return self.references[(prompt, seed)]

    def measure(self, method: str, knob: str, value: Any, config: CacheConfig, prompts: Sequence[str],
                kind: str = "candidates") -> Candidate:
        key = (json.dumps(config.to_dict(), sort_keys=True, default=str), "\n".join(prompts))
        if key in self.memo:
            return self.memo[key]
        psnrs, ssims, lpipses, blocks, uncached, per_branch, stats_seen = [], [], [], 0, 0, {}, []
        for prompt in prompts:
            for seed in self.seeds:
                reference = self.reference(prompt, seed)
                image, stats = self.generate(prompt, seed, config, kind)
                stats_seen.append(stats)
                psnrs.append(psnr(reference, image))
                ssims.append(ssim(reference, image))
                if self.lpips_fn is not None:
                    lpipses.append(self.lpips_fn(reference, image))
                blocks += stats.blocks_computed
                uncached += stats.uncached_blocks
                for name, branch in stats.branches.items():
                    per_branch.setdefault(name, []).append(branch.num_computed)
        candidate = Candidate(
            method, knob, value, config.to_dict(), {b: float(np.mean(v)) for b, v in per_branch.items()},
            blocks / uncached if uncached else math.nan, psnrs, ssims, lpipses if self.lpips_fn else None,
        )
        candidate._stats = stats_seen  # type: ignore[attr-defined]  # for the guard report, not serialised
        self.memo[key] = candidate
        return candidate


def _forcing_guards(stats_list) -> str:
    """The reasons the computed steps of some runs were computed (``"first-step x2, last-step x2"``)."""
    reasons: Counter = Counter()
    for stats in stats_list:
        for branch in stats.branches.values():
            reasons.update(r.reason or "tested" for r in branch.records if not r.reused)
    runs = max(1, len(stats_list))
    return ", ".join(f"{reason} ({n / runs:g} per run)" for reason, n in reasons.most_common())


# -- the search ----------------------------------------------------------------------------------------------------
def _base_config(pipe, method: str, num_steps: int, calibrated: Sequence[CacheConfig]) -> CacheConfig:
    from .bench import sweep_methods

    if method in sweep_methods():  # the greedy methods: equal-budget's base (its MagCache / SeaCache caps lifted)
        return _greedy_base(pipe, method, num_steps, calibrated)
    from ..configs import make_cache_config

    return make_cache_config(method)


def _min_budget(errors: np.ndarray) -> int:
    """The smallest budget the matrix can solve (paths use only finite edges)."""
    from ..schedules import solve_lexicographic_minimax

    n = errors.shape[0]
    lo, hi = 2, n  # hi is always solvable (every edge i -> i+1 is 0)
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            solve_lexicographic_minimax(errors, mid)
            hi = mid
        except ValueError:
            lo = mid + 1
    return lo


def _psnr_floor(c: Candidate, margin: float | str) -> float:
    """What the PSNR target is held against: the ``"auto"`` prediction bound, or the worst prompt less ``margin`` dB."""
    return psnr_prediction_bound(c.psnr) if margin == "auto" else c.worst_psnr - margin


def _meets(c: Candidate, target_psnr: float, target_ssim: float | None, margin: float | str = 0.0) -> bool:
    """The fidelity targets alone (a config that reuses nothing meets every target: the search's slow end)."""
    return _psnr_floor(c, margin) >= target_psnr and (target_ssim is None or c.worst_ssim >= target_ssim)


def _passes(c: Candidate, target_psnr: float, target_ssim: float | None, margin: float | str = 0.0) -> bool:
    """A candidate that can be chosen: it meets the targets and reuses at least one step."""
    return c.reuses and _meets(c, target_psnr, target_ssim, margin)


def _search(evaluate: Callable[[Any], Candidate], values_slow_to_fast: Sequence[Any] | None,
            low: float, high: float, iterations: int, ok: Callable[[Candidate], bool]) -> list[Candidate]:
    """Bisection for the fastest passing setting; returns every candidate evaluated (in order).

    Discrete knobs give ``values_slow_to_fast`` (index bisection); continuous ones ``low``/``high`` (geometric,
    ``iterations`` steps; ``low`` is the slow end)."""
    seen: list[Candidate] = []

    def run(v):
        c = evaluate(v)
        if c not in seen:
            seen.append(c)
        return ok(c)

    if values_slow_to_fast is not None:
        vals = list(values_slow_to_fast)
        if run(vals[-1]):
            return seen
        if not run(vals[0]):
            return seen
        lo, hi = 0, len(vals) - 1  # lo passes, hi fails
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if run(vals[mid]):
                lo = mid
            else:
                hi = mid
        return seen
    if run(high) or not run(low):
        return seen
    for _ in range(iterations):
        mid = math.sqrt(low * high)
        if run(mid):
            low = mid
        else:
            high = mid
    return seen


def tune(
    pipe,
    target_psnr: float,
    *,
    prompts: Sequence[str] | None = None,
    held_out_prompts: Sequence[str] | None = None,
    seeds: int = 1,
    target_ssim: float | None = None,
    methods: Sequence[str] | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    num_inference_steps: int | None = None,
    calibrated: Sequence[CacheConfig] = (),
    error_matrix: str | os.PathLike | tuple | None = None,
    max_span: int = 6,
    iterations: int = 6,
    measure_latency: int = 0,
    compare_defaults: bool = False,
    margin: float | str = DEFAULT_MARGIN,
    model: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Find the fastest cache config whose worst tuning (prompt, seed) keeps PSNR ``>= target_psnr`` (module docstring).

    Args:
        pipe: a cached pipeline (its cache config is restored at the end; a calibrated TeaCache / MagCache config it
            holds supplies coefficients / ratios, as ``calibrated`` does).
        target_psnr: dB against the uncached image of the same prompt and seed.
        prompts: tuning prompts (default :data:`DEFAULT_TUNING_PROMPTS`).
        held_out_prompts: verification prompts, disjoint from ``prompts`` (default :data:`DEFAULT_HELD_OUT_PROMPTS`
            minus the tuning prompts).
        seeds: seeds ``0 .. seeds-1`` per prompt.
        target_ssim: optional second target (worst SSIM, scikit-image).
        methods: methods to search (default: every registered method; those without a knob are skipped).
        call_kwargs: other call arguments (size, CFG, negative prompt, ...).
        num_inference_steps: overrides ``call_kwargs["num_inference_steps"]``; one of them is required.
        calibrated: configs carrying TeaCache coefficients / MagCache ratios (``calibrate``'s output).
        error_matrix: LeMiCa's error matrix for the planned methods: a file (``calibrate --method lemica``), or
            ``(errors, provenance)``; ``None`` measures one on the first tuning prompt and seed with ``max_span``.
        iterations: bisection steps of a threshold.
        measure_latency: interleaved timed rounds of the chosen config against uncached (0: none).
        compare_defaults: also measure every searchable method's default config (what a user who does not tune gets).
        margin: what a candidate's tuning PSNRs must clear the target by (the held-out check is against
            ``target_psnr`` alone): the search lands near its boundary, and unseen prompts scatter around it.
            ``"auto"`` (the default) holds :func:`psnr_prediction_bound` of the candidate's tuning PSNRs (99 %
            one-sided, from their own scatter) to the target; a number of dB holds the worst tuning prompt to
            ``target_psnr + margin`` (``0``: the bare worst-prompt rule).
        model: a name for the records.
        progress: called with a line now and then.

    Raises:
        UnreachableTarget: (a ``ValueError``) no caching config reaching the target; names the best PSNR seen.
        ValueError: bad arguments (no steps, overlapping prompts, unknown method, ...).
    """
    from ..schedules import solve_lexicographic_minimax

    say = progress or (lambda line: None)
    kwargs = dict(call_kwargs or {})
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    num_steps = kwargs.get("num_inference_steps")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 3:
        raise ValueError(f"tune needs num_inference_steps >= 3 (an integer), got {num_steps!r}")
    if not (isinstance(target_psnr, (int, float)) and math.isfinite(target_psnr)):
        raise ValueError(f"target_psnr must be a finite number of dB, got {target_psnr!r}")
    if margin != "auto" and not (isinstance(margin, (int, float)) and not isinstance(margin, bool)
                                 and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be 'auto' or a finite number of dB >= 0, got {margin!r}")
    if target_ssim is not None and not 0 <= target_ssim <= 1:
        raise ValueError(f"target_ssim must be in [0, 1], got {target_ssim!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    prompts = list(prompts) if prompts else list(DEFAULT_TUNING_PROMPTS)
    if held_out_prompts:
        held_out = list(held_out_prompts)
        overlap = sorted(set(held_out) & set(prompts))
        if overlap:
            raise ValueError(f"held-out prompts must be disjoint from the tuning prompts; both have {overlap}")
    else:
        held_out = [p for p in DEFAULT_HELD_OUT_PROMPTS if p not in prompts]
    registered = available_cache_methods()
    if methods:
        for m in methods:
            if m not in registered:
                raise ValueError(f"unknown cache method {m!r}; registered: {', '.join(registered)}")
        wanted = list(dict.fromkeys(methods))
    else:
        wanted = [m for m in registered if m != "none"]
    lpips_fn, lpips_note = lpips_metric()
    if lpips_fn is None:
        say(f"LPIPS skipped: {lpips_note}")
    seed_list = list(range(seeds))
    original = pipe.cache_config
    if original is not None:  # its calibrated coefficients / ratios, before the candidates replace it on the pipe
        calibrated = [original, *calibrated]
    runner = _Runner(pipe, kwargs, seed_list, lpips_fn, say)
    ok = lambda c: _meets(c, target_psnr, target_ssim, margin)  # noqa: E731
    skipped: list[dict[str, str]] = []
    candidates: list[Candidate] = []
    best: dict[str, Candidate | None] = {}
    bounds: dict[str, str] = {}
    defaults: list[Candidate] = []
    matrix_info: dict[str, Any] | None = None
    errors = None
    clock = Stopwatch().start()
    try:
        for p in prompts:
            for s in seed_list:
                runner.reference(p, s)
        say(f"{len(prompts) * seeds} uncached reference(s) generated")
        for method in wanted:
            knob = tunable().get(method)
            if knob is None:
                skipped.append({"method": method, "reason": "no knob known to tune (give its config class a `sweep`, "
                                "cached_diffusers.registry.Sweep)"})
                say(f"skipped {method}: no knob known")
                continue
            reason = None
            try:
                if knob.kind != "budget":  # a planned method has no config before its schedule is solved
                    base = _base_config(pipe, method, num_steps, calibrated)
                    reason = _unsupported(pipe, base)  # the model's data and checks (TeaCache coefficients, Fn + Bn)
            except (ValueError, TypeError) as error:
                reason = str(error)
            if reason is not None:
                skipped.append({"method": method, "reason": reason})
                say(f"skipped {method}: {reason}")
                continue
            if knob.kind == "budget":
                if errors is None:
                    errors, matrix_info = _error_matrix(pipe, error_matrix, prompts[0], kwargs, num_steps, max_span,
                                                        runner, say)
                budgets = list(range(num_steps - 1, _min_budget(errors) - 1, -1))  # slow (large B) to fast

                def build(b, method=method):
                    steps = solve_lexicographic_minimax(errors, b)
                    return cache_method(method).config_class(computed_steps=steps, num_inference_steps=num_steps)

                evaluate = lambda b, method=method, build=build: runner.measure(  # noqa: E731
                    method, "budget", b, build(b), prompts)
                seen = _search(evaluate, budgets, 0, 0, iterations, ok)
                fast_end = budgets[-1]
            elif knob.kind == "int":
                values = list(range(int(knob.low), int(min(knob.high, num_steps - 1)) + 1))
                if not knob.faster_up:
                    values.reverse()
                evaluate = lambda v, method=method, base=base, knob=knob: runner.measure(  # noqa: E731
                    method, knob.name, v, base.replace(**{knob.name: v}), prompts)
                seen = _search(evaluate, values, 0, 0, iterations, ok)
                fast_end = values[-1]
            else:
                lo, hi = (knob.low, knob.high) if knob.faster_up else (knob.high, knob.low)
                evaluate = lambda v, method=method, base=base, knob=knob: runner.measure(  # noqa: E731
                    method, knob.name, float(v), base.replace(**{knob.name: float(v)}), prompts)
                seen = _search(evaluate, None, lo, hi, iterations, ok)
                fast_end = float(hi)
            for c in seen:
                c.passes = _passes(c, target_psnr, target_ssim, margin)
            candidates += seen
            passing = [c for c in seen if c.passes]
            best[method] = max(passing, key=lambda c: (c.ideal_speedup, c.worst_psnr)) if passing else None
            if best[method] is not None and best[method].value == fast_end:
                where = (f"the smallest budget the error matrix solves, {fast_end} (its longest measured edge bounds "
                         "it)" if knob.kind == "budget" else f"{fast_end:g}")
                bounds[method] = (
                    f"{best[method].knob} at the fast end of its search range ({where}); computed steps forced by "
                    f"{_forcing_guards(getattr(best[method], '_stats', []))}"
                )
            b = best[method]
            say(f"{method}: {len(seen)} candidate(s); fastest passing: "
                + (f"{b.setting()} ({b.ideal_speedup:.2f}x, worst {b.worst_psnr:.2f} dB)" if b else "none"))
        if not candidates:
            raise ValueError("no method could be searched on this model: " + "; ".join(
                f"{s['method']}: {s['reason']}" for s in skipped))
        winners = [c for c in best.values() if c is not None]
        if not winners:
            caching = [c for c in candidates if c.reuses] or candidates
            top = max(caching, key=lambda c: _psnr_floor(c, margin))
            rule = ("" if margin == 0 else f", {_psnr_floor(top, margin):.2f} dB by the margin rule "
                    f"({_margin_rule(margin)})")
            raise UnreachableTarget(
                f"target PSNR {target_psnr:g} dB is unreachable with caching on this model: the best worst-prompt PSNR "
                f"of any config reusing a step was {top.worst_psnr:.2f} dB{rule} ({top.method} {top.setting()}, "
                f"{len(candidates)} configs measured)"
            )
        chosen = max(winners, key=lambda c: (c.ideal_speedup, c.worst_psnr))
        bound = bounds.get(chosen.method)
        if bound is not None:
            bound = f"{chosen.method}: {bound}"
        config = _config_from(chosen)
        say(f"chosen {chosen.method} {chosen.setting()}: {chosen.ideal_speedup:.2f}x; held-out check")
        check = runner.measure(chosen.method, chosen.knob, chosen.value, config, held_out, kind="held-out")
        held = {
            "prompts": held_out, "seeds": seed_list,
            "psnr": {f"{p} (seed {s})": v for (p, s), v in zip(((p, s) for p in held_out for s in seed_list), check.psnr)},
            "ssim": check.ssim, "lpips": check.lpips, "worst_psnr": check.worst_psnr, "mean_psnr": check.mean_psnr,
            "worst_ssim": check.worst_ssim, "computed_steps": check.computed_steps,
            "ideal_speedup": check.ideal_speedup,
            "held": bool(check.worst_psnr >= target_psnr and (target_ssim is None or check.worst_ssim >= target_ssim)),
        }
        if compare_defaults:
            for method in wanted:
                if method in best:
                    try:
                        cfg = _default_config(pipe, method, num_steps, calibrated)
                        reason = None if cfg is None else _unsupported(pipe, cfg)  # data, Fn + Bn, ...
                        if reason is not None:
                            raise ValueError(reason)
                    except (ValueError, TypeError) as error:
                        skipped.append({"method": f"{method} (default)", "reason": str(error)})
                        continue
                    if cfg is None:
                        continue
                    defaults.append(runner.measure(method, "default", "default", cfg, prompts, kind="defaults"))
        latency = _latency(runner, config, prompts[0], measure_latency) if measure_latency else None
    finally:
        pipe.cache_config = original
    generations = dict(runner.count)
    generations["total"] = sum(runner.count.values())
    env = environment(pipe.device)
    info = {
        "model": model or type(pipe).__name__, "pipeline": type(pipe).__name__, "num_inference_steps": num_steps,
        "call_kwargs": {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str))},
        "prompts": prompts, "held_out_prompts": held_out, "seeds": seed_list, "methods": wanted,
        "iterations": iterations, "margin": margin, "margin_rule": _margin_rule(margin),
        "psnr_floor": _psnr_floor(chosen, margin), "lpips": lpips_note if lpips_fn is None else "LPIPS measured: " + lpips_note,
        "error_matrix": matrix_info, "seconds": round(clock.elapsed(), 1), "environment": env,
        "protocol": (
            "per method, bisection of its knob for the fastest setting whose worst (prompt, seed) PSNR against the "
            "uncached image is >= target (and SSIM >= target_ssim when given) and which reuses at least one step; "
            "greedy thresholds geometric in [1e-3, 10], TaylorSeer's interval and the planned methods' budget as "
            "integers (planned schedules solved from one error matrix); the fastest method by ideal speedup "
            "(uncached transformer blocks over blocks run) wins; then re-run on held-out prompts."
        ),
    }
    return TuneResult(target_psnr, target_ssim, chosen, config, candidates, best, skipped, held, generations, bound,
                      info, latency, defaults)


def _margin_rule(margin: float | str) -> str:
    if margin == "auto":
        return (f"auto: {DEFAULT_CONFIDENCE:.0%} one-sided prediction bound of the tuning PSNRs, "
                "min(worst, mean - t * s * sqrt(1 + 1/n)), held to the target")
    return f"worst tuning PSNR held to the target + {margin:g} dB"


def _config_from(c: Candidate) -> CacheConfig:
    from ..configs import cache_config_from_dict

    return cache_config_from_dict(c.config)


def _default_config(pipe, method: str, num_steps: int, calibrated) -> CacheConfig | None:
    """The method's published default config, with the model's calibrated data (what a user who does not tune gets);
    ``None`` for a planned method (no default schedule exists: it needs a calibration)."""
    from .bench import sweep_methods
    from ..configs import make_cache_config

    sweep = tunable().get(method)
    if sweep is not None and sweep.kind == "budget":
        return None
    config = make_cache_config(method)
    if method in sweep_methods():
        base = _greedy_base(pipe, method, num_steps, calibrated)
        for name in ("coefficients", "mag_ratios"):
            if hasattr(config, name) and getattr(config, name) is None:
                config = config.replace(**{name: getattr(base, name)})
    return config


def _error_matrix(pipe, source, prompt: str, kwargs, num_steps: int, max_span: int, runner: _Runner, say):
    from ..calibration_schedules import load_error_matrix
    from ..methods.lemica import measure_edge_errors

    if source is None:
        call = {k: v for k, v in kwargs.items() if k != "num_inference_steps"}
        say(f"measuring LeMiCa's error matrix on {prompt!r} (max span {max_span})")
        errors = measure_edge_errors(pipe, [prompt], call, num_steps, max_span=max_span, seed=0)
        span = min(max_span, num_steps - 1)
        edges = sum(1 for i in range(num_steps) for j in range(i + 2, min(i + span, num_steps - 1) + 1))
        runner.count["error-matrix calibration"] += 1 + edges
        return errors, {"measured": True, "prompts": [prompt], "max_span": max_span, "runs": 1 + edges}
    if isinstance(source, tuple):
        errors, provenance = source
        errors = np.asarray(errors, dtype=float)
        path = None
    else:
        errors, provenance = load_error_matrix(source)
        path = os.fspath(source)
    if errors.shape[0] != num_steps:
        raise ValueError(f"the error matrix {path or ''} is for {errors.shape[0]} steps, not {num_steps}".replace("  ", " "))
    return errors, {"measured": False, "file": path, "prompts": provenance.get("prompts"),
                    "max_span": provenance.get("max_span"), "note": "calibration runs made earlier, not counted here"}


def _latency(runner: _Runner, config: CacheConfig, prompt: str, repeats: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    pipe = runner.pipe

    def run(cfg):
        pipe.cache_config = cfg
        _, seconds = timed_call(pipe, prompt=prompt, generator=make_generator(pipe.device.type, 0), output_type="np",
                                **runner.kwargs)
        runner.count["latency"] += 1
        return seconds

    run(None), run(config)  # warm-up
    for r in range(repeats):
        order = ("uncached", "cached") if r % 2 == 0 else ("cached", "uncached")
        for name in order:
            times[name].append(run(None if name == "uncached" else config))
    ratios = sorted(u / c for u, c in zip(times["uncached"], times["cached"]))
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"repeats": repeats, "prompt": prompt, "uncached_s": times["uncached"], "cached_s": times["cached"],
            "uncached_median_s": median["uncached"], "cached_median_s": median["cached"],
            "speedup": median["uncached"] / median["cached"], "ratio_min": ratios[0], "ratio_max": ratios[-1]}


# -- output --------------------------------------------------------------------------------------------------------
def plot_tuning(result: TuneResult, path: str | os.PathLike) -> str:
    """Worst tuning PSNR against ideal speedup, one series per method, the target line and the chosen point."""
    from .imaging import require_extra

    FigureCanvasAgg = require_extra("matplotlib.backends.backend_agg", "matplotlib").FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5), dpi=110)
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    cap = 100.0
    for method in dict.fromkeys(c.method for c in result.candidates):
        pts = sorted((c.ideal_speedup, min(c.worst_psnr, cap)) for c in result.candidates if c.method == method)
        ax.plot(*zip(*pts), marker=".", linewidth=1, label=method)
    c = result.chosen
    ax.plot([c.ideal_speedup], [min(c.worst_psnr, cap)], marker="*", markersize=16, color="black", linestyle="",
            label=f"chosen: {c.method} {c.setting()}")
    ax.axhline(result.target_psnr, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("ideal speedup (uncached transformer blocks / blocks run)")
    ax.set_ylabel("worst tuning-prompt PSNR against uncached (dB)")
    ax.set_title(f"{result.info.get('model')}: tune --target-psnr {result.target_psnr:g}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return str(path)


OUTPUT_FILES = ("cache_config.json", "cache_config.tuning.json", "tuning_pareto.png")


def write_outputs(result: TuneResult, directory: str | os.PathLike, overwrite: bool = False) -> list[str]:
    """Write ``cache_config.json`` (the chosen config), ``cache_config.tuning.json`` and ``tuning_pareto.png`` into
    ``directory``. An existing file is an error unless ``overwrite`` (then the old one is kept as ``FILE.bak``)."""
    from .. import __version__

    directory = os.fspath(directory)
    paths = [os.path.join(directory, name) for name in OUTPUT_FILES]
    for path in paths[:2]:
        refuse_existing(path, overwrite)
    os.makedirs(directory, exist_ok=True)
    for path in paths:
        keep_backup(path)
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(result.config.to_dict(), f, indent=2)
        f.write("\n")
    record = result.to_dict()
    record["versions"] = {"cached_diffusers": __version__, **{
        k: v for k, v in result.info["environment"].items() if k in ("torch", "diffusers", "transformers", "python")}}
    write_json(record, paths[1], indent=1, default=str)  # an infinite PSNR as "inf", NaN as null
    plot_tuning(result, paths[2])
    return paths
