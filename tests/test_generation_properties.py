"""Property: any sequence of generations on long-lived pipelines that share a transformer gives, call by call, exactly
what a fresh pipeline gives with the same arguments, and the engine holds no more memory at the end than after the
first call.

Hypothesis draws the sequences: model (Qwen-Image, FLUX.2 [klein], tiny), which of two pipelines sharing the
transformer runs, the cache method and its parameters (switched between calls), 1-30 steps (mostly few), image
size, prompts, ``num_images_per_prompt``, CFG on or off, and callbacks that replace or edit the latents, change the
schedule, raise, or do nothing. Bounded (``max_examples``, derandomized) to run in about a minute on one CPU thread.
"""

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cached_diffusers import (
    CachedFlux2KleinPipeline,
    CachedQwenImagePipeline,
    DBCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    SeaCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from cached_diffusers.engine import _OPEN_GENERATIONS, Generation
from cached_diffusers.pipeline_mixin import _BUSY
from cached_diffusers.registry import cache_method
from cached_diffusers.tools.tiny import (
    TRANSFORMER_CONFIG,
    build_tiny_flux2_klein_components,
    build_tiny_qwenimage_components,
)
from conftest import matrix_methods

pytestmark = pytest.mark.slow  # hypothesis sequences of whole generations: left out of the fast set (-m "not slow")

SEQUENCE_LENGTH = 52
MAX_EXAMPLES = 4  # 4 sequences of 52 generations: 208 generations, each checked against a fresh pipeline
CACHE_BLOCKS = 3  # Qwen-Image below: 3 blocks; Klein: 2 double-stream + 4 single-stream


class CallbackError(Exception):
    pass


def qwen_components():
    from diffusers import QwenImageTransformer2DModel

    components = build_tiny_qwenimage_components()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        components["transformer"] = QwenImageTransformer2DModel(
            **{**TRANSFORMER_CONFIG, "num_layers": CACHE_BLOCKS, "num_attention_heads": 2}
        ).eval()
    return components


MODELS = {
    "qwen": (CachedQwenImagePipeline, qwen_components),
    "klein": (CachedFlux2KleinPipeline, build_tiny_flux2_klein_components),
}


@pytest.fixture(scope="module")
def components():
    return {name: build() for name, (_, build) in MODELS.items()}


def new_pipeline(model, components, cache_config=None):
    """A pipeline around the shared models, with a scheduler of its own."""
    cls = MODELS[model][0]
    scheduler = type(components["scheduler"]).from_config(components["scheduler"].config)
    pipe = cls(**{**components, "scheduler": scheduler}, cache_config=cache_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- what is drawn ---------------------------------------------------------------------------------------------------
COEFFICIENTS = st.sampled_from([(0.0, 0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 2.0, 1.0, 0.01), (-4.5e02, 2.8e02, -4.5e01, 3.2e00, -2.0e-02)])
MASKS = st.one_of(
    st.none(),
    st.sampled_from(["slow", "medium", "fast", "ultra"]),
    st.lists(st.integers(0, 1), min_size=1, max_size=8),
)


@st.composite
def guards(draw):
    mask = draw(MASKS)
    return dict(
        max_warmup_steps=draw(st.integers(0, 3)),
        max_cached_steps=draw(st.one_of(st.none(), st.integers(0, 4))),
        max_continuous_cached_steps=draw(st.one_of(st.none(), st.integers(1, 3))),
        compute_last_step=draw(st.booleans()),
        scm_steps_mask=mask,
        scm_steps_policy=draw(st.sampled_from(["dynamic", "static"])) if mask is not None else "dynamic",
    )


def residual_options(draw):
    return dict(enable_taylorseer=draw(st.booleans()), taylorseer_order=draw(st.integers(1, 2)))


def teacache_fields(draw, common):
    return TeaCacheConfig(
        rel_l1_thresh=draw(st.sampled_from([0.05, 0.3, 1.0, 1e6])), coefficients=draw(COEFFICIENTS),
        **common, **residual_options(draw),
    )


def magcache_fields(draw, common):
    ratios = draw(st.lists(st.floats(0.8, 1.2), min_size=2, max_size=12))
    return MagCacheConfig(
        mag_ratios=[1.0] + ratios[1:], mag_threshold=draw(st.sampled_from([0.01, 0.1, 1.0])),
        mag_max_reused_steps=draw(st.integers(1, 4)), mag_retention_ratio=draw(st.sampled_from([0.0, 0.2, 0.5])),
        **common, **residual_options(draw),
    )


def dbcache_fields(draw, common):
    fn = draw(st.integers(1, 2))
    return DBCacheConfig(
        Fn=fn, Bn=draw(st.integers(0, CACHE_BLOCKS - 1 - fn)),
        residual_diff_threshold=draw(st.sampled_from([0.0, 0.05, 0.5, 1e6])), **common, **residual_options(draw),
    )


def fbcache_fields(draw, common):
    return FirstBlockCacheConfig(
        residual_diff_threshold=draw(st.sampled_from([0.05, 0.5, 1e6])), **common, **residual_options(draw)
    )


def seacache_fields(draw, common):
    return SeaCacheConfig(
        threshold=draw(st.sampled_from([0.0, 0.1, 1.0, 1e6])), residual_order=draw(st.integers(0, 1)),
        retention_steps=draw(st.integers(0, 2)), cache_end_steps=draw(st.integers(0, 2)),
        max_consecutive_cached=draw(st.integers(0, 3)), power_exp=draw(st.sampled_from([1.0, 3.0])), **common,
    )


def taylorseer_fields(draw, common):
    return TaylorSeerConfig(order=draw(st.integers(1, 3)), interval=draw(st.integers(1, 4)), **common)


OWN_FIELDS = {
    "teacache": teacache_fields, "magcache": magcache_fields, "dbcache": dbcache_fields, "fbcache": fbcache_fields,
    "seacache": seacache_fields, "taylorseer": taylorseer_fields,
}  # fmt: skip
"""Methods whose own fields are drawn here too (beyond their sweep knob); any other registered method draws its sweep
knob (:func:`sweep_fields`)."""


def sweep_fields(draw, method, steps, common):
    """A config of a registered method from its sweep alone: a budget's computed steps (the first, the last and up to
    three others of ``steps``), or the knob at its sweep's low end, one of its values or far above its range."""
    sweep = method.sweep
    if sweep is None:
        return method.config_class(**common)
    if sweep.kind == "budget":
        if steps < 2:  # a schedule needs two steps
            return None
        others = draw(st.lists(st.integers(0, steps - 1), max_size=3))
        computed = sorted({0, steps - 1, *others})
        return method.config_class(computed_steps=computed, num_inference_steps=steps, **common)
    high = sweep.high if math.isfinite(sweep.high) else 2 * max(sweep.values or (sweep.low,))
    value = draw(st.sampled_from([sweep.low, *sweep.values, high * (1e6 if sweep.kind == "log" else 1)]))
    config = method.config_class.sweep_config(type(sweep.low)(value) if sweep.kind == "int" else value)
    return config.replace(**common)


@st.composite
def cache_configs(draw, steps):
    method = draw(st.sampled_from(["none", *[m.name for m in matrix_methods()]]))
    if method == "none":
        return None
    common = draw(guards())
    if method in OWN_FIELDS:
        return OWN_FIELDS[method](draw, common)
    return sweep_fields(draw, cache_method(method), steps, common)


_FEW, _SOME, _MANY = st.integers(1, 3), st.integers(4, 8), st.integers(9, 30)
STEPS = st.one_of(*[_FEW] * 16, _SOME, _SOME, _SOME, _MANY)
"""1-30 steps, mostly 1-3 (16 in 20), sometimes 4-8 (3 in 20), rarely 9-30 (1 in 20)."""


@st.composite
def callbacks(draw):
    kind = draw(st.sampled_from(["none", "none", "replace", "in-place", "schedule", "raise", "nothing"]))
    return None if kind == "none" else (kind, draw(st.integers(0, 5)))


@st.composite
def generations(draw):
    steps = draw(STEPS)
    return dict(
        model=draw(st.sampled_from(["qwen", "qwen", "qwen", "qwen", "klein"])),  # Klein's tiny text encoder costs more
        pipeline=draw(st.integers(0, 1)),
        config=draw(cache_configs(steps)),
        steps=steps,
        height=draw(st.sampled_from([32, 32, 48])),
        width=draw(st.sampled_from([32, 32, 48])),
        prompts=draw(st.sampled_from([["a red cat"], ["a blue bird", "a green tree"]])),
        num_images_per_prompt=draw(st.sampled_from([1, 1, 2])),
        cfg=draw(st.booleans()),
        callback=draw(callbacks()),
        seed=draw(st.integers(0, 3)),
    )


def make_callback(spec):
    if spec is None:
        return None
    kind, at = spec

    def callback(pipe, i, t, tensors):
        if i != at:
            return {}
        if kind == "replace":
            noise = torch.randn(tensors["latents"].shape, generator=torch.Generator().manual_seed(i))
            return {"latents": 0.5 * tensors["latents"] + 0.1 * noise}
        if kind == "in-place":
            tensors["latents"].mul_(0.8)
        elif kind == "schedule":
            pipe.scheduler.sigmas[i + 1 : -1] *= 0.95
        elif kind == "raise":
            raise CallbackError(f"callback raised at step {i}")
        return {}

    return callback


def call(pipe, model, g):
    kwargs = dict(
        prompt=g["prompts"], num_inference_steps=g["steps"], height=g["height"], width=g["width"],
        num_images_per_prompt=g["num_images_per_prompt"], output_type="latent",
        generator=torch.Generator().manual_seed(g["seed"]), callback_on_step_end=make_callback(g["callback"]),
    )
    if model == "qwen":
        kwargs.update(true_cfg_scale=3.0, negative_prompt=[" "] * len(g["prompts"]) if g["cfg"] else None)
    else:
        kwargs.update(guidance_scale=3.0 if g["cfg"] else 1.0, max_sequence_length=16)
    try:
        output = pipe(**kwargs)
    except CallbackError as error:
        return ("raised", str(error), json.dumps(pipe.cache_stats.to_dict(), sort_keys=True))
    return ("ok", output.images, json.dumps(pipe.cache_stats.to_dict(), sort_keys=True))


def same(a, b) -> bool:
    if a[0] != b[0] or a[2] != b[2]:
        return False
    if a[0] == "raised":
        return a[1] == b[1]
    return a[1].shape == b[1].shape and bool(torch.equal(a[1].isnan(), b[1].isnan())) and bool(
        torch.equal(a[1].nan_to_num(), b[1].nan_to_num())
    )


def held_by_engine(*roots) -> tuple[int, int]:
    """(tensors, bytes) reachable from the roots through dicts, sequences and this package's objects."""
    seen, tensors, nbytes, stack = set(), 0, 0, list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            tensors, nbytes = tensors + 1, nbytes + obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif type(obj).__module__.startswith("cached_diffusers") and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            stack.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
    return tensors, nbytes


@settings(
    max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(sequence=st.lists(generations(), min_size=SEQUENCE_LENGTH, max_size=SEQUENCE_LENGTH))
def test_every_generation_of_a_sequence_is_what_a_fresh_pipeline_gives(components, sequence):
    pipes = {model: [new_pipeline(model, components[model]) for _ in range(2)] for model in MODELS}
    held, configs = [], {(model, i): None for model in MODELS for i in range(2)}
    for index, g in enumerate(sequence):
        model = g["model"]
        pipe = pipes[model][g["pipeline"]]
        pipe.cache_config = configs[model, g["pipeline"]] = g["config"]  # config switches between calls
        got = call(pipe, model, g)
        expected = call(new_pipeline(model, components[model], g["config"]), model, g)
        assert same(got, expected), f"generation {index} differs from a fresh pipeline's: {g}"
        # building pipelines around the shared models changed no other pipeline's config
        assert all(pipes[m][i].cache_config == config for (m, i), config in configs.items())
        assert not _OPEN_GENERATIONS.get() and not _BUSY  # nothing left open or busy, also after a raising callback
        roots = [p.transformer.cache_engine for ps in pipes.values() for p in ps]
        roots += [p.__dict__.get("_cache_generation") for ps in pipes.values() for p in ps]
        held.append(held_by_engine(*[r for r in roots if r is not None]))
        assert all(isinstance(r, Generation) and not r.branches for r in roots[len(roots) // 2 :] if r is not None)
    assert max(held) == held[0], f"memory held by the engines grew over the sequence: {held}"
