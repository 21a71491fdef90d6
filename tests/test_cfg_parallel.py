"""CFG-parallel on spawned CPU processes (gloo): each guidance branch on its own rank, for every cache method.

Every rank first runs the serial call (both branches on itself), then the CFG-parallel call; the parent process
checks that the parallel images equal the serial ones within 1e-4 and that rank k's statistics are exactly the serial
run's statistics of branch k (the same reused steps, reasons and decision values). The error tests check that a rank
that raises makes every rank raise, within the process group's timeout. A batch of two prompts whose samples disagree
at a step checks that per-sample decisions (issue 22) hold under CFG-parallel. The multi-process harness is
``tests/distributed.py``; it sets diffusers' CPU device count to 1 in the children (see there).
"""

import ast
import textwrap

import pytest
import torch

from cached_diffusers import FirstBlockCacheConfig, TaylorSeerConfig
from cached_diffusers.cfg_parallel import CFGParallelError, check_parent_loop
from conftest import matrix_context, matrix_methods, mixing_config
from distributed import run_distributed

pytestmark = pytest.mark.slow  # spawns gloo process groups (multi-process): left out of the fast set (-m "not slow")

TIMEOUT_S = 120.0  # the process group's timeout: a rank stuck in a collective fails after it, never hangs
KLEIN_COEFFICIENTS = (2.0, -3.0, 1.0, 1.0, 0.0)  # a test polynomial (no Klein coefficients exist)
STEPS = 8

STATIC_SCM = FirstBlockCacheConfig(residual_diff_threshold=10.0, scm_steps_mask="fast", scm_steps_policy="static")
"""A static SCM mask (the mask alone decides), run beside every registered method."""


def _qwen_pipe():
    from cached_diffusers import CachedQwenImagePipeline
    from cached_diffusers.tools.tiny import build_tiny_qwenimage_pipeline

    return build_tiny_qwenimage_pipeline(seed=0, pipeline_class=CachedQwenImagePipeline)


def _qwen_kwargs(seed=0, **overrides):
    from cached_diffusers.tools.tiny import DEFAULT_PROMPTS

    kwargs = dict(prompt=DEFAULT_PROMPTS[0], negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=STEPS,
                  generator=torch.Generator().manual_seed(seed), output_type="latent", height=64, width=64)  # fmt: skip
    return {**kwargs, **overrides}


def _klein_pipe():
    from cached_diffusers import CachedFlux2KleinPipeline
    from cached_diffusers.tools.tiny import build_tiny_flux2_klein_pipeline

    return build_tiny_flux2_klein_pipeline(seed=0, pipeline_class=CachedFlux2KleinPipeline)


def _klein_kwargs(seed=0, **overrides):
    from cached_diffusers.tools.tiny import DEFAULT_PROMPTS

    kwargs = dict(prompt=DEFAULT_PROMPTS[0], guidance_scale=4.0, num_inference_steps=STEPS, max_sequence_length=32,
                  generator=torch.Generator().manual_seed(seed), output_type="latent", height=32, width=32)  # fmt: skip
    return {**kwargs, **overrides}


FAMILIES = {"qwenimage": (_qwen_pipe, _qwen_kwargs, None), "klein": (_klein_pipe, _klein_kwargs, KLEIN_COEFFICIENTS)}
"""Family -> (pipeline builder, call arguments, TeaCache coefficients: ``None`` for the model's published ones)."""

_CONFIGS: dict[tuple, list] = {}


def family_configs(family, methods=None):
    """Each method's config (``methods``: every registered method, then :data:`STATIC_SCM`) under which each branch
    of ``family``'s serial run reuses some steps and computes some between its first and last
    (:func:`conftest.mixing_config`: a threshold found by bisection over the method's sweep range). Searched once in
    the test process; the ranks get the configs."""
    extra = [STATIC_SCM] if methods is None else []
    methods = matrix_methods() if methods is None else methods
    key = (family, *[m.config_class for m in methods])
    if key not in _CONFIGS:
        make_pipe, make_kwargs, coefficients = FAMILIES[family]
        pipe = make_pipe()
        pipe.set_progress_bar_config(disable=True)
        context = matrix_context(coefficients, pipe.transformer.num_cache_blocks, STEPS)

        def reused_by_branch(config):
            pipe.cache_config = config
            pipe(**make_kwargs())
            return {b: [r.reused for r in s.records] for b, s in pipe.cache_stats.branches.items()}

        _CONFIGS[key] = [mixing_config(m, context, reused_by_branch, STEPS) for m in methods]
    return _CONFIGS[key] + extra


