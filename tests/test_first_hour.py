"""A new user's first hour: the command line on the shipped models, install ranges, imports, loaders and paths.

Each test here guards one thing a new user met on a fresh clone: generating with only ``--prompt`` drew noise, a
mistyped local path ended in a Hub traceback, ``dtype=`` was refused by two loaders, importing the package took
seconds, and nothing noticed when diffusers' parent ``forward`` changed under our copy of it (now there is no copy:
a changed parent ``forward`` caches unchanged).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel, QwenImageTransformer2DModel
from PIL import Image

from cached_diffusers.tools import reference_model as ref
from cached_diffusers.tools.cli import main
from cached_diffusers.hub import GENERATION_DEFAULTS_NAME, check_local_path, load_generation_defaults
from cached_diffusers.tools.imaging import MissingExtraError, require_extra
from cached_diffusers.models.flux2 import CachedFlux2Transformer2DModel
from cached_diffusers.models.qwenimage import CachedQwenImageTransformer2DModel
from reference import ROOT, reference_dir

MODELS = {"qwenimage": ref.REFERENCE_MODEL_DIR, "flux2-klein": ref.REFERENCE_KLEIN_DIR}


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and return its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return done.stdout


# -- generate with only --prompt draws the caption ---------------------------------------------------------------
@pytest.mark.parametrize("architecture", sorted(MODELS))
def test_generate_with_only_a_prompt_draws_the_emoji(architecture, tmp_path, capsys):
    """On both reference models, ``generate --model DIR --prompt CAPTION`` (nothing else) uses the directory's
    ``generation_defaults.json``: a 32 x 32 image whose nearest training image is the caption's own glyph."""
    dataset = ref.load_reference_dataset()
    prompts = ["rocket", "red apple"]
    out = tmp_path / "image.png"
    argv = ["generate", "--model", os.fspath(MODELS[architecture]), "--output", os.fspath(out), "--quiet"]
    assert main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
    assert "(20 steps)" in capsys.readouterr().out
    images = np.stack([np.asarray(Image.open(tmp_path / f"image-{i}.png").convert("RGB")) for i in range(2)])
    assert images.shape == (2, ref.RESOLUTION, ref.RESOLUTION, 3)
    distances = ((images[:, None].astype(np.float32) - dataset.images[None].astype(np.float32)) ** 2).sum((2, 3, 4))
    assert [dataset.captions[i] for i in distances.argmin(1)] == prompts


def test_options_override_the_directory_defaults(tmp_path, capsys):
    out = tmp_path / "image.png"
    argv = ["generate", "--model", os.fspath(ref.REFERENCE_MODEL_DIR), "--prompt", "rocket", "--quiet"]
    assert main(argv + ["--steps", "3", "--height", "64", "--width", "48", "--output", os.fspath(out)]) == 0
    assert "(3 steps)" in capsys.readouterr().out
    assert Image.open(out).size == (48, 64)


