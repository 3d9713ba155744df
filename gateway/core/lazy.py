"""Modules imported at their first use: what a gateway's start does not need (scipy's BLAS
is needed at the first fold) is not imported before it is ready."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class LazyModule:
    """Stands for the module `name`, imported at the first attribute read."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_function(module: str, name: str) -> Callable[..., Any]:
    """module.name, imported at the first call (then ~1 us per call: a dict lookup)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call
