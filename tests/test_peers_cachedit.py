"""Differential tests: our DBCache / First-Block-Cache / TaylorSeer / SCM against cache-dit 1.5.3.

cache-dit patches ``QwenImagePipeline.__call__`` at class level, so it runs in a subprocess
(``tests/peers/cachedit_runner.py``); every cache-dit run of this module is made by ONE subprocess call (the module
fixture ``peer``), our runs share one pipeline (the module fixture ``pipe``). The behaviour compared here is
described in ``docs/cachedit-spec.md``.

Both sides run the same stock tiny Qwen-Image pipeline (``cached_diffusers.tools.tiny``, seed 0, 12 blocks), 64 x 64, true
CFG 4.0 (cond and uncond calls), ``output_type="latent"``, with the same thread count.

Thresholds. The untrained weights give large probe changes: the relative L1 change of the block-0 residual between
consecutive steps is 0.61-0.79 at 12 steps (and grows when compared with an older computed step), so real-model
thresholds (0.05-0.2) never reuse anything. The thresholds below were read off the diffs cache-dit records
(``CacheStats.residual_diffs``) so that every one of them gives both computed and reused steps in both branches and
sits at least 1e-3 away from every diff it is tested against (the tests check both), so float32 reduction-order noise
(~1e-7) cannot flip a decision.

Mapping of the configs: ours ``Fn``/``Bn`` = cache-dit ``Fn_compute_blocks``/``Bn_compute_blocks``; ours ``None`` =
cache-dit ``-1`` (no cap); ours ``compute_last_step=False`` (cache-dit has no last-step rule); ours branches ``"cond"``
/ ``"uncond"`` = cache-dit ``cached_steps`` / ``cfg_cached_steps`` (QwenImage adapter, ``enable_separate_cfg=True``).

Deliberate differences, shown by ``test_difference_*``: our last-step rule (``compute_last_step=True`` by default),
our per-branch state keyed by the pipeline's branch name instead of cache-dit's call parity, and our explicit-bins
masks always computing the last step.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from cached_diffusers import CachedQwenImagePipeline, DBCacheConfig, FirstBlockCacheConfig, steps_mask
from cached_diffusers.tools.tiny import DEFAULT_PROMPTS, build_tiny_qwenimage_pipeline

pytestmark = pytest.mark.slow  # the module's cache-dit runs: one subprocess of about 17 s

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = DEFAULT_PROMPTS[0]
HEIGHT = WIDTH = 64
N = 12  # denoising steps of most runs
N_SCM = 20
MASK_POLICIES = ("slow", "medium", "fast", "ultra")
MASK_STEPS = tuple(range(1, 61))

# First-Block-Cache (DBCache Fn=1, Bn=0, no warm-up). cache-dit's reused steps at N=12 (both branches unless noted):
# 0.67 -> [1, 4]; 0.71 -> cond [1, 2, 4], uncond [1, 2, 4, 9] (the branches decide differently);
# 0.76 -> [1, 2, 3, 6, 8, 11] (reuses the last step); 0.82 -> [1, 2, 3, 4, 5, 7, 8, 9, 11].
FBC_THRESHOLDS = (0.67, 0.71, 0.76, 0.82)
# DBCache Fn=2, Bn=1, warm-up 2, at most 2 consecutive reuses: 0.70 -> [2, 4, 8]; 0.82 -> [2, 3, 5, 6, 8, 9, 11]
# (the cap decides from 0.80 up). With TaylorSeer order 2 at 0.82 the forecast uses order 0 at steps 2-3, order 1 at
# 5-6 and order 2 at 8-9 and 11 (see the spec: cache-dit's calibrator forms its first difference at step >= 3 only).
F2B1_THRESHOLDS = (0.70, 0.82)
TAYLORSEER_ORDERS = (None, 1, 2)
MIN_MARGIN = 1e-3  # min |recorded diff - threshold| over the diffs a run tested

# Latent tolerance with the TaylorSeer calibrator. Same decisions and the same float32 operations give identical
# latents; a different association of the forecast sum (e.g. F0 + (d^k / k!) * Fk, or the forecast accumulated in
# float64 and rounded once) changes single elements by <= 1 ulp, which moves the final latents (|x| <= 4.4, ulp at 4 is
# 4.8e-7) by at most 7.2e-7 on these runs (measured with cache-dit itself). 1e-5 allows ~14x that and is still
# ~500x below the effect of a different forecast (5.6e-3 to 2.7e-2 here when the first difference is formed at step 1
# instead of step 3).
TAYLORSEER_ATOL = 1e-5
SIGNAL_RTOL = 1e-5  # our recorded residual diffs vs cache-dit's (same float32 reductions: equal up to rounding)


# ----------------------------------------------------------------------------------------------------------------
# The runs: one cache-dit run per Case, made in the subprocess; our runs are built from the same Case.


@dataclass(frozen=True)
class Case:
    n: int
    Fn: int = 1
    Bn: int = 0
    threshold: float = 0.08
    warmup: int = 0
    warmup_interval: int = 1
    max_cached: int | None = None
    max_continuous: int | None = None
    taylorseer_order: int | None = None
    scm: str | None = None  # a preset name
    scm_policy: str = "dynamic"
    cfg: bool = True

    def peer_spec(self, name: str) -> dict[str, Any]:
        cache = {
            "Fn_compute_blocks": self.Fn,
            "Bn_compute_blocks": self.Bn,
            "residual_diff_threshold": self.threshold,
            "max_warmup_steps": self.warmup,
            "warmup_interval": self.warmup_interval,
            "max_cached_steps": -1 if self.max_cached is None else self.max_cached,
            "max_continuous_cached_steps": -1 if self.max_continuous is None else self.max_continuous,
            "enable_separate_cfg": True,
        }
        if self.scm is not None:
            cache["steps_computation_mask"] = {"mask_policy": self.scm}
            cache["steps_computation_policy"] = self.scm_policy
        spec = {"name": name, "num_inference_steps": self.n, "cache": cache, "taylorseer_order": self.taylorseer_order}
        if not self.cfg:
            spec["call"] = {"true_cfg_scale": 1.0, "negative_prompt": None}
        return spec

    def ours(self, **overrides: Any) -> DBCacheConfig:
        kwargs = dict(
            Fn=self.Fn,
            Bn=self.Bn,
            residual_diff_threshold=self.threshold,
            max_warmup_steps=self.warmup,
            warmup_interval=self.warmup_interval,
            max_cached_steps=self.max_cached,
            max_continuous_cached_steps=self.max_continuous,
            compute_last_step=False,
            enable_taylorseer=self.taylorseer_order is not None,
            taylorseer_order=self.taylorseer_order or 1,
            scm_steps_mask=self.scm,
            scm_steps_policy=self.scm_policy,
        )
        kwargs.update(overrides)
        return DBCacheConfig(**kwargs)


def _f2b1_name(t: float, order: int | None) -> str:
    return f"f2b1-w2-mc2-{t:.2f}-ts{order or 0}"


CASES: dict[str, Case] = {}
for _t in FBC_THRESHOLDS:
    CASES[f"f1b0-{_t:.2f}"] = Case(n=N, threshold=_t)
for _t in F2B1_THRESHOLDS:
    for _order in TAYLORSEER_ORDERS:
        CASES[_f2b1_name(_t, _order)] = Case(
            n=N, Fn=2, Bn=1, threshold=_t, warmup=2, max_continuous=2, taylorseer_order=_order
        )
# Warm-up 5: the first 5 steps are computed, so cache-dit's late first difference (step >= 3) and a textbook ladder
# (order k after k + 1 computed steps) hold the same factors at every reused step: reused [5, 6, 8, 9, 11].
CASES["f2b1-w5-mc2-0.82-ts2"] = Case(n=N, Fn=2, Bn=1, threshold=0.82, warmup=5, max_continuous=2, taylorseer_order=2)
# Every guard at once: warm-up steps 0 and 2 only (interval 2), at most 2 consecutive and 4 reuses in total:
# reused [1, 3, 4, 6]; step 5 computes for the consecutive cap, steps 7-11 for the total cap.
CASES["guards-0.78"] = Case(n=N, threshold=0.78, warmup=4, warmup_interval=2, max_cached=4, max_continuous=2)
# SCM "fast" at 20 steps: 11111101000000000001. Static reuses exactly the mask-0 steps (no diff test, no caps);
# dynamic tests the mask-0 steps with the diff: reused [6, 8, 11].
CASES["scm-fast-static"] = Case(n=N_SCM, threshold=0.65, scm="fast", scm_policy="static")
CASES["scm-fast-dynamic-0.65"] = Case(n=N_SCM, threshold=0.65, scm="fast", scm_policy="dynamic")
# No CFG (one transformer call per step), for the call-parity difference.
CASES["nocfg-f1b0-0.76"] = Case(n=N, threshold=0.76, cfg=False)

EXPLICIT_BINS = [
    {"compute_bins": [4, 2, 1], "cache_bins": [2, 3], "total_steps": 12},  # 111100110001: ends with a compute bin
    {"compute_bins": [4, 2, 1], "cache_bins": [2, 3, 4], "total_steps": 16},  # 1111001100010000: cache-dit's example
]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def peer(tmp_path_factory) -> dict[str, Any]:
    """All cache-dit results of this module, from one ``tests.peers.cachedit_runner`` subprocess."""
    request = {
        "seed": 0,
        "num_threads": torch.get_num_threads(),
        "height": HEIGHT,
        "width": WIDTH,
        "prompt": PROMPT,
        "negative_prompt": " ",
        "true_cfg_scale": 4.0,
        "generator_seed": 0,
        "references": sorted({N, N_SCM}),
        "runs": [case.peer_spec(name) for name, case in CASES.items()],
        "masks": {"policies": list(MASK_POLICIES), "steps": list(MASK_STEPS)},
        "mask_calls": EXPLICIT_BINS,
    }
    folder = tmp_path_factory.mktemp("cachedit")
    req, res = folder / "request.json", folder / "result.pt"
    req.write_text(json.dumps(request))
    env = {**os.environ, "CACHE_DIT_LOG_LEVEL": "error"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.peers.cachedit_runner", str(req), str(res)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(
            "the cache-dit runner failed (cache-dit is a test-only dependency: "
            "`pip install --no-deps cache-dit==1.5.3 packaging pyyaml`):\n" + proc.stderr[-4000:],
            pytrace=False,
        )
    result = torch.load(res, weights_only=True)
    errors = {name: run["error"] for name, run in result["runs"].items() if run["error"]}
    assert not errors, f"cache-dit runs failed: {errors}"
    return result


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_qwenimage_pipeline(seed=0, pipeline_class=CachedQwenImagePipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_OURS: dict[Any, tuple[torch.Tensor, Any]] = {}


def run_ours(pipe, key: Any, config, n: int, cfg: bool = True):
    """Our latents and ``cache_stats`` for ``config`` (memoized per ``key`` within the module)."""
    if key not in _OURS:
        pipe.cache_config = config
        out = pipe(
            prompt=PROMPT,
            negative_prompt=" " if cfg else None,
            true_cfg_scale=4.0 if cfg else 1.0,
            num_inference_steps=n,
            height=HEIGHT,
            width=WIDTH,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images
        stats = copy.deepcopy(pipe.cache_stats) if config is not None else None  # not overwritten by the next run
        _OURS[key] = (out.detach().clone(), stats)
    return _OURS[key]


# ----------------------------------------------------------------------------------------------------------------
# Helpers

BRANCHES = (("cond", "cached_steps", "residual_diffs"), ("uncond", "cfg_cached_steps", "cfg_residual_diffs"))


def reused(stats, branch: str) -> list[int]:
    return list(stats.branches[branch].reused_steps) if branch in stats.branches else []


def assert_both_outcomes_and_margin(run: dict[str, Any], threshold: float) -> None:
    """The chosen threshold gives computed and reused steps in both branches, and no near-tie."""
    n = run["num_inference_steps"]
    for branch, cached_key, diffs_key in BRANCHES:
        cached = run[cached_key]
        assert cached, f"threshold {threshold}: cache-dit reuses nothing in the {branch} branch; choose another one"
        assert len(cached) < n, f"threshold {threshold}: cache-dit reuses every step of the {branch} branch"
        diffs = run[diffs_key]
        margin = min(abs(d - threshold) for d in diffs.values())
        assert margin >= MIN_MARGIN, (
            f"threshold {threshold} is within {margin:.2e} of a diff cache-dit tested ({branch}): {diffs}; "
            "a float32 rounding difference could flip that decision, choose another threshold"
        )


def assert_same_decisions(stats, run: dict[str, Any]) -> None:
    n = run["num_inference_steps"]
    assert set(stats.branches) == {"cond", "uncond"}, f"branches: {sorted(stats.branches)}"
    for branch, cached_key, _ in BRANCHES:
        b = stats.branches[branch]
        assert sorted(b.computed_steps + b.reused_steps) == list(range(n)), f"{branch}: not one record per step"
        assert reused(stats, branch) == run[cached_key], (
            f"{branch}: ours reused {reused(stats, branch)}, cache-dit {run[cached_key]} "
            f"(cache-dit diffs {run['residual_diffs' if branch == 'cond' else 'cfg_residual_diffs']}, "
            f"ours {b.values})"
        )


def assert_same_signals(stats, run: dict[str, Any], hint: str = "") -> None:
    """Every residual diff cache-dit tested is recorded by us at the same step, with the same value."""
    for branch, _, diffs_key in BRANCHES:
        ours = stats.branches[branch].values
        for step, d in run[diffs_key].items():
            assert step in ours, f"{branch}: cache-dit tested a diff at step {step}, we record none ({ours})"
            assert abs(ours[step] - d) <= SIGNAL_RTOL * abs(d), (
                f"{branch} step {step}: ours {ours[step]}, cache-dit {d}{hint}"
            )


def assert_same_blocks(stats, run: dict[str, Any]) -> None:
    """The number of transformer-block forwards is the same (Fn + Bn on a reused call, all blocks otherwise)."""
    assert stats.blocks_computed == sum(run["block_calls"]), (
        f"blocks run: ours {stats.blocks_computed}, cache-dit {sum(run['block_calls'])} ({run['block_calls']})"
    )


def assert_latents(ours: torch.Tensor, theirs: torch.Tensor, atol: float, what: str, hint: str = "") -> None:
    assert ours.shape == theirs.shape, f"{what}: shapes {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    diff = (ours.float() - theirs.float()).abs().max().item()
    if atol == 0:
        assert torch.equal(ours, theirs), f"{what}: latents differ from cache-dit's, max |diff| = {diff:.3e}{hint}"
    else:
        assert diff <= atol, f"{what}: max |latent diff| vs cache-dit = {diff:.3e} > {atol:.1e}{hint}"


def mask_zero_steps(mask) -> list[int]:
    return [i for i, m in enumerate(mask) if m == 0]


# ----------------------------------------------------------------------------------------------------------------
# Baseline


@pytest.mark.parametrize("n", sorted({N, N_SCM}))
def test_uncached_runs_match_cachedit_reference(pipe, peer, n):
    """Without a cache our pipeline is the stock pipeline: bit-identical to cache-dit's uncached reference run."""
    ours, _ = run_ours(pipe, ("uncached", n), None, n)
    assert_latents(ours, peer["references"][n], 0, f"uncached, {n} steps")


