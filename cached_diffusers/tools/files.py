"""Output files of the tools: one rule for replacing an existing file (``--overwrite``, the old one kept as
``FILE.bak``), shared by ``calibrate`` and ``tune``; one JSON writer for records holding non-finite numbers
(:func:`write_json`: infinities as ``"inf"`` / ``"-inf"``, NaN as ``null``), shared by ``bench``, ``tune`` and the
equal-budget bench, and :func:`json_float` to read such a number back (also from older records that wrote ``null``);
one Markdown table writer (:func:`markdown_table`) for the reports."""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["json_float", "keep_backup", "markdown_table", "refuse_existing", "strict_json", "write_json"]


def refuse_existing(path: str | os.PathLike, overwrite: bool, flag: str | None = None) -> None:
    """Raise ``ValueError`` when ``path`` exists and ``overwrite`` is false; the message says that ``--overwrite``
    replaces it and keeps the old file as ``path.bak`` (and, with ``flag``, names the option that chose the path)."""
    path = os.fspath(path)
    if overwrite or not os.path.exists(path):
        return
    if flag is None:
        raise ValueError(f"{path} exists: pass --overwrite to replace it (the old file is kept as {path}.bak)")
    raise ValueError(
        f"{flag} {path!r} exists: pass --overwrite to replace it (the old file is kept as {path}.bak), "
        f"or give another {flag}"
    )


def keep_backup(path: str | os.PathLike) -> None:
    """Copy an existing file (one that ``--overwrite`` lets a command replace) to ``path.bak``."""
    path = os.fspath(path)
    if os.path.exists(path):
        shutil.copy2(path, path + ".bak")


def strict_json(value: Any) -> Any:
    """``value`` made standard JSON (no ``Infinity`` / ``NaN``): infinities become ``"inf"`` / ``"-inf"`` (so an
    infinite PSNR, identical images, survives the round trip), NaN becomes ``null``; mappings (keys as strings), lists,
    tuples and numpy scalars are converted recursively, anything else is returned as is."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Mapping):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(data: Any, path: str | os.PathLike, indent: int | None = 2,
               default: Callable[[Any], Any] | None = None) -> str:
    """Write :func:`strict_json` of ``data`` to ``path`` (creating its folder), with a final newline; return the
    path. ``default`` is :func:`json.dump`'s hook for objects JSON has no form for (``str`` writes their text)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(strict_json(data), f, indent=indent, allow_nan=False, default=default)
        f.write("\n")
    return path


def json_float(value: Any, null: float = math.nan) -> float:
    """A number as :func:`write_json` wrote it, back as a float: ``"inf"`` / ``"-inf"`` / ``"nan"`` as those floats,
    ``None`` as ``null`` (records written before :func:`write_json` wrote infinite PSNRs as ``null`` too: pass
    ``null=math.inf`` where a missing value can only have been an infinity)."""
    if value is None:
        return null
    return float(value)


def markdown_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a GitHub Markdown table: ``headers``, the ``|---|`` rule, then one line per row of cells (each
    written with ``str``; an empty cell as ``| |``, a ``|`` inside a cell escaped)."""
    def line(cells: Sequence[Any]) -> str:
        texts = [str(c).replace("|", "\\|") for c in cells]
        return "|" + "|".join(f" {t} " if t else " " for t in texts) + "|"

    return [line(headers), "|" + "|".join("---" for _ in headers) + "|", *(line(row) for row in rows)]
