"""The notebooks in notebooks/ run offline on the shipped reference models, without errors, and show their key
results."""

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # executes the notebooks: left out of the fast set (-m "not slow")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "cached-diffusers-test"


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory):
    """A kernelspec running this interpreter (the test venv's ipykernel), whatever kernels the machine has."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    return root


def execute(name, kernel_path, tmp_path, monkeypatch):
    """Run the notebook in ``tmp_path`` (where it writes its files); return the executed notebook and its text."""
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    text, images = [], 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error"
            if output["output_type"] == "stream":
                text.append(output["text"])
            elif "data" in output:
                text.append(output["data"].get("text/plain", ""))
                images += "image/png" in output["data"]
    return notebook, "\n".join(text), images


def test_notebooks_are_stored_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), path.name


STEPS = 20  # GENERATION_DEFAULTS of the reference model


def test_quickstart(kernel_path, tmp_path, monkeypatch):
    _, text, images = execute("01_quickstart.ipynb", kernel_path, tmp_path, monkeypatch)
    assert "torch threads: 1" in text
    assert "cache config from the model directory: TeaCacheConfig(coefficients=[" in text
    assert "side by side: top row uncached, bottom row cached" in text and images == 1
    psnrs = [float(v) for v in re.findall(r"PSNR cached vs uncached, '[a-z ]+': ([\d.]+) dB", text)]
    assert len(psnrs) == 4 and min(psnrs) > 25  # the cached emoji are close to the uncached ones
    postfix = re.findall(r"reused cond (\d+)/20, uncond (\d+)/20\]", text)  # the progress bar's final postfix
    assert postfix and all(0 < int(c) <= STEPS and 0 < int(u) <= STEPS for c, u in postfix)
    assert "| cond " in text and "| uncond " in text  # the summary's table
    (counts,) = re.findall(r"reused per branch: cond (\d+)/(\d+), uncond (\d+)/(\d+)", text)
    cond, steps, uncond, steps_u = map(int, counts)
    assert steps == steps_u == STEPS and 0 < cond <= STEPS and 0 < uncond <= STEPS
    assert (str(cond), str(uncond)) == postfix[-1]  # the summary counts what the progress bar showed
    assert re.search(r"uncached: median [\d.]+ s, cached: median [\d.]+ s", text)
    assert re.search(r"speedup: [\d.]+x \(ratio of medians; per-round ratios [\d.]+x-[\d.]+x\)", text)
    assert "'cache_config.json'" in text and "'model_index.json'" in text and "saved rel_l1_thresh: 0.3" in text
    assert re.search(r"reloaded cache_config: TeaCacheConfig\(rel_l1_thresh=0\.3, coefficients=\[.*\]\) True", text)
    assert "explicit None wins: None" in text


def test_tuning(kernel_path, tmp_path, monkeypatch):
    _, text, images = execute("02_tuning.ipynb", kernel_path, tmp_path, monkeypatch)
    assert "torch threads: 1" in text
    for method in ("teacache", "fbcache"):
        values = re.search(rf"^{method} decision value per step \(cond\): ([\d.e+\- ]+)$", text, flags=re.M)
        assert values and len(values.group(1).split()) >= STEPS - 2
    assert re.search(r"uncached: median [\d.]+ s per call \(2 prompts, 3 interleaved rounds, 1 torch thread", text)
    rows = re.findall(
        r"^(teacache|fbcache) +([\d.]+) +cond (\d+)/(\d+), uncond (\d+)/(\d+) +([\d.]+)% +[\d.]+ s +[\d.]+x "
        r"+([\d.]+)-([\d.]+)x +([\d.]+)$",
        text,
        flags=re.M,
    )
    assert len(rows) == 8
    sweep = {}
    for method, threshold, cond, n, uncond, n_u, blocks, low, high, quality in rows:
        assert int(n) == int(n_u) == STEPS and int(cond) <= STEPS and int(uncond) <= STEPS
        assert float(low) <= float(high) and 0 < float(blocks) <= 100 and float(quality) > 0
        sweep.setdefault(method, []).append((float(threshold), int(cond), int(uncond), float(blocks)))
    for method, points in sweep.items():  # the thresholds span from no reuse to heavy reuse, in order
        points.sort()
        assert points[0][1:] == (0, 0, 100.0), method
        assert min(points[-1][1:3]) > STEPS // 2, method  # most steps of each branch reused
        blocks = [b for *_, b in points]
        assert blocks == sorted(blocks, reverse=True), method
    front = re.findall(
        r"^  (teacache [\d.]+|fbcache [\d.]+|uncached): speedup ([\d.]+)x, PSNR ([\d.]+) dB", text, flags=re.M
    )
    assert "Pareto front (fastest first):" in text and front
    speeds, psnrs = [float(s) for _, s, _ in front], [float(p) for _, _, p in front]
    assert speeds == sorted(speeds, reverse=True) and psnrs == sorted(psnrs) and len(set(psnrs)) == len(psnrs)
    assert images == 1 and (tmp_path / "pareto.png").stat().st_size > 0


def test_calibration(kernel_path, tmp_path, monkeypatch):
    _, text, images = execute("03_calibration.ipynb", kernel_path, tmp_path, monkeypatch)
    for branch in ("cond", "uncond"):
        ratios = re.search(rf"mag_ratios \({branch}\): \[1\.0, ([\d., ]+)\]", text)
        assert ratios and len(ratios.group(1).split(",")) == STEPS - 1
        assert re.search(rf"^{branch}: 76 pairs, coefficients \[", text, flags=re.M)  # 4 prompts x (20 steps - 1)
    assert re.search(r"TeaCache fit on 152 pairs, .*RMSE [\d.e+-]+, R\^2", text)
    for name in ("calibrated MagCache", "calibrated TeaCache", "shipped TeaCache", "Klein calibrated MagCache"):
        pattern = rf"^{name} reuses cond (\d+)/(\d+), uncond (\d+)/(\d+); PSNR vs uncached per prompt: ([\d., ]+) dB"
        found = re.search(pattern, text, flags=re.M)
        assert found, name
        cond, n, uncond, n_u = map(int, found.groups()[:4])
        assert n == n_u == STEPS and 0 < cond <= STEPS and 0 < uncond <= STEPS, name  # it reuses something
        assert len(found.group(5).split(",")) == 4, name
    assert "reloaded coefficients: (" in text
    assert images == 1 and (tmp_path / "teacache_fit.png").stat().st_size > 0
