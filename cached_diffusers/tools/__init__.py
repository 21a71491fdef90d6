"""Tooling built on the cache engine: the command line (``cli``), the speed-versus-fidelity benchmark (``bench``),
tiny and reference models for tests and demos (``tiny``, ``reference_model``), tuning to a stated fidelity (``tune``),
image metrics (``imaging``) and call timing (``timing``).

These modules depend on the core package (engine, configs, policies, residuals, masks, statistics, mixins, hub) and
on the cached models and pipelines; the core never imports them (``scripts/structure_report.py`` prints the import
graph, ``tests/test_structure.py`` checks it).
"""
