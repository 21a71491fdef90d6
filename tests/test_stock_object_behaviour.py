"""Cached transformers and pipelines behave as the stock diffusers objects do (issue 23, "Objects that must behave as
the stock ones do"): copies (``copy.deepcopy``, ``pickle``, ``torch.save``) that own their cache state, a stock
transformer assigned to a cached pipeline, ``from_pipe`` back to the stock class, directories whose
``model_index.json`` names a cached class, ``torch.compile(fullgraph=True)`` of a never-called transformer,
``cache_config`` validated before any weight loads, and attribute errors that keep their cause."""

import copy
import io
import pickle

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    Flux2Transformer2DModel,
    QwenImagePipeline,
)

from cached_diffusers import (
    CachedBagelPipeline,
    CachedBagelTransformer2DModel,
    CachedDiffusionPipeline,
    CachedFlux2KleinPipeline,
    CachedFlux2Transformer2DModel,
    CachedHunyuanImage3Pipeline,
    CachedHunyuanImage3Transformer2DModel,
    CachedQwenImagePipeline,
    CachedQwenImageTransformer2DModel,
    TeaCacheConfig,
)
from cached_diffusers.engine import CacheEngine
from cached_diffusers.model_mixin import CachedTransformerMixin, diffusers_parent
from cached_diffusers.models.bagel import load_official_transformer
from cached_diffusers.tools.tiny import (
    FLUX2_KLEIN_TRANSFORMER_CONFIG,
    TRANSFORMER_CONFIG,
    build_tiny_flux2_klein_components,
    build_tiny_qwenimage_components,
)
from families import CASES_BY_NAME, LINEAR
from reference import reference_dir

STEPS = 4
TEACACHE = TeaCacheConfig(rel_l1_thresh=0.3)
KLEIN_TEACACHE = TeaCacheConfig(rel_l1_thresh=0.3, coefficients=LINEAR)


# -- tiny transformers of every family, and one forward of each ------------------------------------------------------
def qwen_transformer(cls=CachedQwenImageTransformer2DModel):
    torch.manual_seed(0)
    return cls(**{**TRANSFORMER_CONFIG, "num_layers": 2}).eval()


def qwen_step(model, step, steps=STEPS):
    g = torch.Generator().manual_seed(0)
    channels, text_dim = TRANSFORMER_CONFIG["in_channels"], TRANSFORMER_CONFIG["joint_attention_dim"]
    noise, data = torch.randn(1, 16, channels, generator=g), torch.randn(1, 16, channels, generator=g)
    sigma = 1.0 - step / steps
    return model(
        hidden_states=sigma * noise + (1 - sigma) * data,
        encoder_hidden_states=torch.randn(1, 5, text_dim, generator=g),
        encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.long),
        timestep=torch.tensor([sigma]),
        img_shapes=[[(1, 4, 4)]],
        return_dict=False,
    )[0]


def klein_transformer(cls=CachedFlux2Transformer2DModel):
    torch.manual_seed(0)
    return cls(**FLUX2_KLEIN_TRANSFORMER_CONFIG).eval()


def klein_step(model, step, steps=STEPS):
    g = torch.Generator().manual_seed(0)
    config = FLUX2_KLEIN_TRANSFORMER_CONFIG
    channels, text_dim = config["in_channels"], config["joint_attention_dim"]
    noise, data = torch.randn(1, 16, channels, generator=g), torch.randn(1, 16, channels, generator=g)
    sigma = 1.0 - step / steps
    img_ids = torch.cartesian_prod(torch.tensor([0]), torch.arange(4), torch.arange(4), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(5))
    return model(
        hidden_states=sigma * noise + (1 - sigma) * data,
        encoder_hidden_states=torch.randn(1, 5, text_dim, generator=g),
        timestep=torch.tensor([sigma]),
        img_ids=img_ids[None],
        txt_ids=txt_ids[None],
        guidance=None,
        return_dict=False,
    )[0]


def bagel_transformer():
    model, _ = load_official_transformer(
        reference_dir("bagel-tiny") / "checkpoint", vision_start_token_id=309, vision_end_token_id=310,
        model_class=CachedBagelTransformer2DModel,
    )
    return model.eval()


