"""The ``cached-diffusers`` command line.

``cached-diffusers generate``: load a model (local directory or Hub id) as a cached pipeline and write images.
``cached-diffusers demo``: the embedded default model, generated with and without the cache, compared.

Cache method parameters are options named after the config fields (``--rel-l1-thresh 0.3``), generated from the
registered config classes; an option that does not belong to the chosen ``--cache`` method is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

import typing
from typing import Any, Sequence

from .files import keep_backup, refuse_existing
from .timing import make_generator, timed_call

__all__ = ["main", "build_parser"]


# -- cache options ---------------------------------------------------------------------------------------------------
def _config_fields() -> dict[str, tuple[type, dict[str, Any]]]:
    """``{field name: (annotated type, {method: default})}`` over every registered cache config class."""
    from ..registry import cache_methods

    fields: dict[str, tuple[type, dict[str, Any]]] = {}
    for cls in sorted((m.config_class for m in cache_methods()), key=lambda c: c.method):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, (hints[f.name], {}))[1][cls.method] = f.default
    return dict(sorted(fields.items()))


def _describe_defaults(defaults: dict[str, Any]) -> str:
    values = set(map(repr, defaults.values()))
    if len(values) == 1:
        return f"{', '.join(defaults)}; default {next(iter(defaults.values()))}"
    return "; ".join(f"{method}: default {value}" for method, value in defaults.items())


def _parse_optional(kind: type):
    def parse(text: str):
        if text.lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def _parse_json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


UNSET = object()
"""``cache_config_from_args`` when no cache option was given: the model directory's ``cache_config.json`` applies."""


def _add_cache_arguments(parser: argparse.ArgumentParser, default_method: str | None) -> None:
    from ..configs import available_cache_methods

    group = parser.add_argument_group("cache")
    group.add_argument(
        "--cache",
        default=default_method,
        metavar="METHOD",
        help=f"cache method: {', '.join(available_cache_methods())} (default: "
        + (default_method or "the model directory's cache_config.json if it has one, else none")
        + ")",
    )
    group.add_argument(
        "--cache-config",
        metavar="JSON_OR_FILE",
        help="a whole cache config as JSON ({\"method\": ..., ...}) or a path to a JSON file; overrides --cache",
    )
    for name, (annotation, defaults) in _config_fields().items():
        flag = "--" + name.replace("_", "-")
        args = typing.get_args(annotation)
        help_text = f"({_describe_defaults(defaults)})"
        if annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif str in args:  # a name or a structure, e.g. scm_steps_mask: "fast", "[1,1,0,1]", '{"compute_bins": ...}'
            group.add_argument(flag, dest=name, type=_parse_json_or_text, default=None, help=help_text)
        elif any(typing.get_origin(a) is tuple for a in (annotation, *args)):
            group.add_argument(flag, dest=name, type=float, nargs="+", default=None, help=help_text)
        else:
            kind = next((a for a in (annotation, *args) if a in (int, float, str)), str)
            group.add_argument(flag, dest=name, type=_parse_optional(kind), default=None, help=help_text)


def cache_config_from_args(args: argparse.Namespace):
    """The cache config the options describe (``None`` for no caching; :data:`UNSET` when no option was given and
    the command has no default method).

    Raises:
        ValueError: unknown method, a parameter that does not belong to the method (or given without a method), or
            an invalid value.
    """
    from ..configs import cache_config_from_dict

    given = {name: getattr(args, name) for name in _config_fields() if getattr(args, name) is not None}
    if args.cache is None and not args.cache_config:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"{flags}: choose the cache method with --cache METHOD (or --cache-config)")
        return UNSET
    if args.cache_config:
        data = _json_argument("--cache-config", args.cache_config, "a JSON object")
        if not isinstance(data, dict):
            raise ValueError(
                f"--cache-config must be a JSON object ({{\"method\": ..., ...}}), got {type(data).__name__} {data!r}"
            )
        return cache_config_from_dict({**data, **given})
    return cache_config_from_dict({"method": args.cache, **given})


