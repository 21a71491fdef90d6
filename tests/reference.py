"""Where the official implementations' parity vectors live: ``tests/data/reference`` inside the repository.

The vectors are data files committed with the tests (provenance: ``tests/data/reference/PROVENANCE.md``), so a clone
with nothing beside it runs the whole suite. A missing directory is a test failure with this message, never a skip:
the parity tests are part of the suite.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root."""

REFERENCE_ROOT = ROOT / "tests" / "data" / "reference"


def reference_dir(name: str = "") -> Path:
    """``tests/data/reference/<name>``.

    Raises:
        FileNotFoundError: naming the path, when the directory is missing from the checkout.
    """
    path = REFERENCE_ROOT / name if name else REFERENCE_ROOT
    if not path.exists():
        raise FileNotFoundError(f"reference vectors {name!r} not found at {path}: the checkout is incomplete")
    return path
