"""The old path of SeaCache's SEA filter and distance, which live in :mod:`cached_diffusers.methods.seacache`
(``sea_filter``, ``sea_gain``, ``sea_distance``, ``SEA_EPSILON``), and of :func:`unpack_patch_tokens`, which lives in
:mod:`cached_diffusers.patch_tokens`: ``cached_diffusers.sea.sea_filter`` and the others still resolve.
"""

from __future__ import annotations

from .patch_tokens import unpack_patch_tokens
from .registry import old_path_getattr

__all__ = ["unpack_patch_tokens"]

__getattr__ = old_path_getattr(__name__, "SeaCache's SEA filter and distance")
