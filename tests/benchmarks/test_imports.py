"""Every benchmark module imports on a machine without a GPU (they are run on lent GPUs, where an import
error costs device time): a renamed kernel constant broke kernel_bench unnoticed for several sessions."""
from __future__ import annotations

import importlib
import pkgutil

import pytest

import benchmarks

MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_imports(name: str) -> None:
    importlib.import_module(f"benchmarks.{name}")
