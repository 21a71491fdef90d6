"""The cache methods, one module each: its config, its policy (and per-branch state), its residual store or forecaster
if it has one, its calibration and its sweep metadata. Each module registers its config class with
:func:`cached_diffusers.registry.register_cache_method` when imported; importing this package imports every module
in it (adding a method is adding a file here).

SCM (cache-dit's steps computation masks) is no method of its own: it is the ``scm_steps_mask`` guard every
step-caching config shares (:class:`cached_diffusers.configs.StepCacheConfig`, :mod:`cached_diffusers.scm`).
"""

from __future__ import annotations

import importlib
import pkgutil

MODULES: tuple[str, ...] = tuple(sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")))
"""The method modules of this package (each registers its methods when imported)."""

for _name in MODULES:
    importlib.import_module(f"{__name__}.{_name}")
del _name
