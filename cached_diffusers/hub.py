"""Files that travel with models: ``cache_config.json`` and ``generation_defaults.json`` beside ``model_index.json``.

A cached pipeline's ``save_pretrained`` writes its active cache config to ``<directory>/cache_config.json`` (and
``push_to_hub`` uploads it with the weights); its ``from_pretrained`` reads the file back from a local directory or a
Hub repository unless the caller passes ``cache_config``. The file is the config's ``to_dict()`` (``{"method": ...,
<field>: <value>}``) plus keys starting with ``_`` (metadata, ignored when loading). Stock diffusers ignores the file,
so a directory that has one stays an ordinary diffusers directory.

``generation_defaults.json`` (optional, local directories) holds the call arguments a model is meant to be run with
(``{"height": 32, "width": 32, "num_inference_steps": 20, "true_cfg_scale": 4.0, ...}``): the command line's
``generate``, ``calibrate`` and ``bench`` use them for every option the user does not give. The shipped reference
models have one; stock diffusers ignores it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from .configs import CacheConfig, cache_config_from_dict

__all__ = [
    "CACHE_CONFIG_NAME",
    "GENERATION_DEFAULTS_NAME",
    "check_local_path",
    "hub_unavailable_reason",
    "load_cache_config",
    "load_generation_defaults",
    "parse_cache_config",
    "read_cache_config",
    "read_json_file",
    "resolve_dtype",
    "save_cache_config",
]

CACHE_CONFIG_NAME = "cache_config.json"
"""File name of a saved cache config, at the root of a pipeline directory or Hub repository."""

GENERATION_DEFAULTS_NAME = "generation_defaults.json"
"""File name of a model directory's default call arguments (see the module docstring)."""

HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download")
"""``from_pretrained`` keyword arguments that are also used to fetch ``cache_config.json`` from the Hub."""


def save_cache_config(config: CacheConfig | None, directory: str | os.PathLike) -> str | None:
    """Write ``config`` to ``directory/cache_config.json``; with ``config=None`` remove a stale file instead.

    Returns:
        The path written, or ``None`` when no config is active (no file is left behind, so that the directory does
        not turn caching back on when loaded).
    """
    path = os.path.join(os.fspath(directory), CACHE_CONFIG_NAME)
    if config is None:
        if os.path.isfile(path):
            os.remove(path)
        return None
    from . import __version__

    os.makedirs(os.fspath(directory), exist_ok=True)
    data = {**config.to_dict(), "_cached_diffusers_version": __version__}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return path


def parse_cache_config(data: Any, source: str) -> CacheConfig | None:
    """A config from the JSON value of a ``cache_config.json``; ``source`` names the file in error messages.

    Keys starting with ``_`` are metadata and ignored. ``{"method": "none"}`` gives ``None`` (no caching).

    Raises:
        ValueError: naming ``source``, for anything that is not a valid config (not an object, no or unknown method,
            unknown field, invalid value such as coefficients of the wrong length).
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"invalid cache config in {source}: expected a JSON object, got {type(data).__name__}")
    params = {key: value for key, value in data.items() if not str(key).startswith("_")}
    try:
        return cache_config_from_dict(params)
    except ValueError as error:
        raise ValueError(f"invalid cache config in {source}: {error}") from None


def read_json_file(path: str | os.PathLike, what: str) -> Any:
    """The JSON value in the file ``path``; ``what`` names its role in error messages (``"cache config"``).

    Raises:
        ValueError: naming the file, when it is not UTF-8 text or not valid JSON (also: nested too deeply, an
            integer with too many digits).
        FileNotFoundError, IsADirectoryError, PermissionError: as ``open`` raises them (they name the file).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"invalid {what} in {path}: not UTF-8 text ({error})") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, too many digits, nested too deeply
        raise ValueError(f"invalid {what} in {path}: not valid JSON ({error})") from None


def read_cache_config(path: str | os.PathLike) -> CacheConfig | None:
    """Read and validate one ``cache_config.json`` file (see :func:`parse_cache_config`).

    Raises:
        ValueError: naming the file, when it is not UTF-8 JSON or not a valid config.
    """
    return parse_cache_config(read_json_file(path, "cache config"), os.fspath(path))


def load_generation_defaults(model: str | os.PathLike) -> tuple[dict[str, Any], str | None]:
    """The default call arguments saved in a local model directory's ``generation_defaults.json``.

    Returns:
        ``(defaults, path)``: the JSON object (argument name -> value) and the file it came from, or ``({}, None)``
        when ``model`` is not a local directory or has no such file. Keys starting with ``_`` are comments, dropped.

    Raises:
        ValueError: naming the file, when it is not a UTF-8 JSON object.
    """
    path = os.path.join(os.fspath(model), GENERATION_DEFAULTS_NAME)
    if not os.path.isfile(path):
        return {}, None
    data = read_json_file(path, "generation defaults")
    if not isinstance(data, Mapping):
        raise ValueError(f"invalid generation defaults in {path}: expected a JSON object, got {type(data).__name__}")
    return {str(k): v for k, v in data.items() if not str(k).startswith("_")}, path


