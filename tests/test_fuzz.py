"""Fuzzing: random JSON (and bytes) as ``cache_config.json``, random argument vectors for the command line. Every input
ends in a clean error (``ValueError`` naming the file; a one-line message and exit status 1 or 2) or a valid run.
Bounded (``max_examples``, derandomized) to run in well under a minute."""

import dataclasses
import json
import re

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cached_diffusers import BlockStack, CacheConfig, CacheEngine, available_cache_methods
from cached_diffusers.tools.cli import main
from cached_diffusers.registry import cache_methods, registered_names
from cached_diffusers.hub import read_cache_config
from cached_diffusers.spec import ModelCacheSpec
from cached_diffusers.tools.tiny import save_tiny_qwenimage_pipeline

FIELDS = sorted({f.name for m in cache_methods() for f in dataclasses.fields(m.config_class)})
METHODS = registered_names() + ["", "TeaCache", "warp"]

SCALARS = (
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, 1, -1, 0.5, 1e9, 1e-9, "fast", "static", "dynamic", "slow", ""]) | st.text(max_size=8)
)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20)
PLAUSIBLE = st.sampled_from([0, 1, 2, 3, 0.5, 1e-3, 1e6, True, False, None, "fast", "static", [1, 0, 1], [1.0, 0.9]])
NEARLY_VALID = st.fixed_dictionaries(
    {"method": st.sampled_from(registered_names())}, optional={name: PLAUSIBLE for name in FIELDS}
)
CONFIG_LIKE = st.fixed_dictionaries(
    {"method": st.sampled_from(METHODS)},
    optional={"_meta": JSON, **{name: SCALARS | SCALARS | JSON for name in FIELDS}},
)


class Toy:
    """A 4-block stack on (image, text) streams with the TeaCache signal."""

    def stack(self):
        def run_blocks(start, end, streams):
            image, text = streams
            for index in range(start, end):
                image = image * 1.05 + 0.1 * (index + 1)
                text = text * 0.9
            return image, text

        indicators = {"teacache_indicator": lambda s: s[0] * 2.0, "sea_latent": lambda s: s[0][:, None]}
        return BlockStack(4, run_blocks, indicators)


def run_toy_generation(config, steps=4):
    """A short two-branch generation on the toy stack with ``config``; ``ValueError`` if the model cannot run it."""
    engine = CacheEngine(ModelCacheSpec(
        model_name="Toy", num_blocks=4, teacache_coefficients=(0.0, 0.0, 0.0, 1.0, 0.0),
        teacache_coefficients_source="identity (f(x) = x)", mag_ratios=(1.0, 0.95, 0.9), mag_ratios_source="toy",
    ))
    engine.config = config
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1, 5, 3, generator=generator), torch.randn(1, 2, 3, generator=generator)
    for step in range(steps):
        for branch in ("cond", "uncond"):
            with engine.context(branch, step_index=step, num_inference_steps=steps):
                out = engine.run(Toy().stack(), (base[0] + 0.01 * step, base[1]))
            assert all(o.shape == b.shape for o, b in zip(out, base))
    assert engine.stats.num_computed + engine.stats.num_reused == 2 * steps


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.one_of(NEARLY_VALID, CONFIG_LIKE, JSON), raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_random_cache_config_json_is_a_clean_error_or_a_config_that_runs(tmp_path, data, raw):
    path = tmp_path / "cache_config.json"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(json.dumps(data), encoding="utf-8")
    try:
        config = read_cache_config(path)
    except ValueError as error:
        assert str(path) in str(error)
        event("clean error")
        return
    event("a config" if config is not None else "no caching")
    assert config is None or isinstance(config, CacheConfig)
    if config is not None:
        assert read_cache_config(path) == config and hash(config) == hash(read_cache_config(path))
        try:
            run_toy_generation(config)
        except ValueError as error:  # a valid config this model cannot run (Fn + Bn too large): said when applied
            assert re.search(r"Fn \+ Bn|no block to cache", str(error)), error


# -- the command line ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_qwenimage_pipeline(tmp_path_factory.mktemp("fuzz") / "model"))


