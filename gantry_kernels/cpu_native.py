"""Build-once loader of the engine's small C kernels (AVX2+FMA, OpenMP): compiled with the system C
compiler at first use, cached per source hash under ~/.cache/gantry/kernels; None where the CPU lacks
AVX2 or no compiler works (callers then run their torch code). NativeLibrary: one source's library
as its callers hold it (gantry_kernels/cpu_ops.py, gantry_kernels/cpu_layer.py, engine/layers/quant/ggml_cpu.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable

import torch

logger = logging.getLogger("gantry.engine")
_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gantry", "kernels")


def _build(source_path: str, deps: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        logger.info("%s not used: the CPU lacks AVX2; torch code runs instead", os.path.basename(source_path))
        return None
    try:
        h = hashlib.sha256()
        for p in (source_path, *deps):  # the files it #includes count: a change there rebuilds it
            with open(p, "rb") as f:
                h.update(f.read())
        digest = h.hexdigest()[:16]
    except OSError as e:  # an install without the package's C sources
        logger.warning("%s not built (%s); torch code runs instead, which is slower", os.path.basename(source_path), e)
        return None
    stem = os.path.splitext(os.path.basename(source_path))[0]
    path = os.path.join(cache_dir(), f"{stem}-{digest}.so")
    if not os.path.isfile(path):
        os.makedirs(cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())  # ranks may build at once: rename is atomic
        os.close(fd)
        cmd = [os.environ.get("CC", "cc"), "-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC",
               "-o", tmp, source_path, "-lm"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(tmp, path)
        except (OSError, subprocess.SubprocessError) as e:
            os.unlink(tmp)
            err = getattr(e, "stderr", b"") or b""
            logger.warning("%s not built (%s %s); torch code runs instead, which is slower", stem, e,
                           err.decode(errors="replace")[-300:])
            return None
    return ctypes.CDLL(path)


def load(source_path: str, deps: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The built library of one C source (built at the first call in this process), or None; deps: the
    sources it #includes."""
    with _lock:
        if source_path not in _libs:
            _libs[source_path] = _build(source_path, deps)
        return _libs[source_path]


class NativeLibrary:
    """One C source's library in this process: built (or taken from the cache) and its functions' argument
    types set at the first get(), then the same answer on every call without a lock (ops ask per call);
    None where it cannot run. switches: environment variables that, set to 0, keep it unused."""

    def __init__(self, source_path: str, bind: Callable[[ctypes.CDLL], None], deps: tuple[str, ...] = (),
                 switches: tuple[str, ...] = ()):
        self.source_path, self.bind, self.deps, self.switches = source_path, bind, deps, switches
        self.lib: ctypes.CDLL | None = None
        self.tried = False
        self._lock = threading.Lock()  # not load()'s: get() holds it while load() runs

    def get(self) -> ctypes.CDLL | None:
        if self.tried:
            return self.lib
        with self._lock:
            if not self.tried:
                lib = None
                if all(os.environ.get(name, "1") != "0" for name in self.switches):
                    lib = load(self.source_path, self.deps)
                if lib is not None:
                    self.bind(lib)
                self.lib = lib
                self.tried = True  # after lib: a caller that sees tried without the lock sees lib too
        return self.lib
