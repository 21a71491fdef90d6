#!/usr/bin/env python
"""Markdown tables of docs/tuning.md from the records `cached-diffusers tune` wrote under benchmarks/tuning/.

    python scripts/tuning_report.py benchmarks/tuning/qwenimage

One row per target (the chosen config, its computed steps, ideal and measured speedup, its worst tuning PSNR and the
PSNR the margin rule held to the target (`--margin auto`: the prediction bound; a number: worst less the margin),
held-out worst and mean PSNR, generations run and wall seconds), then every method's published default setting at the same model and steps (from the first record
that measured them: `tune --compare-defaults`).
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys

from cached_diffusers.registry import cache_method
from cached_diffusers.tools.files import json_float, markdown_table


def _psnr(value) -> float:
    """A PSNR from a record: "inf" (identical images) as written now, or null as older records wrote it."""
    return json_float(value, null=math.inf)


def _steps(computed: dict) -> str:
    values = sorted(set(computed.values()))
    text = " / ".join(f"{v:g}" for v in values)
    return text if len(values) == 1 else f"{text} (per branch)"


def report(folder: str) -> str:
    records = []
    for path in glob.glob(os.path.join(folder, "psnr*", "cache_config.tuning.json")):
        with open(path, encoding="utf-8") as f:
            records.append(json.load(f))
    records.sort(key=lambda r: -r["target_psnr"])
    if not records:
        raise SystemExit(f"no cache_config.tuning.json under {folder}/psnr*/")
    rows = []
    for r in records:
        c, h, lat = r["chosen"], r["held_out"], r.get("latency") or {}
        measured = f"{lat['speedup']:.2f}x ({lat['ratio_min']:.2f}-{lat['ratio_max']:.2f})" if lat else "-"
        margin = r.get("margin", 0)
        worst = _psnr(c["worst_psnr"])
        floor = (_psnr(r["psnr_floor"]) if "psnr_floor" in r
                 else worst - (margin if isinstance(margin, (int, float)) else 0))
        rule = f"bound {floor:.2f}" if margin == "auto" else (f"+{margin:g} dB margin" if margin else "worst")
        rows.append([
            f"{r['target_psnr']:g} dB", c["method"], c["setting"], _steps(c["computed_steps"]),
            f"{c['ideal_speedup']:.2f}x", measured, f"{worst:.2f} dB ({rule})",
            f"{_psnr(h['worst_psnr']):.2f} / {_psnr(h['mean_psnr']):.2f} dB", "yes" if h["held"] else "**no**",
            r["generations"]["total"], f"{r['seconds']:.0f}",
        ])
    lines = markdown_table(
        ["target", "chosen", "setting", f"computed steps of {records[0]['num_inference_steps']}", "ideal speedup",
         "measured speedup", "tuning worst PSNR (margin rule)", "held-out worst / mean PSNR", "held", "generations",
         "seconds"], rows)
    defaults = next((r["defaults"] for r in records if r.get("defaults")), [])
    skipped = next((r["skipped"] for r in records if r.get("defaults")), [])
    if defaults:
        lines += ["", "Published default settings at the same model and steps (tuning prompts, no tuning):", ""]
        default_rows = []
        for d in defaults:
            cfg = d["config"]
            sweep = cache_method(d["method"]).sweep  # the knob the method's module declares
            knob = sweep.knob if sweep is not None and sweep.kind != "budget" else None
            setting = f"{knob}={cfg[knob]:g}" if knob in cfg else "default"
            default_rows.append([d["method"], setting, _steps(d["computed_steps"]), f"{d['ideal_speedup']:.2f}x",
                                 f"{_psnr(d['worst_psnr']):.2f} / {_psnr(d['mean_psnr']):.2f} dB"])
        lines += markdown_table(["method", "setting", "computed steps", "ideal speedup", "worst / mean PSNR"],
                                default_rows)
        for s in skipped:
            lines.append(f"\n{s['method']}: {s['reason']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        print(report(folder))