# ----------------------------------------------------------------------------------------------------------------
# First-Block-Cache = DBCache Fn=1, Bn=0, no warm-up


@pytest.mark.parametrize("threshold", FBC_THRESHOLDS)
@pytest.mark.parametrize("method", ["dbcache", "fbcache"])
def test_first_block_cache_matches_cachedit(pipe, peer, method, threshold):
    case = CASES[f"f1b0-{threshold:.2f}"]
    run = peer["runs"][f"f1b0-{threshold:.2f}"]
    assert_both_outcomes_and_margin(run, threshold)
    if method == "dbcache":
        config = case.ours()
    else:
        config = FirstBlockCacheConfig(residual_diff_threshold=threshold, compute_last_step=False)
    latents, stats = run_ours(pipe, (method, threshold), config, case.n)
    assert_same_decisions(stats, run)
    assert_same_signals(stats, run)
    assert_same_blocks(stats, run)
    assert_latents(latents, run["latents"], 0, f"{method} threshold {threshold}")


def test_branches_decide_independently(peer):
    """At 0.71 the uncond branch reuses step 9 and the cond branch does not: one state per branch is required."""
    run = peer["runs"]["f1b0-0.71"]
    assert run["cached_steps"] != run["cfg_cached_steps"]


# ----------------------------------------------------------------------------------------------------------------
# DBCache with Fn/Bn, warm-up and caps, with and without the TaylorSeer calibrator


