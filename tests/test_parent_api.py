"""The parents' API on the cached pipelines, as diffusers' own pipeline tests exercise it (written here, not copied):
call options (num_images_per_prompt, CFG, step callbacks and their tensor inputs), torch.compile of the transformer
with caching off, from_pipe in both directions, saving and loading (model_index.json, transformer=None), and the
registry that maps diffusers pipelines to cached classes."""

import inspect
import json

import diffusers
import pytest
import torch

import cached_diffusers as cd
from cached_diffusers import DBCacheConfig, TaylorSeerConfig
from cached_diffusers.model_mixin import CachedTransformerMixin

from families import CASES_BY_NAME, small_working_sizes


def images(pipe, case, **overrides):
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(1234)
    with small_working_sizes():
        return pipe(**case.inputs(**overrides)).images


REUSING = DBCacheConfig(Fn=1, Bn=0, residual_diff_threshold=100.0, max_warmup_steps=1)


@pytest.fixture(scope="module")
def qwen_edit():
    case = CASES_BY_NAME["qwen-edit"]
    stock = case.stock(**case.components())
    return case, stock, case.cached.from_pipe(stock)


@pytest.fixture(scope="module")
def klein_inpaint():
    case = CASES_BY_NAME["flux2-klein-inpaint"]
    stock = case.stock(**case.components())
    return case, stock, case.cached.from_pipe(stock)


@pytest.fixture(params=["qwen_edit", "klein_inpaint"])
def trio(request):
    case, stock, cached = request.getfixturevalue(request.param)
    cached.cache_config = None
    yield case, stock, cached
    cached.cache_config = None


def test_num_images_per_prompt(trio):
    case, stock, cached = trio
    one = images(cached, case, num_images_per_prompt=1)
    two = images(cached, case, num_images_per_prompt=2)
    assert two.shape[0] == 2 * one.shape[0]
    assert torch.equal(two, images(stock, case, num_images_per_prompt=2))
    cached.cache_config = REUSING
    two_cached = images(cached, case, num_images_per_prompt=2)
    assert two_cached.shape == two.shape
    for branch in cached.cache_stats.branches.values():  # one call per step and branch, the images batched in it
        assert branch.num_reused > 0 and len(branch.records) == len({r.step for r in branch.records})


def test_guidance_changes_the_output_as_on_the_parent(trio):
    case, stock, cached = trio
    with_cfg, without_cfg = images(cached, case, cfg=True), images(cached, case, cfg=False)
    assert not torch.allclose(with_cfg, without_cfg)
    assert torch.equal(with_cfg, images(stock, case, cfg=True))
    assert torch.equal(without_cfg, images(stock, case, cfg=False))
    cached.cache_config = REUSING
    images(cached, case, cfg=False)
    assert list(cached.cache_stats.branches) == ["cond"]
    images(cached, case, cfg=True)
    assert list(cached.cache_stats.branches) == ["cond", "uncond"]


@pytest.mark.parametrize("caching", [False, True])
def test_step_callbacks_get_every_tensor_input_and_can_change_latents(trio, caching):
    case, stock, cached = trio
    names = list(case.stock._callback_tensor_inputs)
    assert list(cached._callback_tensor_inputs) == names
    seen = []

    def record(pipe, i, t, kwargs):
        assert set(kwargs) == set(names)
        seen.append(i)
        return kwargs

    cached.cache_config = REUSING if caching else None
    images(cached, case, callback_on_step_end=record, callback_on_step_end_tensor_inputs=names)
    assert seen and seen == list(range(len(seen)))

    def zero_last(pipe, i, t, kwargs):
        if i == pipe.num_timesteps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    changed = images(cached, case, callback_on_step_end=zero_last, callback_on_step_end_tensor_inputs=["latents"])
    cached.cache_config = None
    assert torch.equal(
        changed if not caching else images(cached, case, callback_on_step_end=zero_last,
                                           callback_on_step_end_tensor_inputs=["latents"]),
        images(stock, case, callback_on_step_end=zero_last, callback_on_step_end_tensor_inputs=["latents"]),
    )
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        images(cached, case, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["not_a_tensor"])


