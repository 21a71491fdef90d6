"""Where the official implementations' parity vectors live (``shared/reference`` beside the project root).

CI clones the project with ``shared/`` beside it; ``CACHED_DIFFUSERS_REFERENCE`` points elsewhere. A missing
directory is a test failure with this message, never a skip: the parity tests are part of the suite.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def reference_dir(name: str = "") -> Path:
    """``shared/reference/<name>``; raises ``FileNotFoundError`` naming the places looked at."""
    candidates = []
    if os.environ.get("CACHED_DIFFUSERS_REFERENCE"):
        candidates.append(Path(os.environ["CACHED_DIFFUSERS_REFERENCE"]))
    candidates.append(ROOT.parent / "shared" / "reference")
    for base in candidates:
        path = base / name if name else base
        if path.exists():
            return path
    raise FileNotFoundError(
        f"reference vectors {name!r} not found in {[str(c) for c in candidates]}: clone the project beside shared/ "
        "or set CACHED_DIFFUSERS_REFERENCE"
    )