@pytest.mark.parametrize("order", TAYLORSEER_ORDERS, ids=lambda o: f"ts{o or 0}")
@pytest.mark.parametrize("threshold", F2B1_THRESHOLDS)
def test_dbcache_fn_bn_matches_cachedit(pipe, peer, threshold, order):
    name = _f2b1_name(threshold, order)
    case, run = CASES[name], peer["runs"][name]
    assert_both_outcomes_and_margin(run, threshold)
    latents, stats = run_ours(pipe, name, case.ours(), case.n)
    hint = "" if order is None else (
        "; the forecast at the reused steps differs: cache-dit's calibrator forms no finite difference before "
        "step 3, so steps 2-3 reuse R(1) unchanged (docs/cachedit-spec.md section 3.4)"
    )
    assert_same_decisions(stats, run)
    # Without a calibrator a reused step adds the stored residual: the same float32 ops, so exactly equal.
    assert_latents(latents, run["latents"], 0 if order is None else TAYLORSEER_ATOL, name, hint)
    assert_same_signals(stats, run, hint)
    assert_same_blocks(stats, run)


def test_taylorseer_changes_the_output(peer):
    """The calibrator is really used: the three runs make the same decisions but give different latents."""
    runs = [peer["runs"][_f2b1_name(0.82, order)] for order in TAYLORSEER_ORDERS]
    assert runs[0]["cached_steps"] == runs[1]["cached_steps"] == runs[2]["cached_steps"]
    assert (runs[0]["latents"] - runs[1]["latents"]).abs().max() > 1e-3
    assert (runs[1]["latents"] - runs[2]["latents"]).abs().max() > 1e-3


