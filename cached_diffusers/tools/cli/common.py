"""What the subcommands share: input checks (devices, output paths, call values), the model's pipeline class, its
generation defaults and the sampling arguments of a call, and loading the cached pipeline."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from typing import Any

from ..timing import make_generator
from .options import UNSET


# -- shared helpers --------------------------------------------------------------------------------------------------
def _device_and_dtype(device: str | None, dtype: str | None):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be one of float32, bfloat16, float16, got {dtype!r}")
    return device, getattr(torch, dtype)


def _check_device(device: str) -> None:
    """Raises ``ValueError`` naming ``--device`` for a device string torch does not parse or a device not present."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:N, mps): {error}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is available here (torch sees none); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are available")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: unsupported device type {parsed.type!r} (cpu, cuda, cuda:N, mps)")


def check_output_file(flag: str, path: str, image: bool = False) -> None:
    """Check, before any work, that ``path`` can be written: not a directory, its folder exists or can be created,
    is writable, and (``image=True``) its extension is an image format PIL writes.

    Raises:
        ValueError: naming ``flag`` and the path.
    """
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory; give a file path")
    check_output_dir(flag, os.path.dirname(os.path.abspath(path)), describe=path)
    if os.path.isdir(os.path.dirname(os.path.abspath(path))):
        existed = os.path.exists(path)
        try:
            with open(path, "ab"):
                pass
        except OSError as error:
            raise ValueError(f"{flag} {path!r} cannot be written: {error.strerror or error}") from None
        if not existed:
            os.remove(path)
    if image:
        from PIL import Image

        ext = os.path.splitext(path)[1].lower()
        if ext not in Image.registered_extensions():
            raise ValueError(f"{flag} {path!r}: unknown image file extension {ext or '(none)'!r}; use e.g. .png or .jpg")