VALUES = st.one_of(
    st.sampled_from(["0", "1", "2", "-1", "7", "16", "32", "1e9", "nan", "inf", "abc", "", "none", "null", "[1,2]",
                     '{"method": "teacache"}', '{"method": "fbcache", "residual_diff_threshold": 100}', "{", "[]",
                     "cpu", "cuda", "meta", "foo", "float32", "float16", "int8", "fast", "static", "teacache",
                     "magcache", "dbcache", "fbcache", "taylorseer", "none", "warp", "{MODEL}", "{TMP}", "{TMP}/x.png",
                     "{TMP}/a-file/x.png", "{TMP}/out.nope", "{TMP}/latin1.json", "/nonexistent", "{TMP}/empty"]),
    st.integers(-3, 3).map(str),
    st.text(max_size=5),
)
OPTIONS = ["--steps", "--height", "--width", "--seed", "--device", "--dtype", "--cache", "--cache-config",
           "--rel-l1-thresh", "--max-warmup-steps", "--scm-steps-mask", "--Fn", "--true-cfg-scale", "--guidance-scale",
           "--negative-prompt", "--output", "--model", "--prompt", "--coefficients", "--mag-ratios", "--method",
           "--output-dir", "--repeats", "--unknown-option"]
FLAGS = ["--quiet", "--compute-last-step", "--no-compute-last-step", "--calibrate", "--help-me"]


@st.composite
def argument_vectors(draw):
    command = draw(st.sampled_from(["generate", "generate", "generate", "calibrate", "demo", "bench", "nothing"]))
    base = {
        # a valid, cheap run when nothing random spoils it; later options override earlier ones
        "generate": ["--model", "{MODEL}", "--prompt", "x", "--steps", "1", "--height", "32", "--width", "32", "--quiet",
                     "--output", "{TMP}/o.png"],
        "calibrate": ["--model", "{MODEL}", "--prompt", "x", "--steps", "2", "--height", "32", "--width", "32",
                      "--quiet", "--output", "{TMP}/c.json"],
        # demo and bench load the embedded reference model: keep them on errors found before that
        "demo": ["--output", "{TMP}/a-file/demo.png"],
        "bench": ["--output-dir", "{TMP}/a-file"],
        "nothing": [],
    }[command]
    extra = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 4)) == 0:
            extra.append(draw(st.sampled_from(FLAGS)))
        else:
            option = draw(st.sampled_from(OPTIONS))
            extra += [option, draw(VALUES)]
            if command in ("generate", "calibrate") and option == "--steps":
                extra[-1] = draw(st.sampled_from(["-1", "0", "1", "2", "x"]))  # bounded work
            if command in ("generate", "calibrate") and option in ("--height", "--width"):
                extra[-1] = draw(st.sampled_from(["-1", "0", "7", "16", "32", "x"]))
    if command in ("demo", "bench"):
        extra += base  # their bad output comes last, so it always applies
        base = []
    return [command, *base, *extra]


@settings(max_examples=35, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(argv=argument_vectors())
def test_random_command_lines_end_in_a_clean_error_or_a_valid_run(model_dir, tmp_path_factory, capsys, argv):
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "a-file").write_text("x")
    (tmp / "empty").mkdir()
    (tmp / "latin1.json").write_bytes(b'{"method": "teacache", "x": "\xe9"}')
    argv = [a.replace("{MODEL}", model_dir).replace("{TMP}", str(tmp)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse: usage errors (2) and --help (0)
        code = exit.code
    out, err = capsys.readouterr()
    event(f"{argv[0]}: exit {code}")
    assert "Traceback" not in err and "Traceback" not in out, (argv, err)
    assert code in (0, 1, 2), (argv, code, err)
    if code in (1, 2):
        last = [line for line in err.splitlines() if line.strip()][-1]
        assert re.match(r"(cached-diffusers( \w+)?: error: |usage: )", last) or "error:" in last, (argv, err)
    if code == 0 and argv[0] == "generate":
        assert "wrote " in out