def test_taylorseer_after_long_warmup_matches_cachedit(pipe, peer):
    """Warm-up 5: the factors do not depend on when cache-dit forms its first difference."""
    name = "f2b1-w5-mc2-0.82-ts2"
    case, run = CASES[name], peer["runs"][name]
    assert_both_outcomes_and_margin(run, case.threshold)
    latents, stats = run_ours(pipe, name, case.ours(), case.n)
    assert_same_decisions(stats, run)
    assert_same_signals(stats, run)
    assert_latents(latents, run["latents"], TAYLORSEER_ATOL, name)


def test_guards_match_cachedit(pipe, peer):
    """warmup_interval, max_continuous_cached_steps and max_cached_steps in cache-dit's order."""
    name = "guards-0.78"
    case, run = CASES[name], peer["runs"][name]
    assert_both_outcomes_and_margin(run, case.threshold)
    assert run["cached_steps"] == run["cfg_cached_steps"] == [1, 3, 4, 6]
    latents, stats = run_ours(pipe, name, case.ours(), case.n)
    assert_same_decisions(stats, run)
    assert_same_signals(stats, run)
    assert_latents(latents, run["latents"], 0, name)


# ----------------------------------------------------------------------------------------------------------------
# SCM


@pytest.mark.parametrize("policy", MASK_POLICIES)
def test_preset_masks_match_cachedit(peer, policy):
    """Where cache-dit accepts the step count, our mask is cache-dit's; elsewhere ours is still a valid mask."""
    rejected = []
    for n in MASK_STEPS:
        theirs = peer["masks"][(policy, n)]
        ours = steps_mask(policy, n)
        if isinstance(theirs, str):  # cache-dit raises: fewer than 8 steps other than 4 and 6
            rejected.append(n)
            assert len(ours) == n and set(ours) <= {0, 1}, f"{policy}, {n} steps: {ours}"
            assert ours[0] == 1 and ours[-1] == 1, f"{policy}, {n} steps: {ours}"
        else:
            assert tuple(ours) == tuple(theirs), f"{policy}, {n} steps: ours {ours}, cache-dit {theirs}"
    assert rejected == [1, 2, 3, 5, 7]