def _records(stats):
    return {b: [(r.step, r.reused, r.reason, r.value) for r in s.records] for b, s in stats.branches.items()}


def _serial_then_parallel(rank, world_size, family, configs, group=None):
    """On every rank: for each config, the serial run, then the CFG-parallel one. Returns one row per config."""
    make_pipe, make_kwargs, _ = FAMILIES[family]
    pipe = make_pipe()
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for config in [None, *configs]:
        pipe.cache_config = config
        pipe.disable_cfg_parallel()
        serial = pipe(**make_kwargs()).images
        serial_records = _records(pipe.cache_stats)
        pipe.enable_cfg_parallel(group)
        parallel = pipe(**make_kwargs()).images
        rows.append((config, serial, parallel, serial_records, _records(pipe.cache_stats)))
    return rows


def _check_rows(results, branches):
    for rank, rows in enumerate(results):
        for config, serial, parallel, serial_records, parallel_records in rows:
            name = config.method if config is not None else "none"
            assert parallel.shape == serial.shape and (parallel - serial).abs().max().item() <= 1e-4, name
            if config is None:
                assert parallel_records == {}
                continue
            # rank k holds branch k only, exactly as the serial run recorded it
            assert list(parallel_records) == [branches[rank]], name
            assert parallel_records[branches[rank]] == serial_records[branches[rank]], name
            assert any(reused for _, reused, _, _ in serial_records[branches[rank]]), f"{name}: nothing reused"
            middle = serial_records[branches[rank]][1:-1]
            assert any(not reused for _, reused, _, _ in middle), f"{name}: nothing computed between first and last"
    for row0, row1 in zip(results[0], results[1]):
        torch.testing.assert_close(row0[2], row1[2], rtol=0, atol=0)  # every rank returns the same images


@pytest.mark.parametrize("family", ["qwenimage", "klein"])
def test_every_method_equals_the_serial_run_per_branch(family):
    check_cfg_parallel_equals_serial(family)


def check_cfg_parallel_equals_serial(family, methods=None):
    """Every method of ``methods`` (default: every registered one, and a static SCM mask) on two ranks: each rank's
    statistics are the serial run's of its branch, the images the serial ones (:func:`_check_rows`)."""
    configs = family_configs(family, methods)
    names = [m.name for m in (matrix_methods() if methods is None else methods)]
    assert [c.method for c in configs[: len(names)]] == names
    results = run_distributed(_serial_then_parallel, world_size=2, args=(family, configs), timeout_s=TIMEOUT_S)
    _check_rows(results, ["cond", "uncond"])


# -- BAGEL: 2 or 3 ranks, "gen" alone outside cfg_interval ----------------------------------------------------------
def _bagel(rank, world_size):
    from cached_diffusers import CachedBagelPipeline
    from reference import reference_dir

    pipe = CachedBagelPipeline.from_pretrained(reference_dir("bagel-tiny") / "checkpoint")
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red cat sitting on a blue sofa", height=64, width=96, num_timesteps=8, cfg_text_scale=4.0,
                  cfg_img_scale=1.5 if world_size == 3 else 1.0, cfg_interval=(0.4, 1.0), output_type="pt")  # fmt: skip
    rows = []
    for config in [FirstBlockCacheConfig(residual_diff_threshold=0.5, max_warmup_steps=1), TaylorSeerConfig(order=1, interval=2)]:
        pipe.cache_config = config
        pipe.disable_cfg_parallel()
        serial = pipe(**kwargs, generator=torch.Generator().manual_seed(42)).images
        serial_records = _records(pipe.cache_stats)
        pipe.enable_cfg_parallel()
        parallel = pipe(**kwargs, generator=torch.Generator().manual_seed(42)).images
        rows.append((config, serial, parallel, serial_records, _records(pipe.cache_stats)))
    return rows


