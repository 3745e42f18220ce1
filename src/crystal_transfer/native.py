"""Compiled CPU kernels for the gated convolution's edge tensor, built with the machine's C compiler on first use.

PyTorch runs CGCNN's edge part (BatchNorm, sigmoid, softplus, product, neighbour sum and their gradients) as one
pass over the (atoms × 12 × 128) edge tensor per operation, and its CPU ``softplus``, ``exp`` and ``log`` are slow
on some machines (0.6–1 ns per element on this project's AMD EPYC, against 0.25 for ``sigmoid``). ``gated_kernels.c``
does those passes in five vectorised loops. It is compiled once per machine, compiler and source (``-O3
-march=native -ffast-math``) into a cache directory and loaded with ``ctypes``; no PyTorch headers, so the build
takes about half a second.

Where no C compiler works (or with ``CRYSTAL_TRANSFER_NATIVE=0``) ``kernels()`` returns None, says why in
``unavailable_reason()`` and the model keeps its PyTorch path (``model._GatedMessages``): the same numbers to
float rounding, somewhat slower. The cache directory is ``$CRYSTAL_TRANSFER_CACHE/native``, else
``~/.cache/crystal_transfer/native``; where that cannot be written, the system's temporary directory.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gated_kernels.c")
DISABLE_ENV = "CRYSTAL_TRANSFER_NATIVE"
_FLAG_SETS = (
    ["-O3", "-march=native", "-ffast-math", "-fPIC", "-shared"],
    ["-O3", "-ffast-math", "-fPIC", "-shared"],  # compilers without -march=native (some on arm64)
)
_FUNCTIONS = {
    "ct_gather_add": [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4,
    "ct_col_stats": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p],
    "ct_gated_forward": [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 4,
    "ct_gated_backward_dy": [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 4,
    "ct_bn_backward_apply": [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 4,
}
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$CRYSTAL_TRANSFER_CACHE/native``, else ``~/.cache/crystal_transfer/native``
    (the cache of the published checkpoints' wheel too)."""
    return Path(os.environ.get("CRYSTAL_TRANSFER_CACHE") or Path.home() / ".cache" / "crystal_transfer") / "native"


def _compiler() -> str | None:
    """The C compiler: ``$CC``, else the first of cc, gcc, clang on PATH."""
    if os.environ.get("CC"):
        return os.environ["CC"]
    return next((found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None)


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _build(compiler: str, target_dir: Path) -> Path:
    """Compile ``SOURCE`` into ``target_dir`` (atomically) unless an identical build is there; the library's path."""
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"C compiler {compiler!r} does not run: {error}") from error
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join(x.encode() if isinstance(x, str) else x for x in (source, compiler, version, " ".join(flags),
                                                                          _cpu_signature(), sys.platform))
        ).hexdigest()[:20]
        library = target_dir / f"gated_kernels-{key}.so"
        if library.exists():
            _STATE["built"] = False
            return library
        target_dir.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=target_dir, prefix=".gated_kernels-", suffix=".so")
        os.close(fd)
        try:
            done = subprocess.run(
                [compiler, *flags, str(SOURCE), "-o", temp, "-lm"], capture_output=True, text=True, timeout=120
            )
            if done.returncode == 0:
                os.replace(temp, library)
                _STATE["built"] = True
                return library
            errors.append(f"{' '.join(flags)}: {done.stderr.strip()[-400:]}")
        except (OSError, subprocess.SubprocessError) as error:
            errors.append(f"{' '.join(flags)}: {error}")
        finally:
            Path(temp).unlink(missing_ok=True)
    raise RuntimeError(f"{compiler} could not compile {SOURCE.name}: " + " | ".join(errors))


def _load() -> ctypes.CDLL:
    """Build (or find) and load the library; raises RuntimeError saying what failed."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    try:
        library = _build(compiler, cache_dir())
    except OSError:  # cache not writable (read-only home, quota): a per-user temporary directory
        user = getattr(os, "getuid", lambda: 0)()
        library = _build(compiler, Path(tempfile.gettempdir()) / f"crystal_transfer-{user}" / "native")
    lib = ctypes.CDLL(str(library))
    _STATE["path"] = library
    for name, argtypes in _FUNCTIONS.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = None
    return lib


def kernels() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be built (the reason: ``unavailable_reason()``).

    Built and loaded once per process; a failure warns once and is not retried.
    """
    if "lib" in _STATE:
        return _STATE["lib"]  # type: ignore[return-value]
    with _LOCK:
        if "lib" not in _STATE:
            lib, reason = None, None
            if os.environ.get(DISABLE_ENV, "1") == "0":
                reason = f"{DISABLE_ENV}=0"
            else:
                try:
                    lib = _load()
                except (RuntimeError, OSError, AttributeError) as error:
                    reason = str(error)
                    warnings.warn(
                        f"compiled CGCNN kernels unavailable ({reason}); using the PyTorch path, same results, slower",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            _STATE["reason"] = reason
            _STATE["lib"] = lib
    return _STATE["lib"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """Why ``kernels()`` returned None (None when they are loaded or not yet tried)."""
    return _STATE.get("reason")  # type: ignore[return-value]


def describe() -> str:
    """One line on the kernels' state: built now or taken from the cache (and where), or why unavailable."""
    if "lib" not in _STATE:
        return "compiled kernels: not loaded yet"
    if _STATE["lib"] is None:
        return f"compiled kernels: unavailable ({_STATE['reason']}); PyTorch path"
    how = "built now" if _STATE.get("built") else "loaded from the cache"
    return f"compiled kernels: {how}, {_STATE['path']}"


def reset() -> None:
    """Forget the loaded kernels and the failure reason (tests; a changed ``CC`` or cache directory)."""
    with _LOCK:
        _STATE.clear()


_POOL: list[ThreadPoolExecutor] = []  # at most one, with as many workers as the largest split so far


def chunk_count(n: int) -> int:
    """How many pieces ``run_chunked`` splits ``n`` items into: torch's thread count, at least 256 items each."""
    return max(1, min(torch.get_num_threads(), n // 256))


def run_chunked(call: Callable[[int, int, int], None], n: int, chunks: int) -> None:
    """``call(piece, start, stop)`` over [0, n) in ``chunks`` contiguous pieces, in parallel.

    ctypes releases the GIL during a foreign call, so the pieces run on as many cores as there are pieces
    (``chunk_count``: PyTorch's thread count). Callers give each piece its own row of partial sums, so results
    are deterministic for a given thread count.
    """
    if chunks <= 1:
        call(0, 0, n)
        return
    bounds = [n * i // chunks for i in range(chunks + 1)]
    with _LOCK:
        if not _POOL or _POOL[0]._max_workers < chunks:
            if _POOL:
                _POOL[0].shutdown(wait=False)
            _POOL[:] = [ThreadPoolExecutor(max_workers=chunks, thread_name_prefix="crystal_transfer-native")]
        pool = _POOL[0]
    for future in [pool.submit(call, i, bounds[i], bounds[i + 1]) for i in range(chunks)]:
        future.result()