@pytest.mark.parametrize("name", ["qwen-txt2img", "flux2-klein"])
@pytest.mark.slow  # over 4 s
def test_fullgraph_compile_with_caching_off(name):
    case = CASES_BY_NAME[name]
    pipe = case.cached(**case.components())
    eager = images(pipe, case, steps=2)
    torch._dynamo.reset()
    try:
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
        compiled = images(pipe, case, steps=2)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)


def test_from_pipe_in_both_directions_leaves_the_source_alone():
    base = CASES_BY_NAME["qwen-txt2img"]
    edit = CASES_BY_NAME["qwen-edit"]
    components = edit.components()
    stock = diffusers.QwenImagePipeline(**{k: v for k, v in components.items() if k != "processor"})
    transformer = stock.transformer
    cached = cd.CachedQwenImageImg2ImgPipeline.from_pipe(stock, cache_config=REUSING)
    assert type(stock.transformer) is diffusers.QwenImageTransformer2DModel and stock.transformer is transformer
    assert stock.transformer.transformer_blocks is cached.transformer.transformer_blocks  # shared, not copied
    assert not hasattr(stock.transformer, "_cache_engine")
    assert cached.cache_config == REUSING
    expected = images(stock, base)

    # cached -> cached shares the cached transformer and its config
    edit_pipe = cd.CachedQwenImageEditPipeline.from_pipe(cached, processor=components["processor"])
    assert edit_pipe.transformer.transformer_blocks is cached.transformer.transformer_blocks
    assert edit_pipe.cache_config == REUSING
    edit_pipe.cache_config = None  # a cache of its own
    assert cached.cache_config == REUSING
    other = cd.CachedQwenImagePipeline.from_pipe(cached, cache_config=TaylorSeerConfig())
    assert isinstance(other.cache_config, TaylorSeerConfig) and cached.cache_config == REUSING
    # cached -> stock: the transformer as a stock view runs stock while the source keeps caching
    back = diffusers.QwenImagePipeline.from_pipe(cached, transformer=cached.transformer.stock_view())
    assert type(back) is diffusers.QwenImagePipeline and type(back.transformer) is diffusers.QwenImageTransformer2DModel
    assert back.transformer.transformer_blocks is cached.transformer.transformer_blocks
    assert torch.equal(images(back, base), expected)
    assert cached.cache_config == REUSING and type(cached.transformer) is cd.CachedQwenImageTransformer2DModel
    cached.cache_config = None
    assert torch.equal(images(cd.CachedQwenImagePipeline.from_pipe(cached), base), expected)


def test_a_pipeline_built_from_a_cached_transformer_saves_a_stock_directory(tmp_path):
    case = CASES_BY_NAME["qwen-txt2img"]
    first = case.cached(**case.components(), cache_config=REUSING)
    assert isinstance(first.transformer, CachedTransformerMixin)
    again = cd.CachedQwenImagePipeline(**first.components)  # the transformer is already cached here
    again.cache_config = REUSING
    again.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    assert all(not str(v).startswith("cached") for entry in index.values() if isinstance(entry, list) for v in entry)
    stock = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(stock) is diffusers.QwenImagePipeline and type(stock.transformer) is diffusers.QwenImageTransformer2DModel
    loaded = cd.CachedDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(loaded) is cd.CachedQwenImagePipeline and loaded.cache_config == REUSING
    encoder_only = cd.CachedQwenImagePipeline.from_pretrained(tmp_path / "saved", transformer=None)
    assert encoder_only.transformer is None and encoder_only.cache_config is None
    embeds, mask = encoder_only.encode_prompt("a red cat", device="cpu")
    assert embeds.ndim == 3 and embeds.shape[0] == 1 and (mask is None or mask.shape == embeds.shape[:2])


