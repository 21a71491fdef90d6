"""What the scripts run for each cache method, read from the registry (:mod:`cached_diffusers.registry`).

The scripts keep no list of methods: their choices are the registered methods (:func:`method_names`), plus run modes
built from them (:func:`run_modes`: ``<method>-calibrate`` for a method calibrated from runs, ``scm`` for DBCache with
cache-dit's "fast" steps computation mask). A method's setting is its published default (``Sweep.published``) fitted
to the model (:func:`published_config`); ``--threshold METHOD=VALUE`` (:func:`parse_thresholds`) sets its sweep knob.
A method registered later appears in every script with no edit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

CALIBRATE = "-calibrate"
SCM_BASE, SCM_MASK = "dbcache", "fast"
"""The ``scm`` run mode: the registered DBCache at its setting, with ``scm_steps_mask="fast"``."""


def method_names() -> list[str]:
    """The registered caching methods, in the registry's listing order (``"none"`` left out)."""
    from cached_diffusers.registry import cache_methods

    return [m.name for m in cache_methods(enabled=True)]


def calibrates_from_runs(name: str) -> bool:
    """Whether ``name`` has a ``calibrate=True`` run (a ``"runs"`` calibration)."""
    from cached_diffusers.registry import cache_method

    method = cache_method(name)
    fields = {f.name for f in dataclasses.fields(method.config_class)}
    return method.calibration == "runs" and "calibrate" in fields


def run_modes() -> list[str]:
    """Every name a script accepts: each method, then ``<method>-calibrate`` after a method calibrated from runs,
    and ``scm`` when DBCache is registered."""
    names = []
    for name in method_names():
        names.append(name)
        if calibrates_from_runs(name):
            names.append(name + CALIBRATE)
    if SCM_BASE in names:
        names.append("scm")
    return names


def base_method(mode: str) -> str:
    """The registered method a run mode is built from."""
    if mode == "scm":
        return SCM_BASE
    return mode[: -len(CALIBRATE)] if mode.endswith(CALIBRATE) else mode


def knob(name: str) -> str | None:
    """The field ``--threshold name=VALUE`` sets (the method's sweep knob); ``None`` for a method without a value
    knob (no sweep, or a planned schedule's budget)."""
    from cached_diffusers.registry import cache_method

    sweep = cache_method(name).sweep
    return sweep.knob if sweep is not None and sweep.kind != "budget" else None


def parse_thresholds(items: Iterable[str] | None) -> dict[str, float]:
    """``["teacache=0.3", ...]`` -> ``{"teacache": 0.3}``; raises ``ValueError`` naming what is wrong."""
    values: dict[str, float] = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in method_names():
            raise ValueError(f"--threshold {item!r}: want METHOD=VALUE, METHOD one of {', '.join(method_names())}")
        if knob(name) is None:
            raise ValueError(f"--threshold {item!r}: {name} has no threshold or interval knob")
        try:
            values[name] = float(text)
        except ValueError:
            raise ValueError(f"--threshold {item!r}: {text!r} is not a number") from None
    return values


def threshold_help() -> str:
    knobs = ", ".join(f"{n}: {knob(n)}" for n in method_names() if knob(n) is not None)
    return f"METHOD=VALUE, repeatable: the method's sweep knob ({knobs}); default its published setting"


def default_plan(steps: int) -> list[int]:
    """A planned-schedule method's computed steps when none is calibrated: 0, 1, 2, every third step from 4 and the
    last step."""
    return sorted({0, 1, 2, steps - 1} | set(range(4, steps - 1, 3)))


def published_config(name: str, *, value: Any = None, steps: int, num_blocks: int | None = None, **data: Any):
    """The config ``name`` runs at: its published default (``Sweep.published``) with the knob at ``value`` when given,
    and the fields the method's ``sweep_config`` fits to the model (DBCache's ``Fn`` and warm-up from ``num_blocks``
    and ``steps``; ``data``'s TeaCache ``coefficients`` / MagCache ``mag_ratios``) taken from that fit. A planned
    schedule runs :func:`default_plan`; a method with no sweep its class defaults."""
    from cached_diffusers.registry import cache_method

    method = cache_method(name)
    cls, sweep = method.config_class, method.sweep
    if sweep is None:
        return cls(**data)
    if sweep.kind == "budget":
        return cls(computed_steps=default_plan(steps), num_inference_steps=steps, **data)
    published = dict(sweep.published)
    if value is None:
        value = published.get(sweep.knob, getattr(cls, sweep.knob, None))
    fitted = cls.sweep_config(value, num_blocks=num_blocks, num_steps=steps, **data)
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    keep = {k: v for k, v in published.items() if k != sweep.knob and getattr(fitted, k) == defaults.get(k, object())}
    return fitted.replace(**keep) if keep else fitted


def mode_config(mode: str, **context: Any):
    """The config of a run mode (see :func:`run_modes`): a ``-calibrate`` mode is ``calibrate=True``, ``scm`` the
    DBCache setting with the "fast" mask, any other the method's :func:`published_config`."""
    from cached_diffusers.registry import cache_method

    base = base_method(mode)
    if mode.endswith(CALIBRATE):
        return cache_method(base).config_class(calibrate=True)
    config = published_config(base, **context)
    return config.replace(scm_steps_mask=SCM_MASK) if mode == "scm" else config


def smoke_configs(transformer: Any, steps: int, names: Iterable[str] | None = None) -> list[tuple[str, Any, str | None]]:
    """What a smoke script runs on ``transformer`` (a cached transformer): ``(label, config, reason)`` per registered
    method (or per name of ``names``), in the registry's order. The config is the method's :func:`published_config`
    fitted to the model's blocks and ``steps``; when the model lacks the data it needs (TeaCache coefficients, MagCache
    ratios) and the method calibrates from runs, its calibration run (``<method>-calibrate``) instead, which exercises
    the same path; ``reason`` says why the model cannot run it (``None``: it can;
    :func:`cached_diffusers.policies.unsupported_reason`). The label names the method and its knob's value."""
    from cached_diffusers.policies import unsupported_reason

    spec = transformer.cache_engine.spec
    num_blocks = getattr(transformer, "num_cache_blocks", None)
    rows = []
    for name in names if names is not None else method_names():
        config = published_config(name, steps=steps, num_blocks=num_blocks)
        field = knob(name)
        label = f"{name} {field}={getattr(config, field)}" if field else name
        reason = unsupported_reason(config, spec)
        if reason is not None and calibrates_from_runs(name):
            label, config = name + CALIBRATE, mode_config(name + CALIBRATE)
            reason = unsupported_reason(config, spec)
        rows.append((label, config, reason))
    return rows