def check_output_dir(flag: str, directory: str, describe: str | None = None) -> None:
    """Check that ``directory`` is a writable folder or can be created; ``ValueError`` naming ``flag`` otherwise."""
    what = describe or directory
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {what!r}: {existing!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        reason = error.strerror or error
        wanted = os.path.abspath(directory)
        if wanted != existing:  # name the missing folder first: it is what the user typed
            raise ValueError(
                f"{flag} {what!r}: the folder {wanted!r} does not exist and cannot be created ({existing!r} is not "
                f"writable: {reason})"
            ) from None
        raise ValueError(f"{flag} {what!r}: the folder {existing!r} is not writable ({reason})") from None


def _check_call_value(label: str, name: str, value: Any) -> None:
    """One sampling argument of the pipeline call (``name``), from an option or a ``generation_defaults.json``;
    ``label`` names where it came from (``--steps``, or the file and key).

    Raises:
        ValueError: naming ``label`` and the valid range.
    """
    from ...validation import MAX_STEPS

    if name in ("num_inference_steps", "height", "width", "max_sequence_length"):
        high = MAX_STEPS if name == "num_inference_steps" else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (high is not None and value > high):
            bounds = f"in [1, {high}]" if high is not None else ">= 1"
            unit = " (pixels)" if name in ("height", "width") else ""
            raise ValueError(f"{label} must be an integer {bounds}{unit}, got {value!r}")
    elif name in ("true_cfg_scale", "guidance_scale"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{label} must be a finite number, got {value!r}")
    elif name == "negative_prompt":
        if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{label} must be a string or a list of strings, got {value!r}")


def _check_sampling_args(args: argparse.Namespace) -> None:
    """The sampling options, checked before anything is loaded; ``ValueError`` naming the option."""
    for dest, name in SAMPLING_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is not None:
            _check_call_value("--" + dest.replace("_", "-"), name, value)


def _check_size_for(pipe, values: dict[str, tuple[str, Any]]) -> None:
    """Height and width against the pipeline's size granularity (twice the VAE scale factor): the pipelines would
    silently round another size down. ``values``: ``{"height": (label, value), ...}`` as given."""
    scale = getattr(pipe, "vae_scale_factor", None)
    if not isinstance(scale, int) or scale < 1:
        return
    multiple = 2 * scale
    for name in ("height", "width"):
        if name not in values:
            continue
        label, value = values[name]
        if value % multiple:
            lower, upper = max(multiple, value - value % multiple), value - value % multiple + multiple
            raise ValueError(
                f"{label} must be a multiple of {multiple} pixels for {type(pipe).__name__}, got {value} "
                f"(nearest: {lower} or {upper})"
            )


def _output_paths(output: str, count: int) -> list[str]:
    if count == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}-{i}{ext or '.png'}" for i in range(count)]


# -- the model: its pipeline class, generation defaults and loading -------------------------------------------------
def _quiet_loading() -> None:
    """No loading progress bars (diffusers' components, transformers' weights): ``--quiet``."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _check_model(model: str) -> None:
    """``--model`` before anything is loaded: a diffusers directory (it has ``model_index.json``), or a Hub id the
    Hub can serve (cached, or the Hub reachable within seconds).

    Raises:
        ValueError: naming ``--model``, for a local-looking path that does not exist, a folder or file that is not a
            diffusers model directory, or a Hub id while offline or with the Hub out of reach.
    """
    from ...hub import check_local_path, hub_unavailable_reason

    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ValueError(f"--model {model!r} is not a diffusers model directory: it has no model_index.json")
        return
    if os.path.exists(model):
        raise ValueError(f"--model {model!r} is a file; give a diffusers model directory or a Hub id")
    try:
        check_local_path(model)
    except FileNotFoundError as error:
        raise ValueError(f"--model: {error}") from None
    reason = hub_unavailable_reason(model)
    if reason is not None:
        raise ValueError(f"--model {model!r} is not a local directory, and as a Hub id it cannot be loaded: {reason}")


def _pipeline_class_for(model: str):
    """The cached pipeline class for ``model``'s ``model_index.json`` (:func:`cached_diffusers.auto.cached_pipeline_class_for`).

    Raises:
        ValueError: naming the model, for a pipeline without cached counterpart (the message lists the supported ones).
    """
    from ...auto import cached_pipeline_class_for

    return cached_pipeline_class_for(model)


def _parent_call_parameters(pipeline_class: type):
    """The parameters (``inspect.Parameter`` by name) of the pipeline class's diffusers parent ``__call__``."""
    import inspect

    from ...model_mixin import diffusers_parent
    from ...pipeline_mixin import CachedPipelineMixin

    return inspect.signature(diffusers_parent(pipeline_class, CachedPipelineMixin).__call__).parameters


def _call_parameters(pipeline_class: type) -> set[str]:
    """Names of the arguments the pipeline class's diffusers parent ``__call__`` takes."""
    return set(_parent_call_parameters(pipeline_class))


SAMPLING_OPTIONS = {
    "steps": "num_inference_steps",
    "negative_prompt": "negative_prompt",
    "true_cfg_scale": "true_cfg_scale",
    "guidance_scale": "guidance_scale",
    "height": "height",
    "width": "width",
    "max_sequence_length": "max_sequence_length",
}
"""Command-line option (``argparse`` dest) -> the pipeline ``__call__`` argument it sets."""

NOT_DEFAULTS = ("prompt", "generator", "latents", "callback_on_step_end", "output_type", "return_dict")
"""Call arguments a ``generation_defaults.json`` may not set (per-call values, or what the command line decides)."""


def _checked_generation_defaults(model: str | None) -> tuple[dict[str, Any], str | None]:
    """``(defaults, file)``: the model directory's ``generation_defaults.json`` (``({}, None)`` without one), its
    values checked as the matching options are (no torch is imported).

    Raises:
        ValueError: naming the file and the key, for a value the matching option would refuse.
    """
    from ...hub import load_generation_defaults

    defaults, source = load_generation_defaults(model) if model is not None else ({}, None)
    for name, value in defaults.items():
        _check_call_value(f"{source}: {name!r}", name, value)
    return defaults, source


def _generation_defaults(pipeline_class: type, model: str | None) -> dict[str, Any]:
    """The model directory's ``generation_defaults.json`` (``{}`` without one), checked against ``pipeline_class``.

    Raises:
        ValueError: naming the file, when it is not a JSON object, holds a value the matching option would refuse,
            or sets an argument the pipeline's ``__call__`` does not take (or one of :data:`NOT_DEFAULTS`).
    """
    defaults, source = _checked_generation_defaults(model)
    accepted = _call_parameters(pipeline_class) - set(NOT_DEFAULTS) - {"self"}
    for name in defaults:
        if name not in accepted:
            raise ValueError(
                f"{source}: {name!r} is not a default call argument of {pipeline_class.__name__} "
                f"(it takes {', '.join(sorted(accepted))})"
            )
    return defaults


def _sampling_kwargs(pipe, args: argparse.Namespace, seed: int, num_prompts: int = 1) -> dict[str, Any]:
    """The sampling arguments of one call: the model directory's ``generation_defaults.json`` (when it has one),
    overridden by the options the user gave, plus the seeded generator; checked against the pipeline. A single
    negative prompt is repeated for ``num_prompts`` prompts (the pipelines want one per prompt).

    Raises:
        ValueError: for an option (or, naming the file, a default) the pipeline's ``__call__`` does not take.
    """
    accepted = _call_parameters(type(pipe))
    kwargs = dict(_generation_defaults(type(pipe), args.model))
    _, source = _checked_generation_defaults(args.model)
    labels = {name: (f"{source}: {name!r}", value) for name, value in kwargs.items()}
    for dest, name in SAMPLING_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        flag = "--" + dest.replace("_", "-")
        if name not in accepted:
            raise ValueError(f"{flag} is not an argument of {type(pipe).__name__} (from {args.model})")
        kwargs[name], labels[name] = value, (flag, value)
    _check_size_for(pipe, labels)
    if isinstance(kwargs.get("negative_prompt"), str) and num_prompts > 1:
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * num_prompts
    kwargs["generator"] = make_generator(pipe.device.type, seed)
    return kwargs


def _call_value(pipe, kwargs: dict[str, Any], name: str) -> Any:
    """``kwargs[name]``, else the default of the pipeline's ``__call__`` for it (``None`` when it has none)."""
    import inspect

    if name in kwargs:
        return kwargs[name]
    parameter = _parent_call_parameters(type(pipe)).get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def with_saved_calibration(config, saved):
    """``config`` with the calibrated data of ``saved`` (the model directory's ``cache_config.json``) filled in.

    ``--cache teacache --rel-l1-thresh 0.3`` on a directory calibrated with ``cached-diffusers calibrate`` uses that
    directory's coefficients (MagCache: its ratios; any method: its ``calibrated_data()``), not the model class's
    defaults; values given on the command line (``--coefficients``, ``--mag-ratios``) and calibration runs are left
    alone.
    """
    import dataclasses

    if config is None or not isinstance(saved, type(config)) or getattr(config, "calibrate", False):
        return config
    # the method's calibrated data (CacheConfig.calibrated_data: TeaCache's coefficients, MagCache's ratios)
    missing = {name: value for name, value in saved.calibrated_data().items() if getattr(config, name) is None}
    return dataclasses.replace(config, **missing) if missing else config


def _load_pipeline(args: argparse.Namespace, cache_config):
    """The cached pipeline of ``--model`` (checked with :func:`_check_model` by the caller, before any other work)."""
    from ...hub import load_cache_config

    device, dtype = _device_and_dtype(args.device, args.dtype)
    pipeline_class = _pipeline_class_for(args.model)
    _generation_defaults(pipeline_class, args.model)  # a bad file fails before any weight is loaded
    if cache_config is not UNSET and os.path.isdir(args.model):
        cache_config = with_saved_calibration(cache_config, load_cache_config(args.model)[0])
    kwargs = {} if cache_config is UNSET else {"cache_config": cache_config}
    if args.quiet:
        _quiet_loading()
    pipe = pipeline_class.from_pretrained(args.model, dtype=dtype, **kwargs)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=args.quiet)
    return pipe
