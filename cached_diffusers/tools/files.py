"""Output files of the tools: one rule for replacing an existing file (``--overwrite``, the old one kept as
``FILE.bak``), shared by ``calibrate`` and ``tune``."""

from __future__ import annotations

import os
import shutil

__all__ = ["keep_backup", "refuse_existing"]


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
