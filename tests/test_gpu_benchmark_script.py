"""`scripts/gpu_benchmark_qwenimage.py` replays a benchmark's reuse schedules (smoke test at a tiny size on CPU).

The script is meant for a GPU at full size; here its protocol runs on a small transformer, so only the bookkeeping
is checked (forced schedules, computed/reused counts, report fields), never the timings.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from cached_diffusers import CachedQwenImagePipeline, DBCacheConfig, TeaCacheConfig
from cached_diffusers.tools import tiny
from cached_diffusers.tools.bench import run_benchmark, write_json
from reference import ROOT

STEPS = 6


@pytest.mark.slow  # over 4 s
def test_replays_the_benchmark_schedules(tmp_path):
    pipe = tiny.build_tiny_qwenimage_pipeline(seed=0, pipeline_class=CachedQwenImagePipeline)
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": STEPS, "height": 64, "width": 64, "negative_prompt": " ", "true_cfg_scale": 4.0}
    configs = [TeaCacheConfig(rel_l1_thresh=0.6), DBCacheConfig(Fn=2, max_warmup_steps=0, scm_steps_mask=[1, 1, 0, 1, 0, 1], scm_steps_policy="static")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_benchmark(pipe, configs, tiny.DEFAULT_PROMPTS[:1], call, repeats=1)
    finally:
        torch.set_num_threads(threads)
    schedules = write_json(result, tmp_path / "results.json")
    recorded = [e.reuse_schedules for e in result.entries]
    assert recorded[1] == {"cond": [[2, 4]], "uncond": [[2, 4]]}
    assert recorded[0]["cond"][0], "the TeaCache setting must reuse some steps for the replay to mean anything"

    out = tmp_path / "gpu"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_benchmark_qwenimage.py"), "--tiny", "--device", "cpu",
           "--steps", str(STEPS), "--height", "64", "--repeats", "1", "--schedules", str(schedules),
           "--output-dir", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (report_path,) = out.glob("gpu-*-cpu-tiny.json")
    report = json.loads(report_path.read_text())
    assert report["num_inference_steps"] == STEPS and report["device"] == "cpu"
    for entry, row in zip(result.entries, report["results"]):
        assert row["label"] == entry.label
        assert row["reused_steps"] == entry.reuse_schedules["cond"][0]  # the schedule was forced as recorded
        assert row["reused"] + row["computed"] == STEPS
        assert row["cost_ratio"] is not None and row["cost_ratio"] > 0
        expected_ideal = STEPS / (row["computed"] + row["reused"] * row["cost_ratio"])
        assert abs(row["ideal_speedup"] - expected_ideal) < 1e-9
    assert report["bookkeeping_ms_per_step"] is not None
    assert (out / report_path.name.replace(".json", ".md")).read_text().count("\n| ") == 1 + len(report["results"])


@pytest.mark.slow  # over 4 s
def test_refuses_schedules_of_another_step_count(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"num_inference_steps": 20, "results": []}))
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_benchmark_qwenimage.py"), "--tiny", "--device", "cpu",
           "--schedules", str(path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "num_inference_steps=20" in done.stderr and "50" in done.stderr

