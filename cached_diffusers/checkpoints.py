"""Reading checkpoint files with errors that name the file (and the tensor): JSON configs and safetensors.

The loaders of the official BAGEL and HunyuanImage-3.0 layouts read their files through these helpers, so that a
truncated, corrupt or unreadable file is reported as ``ValueError("<path>: ...")`` (or ``FileNotFoundError`` naming
it) instead of a bare ``SafetensorError`` / ``JSONDecodeError`` / ``UnicodeDecodeError``.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

__all__ = [
    "check_tokenizer_files",
    "get_shape",
    "get_tensor",
    "load_safetensors",
    "open_safetensors",
    "read_json",
    "read_json_object",
]


def read_json(path: str | os.PathLike, what: str = "JSON") -> Any:
    """The JSON value stored in ``path``.

    Raises:
        FileNotFoundError: naming the file, when it does not exist.
        ValueError: naming the file, when it cannot be read, is not UTF-8 text or not valid JSON.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: the {what} file is missing") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: the {what} file is not UTF-8 text ({error})") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read the {what} file: {error.strerror or error}") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path}: the {what} file is not valid JSON ({error}); is the file truncated or corrupt?") from None


def read_json_object(path: str | os.PathLike, what: str = "JSON") -> dict[str, Any]:
    """:func:`read_json` of a file that must hold a JSON object; ``ValueError`` naming the file otherwise."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)}: the {what} file must hold a JSON object, got {type(data).__name__}")
    return data


def _safetensors_error(path: str, error: Exception, key: str | None = None) -> ValueError:
    where = f"tensor {key!r} of " if key is not None else ""
    return ValueError(
        f"{path}: cannot read {where}the safetensors file ({type(error).__name__}: {error}); is it truncated or corrupt?"
    )


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, **kwargs: Any) -> Iterator[Any]:
    """``safetensors.safe_open(path, framework="pt", **kwargs)``; errors opening it name the file.

    Read tensors from the handle with :func:`get_tensor` and :func:`get_shape`, whose errors name the file and key.

    Raises:
        FileNotFoundError: naming the file, when it does not exist.
        ValueError: naming the file, for a file that is not a readable safetensors file (truncated, corrupt header).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: safetensors file not found")
    try:
        handle = safe_open(path, framework="pt", **kwargs)
    except Exception as error:  # SafetensorError, OSError, ...
        raise _safetensors_error(path, error) from None
    with handle as opened:
        yield opened


def get_tensor(handle: Any, key: str, path: str | os.PathLike):
    """``handle.get_tensor(key)``; ``ValueError`` naming the file and the key when the data cannot be read."""
    try:
        return handle.get_tensor(key)
    except Exception as error:
        raise _safetensors_error(os.fspath(path), error, key) from None


def get_shape(handle: Any, key: str, path: str | os.PathLike) -> list[int]:
    """``handle.get_slice(key).get_shape()``; ``ValueError`` naming the file and the key on failure."""
    try:
        return handle.get_slice(key).get_shape()
    except Exception as error:
        raise _safetensors_error(os.fspath(path), error, key) from None


def load_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """``safetensors.torch.load_file(path)``; errors name the file (and the key, where one fails)."""
    with open_safetensors(path, device="cpu") as handle:
        return {key: get_tensor(handle, key, path) for key in handle.keys()}


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json")
"""JSON files a ``transformers`` tokenizer directory may hold (read by ``AutoTokenizer``, whose errors name none)."""


def check_tokenizer_files(directory: str | os.PathLike) -> None:
    """Check that the tokenizer JSON files present in ``directory`` are readable JSON objects, before ``transformers``
    reads them.

    Raises:
        ValueError: naming the first file that is not UTF-8 text or not valid JSON (truncated, corrupt).
    """
    for name in TOKENIZER_JSON_FILES:
        path = os.path.join(os.fspath(directory), name)
        if os.path.isfile(path):
            read_json_object(path, "tokenizer")