def test_the_registry_maps_every_supported_diffusers_pipeline(tmp_path):
    supported = cd.supported_pipelines()
    for name in ["QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline", "QwenImageEditPipeline",
                 "QwenImageEditInpaintPipeline", "QwenImageEditPlusPipeline", "QwenImageControlNetPipeline",
                 "QwenImageControlNetInpaintPipeline", "QwenImageLayeredPipeline", "Flux2Pipeline",
                 "Flux2KleinPipeline", "Flux2KleinKVPipeline", "Flux2KleinInpaintPipeline"]:
        cls = supported[name]
        assert cls.__mro__[2] is getattr(diffusers, name) and cd.cached_pipeline_class(name) is cls
        assert cd.cached_pipeline_class(cls.__name__) is cls
        assert getattr(cd, cls.__name__) is cls
    with pytest.raises(ValueError, match=r"no cached pipeline for 'StableDiffusionPipeline'.*QwenImageEditPipeline"):
        cd.cached_pipeline_class("StableDiffusionPipeline")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match=r"other: no cached pipeline for 'FluxPipeline'.*Flux2KleinInpaintPipeline"):
        cd.CachedDiffusionPipeline.from_pretrained(tmp_path / "other")
    with pytest.raises(EnvironmentError, match="from_pretrained"):
        cd.CachedDiffusionPipeline()


def test_a_stock_img2img_directory_opens_as_the_cached_img2img_pipeline(tmp_path):
    case = CASES_BY_NAME["qwen-img2img"]
    stock = case.stock(**case.components())
    stock.save_pretrained(tmp_path / "img2img")
    pipe = cd.CachedDiffusionPipeline.from_pretrained(tmp_path / "img2img", cache_config=TaylorSeerConfig())
    assert type(pipe) is cd.CachedQwenImageImg2ImgPipeline and isinstance(pipe.cache_config, TaylorSeerConfig)
    pipe.cache_config = None
    assert torch.equal(images(pipe, case), images(stock, case))


@pytest.mark.parametrize(
    "name, targets, config",
    [
        ("qwen-edit", ("to_q", "to_k", "to_v", "add_q_proj", "add_v_proj"), REUSING),
        ("flux2-klein-inpaint", ("to_q", "to_k", "to_v", "to_qkv_mlp_proj"), REUSING),
    ],
)
def test_lora_loading_on_new_pipeline_families(tmp_path, name, targets, config):
    """diffusers' LoRA tests find the LoRA-scale argument in the call signature; then load_lora_weights works as on
    the stock pipeline, uncached and cached (the checks of tests/test_ecosystem.py, on an edit and an inpaint
    pipeline)."""
    from test_ecosystem import check_lora, write_lora

    case = CASES_BY_NAME[name]
    parameters = inspect.signature(case.cached.__call__).parameters
    assert "attention_kwargs" in parameters
    cached, stock = case.cached(**case.components()), case.stock(**case.components())
    for pipe in (cached, stock):
        pipe.set_progress_bar_config(disable=True)
    lora = write_lora(cached.transformer, tmp_path / "lora", targets=targets)

    def kwargs(**extra):
        torch.manual_seed(1234)
        return case.inputs(steps=5, **extra)

    with small_working_sizes():
        check_lora(cached, stock, case.cached, config, lora, kwargs)


def test_fullgraph_compile_with_caching_on_is_refused_with_the_reason():
    case = CASES_BY_NAME["flux2-klein"]
    pipe = case.cached(**case.components(), cache_config=REUSING)
    torch._dynamo.reset()
    try:
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
        with pytest.raises(Exception, match=r"with caching on the transformer cannot be compiled with fullgraph=True"):
            images(pipe, case, steps=2)
    finally:
        torch._dynamo.reset()
