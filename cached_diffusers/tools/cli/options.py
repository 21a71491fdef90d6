"""The command line's options: the cache method options generated from the registered config classes, JSON option
values, and the parent parsers of the options several subcommands share (sampling, device, run options, ...)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from typing import Any


# -- cache options ---------------------------------------------------------------------------------------------------
def _config_fields() -> dict[str, tuple[type, dict[str, Any]]]:
    """``{field name: (annotated type, {method: default})}`` over every registered cache config class."""
    from ...registry import cache_methods

    fields: dict[str, tuple[type, dict[str, Any]]] = {}
    for cls in sorted((m.config_class for m in cache_methods()), key=lambda c: c.method):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, (hints[f.name], {}))[1][cls.method] = f.default
    return dict(sorted(fields.items()))


def _renamed_fields() -> dict[str, str]:
    """``{old field name: new name}`` over every registered cache config class (its ``renamed_fields``)."""
    from ...registry import cache_methods

    renamed: dict[str, str] = {}
    for m in cache_methods():
        renamed.update(getattr(m.config_class, "renamed_fields", {}))
    return renamed


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
    from ...configs import available_cache_methods

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
    for old, new in _renamed_fields().items():  # old flags still work: the config warns (FutureWarning) and renames
        hidden = _config_fields()[new]
        group.add_argument("--" + old.replace("_", "-"), dest=old, default=None, help=argparse.SUPPRESS,
                           type=_parse_optional(next((a for a in (hidden[0], *typing.get_args(hidden[0])) if a in (int, float, str)), str)))


def cache_config_from_args(args: argparse.Namespace):
    """The cache config the options describe (``None`` for no caching; :data:`UNSET` when no option was given and
    the command has no default method).

    Raises:
        ValueError: unknown method, a parameter that does not belong to the method (or given without a method), or
            an invalid value.
    """
    from ...configs import cache_config_from_dict

    names = [*_config_fields(), *_renamed_fields()]
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
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


# -- options several subcommands share (parent parsers) -------------------------------------------------------------
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