def test_explicit_bins_match_cachedit(peer):
    """Explicit bins covering exactly the step count: the same alternating runs. cache-dit does not force the last
    step of an explicit-bins mask to compute; ours does (deliberate difference: a reused final step skips the
    refinement that matters most)."""
    for kwargs, theirs in zip(EXPLICIT_BINS, peer["mask_calls"]):
        spec = {"compute_bins": kwargs["compute_bins"], "cache_bins": kwargs["cache_bins"]}
        ours = list(steps_mask(spec, kwargs["total_steps"]))
        assert ours[:-1] == theirs[:-1]
        assert ours[-1] == 1
    assert peer["mask_calls"][1][-1] == 0


@pytest.mark.parametrize("policy", ["static", "dynamic"])
def test_scm_run_matches_cachedit(pipe, peer, policy):
    name = "scm-fast-static" if policy == "static" else "scm-fast-dynamic-0.65"
    case, run = CASES[name], peer["runs"][name]
    mask = run["mask"]
    assert tuple(mask) == tuple(steps_mask("fast", case.n)), f"our fast mask differs from cache-dit's {mask}"
    zeros = mask_zero_steps(mask)
    if policy == "static":
        # Static: exactly the mask-0 steps are reused, without a diff test.
        assert run["cached_steps"] == run["cfg_cached_steps"] == zeros
        assert run["residual_diffs"] == {} and run["cfg_residual_diffs"] == {}
    else:
        assert_both_outcomes_and_margin(run, case.threshold)
        assert set(run["cached_steps"]) < set(zeros) and set(run["cfg_cached_steps"]) < set(zeros)
    latents, stats = run_ours(pipe, name, case.ours(), case.n)
    assert_same_decisions(stats, run)
    if policy == "static":
        assert reused(stats, "cond") == reused(stats, "uncond") == zeros
    else:
        assert_same_signals(stats, run)
    assert_same_blocks(stats, run)
    assert_latents(latents, run["latents"], 0, name)


