"""Image helpers for the command line and benchmarks: fidelity metrics and side-by-side sheets.

The metrics use scikit-image and the plots matplotlib, which the ``bench`` extra installs (from a clone of the
repository, ``pip install -e ".[bench]"`` in its root); without them these helpers raise :class:`MissingExtraError`.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = ["MissingExtraError", "install_command", "psnr", "require_extra", "side_by_side", "source_checkout", "ssim", "to_uint8"]


class MissingExtraError(ImportError):
    """A package of an optional extra (``bench``: scikit-image, matplotlib) is not installed."""


def require_extra(module: str, package: str, extra: str = "bench") -> ModuleType:
    """``importlib.import_module(module)``, or a :class:`MissingExtraError` saying how to install it.

    Raises:
        MissingExtraError: naming ``package`` and the command that installs it (see :func:`install_command`).
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{package} is not installed: fidelity metrics and plots need the {extra!r} extra: "
            f"{install_command(package, extra)}"
        ) from None


def source_checkout() -> str | None:
    """The repository root when the package runs from a clone (its ``setup.py`` beside the package), else ``None``."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return root if os.path.isfile(os.path.join(root, "setup.py")) else None


def install_command(package: str, extra: str) -> str:
    """How to install ``package`` of ``extra``: from a clone, the extra of the editable install (the package is not
    on an index); else the package itself."""
    root = source_checkout()
    if root is not None:
        return f'pip install -e ".[{extra}]" (in {root})'
    return f"pip install {package}"


def to_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 array from a PIL image or a float array in ``[0, 1]`` (as ``output_type="np"``)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array
    return (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def psnr(reference: Image.Image | np.ndarray, test: Image.Image | np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of ``test`` against ``reference`` on uint8 pixels (peak 255).

    Computed by scikit-image's ``peak_signal_noise_ratio``; identical images give ``inf``.

    Raises:
        ValueError: if the images differ in size.
        MissingExtraError: without scikit-image (the ``bench`` extra).
    """
    metrics = require_extra("skimage.metrics", "scikit-image")
    a, b = _uint8_pair(reference, test)
    if np.array_equal(a, b):
        return float("inf")
    return float(metrics.peak_signal_noise_ratio(a, b, data_range=255))


def ssim(reference: Image.Image | np.ndarray, test: Image.Image | np.ndarray) -> float:
    """SSIM of ``test`` against ``reference`` on uint8 RGB pixels (scikit-image ``structural_similarity``,
    ``channel_axis=-1``, ``data_range=255``, default 7x7 window); identical images give exactly 1.0.

    Raises:
        ValueError: if the images differ in size.
        MissingExtraError: without scikit-image (the ``bench`` extra).
    """
    metrics = require_extra("skimage.metrics", "scikit-image")
    a, b = _uint8_pair(reference, test)
    if np.array_equal(a, b):
        return 1.0
    return float(metrics.structural_similarity(a, b, channel_axis=-1, data_range=255))


def _uint8_pair(reference, test) -> tuple[np.ndarray, np.ndarray]:
    a, b = to_uint8(reference), to_uint8(test)
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape} vs {b.shape}")
    return a, b


def side_by_side(rows: Sequence[Sequence[Image.Image]], gap: int = 4) -> Image.Image:
    """Tile ``rows`` of equally sized images into one RGB sheet, ``gap`` white pixels apart (a short row is filled
    with white): :func:`diffusers.utils.make_image_grid` over the images, each with a white ``gap`` border right and
    below, the last border cropped off."""
    from diffusers.utils import make_image_grid

    if not rows or not rows[0]:
        raise ValueError("side_by_side needs at least one image")
    width, height = rows[0][0].size
    columns = max(len(r) for r in rows)
    blank = Image.new("RGB", (width + gap, height + gap), "white")
    cells = []
    for row in rows:
        for image in row:
            cell = blank.copy()
            cell.paste(image.convert("RGB"), (0, 0))
            cells.append(cell)
        cells += [blank] * (columns - len(row))
    sheet = make_image_grid(cells, rows=len(rows), cols=columns)
    return sheet.crop((0, 0, sheet.width - gap, sheet.height - gap))
