"""gantry_kernels.cpu_native.NativeLibrary, the one loader of the CPU C kernels (cpu_ops, cpu_layer, ggml_cpu):
built and bound once at first use, the same answer after, None (and no build) when switched off, without
a compiler or without its source."""
from __future__ import annotations

import ctypes
import threading
import time

import pytest

from engine.layers.quant import ggml_cpu
from gantry_kernels import cpu_layer, cpu_native, cpu_ops
from gantry_kernels.cpu_native import NativeLibrary

SOURCE = "int answer(void) { return 42; }\n"


@pytest.fixture
def source(tmp_path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a fresh build cache
    if cpu_ops._native() is None:
        pytest.skip("no AVX2 or no C compiler here")
    (tmp_path / "answer.c").write_text(SOURCE)
    return str(tmp_path / "answer.c")


def test_the_three_callers_share_one_loader() -> None:
    for lib in (cpu_ops.NATIVE, cpu_layer.NATIVE, ggml_cpu.NATIVE):
        assert isinstance(lib, NativeLibrary)
    assert ggml_cpu.cpu_kernel() is ggml_cpu.NATIVE.lib and cpu_ops._native() is cpu_ops.NATIVE.lib


def test_built_and_bound_once_from_many_threads(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    loads, binds = [], []
    real_load = cpu_native.load
    monkeypatch.setattr(cpu_native, "load", lambda *a: loads.append(a) or real_load(*a))

    def bind(lib: ctypes.CDLL) -> None:
        time.sleep(0.2)  # the other threads arrive while this one binds
        lib.answer.restype = ctypes.c_int
        binds.append(lib)

    native = NativeLibrary(source, bind)
    got: list[ctypes.CDLL | None] = []
    threads = [threading.Thread(target=lambda: got.append(native.get())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len(binds) == 1 and got == [binds[0]] * 4
    assert native.get() is binds[0] and native.get().answer() == 42


def test_switched_off_by_its_environment_variables(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_native, "load", lambda *a: pytest.fail("built although switched off"))
    monkeypatch.setenv("GANTRY_CPU_FUSED_LAYER", "0")
    native = NativeLibrary(source, lambda lib: pytest.fail("bound"),
                           switches=("GANTRY_CPU_NATIVE", "GANTRY_CPU_FUSED_LAYER"))
    assert native.get() is None and native.get() is None


def test_without_a_compiler_or_a_source_the_torch_code_runs(source: str, tmp_path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native = NativeLibrary(source, lambda lib: pytest.fail("bound"))
    assert native.get() is None
    assert NativeLibrary(str(tmp_path / "missing.c"), lambda lib: pytest.fail("bound")).get() is None
