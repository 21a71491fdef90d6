#!/usr/bin/env python
"""Run diffusers' own tests for the Qwen-Image and FLUX.2 models and pipelines against the cached classes.

    python scripts/run_upstream_diffusers_tests.py /path/to/diffusers [--modes stock off on] [--files ...] [-k EXPR]

The diffusers checkout (a clone of huggingface/diffusers, ideally at the installed version's tag) is only read: its
test files are run in place with pytest, once per mode, with ``scripts/upstream_diffusers_plugin.py`` loaded:

* ``stock``: the stock classes (the baseline: what passes without cached-diffusers),
* ``off``: the cached classes substituted for the stock ones in the ``diffusers`` namespace, caching off,
* ``on``: the same, every cached pipeline built with a reusing cache config (the transformer model tests are not run:
  a transformer called outside a pipeline needs the denoising step).

It prints, per mode, the tests that pass on stock but not on the cached classes, leaving out those refused by design
(diffusers' own cache hooks, ``enable_cache``; fullgraph compilation with caching on), and writes the outcomes as
JSON with ``--report``. Tests that need the Hub (tiny checkpoints of hf-internal-testing) fail in every mode without
network access (the script sets ``HF_HUB_OFFLINE=1`` unless ``--online``) and are therefore not counted. Exit status 1 when a test regresses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

DEFAULT_FILES = [
    "tests/pipelines/qwenimage",
    "tests/pipelines/flux2",
    "tests/models/transformers/test_models_transformer_qwenimage.py",
    "tests/models/transformers/test_models_transformer_flux2.py",
    "tests/lora/test_lora_layers_qwenimage.py",
    "tests/lora/test_lora_layers_flux2.py",
]
MODEL_TESTS = "tests/models/"
# Words of diffusers' own test names that exercise diffusers' cache hooks (its MagCache, FirstBlockCache,
# TaylorSeerCache, FasterCache, PAB hooks: ``enable_cache``), which the cached classes refuse by design; these name
# diffusers' hooks, not this package's methods (those come from the registry wherever a script runs them).
BY_DESIGN = ("cache_hook", "enable_cache", "test_cache", "magcache", "first_block_cache", "taylorseer_cache",
             "faster_cache", "pyramid_attention")


def outcomes(junit: Path) -> dict[str, str]:
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped":
                status = "skipped"
        result[test_id] = status
    return result


def run_mode(
    checkout: Path, mode: str, files: list[str], keyword: str | None, extra: list[str], online: bool
) -> dict[str, str]:
    if mode == "on":
        files = [f for f in files if not f.startswith(MODEL_TESTS)]
    files = [f for f in files if (checkout / f).exists()]
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        env = dict(os.environ, CACHED_DIFFUSERS_UPSTREAM_MODE=mode)
        if not online:
            env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # fail fast instead of retrying the Hub
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "pytest", *files, "-p", "upstream_diffusers_plugin", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", *(["-k", keyword] if keyword else []), *extra]
        print(f"[{mode}] {' '.join(command)}", flush=True)
        subprocess.run(command, cwd=checkout, env=env, check=False)
        return outcomes(junit) if junit.exists() else {}


def by_design(test_id: str, mode: str) -> bool:
    name = test_id.lower()
    return any(word in name for word in BY_DESIGN) or (mode == "on" and ("compile" in name or "fullgraph" in name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a diffusers source checkout (its tests/ is used)")
    parser.add_argument("--modes", nargs="+", default=["stock", "off", "on"], choices=["stock", "off", "on"])
    parser.add_argument("--files", nargs="+", default=DEFAULT_FILES, help="test files or folders, relative to it")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("--report", type=Path, help="write all outcomes as JSON here")
    parser.add_argument("--online", action="store_true", help="let the tests download hf-internal-testing checkpoints")
    parser.add_argument("pytest_args", nargs="*", help="further pytest arguments (after --)")
    args = parser.parse_args(argv)
    if not (args.checkout / "tests" / "testing_utils.py").exists():
        parser.error(f"{args.checkout} is not a diffusers checkout (no tests/testing_utils.py)")
    modes = ["stock", *[m for m in args.modes if m != "stock"]]
    results = {mode: run_mode(args.checkout, mode, args.files, args.keyword, args.pytest_args, args.online) for mode in modes}
    regressions = {}
    stock = results["stock"]
    for mode in modes[1:]:
        lost = sorted(t for t, s in stock.items() if s == "passed" and results[mode].get(t) != "passed"
                      and not by_design(t, mode))
        regressions[mode] = lost
        counts = {s: sum(v == s for v in results[mode].values()) for s in ("passed", "failed", "skipped")}
        print(f"\n[{mode}] {counts}; stock passed {sum(v == 'passed' for v in stock.values())}; "
              f"passing on stock but not here (not by design): {len(lost)}")
        for test_id in lost:
            print(f"  {test_id}: {results[mode].get(test_id, 'not run')}")
    if args.report:
        args.report.write_text(json.dumps({"outcomes": results, "regressions": regressions}, indent=2))
    return 1 if any(regressions.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
