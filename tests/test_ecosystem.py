"""The cached pipelines in the diffusers ecosystem: cache configs saved with models (local, Hub), progress and
summaries, torch.compile, CPU offloading, LoRA, and diffusers' own cache hooks (refused)."""

import io
import json
import os
import re
import types

import pytest
import torch
from diffusers import DiffusionPipeline, QwenImagePipeline, QwenImageTransformer2DModel
from safetensors.torch import save_file

import cached_diffusers.hub as hub
from cached_diffusers import (
    CachedQwenImagePipeline,
    CachedQwenImageTransformer2DModel,
    DBCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    StepRecord,
    TeaCacheConfig,
)
from cached_diffusers.progress import summary
from cached_diffusers.tools.tiny import TRANSFORMER_CONFIG, build_tiny_qwenimage_pipeline, save_tiny_qwenimage_pipeline

TEACACHE = TeaCacheConfig(rel_l1_thresh=0.3, max_continuous_cached_steps=3)
DBCACHE = DBCacheConfig(Fn=1, Bn=1, residual_diff_threshold=10.0, max_warmup_steps=1, max_continuous_cached_steps=2)


def call_kwargs(steps=6, seed=0, cfg=True, **overrides):
    kwargs = dict(
        prompt="a red cat sitting on a blue chair",
        negative_prompt=" " if cfg else None,
        true_cfg_scale=4.0 if cfg else 1.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        height=64,
        width=64,
    )
    kwargs.update(overrides)
    return kwargs


def cached_pipe(config=None):
    pipe = build_tiny_qwenimage_pipeline(seed=0, pipeline_class=CachedQwenImagePipeline, cache_config=config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, config, **kwargs):
    """Latents and statistics of one call with ``config``."""
    pipe.cache_config = config
    latents = pipe(**call_kwargs(**kwargs)).images
    return latents, pipe.cache_stats.to_dict()


@pytest.fixture(scope="module")
def pipe():
    return cached_pipe()


@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory):
    return save_tiny_qwenimage_pipeline(tmp_path_factory.mktemp("stock") / "tiny-qwenimage")


def directory_with_cache_config(stock_dir, path, content, weights=True):
    """A pipeline directory: links to ``stock_dir``'s files (or only its model_index.json) plus a cache_config.json."""
    path.mkdir()
    for name in os.listdir(stock_dir) if weights else ["model_index.json"]:
        os.symlink(os.path.join(stock_dir, name), path / name)
    text = content if isinstance(content, str) else json.dumps(content)
    (path / "cache_config.json").write_text(text)
    return path


# -- cache configs travel with models --------------------------------------------------------------------------------------
def test_save_pretrained_writes_the_cache_config_and_from_pretrained_reads_it(pipe, tmp_path):
    saved = tmp_path / "saved"
    expected, expected_stats = run(pipe, TEACACHE, steps=5)
    pipe.save_pretrained(saved)
    data = json.loads((saved / "cache_config.json").read_text())
    assert (saved / "model_index.json").is_file()
    assert data["method"] == "teacache" and data["rel_l1_thresh"] == 0.3 and data["max_continuous_cached_steps"] == 3

    loaded = CachedQwenImagePipeline.from_pretrained(saved)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.cache_config == TEACACHE
    assert torch.equal(loaded(**call_kwargs(steps=5)).images, expected)
    assert loaded.cache_stats.to_dict() == expected_stats

    # an explicit argument wins, and an explicit None means no caching
    assert CachedQwenImagePipeline.from_pretrained(saved, cache_config="fbcache").cache_config == FirstBlockCacheConfig()
    assert CachedQwenImagePipeline.from_pretrained(saved, cache_config=None).cache_config is None
    # stock diffusers ignores the file
    stock = DiffusionPipeline.from_pretrained(saved)
    assert type(stock) is QwenImagePipeline and type(stock.transformer) is QwenImageTransformer2DModel

    # saving with caching off removes the stale file: the directory loads uncached again
    pipe.cache_config = None
    pipe.save_pretrained(saved)
    assert not (saved / "cache_config.json").exists()
    assert CachedQwenImagePipeline.from_pretrained(saved).cache_config is None
    # ... unless told to leave it alone
    (saved / "cache_config.json").write_text(json.dumps(MagCacheConfig().to_dict()))
    pipe.save_pretrained(saved, save_cache_config=False)
    assert CachedQwenImagePipeline.from_pretrained(saved).cache_config == MagCacheConfig()


