"""Cache configs that travel with models: ``cache_config.json`` beside a pipeline's ``model_index.json``.

A cached pipeline's ``save_pretrained`` writes its active cache config to ``<directory>/cache_config.json`` (and
``push_to_hub`` uploads it with the weights); its ``from_pretrained`` reads the file back from a local directory or a
Hub repository unless the caller passes ``cache_config``. The file is the config's ``to_dict()`` (``{"method": ...,
<field>: <value>}``) plus keys starting with ``_`` (metadata, ignored when loading). Stock diffusers ignores the file,
so a directory that has one stays an ordinary diffusers directory.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from .configs import CacheConfig, cache_config_from_dict

__all__ = ["CACHE_CONFIG_NAME", "load_cache_config", "parse_cache_config", "read_cache_config", "save_cache_config"]

CACHE_CONFIG_NAME = "cache_config.json"
"""File name of a saved cache config, at the root of a pipeline directory or Hub repository."""

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


def read_cache_config(path: str | os.PathLike) -> CacheConfig | None:
    """Read and validate one ``cache_config.json`` file (see :func:`parse_cache_config`).

    Raises:
        ValueError: naming the file, when it cannot be read (missing, a directory, no permission), is not UTF-8 text,
            is not valid JSON (nested too deeply, numbers too long) or not a valid config.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"invalid cache config in {path}: not UTF-8 text ({error})") from None
    except OSError as error:
        raise ValueError(f"cannot read the cache config {path}: {error.strerror or error}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, too many digits, too deeply nested
        raise ValueError(f"invalid cache config in {path}: not valid JSON ({error})") from None
    return parse_cache_config(data, path)


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