def check_local_path(pretrained_model_name_or_path: str | os.PathLike) -> None:
    """Refuse, in one line, a path that looks local but does not exist (instead of a long Hub connection error).

    A string looks like a Hub repo id when it is ``"namespace/name"``: exactly one ``/``, no backslash, not starting
    with ``.``, ``/`` or ``~``. Anything else that is not an existing file or directory is taken as a local path.

    Raises:
        FileNotFoundError: naming the path, when it looks local and does not exist.
    """
    location = os.fspath(pretrained_model_name_or_path)
    if os.path.exists(location):
        return
    hub_like = location.count("/") == 1 and "\\" not in location and not location.startswith((".", "/", "~"))
    if not hub_like:
        raise FileNotFoundError(
            f"no such model directory: {location!r} (a local path; Hub repository ids look like 'namespace/name')"
        )


def hub_unavailable_reason(repo_id: str, timeout: float = 3.0) -> str | None:
    """Why the Hub repository ``repo_id`` cannot be loaded from here, in a few seconds, else ``None``.

    ``None`` when the Hub's local cache holds the repository's ``model_index.json`` (it loads offline) or the Hub's
    server accepts a connection within ``timeout`` seconds (or a proxy is configured, which this does not try). Else
    the reason: ``HF_HUB_OFFLINE`` is set, or the server cannot be reached (instead of the Hub client's retries).
    """
    from urllib.parse import urlsplit

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str):
            return None
    except ValueError:  # not a valid repo id: the Hub client says so itself
        return None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline or getattr(constants, "HF_HUB_OFFLINE", False):
        return "HF_HUB_OFFLINE is set and the Hub cache holds no copy of it"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    import socket

    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as error:
        return f"the Hub ({constants.ENDPOINT}) cannot be reached ({error.strerror or error})"
    return None


def _hf_hub_download(*args: Any, **kwargs: Any) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(*args, **kwargs)


def load_cache_config(
    pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any
) -> tuple[CacheConfig | None, str | None]:
    """The cache config saved with a pipeline, from a local directory or a Hub repository.

    Args:
        pretrained_model_name_or_path: what ``from_pretrained`` was given: a local directory or a Hub repo id.
        hub_kwargs: ``cache_dir``, ``revision``, ``token``, ``local_files_only``, ``force_download`` as passed to
            ``from_pretrained`` (others are ignored); used for the Hub download of ``cache_config.json``.

    Returns:
        ``(config, source)``: the config (``None`` for ``{"method": "none"}``) and the file it came from, or
        ``(None, None)`` when there is no ``cache_config.json`` (also when offline and the file is not cached).

    Raises:
        ValueError: naming the file, when it exists but is not a valid config.
    """
    location = os.fspath(pretrained_model_name_or_path)
    if os.path.isdir(location):
        path = os.path.join(location, CACHE_CONFIG_NAME)
        if not os.path.isfile(path):
            return None, None
        return read_cache_config(path), path

    from huggingface_hub.errors import EntryNotFoundError

    kwargs = {key: hub_kwargs[key] for key in HUB_KWARGS if hub_kwargs.get(key) is not None}
    kwargs["local_files_only"] = bool(kwargs.get("local_files_only", False))
    try:
        path = _hf_hub_download(location, CACHE_CONFIG_NAME, **kwargs)
    except EntryNotFoundError:
        # Absent from the repository, or offline and not in the local cache: load without one, as stock diffusers.
        return None, None
    config = read_cache_config(path)
    return config, f"{location}/{CACHE_CONFIG_NAME} ({path})"


def resolve_dtype(dtype: Any = None, torch_dtype: Any = None) -> Any:
    """The weights' dtype from ``dtype=`` or the deprecated ``torch_dtype=``, as diffusers 0.42's loaders take them.

    ``torch_dtype`` still works and emits diffusers' deprecation warning (``diffusers.utils.deprecate``).

    Raises:
        ValueError: when both are given.
    """
    if torch_dtype is None:
        return dtype
    if dtype is not None:
        raise ValueError("pass dtype= only: torch_dtype= is its deprecated name, and both were given")
    from diffusers.utils import deprecate

    deprecate("torch_dtype", "1.0.0", "`torch_dtype` is deprecated and will be removed in version 1.0.0; use `dtype`.")
    return torch_dtype