def bagel_step(model, step, steps=STEPS):
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(1))
    return model(x, torch.tensor(1.0 - step / steps), model.prefill(torch.tensor([[301, 64, 266, 302]])), (2, 3)).sample


def hunyuan_transformer():
    return CachedHunyuanImage3Transformer2DModel.from_pretrained(
        reference_dir("hunyuanimage3-tiny") / "checkpoint", dtype=torch.float32
    ).eval()


TRANSFORMERS = {
    "qwenimage": (qwen_transformer, qwen_step, TEACACHE),
    "flux2-klein": (klein_transformer, klein_step, KLEIN_TEACACHE),
    "bagel": (bagel_transformer, bagel_step, TEACACHE),
    "hunyuanimage3": (hunyuan_transformer, None, TEACACHE),
}


def teacache(case):
    """A TeaCache config the case's transformer runs (the FLUX.2 cases have no published coefficients)."""
    coefficients = case.teacache_coefficients
    return TeaCacheConfig(rel_l1_thresh=0.3, coefficients=coefficients) if coefficients else TEACACHE


def run_steps(model, step_fn, steps):
    """Drive the transformer directly through ``steps`` (indices) of a ``STEPS``-step loop; the outputs."""
    outs = []
    with torch.no_grad():
        for i in steps:
            with model.cache_context("cond", step_index=i, num_inference_steps=STEPS):
                outs.append(step_fn(model, i))
    return outs