# ----------------------------------------------------------------------------------------------------------------
# Deliberate differences


def test_difference_last_step_rule(pipe, peer):
    """cache-dit has no last-step rule and reuses step N-1 at 0.76; ours (compute_last_step=True, the default) computes
    it and otherwise decides the same (the last step influences no later decision)."""
    case, run = CASES["f1b0-0.76"], peer["runs"]["f1b0-0.76"]
    assert run["cached_steps"][-1] == run["cfg_cached_steps"][-1] == case.n - 1
    _, stats = run_ours(pipe, "f1b0-0.76-last", case.ours(compute_last_step=True), case.n)
    for branch, cached_key, _ in BRANCHES:
        assert reused(stats, branch) == [s for s in run[cached_key] if s != case.n - 1]
        assert case.n - 1 in stats.branches[branch].computed_steps


def test_difference_branch_by_name_not_call_parity(pipe, peer):
    """Without CFG there is one call per step. cache-dit (``enable_separate_cfg=True``, the QwenImage adapter's
    default) still splits calls by parity: even calls are "non-CFG" and odd calls "CFG", both labelled with step
    ``call // 2``, so it records steps 0..N/2-1 only and a CFG branch that does not exist. Ours keys the state by the
    pipeline's branch name: one "cond" branch with one record per denoising step."""
    case, run = CASES["nocfg-f1b0-0.76"], peer["runs"]["nocfg-f1b0-0.76"]
    assert run["transformer_calls"] == case.n
    labels = set(run["cached_steps"]) | set(run["cfg_cached_steps"]) | set(run["residual_diffs"])
    labels |= set(run["cfg_residual_diffs"])
    assert max(labels) <= (case.n - 1) // 2
    assert run["cfg_residual_diffs"], "cache-dit records a CFG branch although the run has no CFG"
    _, stats = run_ours(pipe, "nocfg-f1b0-0.76", case.ours(), case.n, cfg=False)
    assert set(stats.branches) == {"cond"}
    cond = stats.branches["cond"]
    assert sorted(cond.computed_steps + cond.reused_steps) == list(range(case.n))