def test_a_directory_without_a_cache_config_loads_uncached(stock_dir):
    assert not os.path.exists(os.path.join(stock_dir, "cache_config.json"))
    assert CachedQwenImagePipeline.from_pretrained(stock_dir).cache_config is None


@pytest.mark.parametrize(
    "content, message",
    [
        ({"method": "fastest"}, r"unknown cache method 'fastest'"),
        ({"method": "teacache", "coefficients": [1.0, 2.0, 3.0]}, r"coefficients must have exactly 5 numbers"),
        ({"method": "teacache", "rel_l1_threshold": 0.2}, r"unknown field\(s\) rel_l1_threshold"),
        ({"rel_l1_thresh": 0.2}, r"needs a 'method' key"),
        ('{"method": "teacache",', r"not valid JSON"),
        ([1, 2], r"expected a JSON object"),
    ],
    ids=["method", "coefficients", "field", "no-method", "json", "not-object"],
)
def test_an_invalid_cache_config_file_fails_before_any_weight_is_loaded(stock_dir, tmp_path, content, message):
    # the directory has no weights at all: the error comes from reading cache_config.json, first
    directory = directory_with_cache_config(stock_dir, tmp_path / "bad", content, weights=False)
    path = re.escape(str(directory / "cache_config.json"))
    with pytest.raises(ValueError, match=rf"invalid cache config in {path}: .*{message}"):
        CachedQwenImagePipeline.from_pretrained(directory)


def test_a_cache_config_the_model_cannot_run_fails_at_load_naming_the_file(stock_dir, tmp_path):
    directory = directory_with_cache_config(stock_dir, tmp_path / "dbcache", {"method": "dbcache", "Fn": 8, "Bn": 4})
    path = re.escape(str(directory / "cache_config.json"))
    with pytest.raises(ValueError, match=rf"cache config in {path} cannot be used with CachedQwenImageTransformer2DModel: .*Fn \+ Bn"):
        CachedQwenImagePipeline.from_pretrained(directory)
    # the same file is fine when the caller overrides it
    assert CachedQwenImagePipeline.from_pretrained(directory, cache_config="none").cache_config is None


def test_klein_teacache_without_coefficients_in_the_directory_fails_at_load(tmp_path):
    from cached_diffusers import CachedFlux2KleinPipeline
    from cached_diffusers.tools.tiny import save_tiny_flux2_klein_pipeline

    directory = save_tiny_flux2_klein_pipeline(tmp_path / "klein")
    (directory / "cache_config.json").write_text(json.dumps({"method": "teacache", "rel_l1_thresh": 0.2}))
    path = re.escape(str(directory / "cache_config.json"))
    with pytest.raises(ValueError, match=rf"cache config in {path} cannot be used with CachedFlux2Transformer2DModel: .*no TeaCache coefficients"):
        CachedFlux2KleinPipeline.from_pretrained(directory)
    (directory / "cache_config.json").write_text(json.dumps(FirstBlockCacheConfig(residual_diff_threshold=0.2).to_dict()))
    assert CachedFlux2KleinPipeline.from_pretrained(directory).cache_config == FirstBlockCacheConfig(residual_diff_threshold=0.2)