# -- 1. copies: deepcopy, pickle, torch.save -------------------------------------------------------------------------
def round_trips(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return {
        "deepcopy": copy.deepcopy(model),
        "pickle": pickle.loads(pickle.dumps(model)),
        "torch.save": torch.load(buffer, weights_only=False),
    }


@pytest.mark.parametrize("caching", [False, True], ids=["caching-off", "caching-on"])
@pytest.mark.parametrize("family", list(TRANSFORMERS))
def test_a_cached_transformer_copies_pickles_and_saves_with_a_cache_of_its_own(family, caching):
    build, _, config = TRANSFORMERS[family]
    model = build()
    model.cache_config = config if caching else None
    for how, clone in round_trips(model).items():
        assert type(clone) is type(model), how
        assert clone.cache_config == model.cache_config, how
        assert clone.cache_engine is not model.cache_engine, how
        for (name, a), (_, b) in zip(model.state_dict().items(), clone.state_dict().items()):
            assert torch.equal(a, b), (how, name)
        clone.cache_config = None if caching else config
        assert model.cache_config == (config if caching else None), how


@pytest.mark.parametrize("family", ["qwenimage", "flux2-klein", "bagel"])
def test_a_copy_made_mid_generation_runs_identically_and_owns_its_cache_state(family):
    build, step_fn, config = TRANSFORMERS[family]
    model = build()
    model.cache_config = config
    run_steps(model, step_fn, range(2))
    clone = copy.deepcopy(model)
    before = model.cache_stats.to_dict()
    copied = run_steps(clone, step_fn, range(2, STEPS))
    assert model.cache_stats.to_dict() == before  # running the copy leaves the original's state alone
    assert clone.cache_stats.to_dict() != before
    original = run_steps(model, step_fn, range(2, STEPS))
    for a, b in zip(original, copied):
        assert torch.equal(a, b)
    assert clone.cache_stats.to_dict() == model.cache_stats.to_dict()


@pytest.mark.parametrize("case", ["qwen-txt2img", "flux2-klein"])
def test_a_deep_copied_pipeline_generates_identically_with_its_own_cache(case):
    case = CASES_BY_NAME[case]
    config = teacache(case)
    pipe = case.cached(**case.components(), cache_config=config)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(**case.inputs(steps=STEPS)).images
    stats = pipe.cache_stats.to_dict()
    clone = copy.deepcopy(pipe)
    assert clone.transformer is not pipe.transformer and clone.cache_config == pipe.cache_config
    assert torch.equal(clone(**case.inputs(steps=STEPS)).images, expected)
    assert clone.cache_stats.to_dict() == stats
    clone.cache_config = None
    assert pipe.cache_config == config and pipe.transformer.cache_config == config
    assert torch.equal(pipe(**case.inputs(steps=STEPS)).images, expected)


@pytest.mark.parametrize("cls", [CachedBagelPipeline, CachedHunyuanImage3Pipeline])
def test_the_bagel_and_hunyuanimage3_pipelines_deep_copy(cls):
    name = "bagel-tiny" if cls is CachedBagelPipeline else "hunyuanimage3-tiny"
    pipe = cls.from_pretrained(reference_dir(name) / "checkpoint", cache_config=TEACACHE)
    clone = copy.deepcopy(pipe)
    assert type(clone) is cls and clone.cache_config == TEACACHE
    assert clone.transformer.cache_engine is not pipe.transformer.cache_engine
    clone.cache_config = None
    assert pipe.cache_config == TEACACHE and pipe.transformer.cache_config == TEACACHE


def test_the_engine_copy_drops_no_config_and_shares_no_state():
    engine = qwen_transformer().cache_engine
    engine.config = TEACACHE
    with engine.generation():  # an open generation is the caller's, not the engine's: the copy has none
        clone = copy.deepcopy(engine)
    assert isinstance(clone, CacheEngine) and clone.config == TEACACHE and clone._open_caching == 0
    assert clone._own is not engine._own and clone._own.branches is not engine._own.branches
    with clone.generation():  # its lock works
        assert clone.active


# -- 2. a stock transformer assigned to a cached pipeline ----------------------------------------------------------
@pytest.mark.parametrize("how", ["setattr", "register_modules"])
@pytest.mark.parametrize("case", ["qwen-txt2img", "flux2-klein"])
def test_a_stock_transformer_assigned_to_a_cached_pipeline_is_converted_in_place(case, how):
    case = CASES_BY_NAME[case]
    components = case.components()
    stock = case.stock(**components)
    stock.set_progress_bar_config(disable=True)
    expected = stock(**case.inputs(steps=STEPS)).images
    other = case.components()
    pipe = case.cached(**other, cache_config=None)
    pipe.set_progress_bar_config(disable=True)
    transformer = components["transformer"]
    if how == "setattr":
        pipe.transformer = transformer
    else:
        pipe.register_modules(transformer=transformer)
    assert pipe.transformer is transformer and isinstance(transformer, case.cached.cached_transformer_class)
    assert torch.equal(pipe(**case.inputs(steps=STEPS)).images, expected)
    config = teacache(case)
    pipe.cache_config = config
    pipe.transformer = other["transformer"]  # a swap keeps the pipeline's config and applies it
    assert pipe.cache_config == config and pipe.transformer.cache_config == config
    pipe(**case.inputs(steps=STEPS))
    assert pipe.cache_stats.method == "teacache" and pipe.cache_stats.num_computed > 0


def test_a_transformer_of_another_model_is_refused_at_assignment_naming_the_expected_class():
    pipe = CachedQwenImagePipeline(**build_tiny_qwenimage_components())
    before = pipe.transformer
    with pytest.raises(TypeError, match="transformer.*QwenImageTransformer2DModel.*Flux2Transformer2DModel"):
        pipe.transformer = klein_transformer(Flux2Transformer2DModel)
    with pytest.raises(TypeError, match="QwenImageTransformer2DModel"):
        pipe.register_modules(transformer=klein_transformer(Flux2Transformer2DModel))
    assert pipe.transformer is before


# -- 3. from_pipe back to the stock class --------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["qwen-txt2img", "flux2-klein"])
def test_from_pipe_of_a_cached_pipeline_to_its_stock_class_needs_no_argument(case):
    case = CASES_BY_NAME[case]
    cached = case.cached(**case.components(), cache_config=None)
    cached.set_progress_bar_config(disable=True)
    expected = cached(**case.inputs(steps=STEPS)).images
    config = teacache(case)
    cached.cache_config = config
    stock = case.stock.from_pipe(cached)
    stock.set_progress_bar_config(disable=True)
    assert type(stock.transformer) is diffusers_parent(type(cached.transformer), CachedTransformerMixin)
    assert next(stock.transformer.parameters()) is next(cached.transformer.parameters())  # shared, not copied
    assert torch.equal(stock(**case.inputs(steps=STEPS)).images, expected)
    assert cached.cache_config == config and cached.transformer.cache_config == config
    assert type(cached.transformer) is case.cached.cached_transformer_class
    assert cached.components["transformer"] is cached.transformer  # components unchanged elsewhere


# -- 4. a directory whose model_index.json names a cached class ---------------------------------------------------
@pytest.mark.parametrize("case", ["qwen-txt2img", "flux2-klein"])
def test_a_directory_saved_by_a_stock_pipeline_of_cached_components_loads(case, tmp_path):
    case = CASES_BY_NAME[case]
    cached = case.cached(**case.components())
    cached.save_pretrained(tmp_path / "ours")  # the ordinary round trip (FLUX.2 [klein]'s is exact within 4e-6 only)
    reference = case.cached.from_pretrained(tmp_path / "ours")
    reference.set_progress_bar_config(disable=True)
    expected = reference(**case.inputs(steps=STEPS)).images
    case.stock(**cached.components).save_pretrained(tmp_path / "stock")
    assert "Cached" in (tmp_path / "stock" / "model_index.json").read_text()  # what stock diffusers writes
    for loader in (case.cached, CachedDiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path / "stock")
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is case.cached and type(loaded.transformer) is case.cached.cached_transformer_class
        assert torch.equal(loaded(**case.inputs(steps=STEPS)).images, expected)


# -- 5. torch.compile(fullgraph=True) of a transformer never called --------------------------------------------------
@pytest.mark.parametrize("family", ["qwenimage", "flux2-klein"])
def test_fullgraph_compile_of_a_fresh_cached_transformer_with_caching_off(family):
    build, step_fn, _ = TRANSFORMERS[family]
    model = build()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad():
            out = step_fn(compiled, 0)
    finally:
        torch._dynamo.reset()
    with torch.no_grad():
        assert torch.equal(out, step_fn(model, 0))


# -- 6. an invalid cache_config is refused before any weight loads --------------------------------------------------
@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("stock")
    QwenImagePipeline(**build_tiny_qwenimage_components()).save_pretrained(path)
    return path


@pytest.mark.parametrize("loader", [CachedQwenImagePipeline, CachedDiffusionPipeline])
@pytest.mark.parametrize(
    "value, field",
    [({"method": "teacache", "rel_l1_thresh": 0.2, "bogus": 1}, "bogus"), ({"method": "warpcache"}, "warpcache"),
     ("teacache-fast", "teacache-fast")],
)
def test_an_invalid_cache_config_argument_fails_before_any_weight_is_loaded(stock_dir, monkeypatch, loader, value,
                                                                          field):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the cache_config was checked")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(refuse))
    with pytest.raises(ValueError, match=field):
        loader.from_pretrained(stock_dir, cache_config=value)


# -- 7. attribute errors inside our properties keep their cause -----------------------------------------------------
def test_an_attribute_error_inside_a_cached_model_property_keeps_its_cause(monkeypatch):
    model = qwen_transformer()
    model.__dict__.pop("_cache_engine", None)  # as if never created: the property builds it from num_cache_blocks

    def broken(self):
        return self.no_such_submodule

    monkeypatch.setattr(CachedQwenImageTransformer2DModel, "num_cache_blocks", property(broken))
    with pytest.raises(RuntimeError, match="no_such_submodule") as info:
        model.cache_engine
    assert isinstance(info.value.__cause__, AttributeError)
    with pytest.raises(RuntimeError, match="num_cache_blocks.*no_such_submodule"):
        model.num_cache_blocks
    assert not hasattr(model, "no_such_attribute")  # a missing attribute is still an AttributeError


def test_an_attribute_error_inside_the_engine_surfaces_through_cache_config(monkeypatch):
    model = qwen_transformer()
    pipe = CachedQwenImagePipeline(**{**build_tiny_qwenimage_components(), "transformer": model})

    def broken(self):
        raise AttributeError("'CacheEngine' object has no attribute '_own_config'")

    monkeypatch.setattr(CacheEngine, "config", property(broken))
    with pytest.raises(RuntimeError, match="cache_config.*_own_config") as info:
        model.cache_config
    assert isinstance(info.value.__cause__, AttributeError)
    monkeypatch.setattr(CacheEngine, "stats", property(broken))
    with pytest.raises(RuntimeError, match="cache_stats.*_own_config"):
        pipe.cache_stats