@pytest.mark.parametrize("architecture", sorted(MODELS))
def test_shipped_generation_defaults_are_the_training_settings(architecture):
    defaults, source = load_generation_defaults(MODELS[architecture])
    assert source == os.path.join(MODELS[architecture], GENERATION_DEFAULTS_NAME)
    assert defaults == ref.GENERATION_DEFAULTS[architecture]  # "_comment" is dropped


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[1, 2]", "expected a JSON object, got list"),
        (b"{not json", "not valid JSON"),
        (b'{"height": "\xff"}', "not UTF-8 text"),
        (b'{"prompt": "a cat"}', "'prompt' is not a default call argument of CachedQwenImagePipeline"),
        (b'{"strength": 0.5}', "'strength' is not a default call argument"),
    ],
)
def test_a_bad_generation_defaults_file_is_an_error_naming_it(content, message, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for entry in os.listdir(ref.REFERENCE_MODEL_DIR):
        if entry != GENERATION_DEFAULTS_NAME:
            os.symlink(ref.REFERENCE_MODEL_DIR / entry, model / entry)
    (model / GENERATION_DEFAULTS_NAME).write_bytes(content)
    code = main(["generate", "--model", os.fspath(model), "--prompt", "rocket", "--output", os.fspath(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert os.fspath(model / GENERATION_DEFAULTS_NAME) in err and message in err


def test_generate_requires_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "rocket"])
    assert exit_info.value.code == 2
    assert "--model" in capsys.readouterr().err


def test_max_sequence_length_option_reaches_the_pipeline(tmp_path, capsys):
    """Klein pads prompts to ``max_sequence_length``: a longer one than the model was trained with changes the image,
    so the option (not only the directory default of 32) reaches the call."""
    base = ["generate", "--model", os.fspath(ref.REFERENCE_KLEIN_DIR), "--prompt", "rocket", "--steps", "4", "--quiet"]
    assert main(base + ["--output", os.fspath(tmp_path / "a.png")]) == 0
    assert main(base + ["--max-sequence-length", "32", "--output", os.fspath(tmp_path / "b.png")]) == 0
    assert main(base + ["--max-sequence-length", "48", "--output", os.fspath(tmp_path / "c.png")]) == 0
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# -- paths that do not exist -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["./my-qwen-image", "/no/such/dir", "my-model", "a/b/c", "~/models/qwen"])
def test_a_local_looking_path_that_does_not_exist_is_one_line(path, capsys):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        check_local_path(path)
    from cached_diffusers import CachedBagelPipeline, CachedFlux2KleinPipeline, CachedQwenImagePipeline

    for cls in (CachedQwenImagePipeline, CachedFlux2KleinPipeline, CachedBagelPipeline):
        with pytest.raises(FileNotFoundError, match="no such model directory") as error:
            cls.from_pretrained(path)
        assert path in str(error.value) and "\n" not in str(error.value)
    assert main(["generate", "--model", path, "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--model: no such model directory: {path!r}" in err


def test_hub_ids_and_existing_paths_pass_the_local_path_check(tmp_path):
    check_local_path("Qwen/Qwen-Image")
    check_local_path(tmp_path)


def test_hunyuanimage3_missing_directory_is_a_file_not_found_error(tmp_path):
    from cached_diffusers import CachedHunyuanImage3Pipeline

    with pytest.raises(FileNotFoundError, match="no such HunyuanImage-3.0 release directory"):
        CachedHunyuanImage3Pipeline.from_pretrained(tmp_path / "missing")


# -- dtype= as diffusers 0.42 takes it -----------------------------------------------------------------------------
def test_bagel_and_hunyuanimage3_loaders_take_dtype():
    from cached_diffusers import CachedBagelPipeline, CachedHunyuanImage3Pipeline

    bagel = reference_dir("bagel-tiny") / "checkpoint"
    hunyuan = reference_dir("hunyuanimage3-tiny") / "checkpoint"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dtype= is the current name: no deprecation warning
        assert CachedBagelPipeline.from_pretrained(bagel, dtype=torch.bfloat16).transformer.dtype == torch.bfloat16
        pipe = CachedHunyuanImage3Pipeline.from_pretrained(hunyuan, dtype=torch.float32)
        assert pipe.transformer.model.wte.weight.dtype == torch.float32
    with pytest.warns(FutureWarning, match="torch_dtype"):
        assert CachedBagelPipeline.from_pretrained(bagel, torch_dtype=torch.float32).transformer.dtype == torch.float32
    with pytest.warns(FutureWarning, match="torch_dtype"):
        CachedHunyuanImage3Pipeline.from_pretrained(hunyuan, torch_dtype=torch.float32)
    for cls, path in ((CachedBagelPipeline, bagel), (CachedHunyuanImage3Pipeline, hunyuan)):
        with pytest.raises(ValueError, match="pass dtype= only"):
            cls.from_pretrained(path, dtype=torch.float32, torch_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"supported: cache_config, dtype, "):
        CachedHunyuanImage3Pipeline.from_pretrained(hunyuan, dtypes=torch.float32)


def test_no_example_uses_torch_dtype():
    """The README, the docs and the notebooks show ``dtype=``, as diffusers 0.42 wants."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*.ipynb"))]
    assert [f.name for f in files if "torch_dtype=" in f.read_text(encoding="utf-8")] == []


# -- imports -------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # over 4 s
def test_import_is_lazy():
    """``import cached_diffusers`` loads no torch and no diffusers (each public name loads on first use), so it costs
    milliseconds on top of Python's start; the names still resolve."""
    out = run_python(
        "import sys, cached_diffusers as c\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)\n"
        "print(c.TeaCacheConfig.__module__, c.CachedQwenImagePipeline.__module__, c.CachedFlux2Transformer2DModel.__name__)\n"
        "print(sorted(set(c.__all__) - set(dir(c))), 'models' in sys.modules)\n"
    )
    lines = out.splitlines()
    assert lines[0] == "False False"
    assert lines[1] == "cached_diffusers.methods.teacache cached_diffusers.pipelines.qwenimage CachedFlux2Transformer2DModel"
    assert lines[2].startswith("[]")


def test_every_public_name_resolves():
    import cached_diffusers
    import cached_diffusers.models
    import cached_diffusers.pipelines

    for package in (cached_diffusers, cached_diffusers.models, cached_diffusers.pipelines):
        assert package.__all__ and all(getattr(package, name) is not None for name in package.__all__)
        with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
            package.NoSuchName  # noqa: B018


def test_cli_help_loads_no_torch():
    out = run_python(
        "import contextlib, io, sys\n"
        "from cached_diffusers.tools.cli import main\n"
        "for command in ('generate', 'calibrate', 'demo', 'bench'):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main([command, '--help'])\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    assert out.strip() == "False False"


# -- the parent's own forward runs: a changed parent forward keeps caching unchanged --------------------------------
def _changed_parent(parent: type) -> type:
    """A subclass of ``parent`` whose ``forward`` is a copy of the installed one, made here, with extra statements
    around the block loop (a counter before it, a copy of the image stream after it): a future diffusers release."""
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(parent.forward))
    loop = "    for index_block, block in enumerate(self.transformer_blocks):\n"
    assert source.count(loop) == 1, f"{parent.__name__}.forward has no block loop to surround"
    before = "    self.changed_forward_calls = getattr(self, 'changed_forward_calls', 0) + 1\n"
    after = "    hidden_states = hidden_states.clone()  # a statement after the loop\n"
    lines = source.split(loop)
    body = lines[1].split("\n")
    # the first line back at the loop's indentation ends the loop
    end = next(i for i, line in enumerate(body) if line.startswith("    ") and not line.startswith("     "))
    changed = lines[0] + before + loop + "\n".join(body[:end]) + "\n" + after + "\n".join(body[end:])
    namespace = dict(vars(sys.modules[parent.__module__]))
    exec(compile(changed, f"<changed {parent.__name__}.forward>", "exec"), namespace)
    return type(f"Changed{parent.__name__}", (parent,), {"forward": namespace["forward"], "__module__": __name__})


@pytest.mark.parametrize(
    "cached, parent", [(CachedQwenImageTransformer2DModel, QwenImageTransformer2DModel), (CachedFlux2Transformer2DModel, Flux2Transformer2DModel)]
)
@pytest.mark.parametrize("method", ["teacache", "fbcache", "dbcache"])
@torch.no_grad()
def test_a_changed_parent_forward_caches_unchanged(cached, parent, method):
    from cached_diffusers import DBCacheConfig, FirstBlockCacheConfig, TeaCacheConfig
    from cached_diffusers.tools.tiny import build_tiny_flux2_klein_components, build_tiny_qwenimage_components

    changed_parent = _changed_parent(parent)
    changed_cached = type(f"Cached{changed_parent.__name__}", (cached, changed_parent), {"__module__": __name__})
    assert changed_cached._parent_forward is changed_parent.forward.__wrapped__
    if cached is CachedQwenImageTransformer2DModel:
        stock = build_tiny_qwenimage_components()["transformer"]
        g = torch.Generator().manual_seed(0)
        kwargs = dict(
            encoder_hidden_states=torch.randn(1, 5, stock.config.joint_attention_dim, generator=g),
            encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.long), img_shapes=[[(1, 4, 4)]],
        )  # fmt: skip
        tokens, channels = 16, stock.config.in_channels
    else:
        stock = build_tiny_flux2_klein_components()["transformer"]
        g = torch.Generator().manual_seed(0)
        grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
        img_ids = torch.cat([torch.zeros(16, 1), grid, torch.zeros(16, 1)], 1).long()
        kwargs = dict(
            encoder_hidden_states=torch.randn(1, 5, stock.config.joint_attention_dim, generator=g),
            img_ids=img_ids, txt_ids=torch.zeros(5, 4, dtype=torch.long),
        )  # fmt: skip
        tokens, channels = 16, stock.config.in_channels
    noise, data = torch.randn(2, 1, tokens, channels, generator=g)
    config = {
        "teacache": TeaCacheConfig(rel_l1_thresh=1.0, coefficients=(0.0, 0.0, 0.0, 1.0, 0.0)),
        "fbcache": FirstBlockCacheConfig(residual_diff_threshold=1.0),
        "dbcache": DBCacheConfig(Fn=1, Bn=1, residual_diff_threshold=1.0, max_warmup_steps=1),
    }[method]
    runs = {}
    for cls in (cached, changed_cached):
        model = cls.from_config(stock.config).eval()
        model.load_state_dict(stock.state_dict())
        model.cache_config = config
        outputs = []
        for step in range(8):
            sigma = 1.0 - step / 8 * 0.2
            with model.cache_context("cond", step_index=step, num_inference_steps=8):
                outputs.append(model(hidden_states=sigma * noise + (1 - sigma) * data, timestep=torch.tensor([sigma]),
                                     return_dict=False, **kwargs)[0])  # fmt: skip
        runs[cls] = outputs, model.cache_stats.branches["cond"].records, model
    (expected, expected_records, _), (outputs, records, model) = runs[cached], runs[changed_cached]
    assert model.changed_forward_calls == 8  # the changed forward ran on every step, reused or not
    assert [(r.step, r.reused, r.reason, r.value, r.blocks_computed) for r in records] == [
        (r.step, r.reused, r.reason, r.value, r.blocks_computed) for r in expected_records
    ]
    assert any(r.reused for r in records) and not all(r.reused for r in records), [(r.reason, r.value) for r in records]
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))


# -- the bench extra -----------------------------------------------------------------------------------------------
def test_a_missing_extra_is_a_clear_error(monkeypatch, capsys):
    # from this clone the package is on no index: the editable install of the extra is the command that works
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[bench\]" \(in ' + re.escape(os.fspath(ROOT)) + r"\)"):
        require_extra("no_such_module_for_test", "scikit-image")
    monkeypatch.setitem(sys.modules, "skimage.metrics", None)  # as if scikit-image were not installed
    assert main(["bench", "--quiet"]) == 1
    assert main(["demo", "--quiet"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("scikit-image is not installed" in line for line in err)


def test_setup_requires_ranges_and_keeps_metrics_in_the_bench_extra():
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    install_requires = text[text.index("install_requires") : text.index("extras_require")]
    assert "==" not in install_requires
    assert "scikit-image" not in install_requires and "matplotlib" not in install_requires
    assert '"bench": ["scikit-image' in text


def test_calibration_provenance_records_the_settings_used(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for entry in os.listdir(ref.REFERENCE_MODEL_DIR):
        if entry not in ("cache_config.json", "cache_config.calibration.json"):
            os.symlink(ref.REFERENCE_MODEL_DIR / entry, model / entry)
    argv = ["calibrate", "--model", os.fspath(model), "--prompt", "rocket", "--steps", "4", "--quiet"]
    assert main(argv) == 0
    record = json.loads((model / "cache_config.calibration.json").read_text())
    assert record["num_inference_steps"] == 4  # the option
    assert (record["height"], record["width"], record["true_cfg_scale"]) == (32, 32, 4.0)  # the directory's defaults
