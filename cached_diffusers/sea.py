"""SeaCache's spectral-evolution-aware (SEA) indicator: a Wiener-like filter of the raw latent in frequency space.

SeaCache (arXiv 2602.18993; diffusers 0.42 ``diffusers/hooks/sea_cache.py``) decides from the *raw latent* entering
the transformer, not from an embedding: before two consecutive steps' latents are compared, each is passed through a
filter that keeps the part of its spectrum where the clean signal dominates the noise at the step's noise level.

The filter, per latent, over its grid axes (the two spatial axes of an image, ``(T, H, W)`` of a video), each
channel on its own:

* ``sigma`` is the step's noise level of the flow-matching schedule (``x_sigma = (1 - sigma) x_0 + sigma eps``),
  clamped to ``[1e-6, 1 - 1e-6]``; ``s = 1 - sigma`` scales the signal, ``n = sigma`` the noise.
* The clean signal's power along an axis is a power law of the frequency, ``P(f) = |f|^-power_exp``
  (``f = torch.fft.fftfreq(size)``, cycles per sample in ``[-1/2, 1/2)``); the noise is white. The Wiener-like gain of
  the axis is ``g(f) = s P(f) / (s^2 P(f) + n^2) = s / (s^2 + n^2 |f|^power_exp)`` (at ``f = 0``: ``1 / s``).
* The gain over the grid is the product of the per-axis gains, divided by its mean over the grid (unit mean,
  the paper's Eq. (7), so that distances are comparable across steps); the filtered latent is
  ``real(ifftn(fftn(x) * gain))``, computed in float32 and returned in the input's dtype.

An image is a one-frame video: the gain of an axis of length 1 is a constant, which the unit-mean normalisation
removes, so the 2-D filter over ``(H, W)`` equals the hook's 3-D filter of the same image with ``T = 1`` (checked
against the installed ``_apply_sea_filter`` in ``tests/test_seacache.py``).

The distance between consecutive steps' filtered latents is the hook's: per batch row (the hook's list of latents,
one per sample), ``mean|a - b| / (mean|b| + 1e-16)`` in float32, then the mean over the rows.
"""

from __future__ import annotations

import torch

__all__ = ["SEA_EPSILON", "sea_distance", "sea_filter", "sea_gain", "unpack_patch_tokens"]

SEA_EPSILON = 1e-16
"""Added to the mean of the previous filtered latent in the distance (diffusers' ``SeaCacheSharedState.resolve_gate``)."""

_SIGMA_CLAMP = 1e-6
"""``sigma`` is clamped to ``[1e-6, 1 - 1e-6]`` before the gain (diffusers' ``_apply_sea_filter``)."""


def _axis_gain(size: int, sigma: float, power_exp: float, device: torch.device) -> torch.Tensor:
    """The Wiener-like gain ``s / (s^2 + n^2 |f|^power_exp)`` over ``fftfreq(size)``, float32, shape ``(size,)``."""
    signal, noise = 1.0 - sigma, sigma
    frequencies = torch.fft.fftfreq(size, device=device, dtype=torch.float32).abs()
    return signal / (signal * signal + noise * noise * frequencies.pow(power_exp))


def sea_gain(grid: tuple[int, ...], sigma: float, power_exp: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The unit-mean separable SEA gain over a grid of shape ``grid`` (float32, shape ``grid``).

    Args:
        grid: the sizes of the filtered axes, e.g. ``(H, W)``.
        sigma: the step's noise level in ``[0, 1]`` (clamped to ``[1e-6, 1 - 1e-6]``).
        power_exp: the exponent of the clean signal's power-law prior, ``> 0``.
    """
    sigma = min(max(float(sigma), _SIGMA_CLAMP), 1.0 - _SIGMA_CLAMP)
    gain = torch.ones((), dtype=torch.float32, device=device)
    for axis, size in enumerate(grid):
        shape = [1] * len(grid)
        shape[axis] = size
        gain = gain * _axis_gain(size, sigma, power_exp, torch.device(device)).reshape(shape)
    mean = gain.mean()
    if torch.isfinite(mean) and mean > 0:
        gain = gain / mean
    return gain


def sea_filter(latents: torch.Tensor, sigma: float, power_exp: float, grid_dims: int = 2) -> torch.Tensor:
    """The SEA-filtered latent: ``real(ifftn(fftn(x) * gain))`` over the last ``grid_dims`` axes.

    Args:
        latents: ``(..., *grid)``, e.g. ``(B, C, H, W)`` for images (``grid_dims=2``) or ``(B, C, T, H, W)`` for
            videos (``grid_dims=3``); every leading index (batch row, channel) is filtered on its own.
        sigma: the step's noise level in ``[0, 1]``.
        power_exp: the prior's exponent, ``> 0`` (SeaCache's default 3.0, see ``SeaCacheConfig.power_exp``).
        grid_dims: how many trailing axes form the grid, ``>= 1``.

    Returns:
        The filtered latent, same shape and dtype as ``latents`` (computed in float32).

    Raises:
        ValueError: when ``latents`` has fewer than ``grid_dims`` axes or ``grid_dims < 1``.
    """
    if grid_dims < 1 or latents.ndim < grid_dims:
        raise ValueError(f"sea_filter: need grid_dims >= 1 trailing axes, got grid_dims={grid_dims} for shape "
                         f"{tuple(latents.shape)}")
    dims = tuple(range(latents.ndim - grid_dims, latents.ndim))
    values = latents.detach().float()
    gain = sea_gain(tuple(values.shape[d] for d in dims), sigma, power_exp, values.device)
    filtered = torch.fft.ifftn(torch.fft.fftn(values, dim=dims) * gain, dim=dims).real
    return filtered.to(latents.dtype)


def sea_distance(current: torch.Tensor, previous: torch.Tensor) -> float:
    """Mean over batch rows of ``mean|current - previous| / (mean|previous| + 1e-16)`` (float32).

    Args:
        current, previous: filtered latents of one shape ``(B, ...)``; row ``b`` is one sample.

    Raises:
        ValueError: when the shapes differ.
    """
    if current.shape != previous.shape:
        raise ValueError(f"sea_distance: shapes differ, {tuple(current.shape)} and {tuple(previous.shape)}")
    current = current.float().flatten(1)
    previous = previous.float().flatten(1)
    per_row = (current - previous).abs().mean(dim=1) / (previous.abs().mean(dim=1) + SEA_EPSILON)
    return float(per_row.mean())


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