@pytest.mark.parametrize("world_size", [2, 3])
def test_bagel_branches_on_two_or_three_ranks(world_size):
    results = run_distributed(_bagel, world_size=world_size, timeout_s=TIMEOUT_S)
    branches = ["gen", "cfg_text", "cfg_img"][:world_size]
    for rank, rows in enumerate(results):
        for config, serial, parallel, serial_records, parallel_records in rows:
            assert (parallel - serial).abs().max().item() <= 1e-4, config.method
            assert list(parallel_records) == [branches[rank]]
            assert parallel_records[branches[rank]] == serial_records[branches[rank]], config.method
    # the last step is outside cfg_interval: only "gen" ran there, on rank 0
    assert results[0][0][4]["gen"][-1][0] == 6 and results[1][0][4]["cfg_text"][-1][0] == 5


# -- a batch whose samples disagree: per-sample decisions under CFG-parallel (issue 22) ----------------------------
BATCH_PROMPTS = [0, 2]  # indices into DEFAULT_PROMPTS; sample i is drawn with seed i


def _batch_kwargs(rows):
    """Qwen-Image call arguments for the samples ``rows`` (indices into BATCH_PROMPTS), each with its own seed."""
    from cached_diffusers.tools.tiny import DEFAULT_PROMPTS

    prompts = [DEFAULT_PROMPTS[BATCH_PROMPTS[i]] for i in rows]
    generators = [torch.Generator().manual_seed(i) for i in rows]
    return _qwen_kwargs(prompt=prompts, negative_prompt=[" "] * len(rows), generator=generators)


def _mixing_fbcache(pipe):
    """FBCache with its threshold between the two samples' cond residual differences at the first step where they
    differ, measured by a serial probe run that never reuses: at that step one sample reuses, the other computes."""
    pipe.cache_config = FirstBlockCacheConfig(residual_diff_threshold=0.0, max_warmup_steps=1)
    pipe(**_batch_kwargs([0, 1]))
    samples = pipe.cache_stats.branches["cond"].samples
    for step in range(STEPS):
        low, high = sorted(s.values.get(step, 0.0) for s in samples)
        if low > 0 and high > low * (1 + 1e-3):
            return FirstBlockCacheConfig(residual_diff_threshold=(low * high) ** 0.5, max_warmup_steps=1)
    raise AssertionError(f"the samples' values never differ: {[s.values for s in samples]}")


def _sample_records(stats):
    return {b: [_records_of(sample) for sample in s.samples] for b, s in stats.branches.items()}


def _records_of(branch_stats):
    return [(r.step, r.reused, r.reason, r.value) for r in branch_stats.records]


def _batch_of_disagreeing_samples(rank, world_size):
    """On every rank: each sample alone (serial), the batch serially, then the batch CFG-parallel."""
    pipe = _qwen_pipe()
    pipe.set_progress_bar_config(disable=True)
    pipe.disable_cfg_parallel()
    pipe.cache_config = config = _mixing_fbcache(pipe)
    alone = []
    for row in range(len(BATCH_PROMPTS)):
        images = pipe(**_batch_kwargs([row])).images
        alone.append((images[0], {b: _records_of(s) for b, s in pipe.cache_stats.branches.items()}))
    serial = pipe(**_batch_kwargs([0, 1])).images
    serial_records = _sample_records(pipe.cache_stats)
    pipe.enable_cfg_parallel()
    parallel = pipe(**_batch_kwargs([0, 1])).images
    assert pipe.cache_config is config
    return alone, serial, serial_records, parallel, _sample_records(pipe.cache_stats)


def test_a_batch_whose_samples_disagree_gives_each_sample_its_own_call():
    """Batch 2 under CFG-parallel with a step where one sample computes and the other reuses: rank k takes, sample
    by sample, the decisions of branch k in the serial batched call and in each sample's own call; every sample
    equals its own single-prompt call within 1e-4, and both ranks return the same images."""
    results = run_distributed(_batch_of_disagreeing_samples, world_size=2, timeout_s=TIMEOUT_S)
    branches = ["cond", "uncond"]
    mixed = False
    for rank, (alone, serial, serial_records, parallel, parallel_records) in enumerate(results):
        branch = branches[rank]
        assert list(parallel_records) == [branch]
        assert parallel_records[branch] == serial_records[branch]
        assert len(parallel_records[branch]) == len(BATCH_PROMPTS)
        for row, (own_image, own_records) in enumerate(alone):
            # the same steps and reasons; the decision values agree to float rounding (batched vs. alone)
            assert [r[:3] for r in parallel_records[branch][row]] == [r[:3] for r in own_records[branch]], (rank, row)
            values = [(r[3], o[3]) for r, o in zip(parallel_records[branch][row], own_records[branch])]
            assert all(v == o or abs(v - o) <= 1e-4 * abs(o) for v, o in values), (rank, row, values)
            difference = (parallel[row] - own_image).abs().max().item()
            assert difference <= 1e-4, f"rank {rank}, sample {row}: max abs difference {difference:.3g}"
        steps = [{step for step, reused, _, _ in sample if reused} for sample in parallel_records[branch]]
        mixed |= steps[0] != steps[1]
    assert mixed, "no step where the samples disagreed: the test would not see shared decisions"
    torch.testing.assert_close(results[0][3], results[1][3], rtol=0, atol=0)


