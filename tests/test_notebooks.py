"""The notebooks in notebooks/ run offline on the embedded model, without errors, and show their key results."""

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

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


def test_quickstart(kernel_path, tmp_path, monkeypatch):
    _, text, images = execute("01_quickstart.ipynb", kernel_path, tmp_path, monkeypatch)
    assert re.search(r"uncached: [\d.]+ s, cached: [\d.]+ s, speedup: [\d.]+x", text)
    assert re.search(r"PSNR cached vs uncached: [\d.]+ dB", text)
    assert re.search(r"reused cond \d+/12, uncond \d+/12", text)  # the progress bar's postfix
    assert "| cond " in text and "| uncond " in text  # the summary's table
    assert re.search(r"reused steps per branch: \{'cond': \[\d", text)
    assert "cache_config.json" in text and "model_index.json" in text
    assert "reloaded cache_config: TeaCacheConfig(rel_l1_thresh=0.3) True" in text and "explicit None wins: None" in text
    assert images == 1  # the side-by-side sheet


def test_tuning(kernel_path, tmp_path, monkeypatch):
    _, text, images = execute("02_tuning.ipynb", kernel_path, tmp_path, monkeypatch)
    assert "accumulated distance per reused step (cond)" in text
    rows = re.findall(r"^(teacache|fbcache) +([\d.]+) +([\d.]+)% +[\d.]+x +([\d.]+) +(\d+)$", text, flags=re.M)
    assert len(rows) == 10
    blocks = {(m, float(t)): float(b) for m, t, b, _, _ in rows}
    assert blocks[("teacache", 0.8)] <= blocks[("teacache", 0.05)] and min(blocks.values()) < 100
    assert re.search(r"Pareto front:\n  (teacache|fbcache) threshold", text)
    assert images == 1 and (tmp_path / "pareto.png").stat().st_size > 0


def test_calibration(kernel_path, tmp_path, monkeypatch):
    _, text, images = execute("03_calibration.ipynb", kernel_path, tmp_path, monkeypatch)
    assert re.search(r"mag_ratios \(cond\): \[1\.0, ", text) and "mag_ratios (uncond)" in text
    assert "calibrated MagCache reuses" in text
    assert re.search(r"cond: 27 pairs, coefficients \[", text)  # 3 prompts x (10 steps - 1)
    assert re.search(r"TeaCache fit on 54 pairs, .*RMSE [\d.e+-]+, R\^2", text)
    assert "calibrated TeaCache reuses" in text and "reloaded coefficients: (" in text
    assert images == 1 and (tmp_path / "teacache_fit.png").stat().st_size > 0
