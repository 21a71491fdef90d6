"""pytest plugin used by ``scripts/run_upstream_diffusers_tests.py``: before diffusers' test files import anything,
replace the stock pipeline and transformer classes in the ``diffusers`` namespace by the cached ones.

``CACHED_DIFFUSERS_UPSTREAM_MODE``: ``stock`` (nothing replaced), ``off`` (cached classes, caching off) or ``on``
(cached classes; every cached pipeline built without a cache config gets ``CACHED_DIFFUSERS_UPSTREAM_CONFIG``, a JSON
cache config, by default a DBCache config that reuses).
"""

from __future__ import annotations

import json
import os

DEFAULT_ON_CONFIG = {"method": "dbcache", "Fn": 1, "Bn": 0, "residual_diff_threshold": 0.5, "max_warmup_steps": 0}


def pytest_configure(config):
    mode = os.environ.get("CACHED_DIFFUSERS_UPSTREAM_MODE", "stock")
    if mode == "stock":
        return
    import diffusers

    import cached_diffusers
    from cached_diffusers.model_mixin import diffusers_parent
    from cached_diffusers.pipeline_mixin import CachedPipelineMixin

    replaced = {}
    for name, cls in cached_diffusers.supported_pipelines().items():
        if hasattr(diffusers, name):
            replaced[name] = cls
    for cls in (cached_diffusers.CachedQwenImageTransformer2DModel, cached_diffusers.CachedFlux2Transformer2DModel):
        replaced[diffusers_parent(cls, cached_diffusers.model_mixin.CachedTransformerMixin).__name__] = cls
    for name, cls in replaced.items():
        setattr(diffusers, name, cls)
    if mode == "on":
        default = json.loads(os.environ.get("CACHED_DIFFUSERS_UPSTREAM_CONFIG", json.dumps(DEFAULT_ON_CONFIG)))
        init_cache = CachedPipelineMixin._init_cache

        def init_cache_on(self, cache_config):
            init_cache(self, default if cache_config is None else cache_config)

        CachedPipelineMixin._init_cache = init_cache_on
    config.cached_diffusers_replaced = replaced


def pytest_report_header(config):
    mode = os.environ.get("CACHED_DIFFUSERS_UPSTREAM_MODE", "stock")
    replaced = getattr(config, "cached_diffusers_replaced", {})
    names = ", ".join(f"{name} -> {cls.__name__}" for name, cls in sorted(replaced.items())) or "nothing"
    return f"cached-diffusers upstream run: mode={mode}; replaced in diffusers: {names}"
