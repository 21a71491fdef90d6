"""Lazy package attributes (PEP 562), so that ``import cached_diffusers`` loads no model code and no torch.

diffusers does the same with its ``_LazyModule``; that class lives in ``diffusers.utils``, whose import loads torch,
which would cost the command line's ``--help`` seconds, so the packages here use this small module-level
``__getattr__`` instead.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence


def lazy_attributes(
    package: str, structure: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` whose public names live in submodules.

    Args:
        package: the package's ``__name__``.
        structure: ``{submodule: [public names defined there]}``, submodules relative to ``package``.

    The returned ``__getattr__`` imports a name's submodule on first access and raises ``AttributeError`` for an
    unknown name, as a module does.
    """
    where = {name: module for module, names in structure.items() for name in names}
    public = sorted(where)

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return public

    return __getattr__, __dir__, public