def test_push_to_hub_uploads_the_cache_config_with_the_weights(pipe, tmp_path, monkeypatch):
    import diffusers.pipelines.pipeline_utils as pipeline_utils
    import diffusers.utils.hub_utils as hub_utils

    uploads = []

    def fake_upload(self, working_dir, repo_id, **kwargs):
        config = json.loads(open(os.path.join(working_dir, "cache_config.json")).read())
        uploads.append((repo_id, sorted(os.listdir(working_dir)), config))

    card = types.SimpleNamespace(save=lambda path: open(path, "w").write("card\n"))
    for module in (pipeline_utils, hub_utils):
        monkeypatch.setattr(module, "create_repo", lambda repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id))
        monkeypatch.setattr(module, "load_or_create_model_card", lambda *args, **kwargs: card)
        monkeypatch.setattr(module, "populate_model_card", lambda card, *args, **kwargs: card)
    monkeypatch.setattr(DiffusionPipeline, "_upload_folder", fake_upload)

    pipe.cache_config = TEACACHE
    pipe.save_pretrained(str(tmp_path / "repo"), push_to_hub=True, repo_id="me/tiny-qwenimage-teacache")
    pipe.push_to_hub("me/tiny-qwenimage-teacache")
    assert len(uploads) == 2
    for repo_id, files, config in uploads:
        assert repo_id == "me/tiny-qwenimage-teacache"
        assert {"cache_config.json", "model_index.json", "transformer"} <= set(files)
        assert hub.parse_cache_config(config, "upload") == TEACACHE


def test_from_pretrained_of_a_hub_id_fetches_the_cache_config(stock_dir, tmp_path, monkeypatch):
    from huggingface_hub.errors import EntryNotFoundError

    published = tmp_path / "hub" / "cache_config.json"
    published.parent.mkdir()
    published.write_text(json.dumps(MagCacheConfig(mag_threshold=0.1).to_dict()))
    requests = []

    def fake_download(repo_id, filename, **kwargs):
        requests.append((repo_id, filename, kwargs))
        if repo_id == "someone/without-cache-config":
            raise EntryNotFoundError("404")
        return str(published)

    monkeypatch.setattr(CachedQwenImagePipeline, "download", classmethod(lambda cls, name, **kwargs: str(stock_dir)))
    monkeypatch.setattr(hub, "_hf_hub_download", fake_download)
    loaded = CachedQwenImagePipeline.from_pretrained(
        "someone/tiny-qwenimage", revision="v1", cache_dir=str(tmp_path / "cache"), local_files_only=True
    )
    assert loaded.cache_config == MagCacheConfig(mag_threshold=0.1)
    assert requests == [
        (
            "someone/tiny-qwenimage",
            "cache_config.json",
            {"revision": "v1", "cache_dir": str(tmp_path / "cache"), "local_files_only": True},
        )
    ]
    assert CachedQwenImagePipeline.from_pretrained("someone/without-cache-config").cache_config is None
    assert CachedQwenImagePipeline.from_pretrained("someone/tiny-qwenimage", cache_config=None).cache_config is None
    assert len(requests) == 2  # an explicit cache_config does not look for the file


# -- progress and summaries ---------------------------------------------------------------------------------------------
def test_progress_bar_shows_reused_steps_as_they_happen(pipe):
    steps = 6
    output = io.StringIO()
    pipe.set_progress_bar_config(file=output, mininterval=0, miniters=1, ascii=True)
    try:
        pipe.cache_config = TEACACHE
        pipe(**call_kwargs(steps=steps))
        frames = re.findall(r"(\d+)/6 \[[^\]]*reused cond (\d+)/(\d+), uncond (\d+)/(\d+)\]", output.getvalue())
        stats = pipe.cache_stats
        seen = {}
        for done, cond, cond_calls, uncond, uncond_calls in frames:
            seen[int(done)] = (int(cond), int(cond_calls), int(uncond), int(uncond_calls))
        assert sorted(seen) == list(range(1, steps + 1))
        for done, (cond, cond_calls, uncond, uncond_calls) in seen.items():
            # at the bar's n-th update, the postfix counts the reuses among the first n steps of each branch
            assert cond_calls == uncond_calls == done
            assert cond == sum(r.reused for r in stats.branches["cond"].records[:done])
            assert uncond == sum(r.reused for r in stats.branches["uncond"].records[:done])
        assert seen[steps][0] == stats.branches["cond"].num_reused > 0

        output.seek(0)
        output.truncate(0)
        pipe.cache_config = None
        pipe(**call_kwargs(steps=3))
        assert "3/3" in output.getvalue() and "reused" not in output.getvalue()

        # iterable bars (used by other diffusers pipelines) get the postfix too
        output.seek(0)
        output.truncate(0)
        pipe.cache_config = TEACACHE
        records = pipe.cache_stats.branch("cond").records
        for step in pipe.progress_bar(range(3)):
            records.append(StepRecord(step, step == 1, "test", None, 0))
        assert "reused cond 1/3" in output.getvalue()
    finally:
        pipe.set_progress_bar_config(disable=True)


