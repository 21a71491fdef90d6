"""Packed patch tokens back to their latent grid: what the models hand the engine as a latent-grid indicator (the raw
latent SeaCache filters, kind ``"sea_latent"``), from the token sequences their transformers take.

Qwen-Image, FLUX.2 and BAGEL pack a latent ``(B, C, H, W)`` into ``(B, (H/p) (W/p), C p p)`` tokens (``p = 2``,
row-major over the token grid); :func:`unpack_patch_tokens` inverts that packing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    import torch

__all__ = ["unpack_patch_tokens"]


def unpack_patch_tokens(tokens: torch.Tensor, height: int, width: int, patch: int = 2, channel_last: bool = False
                        ) -> torch.Tensor:
    """The latent grid ``(B, C, height * patch, width * patch)`` of packed patch tokens.

    Args:
        tokens: ``(B, height * width, C * patch * patch)``, tokens in row-major order over the ``(height, width)``
            token grid. Feature order ``(c, p_row, p_col)`` (Qwen-Image's and FLUX.2's packing), or
            ``(p_row, p_col, c)`` with ``channel_last=True`` (BAGEL's).
        height, width: the token grid.
        patch: the patch side ``p``.

    Raises:
        ValueError: when the token count or the feature width does not fit the grid and the patch.
    """
    batch, length, features = tokens.shape
    if length != height * width or features % (patch * patch):
        raise ValueError(
            f"unpack_patch_tokens: tokens {tuple(tokens.shape)} are not a {height}x{width} grid of "
            f"{patch}x{patch} patches"
        )
    channels = features // (patch * patch)
    if channel_last:
        grid = tokens.reshape(batch, height, width, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    else:
        grid = tokens.reshape(batch, height, width, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(batch, channels, height * patch, width * patch)