# -- errors: every rank raises, none hangs --------------------------------------------------------------------------
def _outcome(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - each rank reports what it raised
        return type(error).__name__, str(error)
    return None


def _errors(rank, world_size, case):
    pipe = _qwen_pipe()
    pipe.set_progress_bar_config(disable=True)
    pipe.cache_config = FirstBlockCacheConfig(residual_diff_threshold=0.6)
    pipe.enable_cfg_parallel()
    if case == "bad-input":  # rank 1 fails in the parent's input check (no prompt), before any step
        return _outcome(lambda: pipe(**_qwen_kwargs(prompt="a cat" if rank == 0 else None)))
    if case == "branch-raises":  # rank 1's branch raises inside the transformer at step 2 (an OOM, a NaN check)
        calls = []

        def fail(module, args, kwargs):
            calls.append(1)
            if rank == 1 and len(calls) == 3:
                raise torch.OutOfMemoryError("simulated out of memory in the uncond branch")

        handle = pipe.transformer.register_forward_pre_hook(fail, with_kwargs=True)
        outcome = _outcome(lambda: pipe(**_qwen_kwargs()))
        handle.remove()
        after = pipe(**_qwen_kwargs()).images  # the group and the pipeline still work
        return outcome, tuple(after.shape)
    if case == "different-seeds":
        return _outcome(lambda: pipe(**_qwen_kwargs(seed=rank)))
    if case == "one-branch":  # no negative prompt: one branch per step for two ranks
        return _outcome(lambda: pipe(**_qwen_kwargs(negative_prompt=None, true_cfg_scale=1.0)))
    raise AssertionError(case)


def test_a_rank_failing_its_input_check_makes_every_rank_raise():
    results = run_distributed(_errors, world_size=2, args=("bad-input",), timeout_s=TIMEOUT_S)
    assert results[1][0] == "ValueError"
    assert results[0][0] == "CFGParallelError" and "rank 1" in results[0][1] and "ValueError" in results[0][1]


def test_a_branch_raising_mid_call_makes_every_rank_raise_and_the_group_recovers():
    results = run_distributed(_errors, world_size=2, args=("branch-raises",), timeout_s=TIMEOUT_S)
    (outcome0, shape0), (outcome1, shape1) = results
    assert outcome1 == ("OutOfMemoryError", "simulated out of memory in the uncond branch")
    assert outcome0[0] == "CFGParallelError" and "rank 1" in outcome0[1] and "simulated out of memory" in outcome0[1]
    assert shape0 == shape1 == (1, 16, 64)


def test_ranks_with_different_latents_are_refused():
    results = run_distributed(_errors, world_size=2, args=("different-seeds",), timeout_s=TIMEOUT_S)
    for name, message in results:
        assert name == "ValueError" and "different calls" in message and "seed" in message


def test_a_call_with_fewer_branches_than_ranks_is_refused_on_every_rank():
    results = run_distributed(_errors, world_size=2, args=("one-branch",), timeout_s=TIMEOUT_S)
    for name, message in results:
        assert name == "ValueError" and "needs 2 guidance branches per step" in message and "['cond']" in message


# -- single-process checks -------------------------------------------------------------------------------------------
def test_enable_without_a_process_group_says_how_to_start():
    from cached_diffusers import CachedQwenImagePipeline

    pipe = CachedQwenImagePipeline.__new__(CachedQwenImagePipeline)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node=2"):
        pipe.enable_cfg_parallel()


def test_single_branch_pipelines_refuse_cfg_parallel():
    from cached_diffusers import CachedFlux2Pipeline
    from cached_diffusers.pipelines import CachedFlux2KleinKVPipeline

    for cls in (CachedFlux2Pipeline, CachedFlux2KleinKVPipeline):
        with pytest.raises(ValueError, match="once per step"):
            cls.__new__(cls).enable_cfg_parallel()


@pytest.mark.parametrize(
    "name",
    ["QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline", "QwenImageEditPipeline",
     "QwenImageEditInpaintPipeline", "QwenImageEditPlusPipeline", "QwenImageControlNetPipeline",
     "QwenImageControlNetInpaintPipeline", "QwenImageLayeredPipeline", "Flux2KleinPipeline",
     "Flux2KleinInpaintPipeline"],  # fmt: skip
)
def test_the_installed_parents_only_slice_between_the_branches(name):
    import diffusers

    assert check_parent_loop(getattr(diffusers, name)) is None


def _loop_class(between: str) -> type:
    source = textwrap.dedent(
        f"""
        class Parent:
            def __call__(self, latents):
                with self.transformer.cache_context("cond"):
                    noise_pred = self.transformer(latents)[0]
                {between}
                if self.do_cfg:
                    with self.transformer.cache_context("uncond"):
                        neg = self.transformer(latents)[0]
                return neg + 2 * (noise_pred - neg)
        """
    )
    namespace = {}
    exec(compile(ast.parse(source), "<loop>", "exec"), namespace)  # the check reads the source through inspect
    cls = namespace["Parent"]
    cls.__call__.__source__ = source
    return cls


def test_a_parent_that_computes_with_the_first_prediction_is_refused(monkeypatch):
    import inspect

    monkeypatch.setattr(inspect, "getsource", lambda obj: obj.__source__)
    for between, ok in [("noise_pred = noise_pred[:, :4]", True), ("noise_pred = noise_pred * 2", False),
                        ("noise_pred = noise_pred[:, 0]", False), ("scale = noise_pred.norm()", False)]:  # fmt: skip
        problem = check_parent_loop(_loop_class(between))
        assert (problem is None) is ok, (between, problem)
        if not ok:
            assert between.split(" =")[0] in problem and "only slicing" in problem


def test_cfg_parallel_error_is_a_runtime_error():
    assert issubclass(CFGParallelError, RuntimeError)


# -- CFG 2 x Ulysses 2 on four processes -----------------------------------------------------------------------------
def _mesh_2d(rank, world_size, family, configs):
    from cached_diffusers.multi_gpu import parallelize

    make_pipe, make_kwargs, _ = FAMILIES[family]
    pipe = make_pipe()
    pipe.set_progress_bar_config(disable=True)
    mesh = parallelize(pipe, cfg_parallel=True, ulysses_degree=2)
    rows = []
    for config in [None, *configs]:
        pipe.cache_config = config
        rows.append((pipe(**make_kwargs()).images, _records(pipe.cache_stats)))
    return mesh["cfg"].get_local_rank(), mesh["ulysses"].get_local_rank(), rows


@pytest.mark.parametrize("family", ["qwenimage", "klein"])
def test_cfg_2_by_ulysses_2_on_four_processes(family):
    configs = family_configs(family)
    results = run_distributed(_mesh_2d, world_size=4, args=(family, configs), timeout_s=TIMEOUT_S)
    assert [(c, u) for c, u, _ in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    make_pipe, make_kwargs, _ = FAMILIES[family]
    pipe = make_pipe()  # the serial runs, here in the test process
    pipe.set_progress_bar_config(disable=True)
    serial = []
    for config in [None, *configs]:
        pipe.cache_config = config
        serial.append((config, pipe(**make_kwargs()).images, _records(pipe.cache_stats)))
    branches = ["cond", "uncond"]
    for cfg_rank, _, rows in results:
        for (config, serial_images, serial_records), (parallel, parallel_records) in zip(serial, rows):
            name = config.method if config is not None else "none"
            assert (parallel - serial_images).abs().max().item() <= 1e-4, name
            if config is not None:  # both Ulysses ranks of a CFG rank hold its branch, as the serial run decided it
                branch = branches[cfg_rank]
                assert list(parallel_records) == [branch], name
                _assert_same_decisions(parallel_records[branch], serial_records[branch], name)


def _assert_same_decisions(records, expected, name):
    """The same steps reused for the same reasons; the decision values equal up to the rounding of sums reduced over
    the context-parallel group."""
    assert [r[:3] for r in records] == [r[:3] for r in expected], name
    for (*_, signal), (*_, want) in zip(records, expected):
        assert (signal is None) == (want is None), name
        if signal is not None:
            assert abs(signal - want) <= 1e-5 * max(1.0, abs(want)), name


# -- the command line ------------------------------------------------------------------------------------------------
def _cli(rank, world_size, model_dir, out_dir, flags):
    from cached_diffusers.tools.cli import main

    common = ["generate", "--model", model_dir, "--prompt", "a cat", "--negative-prompt", " ", "--true-cfg-scale",
              "4", "--steps", "4", "--height", "64", "--width", "64", "--device", "cpu", "--quiet",
              "--cache", "fbcache", "--debug"]  # fmt: skip
    serial = main([*common, "--output", f"{out_dir}/serial-{rank}.png"])
    parallel = main([*common, "--output", f"{out_dir}/parallel.png", *flags])
    return serial, parallel


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    from cached_diffusers.tools.tiny import save_tiny_qwenimage_pipeline

    return str(save_tiny_qwenimage_pipeline(tmp_path_factory.mktemp("qwen") / "tiny"))


def test_cli_cfg_parallel_writes_the_serial_image_from_rank_0(tiny_qwen_dir, tmp_path):
    import numpy as np
    from PIL import Image

    results = run_distributed(_cli, world_size=2, args=(tiny_qwen_dir, str(tmp_path), ["--cfg-parallel"]), timeout_s=TIMEOUT_S)
    assert results == [(0, 0), (0, 0)]
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["parallel.png", "serial-0.png", "serial-1.png"]  # only rank 0 wrote the parallel image
    serial = np.asarray(Image.open(tmp_path / "serial-0.png"), dtype=np.int16)
    parallel = np.asarray(Image.open(tmp_path / "parallel.png"), dtype=np.int16)
    assert np.abs(serial - parallel).max() <= 1  # 8-bit images of predictions equal within 1e-4


def test_cli_parallel_flags_parse_and_need_torchrun(tmp_path, monkeypatch, capsys):
    from cached_diffusers.tools.cli import EXIT_USAGE, build_parser, main

    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--ulysses-degree", "2", "--cfg-parallel"])
    assert args.ulysses_degree == 2 and args.cfg_parallel is True
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p"])
    assert args.ulysses_degree == 1 and args.cfg_parallel is False
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')  # passes the model-folder check
    code = main(["generate", "--model", str(model), "--prompt", "p", "--cfg-parallel", "--output", str(tmp_path / "x.png")])
    assert code == EXIT_USAGE
    assert "torchrun --nproc_per_node=N" in capsys.readouterr().err
    code = main(["generate", "--model", str(model), "--prompt", "p", "--ulysses-degree", "0", "--output", str(tmp_path / "x.png")])
    assert code == EXIT_USAGE and "--ulysses-degree must be >= 1, got 0" in capsys.readouterr().err


def _bad_degree(rank, world_size):
    from cached_diffusers.multi_gpu import parallelize

    pipe = _qwen_pipe()
    return _outcome(lambda: parallelize(pipe, cfg_parallel=True, ulysses_degree=2))


def _three_ranks_for_two_branches(rank, world_size):
    from cached_diffusers import CachedQwenImagePipeline

    return _outcome(lambda: CachedQwenImagePipeline.__new__(CachedQwenImagePipeline).enable_cfg_parallel())


def test_a_group_larger_than_the_branch_count_is_refused_on_every_rank():
    results = run_distributed(_three_ranks_for_two_branches, world_size=3, timeout_s=TIMEOUT_S)
    assert results == [("ValueError", "CachedQwenImagePipeline runs 2 guidance branches per step, one per rank, but "
                        "the CFG-parallel group has 3 ranks")] * 3  # fmt: skip


def test_a_world_size_that_does_not_fit_the_degrees_is_refused():
    results = run_distributed(_bad_degree, world_size=2, timeout_s=TIMEOUT_S)
    for name, message in results:
        assert name == "ValueError" and "must be a multiple >= 2 of --ulysses-degree (2)" in message