def test_one_call_summary_prints_per_branch_statistics(pipe):
    pipe.cache_config = TEACACHE
    pipe(**call_kwargs(steps=6))
    printed = io.StringIO()
    returned = pipe.cache_summary(file=printed)
    assert returned is pipe.cache_stats
    text = printed.getvalue()
    assert "config: TeaCacheConfig(max_continuous_cached_steps=3, rel_l1_thresh=0.3)" in text
    for name, branch in pipe.cache_stats.branches.items():
        assert re.search(rf"\| {name} +\| {branch.num_computed} +\| {branch.num_reused} +\|", text)
        assert f"{name}: reused steps {branch.reused_steps}; computed because: first-step 1" in text
    assert f"{100 * pipe.cache_stats.block_fraction:.1f}% of uncached" in text
    # the same from the transformer, or the statistics alone
    printed = io.StringIO()
    assert summary(pipe.transformer, file=printed) is pipe.cache_stats and "| cond" in printed.getvalue()
    pipe.cache_config = None
    pipe(**call_kwargs(steps=2))
    printed = io.StringIO()
    pipe.cache_summary(file=printed)
    assert "no cached transformer call recorded" in printed.getvalue()


# -- diffusers' own cache hooks -----------------------------------------------------------------------------------------
def test_diffusers_cache_hooks_are_refused_on_a_cached_transformer(pipe):
    from diffusers import FirstBlockCacheConfig as DiffusersFirstBlockCacheConfig
    from diffusers import TaylorSeerCacheConfig

    for ours in (TEACACHE, None):
        pipe.cache_config = ours
        for theirs in (DiffusersFirstBlockCacheConfig(threshold=0.1), TaylorSeerCacheConfig()):
            with pytest.raises(ValueError, match=r"caches denoising steps itself, through its cache_config .* would reuse steps twice"):
                pipe.transformer.enable_cache(theirs)
            assert not pipe.transformer.is_cache_enabled

    stock = QwenImageTransformer2DModel(**TRANSFORMER_CONFIG)
    stock.enable_cache(DiffusersFirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match=r"has diffusers' cache hooks enabled .*disable_cache"):
        CachedQwenImageTransformer2DModel.from_base(stock)
    stock.disable_cache()
    assert type(CachedQwenImageTransformer2DModel.from_base(stock)) is CachedQwenImageTransformer2DModel


# -- torch.compile ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # over 4 s
def test_torch_compile_of_the_whole_transformer_keeps_decisions_and_outputs():
    """torch.compile(transformer): with caching on, the cached forward (the parent's own, its block calls intercepted)
    runs eagerly, with the same decisions and outputs and no recompilation; with caching off it is compiled."""
    pipe = cached_pipe()
    expected, expected_stats = run(pipe, TEACACHE)
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    try:
        pipe.transformer = torch.compile(pipe.transformer, backend=backend)
        for call in range(2):
            latents, stats = run(pipe, TEACACHE)
            assert torch.equal(latents, expected)
            assert stats == expected_stats
            if call == 0:
                compiled = len(graphs)
        # nothing traced with caching on, and nothing more in the second generation: no per-step recompilation
        assert compiled == 0 and len(graphs) == 0
        pipe.cache_config = None
        pipe(**call_kwargs())
        assert 1 <= len(graphs) <= 8  # caching off: the parent's forward compiles (per CFG branch's text length)
    finally:
        torch._dynamo.reset()


def test_regional_compilation_of_the_blocks_keeps_decisions_and_outputs():
    """compile_repeated_blocks (inductor, one full graph per block type): same decisions, outputs within 1e-4."""
    pipe = cached_pipe()
    expected, expected_stats = run(pipe, TEACACHE, steps=5, cfg=False)
    assert 0 < sum(len(b["reused_steps"]) for b in expected_stats["branches"].values())
    torch._dynamo.reset()
    try:
        pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
        latents, stats = run(pipe, TEACACHE, steps=5, cfg=False)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    finally:
        torch._dynamo.reset()
    for name, branch in stats["branches"].items():
        assert branch["reused_steps"] == expected_stats["branches"][name]["reused_steps"]
        assert branch["computed_steps"] == expected_stats["branches"][name]["computed_steps"]
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)