# -- shared helpers --------------------------------------------------------------------------------------------------
def _json_argument(flag: str, text: str, what: str):
    """An option's value as JSON: inline, or read from the file it names.

    Raises:
        ValueError: naming ``flag``, when it is neither valid JSON nor a readable JSON file.
    """
    source = ""
    if os.path.isdir(text):
        raise ValueError(f"{flag} {text!r} is a directory; give {what} or the path of a JSON file")
    if os.path.exists(text):
        source = f" (the file {text})"
        try:
            with open(text, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as error:
            raise ValueError(f"{flag}: the file {text!r} is not UTF-8 text ({error})") from None
        except OSError as error:
            raise ValueError(f"{flag}: cannot read the file {text!r}: {error.strerror or error}") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, too many digits, nested too deeply
        if not source and _looks_like_a_path(text):
            raise ValueError(f"{flag}: no such file {text!r} (give {what} inline, or the path of a JSON file)") from None
        raise ValueError(f"{flag}{source} is neither {what} nor a readable JSON file: {error}") from None


def _looks_like_a_path(text: str) -> bool:
    """Whether an option value that is not JSON was meant as a file name (``x.json``, ``dir/x``), not inline JSON."""
    text = text.strip()
    return bool(text) and text[0] not in "{[\"" and (text.lower().endswith(".json") or os.sep in text or "/" in text)


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
    from ..validation import MAX_STEPS

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


# -- generate --------------------------------------------------------------------------------------------------------
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
    from ..hub import check_local_path, hub_unavailable_reason

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
    from ..auto import cached_pipeline_class_for

    return cached_pipeline_class_for(model)


def _parent_call_parameters(pipeline_class: type):
    """The parameters (``inspect.Parameter`` by name) of the pipeline class's diffusers parent ``__call__``."""
    import inspect

    from ..model_mixin import diffusers_parent
    from ..pipeline_mixin import CachedPipelineMixin

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
    from ..hub import load_generation_defaults

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
    from ..hub import load_cache_config

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


def cmd_generate(args: argparse.Namespace) -> int:
    _check_threads(args)
    _check_sampling_args(args)
    check_output_file("--output", args.output, image=True)
    config = cache_config_from_args(args)
    _set_threads(args)
    _device_and_dtype(args.device, args.dtype)
    _check_model(args.model)  # after the options: they are quicker to fix, and a Hub id may take seconds
    _checked_generation_defaults(args.model)
    rank = 0
    if args.cfg_parallel or args.ulysses_degree != 1:  # under torchrun: join the group before loading (device)
        from ..multi_gpu import cfg_degree_of, init_distributed, parallelize

        if args.ulysses_degree < 1:
            raise ValueError(f"--ulysses-degree must be >= 1, got {args.ulysses_degree}")
        rank, world_size = init_distributed()
        cfg_degree_of(world_size, args.cfg_parallel, args.ulysses_degree)  # before any weight is loaded
    pipe = _load_pipeline(args, config)
    if args.cfg_parallel or args.ulysses_degree != 1:
        parallelize(pipe, cfg_parallel=args.cfg_parallel, ulysses_degree=args.ulysses_degree)
    kwargs = {"prompt": args.prompt, **_sampling_kwargs(pipe, args, args.seed, num_prompts=len(args.prompt))}
    output, seconds = timed_call(pipe, **kwargs)
    if rank != 0:  # every rank returns the same images; rank 0 writes them. Each rank's stats are its branches'.
        print(f"rank {rank}: {pipe.cache_stats.summary()}")
        return 0
    paths = _output_paths(args.output, len(output.images))
    for image, path in zip(output.images, paths):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        image.save(path)
    print(f"wrote {', '.join(paths)}")
    print(f"wall time: {seconds:.2f} s ({_call_value(pipe, kwargs, 'num_inference_steps')} steps)")
    print(pipe.cache_stats.summary())
    return 0


# -- calibrate -------------------------------------------------------------------------------------------------------
def _shipped_models_folder() -> str:
    """The installed package's folder of shipped models (``cached_diffusers/assets``), resolved."""
    return os.path.realpath(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets"))


def _check_calibration_output(path: str, overwrite: bool) -> None:
    """A file ``calibrate`` is about to write: never inside the shipped models, never an existing file unless
    ``--overwrite`` (which keeps the old one as ``.bak``, see :func:`_write_json`).

    Raises:
        ValueError: naming ``--output`` and the path.
    """
    shipped = _shipped_models_folder()
    if os.path.commonpath([os.path.realpath(path), shipped]) == shipped:
        raise ValueError(
            f"--output {path!r} is inside the installed package's shipped models ({shipped}), which calibrate never "
            "changes: give --output a path elsewhere"
        )
    check_output_file("--output", path)
    refuse_existing(path, overwrite, "--output")


def _write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON, after :func:`~cached_diffusers.tools.files.keep_backup`."""
    keep_backup(path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _calibration_methods():
    """The registered methods ``calibrate`` knows (those with a ``calibration``), in listing order."""
    from ..registry import cache_methods

    return [m for m in cache_methods(enabled=True) if m.calibration is not None]


def _calibrated_by(kind: str) -> list[str]:
    """Names of the methods calibrated by ``kind`` (``"runs"`` or ``"schedule"``)."""
    return [m.name for m in _calibration_methods() if m.calibration == kind]


def _default_output(args: argparse.Namespace) -> str:
    return args.output or (
        os.path.join(args.model, "cache_config.json") if os.path.isdir(args.model) else "cache_config.json"
    )


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..registry import cache_method

    method = args.method
    cls = cache_method(method).config_class
    _check_threads(args)
    if cls.calibration == "schedule":
        return _calibrate_schedule(args)
    given = [flag for flag, value in (("--budget", args.budget), ("--strength", args.strength),
                                      ("--error-matrix", args.error_matrix)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: for --method {' or '.join(_calibrated_by('schedule'))} only, not {method}")
    if (cls.calibration_target is not None) != (args.computed_steps is not None):
        targets = " or ".join(m.name for m in _calibration_methods() if m.config_class.calibration_target)
        raise ValueError(
            f"--method {targets} needs --computed-steps N (the target computed steps per branch), and only it takes it"
        )
    _check_sampling_args(args)
    output = _default_output(args)
    provenance = os.path.splitext(output)[0] + ".calibration.json"
    _check_calibration_output(output, args.overwrite)
    _check_calibration_output(provenance, args.overwrite)
    _check_model(args.model)
    _checked_generation_defaults(args.model)
    from .tiny import DEFAULT_PROMPTS  # torch, after every check

    _set_threads(args)
    _device_and_dtype(args.device, args.dtype)
    calibration = cls(calibrate=True)
    pipe = _load_pipeline(args, calibration)
    pipe.cache_config = calibration  # whatever the directory held: calibration never reuses
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    runs = []
    for i, prompt in enumerate(prompts):
        kwargs = _sampling_kwargs(pipe, args, args.seed + i)
        pipe(prompt=prompt, **kwargs)
        runs.append(pipe.cache_stats)
    branches = sorted({b for run in runs for b in run.branches})
    settings = {name: _call_value(pipe, kwargs, name) for name in SAMPLING_OPTIONS.values()}
    print(
        f"calibrated {method} on {len(prompts)} prompt(s), {settings['num_inference_steps']} steps, "
        f"branches {', '.join(branches)}"
    )
    config, quality, lines = cls.calibrated(runs, vars(args))
    for line in lines:
        print(line)
    _write_json(output, config.to_dict())
    _write_json(provenance, {
        "model": args.model, "method": method, "prompts": prompts, **settings, "seed": args.seed,
        "fit": quality, "date": time.strftime("%Y-%m-%d"), "calibrated_with": "cached-diffusers calibrate",
    })
    print(f"wrote {output} (and its provenance, {provenance})")
    return 0


def _schedule_outputs(args: argparse.Namespace, budgets: list[int]) -> tuple[dict[int, str], str, str]:
    """``({budget: cache config path}, error matrix path, provenance path)`` of a planned-schedule calibration."""
    output = _default_output(args)
    stem, ext = os.path.splitext(output)
    configs = {b: output for b in budgets} if len(budgets) == 1 else {b: f"{stem}-b{b}{ext or '.json'}" for b in budgets}
    return configs, f"{stem}.error_matrix.json", f"{stem}.calibration.json"


def first_executed_step(num_steps: int, strength: float | None) -> int:
    """The first step that runs at ``strength`` (``None``: 1) of an ``num_steps`` schedule, as diffusers' img2img and
    inpaint pipelines compute it (``get_timesteps``: ``t_start = int(max(N - min(N * strength, N), 0))``)."""
    if strength is None:
        return 0
    return int(max(num_steps - min(num_steps * strength, num_steps), 0))


def _check_budgets(budgets: list[int], num_steps: int, source: str, strength: float | None = None) -> None:
    """``--budget`` values against the steps that run (``ValueError`` naming the step count and where it came from)."""
    executed = num_steps - first_executed_step(num_steps, strength)
    where = f"{source}" if strength is None else f"the steps run at --strength {strength:g} of {num_steps}, {source}"
    if executed < 2:
        raise ValueError(f"--strength {strength:g} runs {executed} of {num_steps} steps: a schedule needs at least 2")
    for b in budgets:
        if not 2 <= b <= executed:
            raise ValueError(f"--budget must be in [2, {executed}] ({where}), got {b}")


def _plan_for_strength(errors, budgets: list[int], first: int) -> dict[int, list[int]]:
    """``{budget: computed steps}``: the lexicographic-minimax plan over the executed steps ``first .. N-1`` (the
    error matrix's lower right block), with step 0 in front when ``first > 0`` (never executed; configs start at 0)."""
    from ..schedules import solve_budgets

    solved = solve_budgets(errors[first:, first:], budgets)
    return {b: ([0] if first else []) + [first + s for s in steps] for b, steps in solved.items()}


def _calibrate_schedule(args: argparse.Namespace) -> int:
    """``calibrate --method lemica|meancache``: measure (or load) the error matrix, solve every budget, write one cache
    config per budget, the matrix and the provenance (see :mod:`cached_diffusers.calibration_schedules`)."""
    from ..calibration_schedules import load_error_matrix, measure_edge_errors, save_error_matrix
    from ..registry import cache_method
    from ..schedules import path_costs

    method = args.method
    cls = cache_method(method).config_class
    needs_model = cls.calibration_needs_model
    if args.computed_steps is not None:
        targets = " or ".join(m.name for m in _calibration_methods() if m.config_class.calibration_target)
        raise ValueError(f"--computed-steps: for --method {targets} only, not {method} (its budget is --budget)")
    budgets = sorted(set(args.budget or ()), reverse=True)
    if not budgets:
        raise ValueError(f"--method {method} needs --budget B [B ...]: the computed steps per schedule (e.g. 25 17 10)")
    if args.strength is not None and not (math.isfinite(args.strength) and 0 < args.strength <= 1):
        raise ValueError(f"--strength must be a number in (0, 1], got {args.strength:g}")
    _check_sampling_args(args)
    configs, matrix_path, provenance_path = _schedule_outputs(args, budgets)
    for path in (*configs.values(), provenance_path, *(() if args.error_matrix else (matrix_path,))):
        _check_calibration_output(path, args.overwrite)
    if args.error_matrix is None or needs_model:  # these load the model
        _check_model(args.model)
    if args.error_matrix is None:
        defaults, source = _checked_generation_defaults(args.model)
        known = (args.steps, "--steps") if args.steps is not None else (defaults.get("num_inference_steps"), source)
        if known[0] is not None:  # the budgets, before torch is imported and the model loaded
            _check_budgets(budgets, known[0], f"num_inference_steps, from {known[1]}", args.strength)
    os.makedirs(os.path.dirname(os.path.abspath(provenance_path)), exist_ok=True)
    loaded = None
    if args.error_matrix is not None:
        errors, loaded = load_error_matrix(args.error_matrix)
        num_steps = errors.shape[0]
        if args.steps is not None and args.steps != num_steps:
            raise ValueError(f"--steps {args.steps} differs from the {num_steps} steps of --error-matrix {args.error_matrix}")
        _check_budgets(budgets, num_steps, f"num_inference_steps, from --error-matrix {args.error_matrix}", args.strength)
        first = first_executed_step(num_steps, args.strength)
        solved = _plan_for_strength(errors, budgets, first)  # fails before any model is loaded
    say = (lambda line: None) if args.quiet else print
    pipe = None
    if loaded is None or needs_model:  # runs the model (torch, after every check)
        from .tiny import DEFAULT_PROMPTS

        prompts = args.prompt or list(DEFAULT_PROMPTS)
        _set_threads(args)
        _device_and_dtype(args.device, args.dtype)
        pipe = _load_pipeline(args, None)
        kwargs = _sampling_kwargs(pipe, args, args.seed)
        kwargs.pop("generator")
        if loaded is None:
            num_steps = int(_call_value(pipe, kwargs, "num_inference_steps"))
        kwargs.pop("num_inference_steps", None)
        _check_budgets(budgets, num_steps, "num_inference_steps", args.strength)
        settings = {name: _call_value(pipe, {**kwargs, "num_inference_steps": num_steps}, name)
                    for name in SAMPLING_OPTIONS.values()}
    if loaded is None:
        errors = measure_edge_errors(
            pipe, prompts, kwargs, num_steps, max_span=args.max_span, seed=args.seed, progress=say
        )
        provenance = {
            "model": args.model, "prompts": prompts, **settings, "seed": args.seed, "max_span": args.max_span,
            "metric": "relative L1 of the final latents against the uncached run, mean over prompts",
            "date": time.strftime("%Y-%m-%d"),
        }
        keep_backup(matrix_path)
        save_error_matrix(matrix_path, errors, provenance)
        first = first_executed_step(num_steps, args.strength)
        solved = _plan_for_strength(errors, budgets, first)
    else:
        provenance = loaded
        matrix_path = args.error_matrix
    record = {"model": args.model, "method": method, "error_matrix": matrix_path, "budgets": {},
              "strength": args.strength, "first_executed_step": first,
              "date": time.strftime("%Y-%m-%d"), "calibrated_with": "cached-diffusers calibrate",
              "matrix_provenance": {k: v for k, v in provenance.items() if k != "schema"}}
    for b in budgets:
        steps = solved[b]
        executed = [s for s in steps if s >= first]  # the plan's edges that run
        entry = {"computed_steps": steps, "sorted_edge_errors": list(path_costs(errors, executed))}
        config, extra = cls.planned(
            steps, num_steps, pipe=pipe, prompts=prompts if pipe is not None else None,
            kwargs=kwargs if pipe is not None else None, candidates=tuple(args.windows), seed=args.seed, progress=say,
        )
        entry.update(extra)
        _write_json(configs[b], config.to_dict())
        record["budgets"][str(b)] = {"cache_config": configs[b], **entry}
        print(f"{method} B={b}: computed steps {steps}; largest edge error {entry['sorted_edge_errors'][0]:.4g}")
    _write_json(provenance_path, record)
    print(f"wrote {', '.join(configs[b] for b in budgets)}, {matrix_path} and {provenance_path}")
    return 0


# -- demo ------------------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    import statistics

    import torch

    from .imaging import psnr, require_extra, side_by_side
    from .reference_model import DEMO_PROMPTS, REFERENCE_MODEL_DIR, load_reference_pipeline

    require_extra("skimage.metrics", "scikit-image")  # the PSNR, before any work

    _check_sampling_args(args)
    check_output_file("--output", args.output, image=True)
    config = cache_config_from_args(args)
    if config is None:
        raise ValueError("demo compares a cached run with an uncached one: choose a --cache method other than 'none'")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    _set_threads(args)
    if args.quiet:
        _quiet_loading()
    pipe = load_reference_pipeline()
    config = with_saved_calibration(config, pipe.cache_config)  # TeaCache with the model's calibrated coefficients
    pipe.set_progress_bar_config(disable=args.quiet)
    prompts = args.prompt or list(DEMO_PROMPTS)
    args = argparse.Namespace(**vars(args), model=os.fspath(REFERENCE_MODEL_DIR))
    kwargs = _sampling_kwargs(pipe, args, args.seed, num_prompts=len(prompts))
    kwargs.pop("generator")
    steps = _call_value(pipe, kwargs, "num_inference_steps")

    def run(cache_config):
        pipe.cache_config = cache_config
        output, seconds = timed_call(pipe, prompt=prompts, **kwargs, generator=make_generator("cpu", args.seed))
        return output, seconds, pipe.cache_stats

    print(f"reference model ({REFERENCE_MODEL_DIR.name}: Qwen-Image classes trained on emoji, offline), "
          f"{len(prompts)} prompt(s), {steps} steps, {torch.get_num_threads()} torch thread(s)")  # fmt: skip
    run(None), run(config)  # warm-up: first-call allocations and lazy initialisation, not timed
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    first: dict[str, tuple] = {}  # name -> (output, stats) of the first round
    for round_index in range(args.repeats):
        # interleaved, the order alternating per round, so that a slow phase of the machine hits both alike
        order = ("uncached", "cached") if round_index % 2 == 0 else ("cached", "uncached")
        for name in order:
            output, seconds, stats = run(None if name == "uncached" else config)
            times[name].append(seconds)
            first.setdefault(name, (output, stats))
    (uncached, _), (cached, cached_stats) = first["uncached"], first["cached"]
    ratios = sorted(u / c for u, c in zip(times["uncached"], times["cached"]))
    median = {name: statistics.median(values) for name, values in times.items()}

    def spread(values):
        return f"median of {len(values)}, range {min(values):.3f}-{max(values):.3f} s"

    print(f"uncached: {median['uncached']:.3f} s ({spread(times['uncached'])})")
    print(f"cached ({config.method}): {median['cached']:.3f} s ({spread(times['cached'])})")
    print(
        f"speedup: {median['uncached'] / median['cached']:.2f}x "
        f"(per-round ratios {ratios[0]:.2f}x-{ratios[-1]:.2f}x over {len(ratios)} interleaved rounds)"
    )
    for branch in cached_stats.branches.values():
        print(f"steps reused ({branch.branch}): {branch.num_reused} of {branch.num_calls} {branch.reused_steps}")
    for prompt, a, b in zip(prompts, uncached.images, cached.images):
        print(f"PSNR cached vs uncached, {prompt!r}: {psnr(a, b):.2f} dB")
    sheet = side_by_side([list(uncached.images), list(cached.images)])
    if max(sheet.size) < 512:  # the reference model draws 32 x 32 images: enlarge the sheet for viewing
        factor = 512 // max(sheet.size)
        sheet = sheet.resize((sheet.width * factor, sheet.height * factor), resample=0)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    sheet.save(args.output)
    print(f"wrote {args.output} (top row uncached, bottom row cached)")
    return 0


# -- bench -----------------------------------------------------------------------------------------------------------
EMBEDDED_MODEL = "reference model (cached_diffusers/assets/reference-qwenimage-emoji: Qwen-Image classes trained on emoji)"


def _load_config_file(flag: str, path: str):
    """A cache config from a JSON file; raises ``ValueError`` naming ``flag`` and the file."""
    from ..configs import cache_config_from_dict

    if not os.path.isfile(path):
        raise ValueError(f"{flag}: no such file {path!r}")
    try:
        return cache_config_from_dict(_json_argument(flag, path, "a JSON object"))
    except ValueError as error:
        raise ValueError(f"{flag} {path}: {error}") from None


def _bench_sweep(text: str) -> list:
    """Configs from ``--sweep``: a JSON list of cache config dicts, inline or in a file."""
    from ..configs import cache_config_from_dict

    data = _json_argument("--sweep", text, "a JSON list")
    if not isinstance(data, list) or not data:
        raise ValueError("--sweep must be a non-empty JSON list of cache configs ({\"method\": ..., ...})")
    return [cache_config_from_dict(item) for item in data]


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import check_methods, default_sweep, plot_pareto, run_benchmark, write_json, write_markdown
    from .imaging import require_extra
    from .reference_model import DEMO_PROMPTS

    require_extra("skimage.metrics", "scikit-image"), require_extra("matplotlib", "matplotlib")  # before any work
    _check_sampling_args(args)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output-dir {args.output_dir!r} is a file, not a folder")
    check_output_dir("--output-dir", args.output_dir)
    for name in ("results.json", "results.md", "pareto.png"):
        check_output_file("--output-dir", os.path.join(args.output_dir, name))
    if args.equal_budget is None and args.planned:
        raise ValueError("--planned is for --equal-budget: the LeMiCa / MeanCache schedules to compare")
    if args.equal_budget is not None:
        if args.sweep:
            raise ValueError("--sweep and --equal-budget exclude each other")
        for name in EQUAL_BUDGET_FILES:
            check_output_file("--output-dir", os.path.join(args.output_dir, name))
        planned = [_load_config_file("--planned", path) for path in args.planned or ()]
        for path, config in zip(args.planned or (), planned):
            if config is None or config.calibration != "schedule":
                names = " or ".join(
                    m.config_class.__name__.removesuffix("Config") for m in _calibration_methods() if m.calibration == "schedule"
                )
                raise ValueError(f"--planned {path}: not a {names} config")
    if args.sweep and args.methods:
        raise ValueError("--sweep and --methods exclude each other: --sweep lists the configs to run")
    if args.sweep and args.calibrated:
        raise ValueError("--sweep and --calibrated exclude each other: --calibrated feeds the default sweep")
    configs = _bench_sweep(args.sweep) if args.sweep else None
    methods = check_methods(args.methods)  # before loading anything
    if args.equal_budget is not None:
        from .equal_budget import budget_methods

        known = budget_methods()
        methods = tuple(m for m in (methods if args.methods else known))
        for m in methods:
            if m not in known:
                raise ValueError(f"--methods {m}: not tunable to a budget; valid with --equal-budget: {', '.join(known)}")
    calibrated = [_load_config_file("--calibrated", path) for path in args.calibrated or ()]
    _set_threads(args)
    device, dtype = _device_and_dtype(args.device, args.dtype)
    args = argparse.Namespace(**vars(args))
    if args.quiet:
        _quiet_loading()
    if args.model is None:
        from .reference_model import REFERENCE_MODEL_DIR, load_reference_pipeline

        pipe = load_reference_pipeline().to(device)
        if pipe.transformer.dtype != dtype:
            pipe = pipe.to(dtype=dtype)
        model = EMBEDDED_MODEL
        args.model = os.fspath(REFERENCE_MODEL_DIR)  # its generation_defaults.json: 32 x 32, true CFG 4, 20 steps
    else:
        # No cache_config argument: a cache_config.json saved with the model (e.g. by `calibrate`) is loaded, and
        # the sweep takes its TeaCache coefficients / MagCache ratios.
        _check_model(args.model)
        pipeline_class = _pipeline_class_for(args.model)
        _generation_defaults(pipeline_class, args.model)  # a bad file fails before any weight is loaded
        pipe = pipeline_class.from_pretrained(args.model, dtype=dtype).to(device)
        model = args.model
    pipe.set_progress_bar_config(disable=True)
    kwargs = _sampling_kwargs(pipe, args, args.seed)
    kwargs.pop("generator")  # run_benchmark seeds each prompt itself
    if configs is None:
        steps = _call_value(pipe, kwargs, "num_inference_steps")
        configs = default_sweep(pipe, methods=methods, num_steps=steps, calibrated=calibrated)
    prompts = args.prompt or list(DEMO_PROMPTS)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    if args.equal_budget is not None:
        return _bench_equal_budget(args, pipe, kwargs, prompts, model, methods, planned, calibrated, progress)
    result = run_benchmark(
        pipe, configs, prompts, kwargs, seed=args.seed, repeats=args.repeats, model=model, progress=progress
    )
    paths = [os.path.join(args.output_dir, name) for name in ("results.json", "results.md", "pareto.png")]
    write_json(result, paths[0])
    text = write_markdown(result, paths[1])
    plot_pareto(result, paths[2])
    print(text)
    print(f"wrote {', '.join(paths)}")
    return 0


EQUAL_BUDGET_FILES = ("equal_budget.json", "equal_budget.md", "equal_budget.csv", "equal_budget.png")


def _bench_equal_budget(args, pipe, kwargs, prompts, model, methods, planned, calibrated, progress) -> int:
    """``bench --equal-budget``: see :mod:`cached_diffusers.tools.equal_budget`."""
    from .equal_budget import format_markdown, plot_equal_budget, run_equal_budget, write_csv, write_json

    kwargs = {**kwargs, "num_inference_steps": int(_call_value(pipe, kwargs, "num_inference_steps"))}
    result = run_equal_budget(
        pipe, prompts, kwargs, args.equal_budget, planned=planned, methods=methods, calibrated=calibrated,
        seed=args.seed, iterations=args.iterations, model=model, progress=progress,
    )
    paths = [os.path.join(args.output_dir, name) for name in EQUAL_BUDGET_FILES]
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(result, paths[0])
    text = format_markdown(result)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(text)
    write_csv(result, paths[2])
    plot_equal_budget(result, paths[3])
    print(text)
    print(f"wrote {', '.join(paths)}")
    return 0


# -- tune ------------------------------------------------------------------------------------------------------------
def cmd_tune(args: argparse.Namespace) -> int:
    """``tune``: the fastest cache config whose worst tuning prompt keeps PSNR >= --target-psnr (see
    :mod:`cached_diffusers.tools.tune`); writes it with its record, then checks it on held-out prompts."""
    from .imaging import require_extra

    require_extra("skimage.metrics", "scikit-image"), require_extra("matplotlib", "matplotlib")  # before any work
    _check_threads(args)
    _check_sampling_args(args)
    if not math.isfinite(args.target_psnr):
        raise ValueError(f"--target-psnr must be a finite number of dB, got {args.target_psnr}")
    if args.target_ssim is not None and not 0 <= args.target_ssim <= 1:
        raise ValueError(f"--target-ssim must be in [0, 1], got {args.target_ssim}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.margin != "auto":
        try:
            args.margin = float(args.margin)
        except ValueError:
            raise ValueError(f"--margin must be 'auto' or a number of dB >= 0, got {args.margin!r}") from None
        if not (math.isfinite(args.margin) and args.margin >= 0):
            raise ValueError(f"--margin must be 'auto' or a number of dB >= 0, got {args.margin}")
    if args.measure_latency is not None and args.measure_latency < 1:
        raise ValueError(f"--measure-latency must be >= 1 (timed rounds), got {args.measure_latency}")
    if args.prompts and args.held_out_prompts:
        overlap = sorted(set(args.prompts) & set(args.held_out_prompts))
        if overlap:
            raise ValueError(f"--held-out-prompts must be disjoint from --prompts; both have {overlap}")
    if args.methods:
        from ..configs import available_cache_methods

        registered = available_cache_methods()
        for m in args.methods:
            if m not in registered:
                raise ValueError(f"--methods {m}: not a registered cache method ({', '.join(registered)})")
    output = args.output or (args.model if os.path.isdir(args.model) else "tuned")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output!r} is a file, not a folder")
    from .tune import OUTPUT_FILES

    for name in OUTPUT_FILES[:2]:  # never overwrite without --overwrite; never into the shipped models
        _check_calibration_output(os.path.join(output, name), args.overwrite)
    calibrated = [_load_config_file("--calibrated", path) for path in args.calibrated or ()]
    if args.error_matrix is not None and not os.path.isfile(args.error_matrix):
        raise ValueError(f"--error-matrix: no such file {args.error_matrix!r}")
    _check_model(args.model)
    _checked_generation_defaults(args.model)
    _set_threads(args)
    _device_and_dtype(args.device, args.dtype)
    from .tune import tune, write_outputs

    args = argparse.Namespace(**vars(args))
    pipe = _load_pipeline(args, UNSET)  # a cache_config.json beside the model supplies calibrated data
    pipe.set_progress_bar_config(disable=True)
    kwargs = _sampling_kwargs(pipe, args, 0)
    kwargs.pop("generator")
    steps = int(_call_value(pipe, kwargs, "num_inference_steps"))
    kwargs["num_inference_steps"] = steps
    progress = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = tune(
        pipe, args.target_psnr, prompts=args.prompts, held_out_prompts=args.held_out_prompts, seeds=args.seeds,
        target_ssim=args.target_ssim, methods=args.methods, call_kwargs=kwargs, calibrated=calibrated,
        error_matrix=args.error_matrix, max_span=args.max_span, iterations=args.iterations,
        measure_latency=args.measure_latency or 0, compare_defaults=args.compare_defaults, margin=args.margin,
        model=args.model,
        progress=progress,
    )
    paths = write_outputs(result, output, overwrite=args.overwrite)
    for item in result.skipped:
        print(f"skipped {item['method']}: {item['reason']}")
    print(f"wrote {', '.join(paths)}")
    print(result.summary())
    margin = result.held_out["worst_psnr"] - args.target_psnr
    if result.held:
        print(f"target {args.target_psnr:g} dB held on every held-out prompt (worst margin {margin:+.2f} dB)")
    else:
        print(
            f"WARNING: target {args.target_psnr:g} dB did NOT hold on every held-out prompt (worst "
            f"{result.held_out['worst_psnr']:.2f} dB, margin {margin:+.2f} dB); the config was written anyway"
        )
    return 0


# -- entry point -----------------------------------------------------------------------------------------------------
DEFAULTS_HELP = "(default: the model directory's generation_defaults.json, else the pipeline's)"


def _sampling_options() -> argparse.ArgumentParser:
    """The options that set the pipeline's sampling arguments (a parent parser of ``generate``, ``calibrate``,
    ``bench`` and ``tune``); unset ones come from the model directory's ``generation_defaults.json``, else the
    pipeline's own defaults."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--steps", type=int, default=None, help=f"num_inference_steps {DEFAULTS_HELP}")
    parser.add_argument("--height", type=int, default=None, help=f"image height in pixels {DEFAULTS_HELP}")
    parser.add_argument("--width", type=int, default=None, help=f"image width in pixels {DEFAULTS_HELP}")
    parser.add_argument("--true-cfg-scale", type=float, default=None, help=f"true CFG scale (Qwen-Image) {DEFAULTS_HELP}")
    parser.add_argument(
        "--guidance-scale", type=float, default=None,
        help=f"guidance_scale (FLUX.2 [klein]'s CFG scale; guidance-distilled models) {DEFAULTS_HELP}",
    )
    parser.add_argument(
        "--max-sequence-length", type=int, default=None,
        help=f"max_sequence_length: prompt tokens (FLUX.2 [klein] pads to it) {DEFAULTS_HELP}",
    )
    return parser


def _device_options() -> argparse.ArgumentParser:
    """``--device`` and ``--dtype`` (a parent parser of the commands that load a model of the user's choice)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on GPU)")
    return parser


THREADS_HELP = (
    "torch CPU threads (default: {default}); on a CPU shared with other processes, 1 avoids stalls of seconds and "
    "is often the fastest"
)


QUIET_BAR = "no progress bar"
QUIET_LINES = "no progress lines on stderr"


def _run_options(default_threads: int | None, quiet: str = QUIET_BAR) -> argparse.ArgumentParser:
    """The options every command shares (a parent parser): ``--threads`` (with this command's default), ``--quiet``
    (``quiet``: what it silences, :data:`QUIET_BAR` or :data:`QUIET_LINES`), ``--debug``."""
    shared = argparse.ArgumentParser(add_help=False)
    default = "torch's, one per core" if default_threads is None else f"{default_threads}, stable timings on a shared CPU"
    shared.add_argument("--threads", type=int, default=default_threads, help=THREADS_HELP.format(default=default))
    shared.add_argument("--quiet", action="store_true", help=quiet)
    shared.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    return shared


def _negative_prompt_option() -> argparse.ArgumentParser:
    """``--negative-prompt``, else the one of ``generation_defaults.json`` (a parent parser of ``bench`` and
    ``tune``)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--negative-prompt", default=None, help=f"negative prompt {DEFAULTS_HELP}")
    return parser


def _calibrated_option(purpose: str) -> argparse.ArgumentParser:
    """``--calibrated FILE`` (repeatable; a parent parser of ``bench`` and ``tune``): ``purpose`` ends its help."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--calibrated", action="append", default=None, metavar="FILE",
        help=f"a cache config JSON written by `calibrate` (repeat): {purpose}",
    )
    return parser


def _check_threads(args: argparse.Namespace) -> None:
    """``--threads`` before any work (``ValueError`` naming it)."""
    if args.threads is not None and (isinstance(args.threads, bool) or args.threads < 1):
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


def _set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` to torch (after :func:`_check_threads`; nothing when not given)."""
    _check_threads(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cached-diffusers", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate", help="generate images with a cached pipeline",
        parents=[_run_options(default_threads=None), _sampling_options(), _device_options()],
    )
    generate.add_argument(
        "--model", required=True,
        help="diffusers pipeline directory or Hub id (e.g. Qwen/Qwen-Image, or a shipped reference model: "
        "cached_diffusers/assets/reference-qwenimage-emoji)",
    )
    generate.add_argument("--prompt", action="append", required=True, help="text prompt (repeat for several)")
    generate.add_argument("--negative-prompt", default=None, help="negative prompt (enables true CFG with --true-cfg-scale > 1)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--output", default="output.png", help="image path (numbered when several)")
    generate.add_argument(
        "--ulysses-degree", type=int, default=1,
        help="Ulysses context parallelism over this many processes (under torchrun; default: 1, off)",
    )
    generate.add_argument(
        "--cfg-parallel", action="store_true",
        help="one guidance branch per process (under torchrun; processes = branches x --ulysses-degree)",
    )
    _add_cache_arguments(generate, default_method=None)
    generate.set_defaults(func=cmd_generate)

    planned = "/".join(_calibrated_by("schedule"))
    targeted = "/".join(m.name for m in _calibration_methods() if m.config_class.calibration_target)
    calibrate = commands.add_parser(
        "calibrate",
        help="fit TeaCache coefficients or MagCache ratios, find a SeaCache threshold, or plan LeMiCa / MeanCache "
        "schedules, on uncached runs, and save the cache config(s)",
        parents=[_run_options(default_threads=None), _sampling_options(), _device_options()],
    )
    calibrate.add_argument("--model", required=True, help="diffusers directory or Hub id")
    calibrate.add_argument("--method", choices=[m.name for m in _calibration_methods()], default="teacache")
    calibrate.add_argument(
        "--computed-steps", type=int, default=None, metavar="N",
        help=f"{targeted}: the largest threshold whose replay on the uncached runs computes at least N steps per branch",
    )
    calibrate.add_argument(
        "--budget", type=int, nargs="+", default=None,
        help=f"{planned}: computed steps per schedule, first and last included (e.g. --budget 25 17 10)",
    )
    calibrate.add_argument(
        "--strength", type=float, default=None,
        help=f"{planned}: plan for img2img / inpaint at this strength in (0, 1]: the budget counts the steps "
        "that run (the first executed one and those after it), not the full schedule's (default: 1, text-to-image)",
    )
    calibrate.add_argument("--max-span", type=int, default=8, help=f"{planned}: longest DAG edge measured, in steps (default: 8)")
    calibrate.add_argument(
        "--error-matrix", default=None, metavar="FILE",
        help=f"{planned}: solve from this saved error matrix (written by an earlier run) instead of measuring",
    )
    calibrate.add_argument(
        "--windows", type=int, nargs="+", default=[1, 2, 4],
        help="meancache: averaging windows tried per gap (1 to 6; default: 1 2 4)",
    )
    calibrate.add_argument("--prompt", action="append", default=None, help="calibration prompt (repeat; default: a small built-in set)")
    calibrate.add_argument("--negative-prompt", default=None, help="negative prompt (true CFG for Qwen-Image: calibrates both branches)")
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the first prompt (then +1 per prompt)")
    calibrate.add_argument("--rel-l1-thresh", type=float, default=0.2, help="TeaCache threshold written with the fit (default: 0.2)")
    calibrate.add_argument("--mag-threshold", type=float, default=0.06, help="MagCache threshold written with the ratios (default: 0.06)")
    calibrate.add_argument(
        "--output", default=None,
        help="cache config path (default: <model>/cache_config.json for a directory; never inside the installed "
        "package's shipped models)",
    )
    calibrate.add_argument(
        "--overwrite", action="store_true",
        help="replace files that exist (each old one is kept as FILE.bak); without it, an existing file is an error",
    )
    calibrate.set_defaults(func=cmd_calibrate)

    demo = commands.add_parser(
        "demo", help="cached vs uncached on the embedded default model (no download)",
        parents=[_run_options(default_threads=1)],
    )
    demo.add_argument("--prompt", action="append", default=None, help="text prompt (repeat for several)")
    demo.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: 20, the model's)")
    demo.add_argument("--height", type=int, default=None, help="image height in pixels (default: 32, the model's)")
    demo.add_argument("--width", type=int, default=None, help="image width in pixels (default: 32, the model's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--true-cfg-scale", type=float, default=None, help="true CFG scale (default: 4.0, the model's)")
    demo.add_argument("--repeats", type=int, default=5, help="timed rounds, uncached and cached interleaved; the median counts (default: 5)")
    demo.add_argument("--output", default="demo.png", help="side-by-side PNG (default: demo.png)")
    _add_cache_arguments(demo, default_method="teacache")
    demo.set_defaults(func=cmd_demo)

    from .bench import sweep_methods  # the registry's curves (no torch)

    bench = commands.add_parser(
        "bench", help="sweep cache methods and thresholds against uncached: time, work, PSNR/SSIM, Pareto plot",
        parents=[
            _run_options(default_threads=None, quiet=QUIET_LINES), _sampling_options(), _device_options(),
            _negative_prompt_option(), _calibrated_option("the sweep's TeaCache coefficients / MagCache ratios"),
        ],
    )
    bench.add_argument("--model", default=None, help="diffusers directory or Hub id (default: the embedded reference model)")
    bench.add_argument("--prompt", action="append", default=None, help="prompt (repeat; default: 4 captions of the reference model)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the first prompt (then +1 per prompt)")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats of every run; the median counts (default: 3)")
    bench.add_argument(
        "--methods", nargs="+", default=None, metavar="METHOD",
        help=f"methods to sweep: {' '.join(sweep_methods())} (default: all)",
    )
    bench.add_argument("--sweep", default=None, metavar="JSON_OR_FILE", help="run these configs instead: a JSON list of cache configs")
    bench.add_argument(
        "--equal-budget", type=int, nargs="+", default=None, metavar="B",
        help="compare every method at these computed-step budgets per branch (e.g. 25 17 10) instead of the sweep",
    )
    bench.add_argument(
        "--planned", nargs="+", default=None, metavar="FILE",
        help="with --equal-budget: LeMiCa / MeanCache cache configs written by `calibrate` (one per budget)",
    )
    bench.add_argument("--iterations", type=int, default=8, help="with --equal-budget: bisection steps per method and budget (default: 8)")
    bench.add_argument("--output-dir", default="bench", help="where results.json, results.md and pareto.png go (default: bench/)")
    bench.set_defaults(func=cmd_bench)

    tune = commands.add_parser(
        "tune", help="find the fastest cache config whose worst prompt keeps PSNR >= a target, check it on held-out "
        "prompts, and save it",
        parents=[
            _run_options(default_threads=None, quiet=QUIET_LINES), _sampling_options(), _device_options(),
            _negative_prompt_option(), _calibrated_option("TeaCache coefficients / MagCache ratios"),
        ],
    )
    tune.add_argument("--model", required=True, help="diffusers directory or Hub id")
    tune.add_argument("--target-psnr", type=float, required=True, metavar="DB",
                      help="worst tuning-prompt PSNR against uncached, in dB")
    tune.add_argument("--target-ssim", type=float, default=None, metavar="S", help="also require worst SSIM >= S")
    tune.add_argument(
        "--margin", default="auto", metavar="auto|DB",
        help="auto: hold the 99%% prediction bound of the tuning prompts' PSNRs (from their scatter) to --target-psnr; "
        "DB: tune the worst tuning prompt to --target-psnr + DB (0: the bare worst prompt); the held-out check stays "
        "at --target-psnr (default: auto)",
    )
    tune.add_argument("--prompts", nargs="+", default=None, metavar="P", help="tuning prompts (default: 8 built-in captions)")
    tune.add_argument(
        "--held-out-prompts", nargs="+", default=None, metavar="P",
        help="verification prompts, disjoint from --prompts (default: a built-in set without the tuning prompts)",
    )
    tune.add_argument("--seeds", type=int, default=1, metavar="K", help="seeds 0..K-1 per prompt (default: 1)")
    tune.add_argument("--methods", nargs="+", default=None, metavar="M", help="methods to search (default: every registered one)")
    tune.add_argument(
        "--error-matrix", default=None, metavar="FILE",
        help="LeMiCa's error matrix (from `calibrate --method lemica`) for the planned methods (default: measured on "
        "the first tuning prompt)",
    )
    tune.add_argument("--max-span", type=int, default=6, help="longest edge of a measured error matrix (default: 6)")
    tune.add_argument("--iterations", type=int, default=6, help="bisection steps of a threshold (default: 6)")
    tune.add_argument(
        "--measure-latency", type=int, nargs="?", const=5, default=None, metavar="R",
        help="also time the chosen config against uncached, R interleaved rounds (default R: 5)",
    )
    tune.add_argument("--compare-defaults", action="store_true",
                      help="also measure every method's default setting (what a user who does not tune gets)")
    tune.add_argument("--output", default=None, metavar="DIR",
                      help="folder of cache_config.json and its record (default: the model directory)")
    tune.add_argument("--overwrite", action="store_true", help="replace existing files (each old one is kept as FILE.bak)")
    tune.set_defaults(func=cmd_tune)
    return parser


EXIT_FAILED = 1
"""Exit status of a run that failed (a model that does not load, an error while generating)."""
EXIT_USAGE = 2
"""Exit status of a usage error (an invalid option, option value or input file), as argparse uses."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, :data:`EXIT_USAGE` or :data:`EXIT_FAILED`).

    Errors are one line on stderr naming the option or file: ``ValueError`` (bad input) exits with 2, any other
    exception (the run failed: a model directory that does not load, an error while generating) with 1. ``--debug``
    raises instead, with the traceback.
    """
    for stream in (sys.stdout, sys.stderr):  # a path or prompt the terminal cannot encode must not fail the run
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as error:  # noqa: BLE001 -- every error becomes one line unless --debug
        if getattr(args, "debug", False):
            raise
        # bad input (an option, a value, a file or a local path that does not exist) is a usage error
        usage = isinstance(error, (ValueError, FileNotFoundError))
        text = " ".join(str(error).split()) or type(error).__name__
        hint = ""
        if not usage and not isinstance(error, ImportError):  # ImportError: an optional extra is missing, said so
            text, hint = f"{type(error).__name__}: {text}", " (--debug shows the traceback)"
        print(f"cached-diffusers {args.command}: error: {text}{hint}", file=sys.stderr)
        return EXIT_USAGE if usage else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