# -- offloading ------------------------------------------------------------------------------------------------------------
def use_cpu_as_execution_device(pipe):
    """On a machine without an accelerator, run accelerate's offload hooks with execution device ``cpu``.

    diffusers builds the offload device as ``torch.device("cpu:0")``; with it accelerate 1.15's sequential-offload
    hooks put plain tensors where parameters were and fail on the next call (the stock pipeline fails the same way),
    an artifact of offloading from CPU to CPU. The hooks are diffusers' own; only their execution device is set.
    """
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for module in component.modules():
                hook = getattr(module, "_hf_hook", None)
                for h in getattr(hook, "hooks", [hook]):
                    if getattr(h, "execution_device", None) is not None:
                        h.execution_device = torch.device("cpu")


def offloaded_pipe(config, offload):
    """A fresh cached pipeline with ``config`` and CPU offloading: ``"model"`` (``enable_model_cpu_offload``) or
    ``"sequential"`` (``enable_sequential_cpu_offload``, executing on the CPU)."""
    offloaded = cached_pipe(config)
    if offload == "model":
        offloaded.enable_model_cpu_offload(device="cpu")
    else:
        offloaded.enable_sequential_cpu_offload(device="cpu")
        use_cpu_as_execution_device(offloaded)
    return offloaded


@pytest.mark.parametrize("config", [TEACACHE, DBCACHE], ids=["teacache", "dbcache-front-back"])
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_cpu_offloading_keeps_decisions_and_outputs(pipe, config, offload):
    expected, expected_stats = run(pipe, config)
    offloaded = offloaded_pipe(config, offload)
    assert hasattr(offloaded.transformer, "_hf_hook")
    assert type(offloaded.transformer) is CachedQwenImageTransformer2DModel
    for _ in range(2):  # the second call runs on the hooks that maybe_free_model_hooks re-installed
        latents, stats = run(offloaded, config)
        assert torch.equal(latents, expected)
        assert stats == expected_stats
    if offload == "sequential":
        assert offloaded.transformer.transformer_blocks[0].img_mod[1].weight.device.type == "meta"


def batch_of_two(**overrides):
    """Call arguments for a batch of two prompts, sample ``i`` drawn with its own generator (seed ``i``)."""
    prompts = ["a red cat sitting on a blue chair", "a white castle on a hill at sunset"]
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    return call_kwargs(prompt=prompts, negative_prompt=[" "] * 2, generator=generators, **overrides)


def mixing_fbcache(pipe):
    """FBCache with its threshold between the two samples' cond residual differences at the first step where they
    differ, from a probe run that never reuses: at that step one sample reuses and the other computes."""
    pipe.cache_config = FirstBlockCacheConfig(residual_diff_threshold=0.0, max_warmup_steps=1)
    pipe(**batch_of_two())
    samples = pipe.cache_stats.branches["cond"].samples
    for step in sorted(samples[0].values):
        low, high = sorted(s.values.get(step, 0.0) for s in samples)
        if low > 0 and high > low * (1 + 1e-3):
            return FirstBlockCacheConfig(residual_diff_threshold=(low * high) ** 0.5, max_warmup_steps=1)
    raise AssertionError(f"the samples' values never differ: {[s.values for s in samples]}")


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_cpu_offloading_keeps_a_mixed_step_per_sample(pipe, offload):
    """A batch whose samples disagree at a step (one computes, the other reuses, rows gathered and scattered): the
    offloaded pipeline gives the latents and per-sample statistics of the same call without offloading."""
    config = mixing_fbcache(pipe)
    pipe.cache_config = config
    expected = pipe(**batch_of_two()).images
    expected_stats = pipe.cache_stats.to_dict()
    samples = pipe.cache_stats.branches["cond"].samples
    assert len(samples) == 2 and samples[0].reused_steps != samples[1].reused_steps  # a mixed step happened
    offloaded = offloaded_pipe(config, offload)
    for _ in range(2):  # the second call runs on the hooks that maybe_free_model_hooks re-installed
        latents = offloaded(**batch_of_two()).images
        assert torch.equal(latents, expected)
        assert offloaded.cache_stats.to_dict() == expected_stats
    if offload == "sequential":
        assert offloaded.transformer.transformer_blocks[0].img_mod[1].weight.device.type == "meta"


# -- LoRA --------------------------------------------------------------------------------------------------------------------
def write_lora(transformer, path, targets, rank=4, seed=1):
    """A LoRA in diffusers' format (``transformer.<module>.lora_A/B.weight``) for the Linear layers named ``targets``."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets:
            state_dict[f"transformer.{name}.lora_A.weight"] = 0.2 * torch.randn(rank, module.in_features, generator=generator)
            state_dict[f"transformer.{name}.lora_B.weight"] = 0.2 * torch.randn(module.out_features, rank, generator=generator)
    assert state_dict
    path.mkdir()
    save_file(state_dict, str(path / "pytorch_lora_weights.safetensors"))
    return path


def check_lora(cached, stock, cached_class, config, lora, kwargs):
    """LoRA through load_lora_weights on a cached pipeline: the stock result uncached, and while caching, the same
    steps and latents as the stock pipeline with the same LoRA made cached afterwards."""
    cached.cache_config = None
    without_lora = cached(**kwargs()).images
    cached.cache_config = config
    cached_without_lora = cached(**kwargs()).images

    cached.load_lora_weights(lora)
    stock.load_lora_weights(lora)
    cached.cache_config = None
    with_lora = cached(**kwargs()).images
    assert torch.equal(with_lora, stock(**kwargs()).images)
    assert not torch.allclose(with_lora, without_lora, atol=1e-3)

    cached.cache_config = config
    latents = cached(**kwargs()).images
    stats = cached.cache_stats
    assert stats.num_reused > 0
    assert not torch.allclose(latents, cached_without_lora, atol=1e-3)
    # the LoRA scale reaches the adapters through the cached forward: scale 0 is the run without LoRA
    assert torch.equal(cached(**kwargs(attention_kwargs={"scale": 0.0})).images, cached_without_lora)

    late = cached_class(**stock.components, cache_config=config)  # LoRA loaded first, then made cached
    late.set_progress_bar_config(disable=True)
    assert torch.equal(late(**kwargs()).images, latents)
    assert late.cache_stats.to_dict() == stats.to_dict()


def test_lora_loading_on_the_cached_qwenimage_pipeline(tmp_path):
    cached = cached_pipe()
    stock = build_tiny_qwenimage_pipeline(seed=0)
    stock.set_progress_bar_config(disable=True)
    lora = write_lora(cached.transformer, tmp_path / "lora", targets=("to_q", "to_k", "to_v", "add_q_proj", "add_v_proj"))
    check_lora(cached, stock, CachedQwenImagePipeline, TEACACHE, lora, lambda **extra: call_kwargs(steps=6, **extra))


def test_lora_loading_on_the_cached_flux2_klein_pipeline(tmp_path):
    from cached_diffusers import CachedFlux2KleinPipeline
    from cached_diffusers.tools.tiny import build_tiny_flux2_klein_pipeline

    cached = build_tiny_flux2_klein_pipeline(seed=0, pipeline_class=CachedFlux2KleinPipeline)
    stock = build_tiny_flux2_klein_pipeline(seed=0)
    for p in (cached, stock):
        p.set_progress_bar_config(disable=True)
    lora = write_lora(cached.transformer, tmp_path / "lora", targets=("to_q", "to_k", "to_v", "to_qkv_mlp_proj"))

    def kwargs(**extra):
        return dict(
            prompt="a red cat sitting on a blue chair",
            guidance_scale=4.0,
            num_inference_steps=5,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            max_sequence_length=64,
            height=64,
            width=64,
            **extra,
        )

    config = FirstBlockCacheConfig(residual_diff_threshold=10.0, max_continuous_cached_steps=2)
    check_lora(cached, stock, CachedFlux2KleinPipeline, config, lora, kwargs)
