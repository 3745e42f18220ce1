"""Compiled CPU kernels, built with the machine's C compiler on first use and loaded with ``ctypes``.

Every library here is compiled once per machine, compiler and source into a cache directory (no PyTorch headers,
so a build is quick), and its functions' signatures are declared once, in :data:`LIBRARIES`:

- ``gated`` (``gated_kernels.c``, :func:`kernels`): the gated convolution's edge part. PyTorch runs CGCNN's
  BatchNorm, sigmoid, softplus, product, neighbour sum and their gradients as one pass over the (atoms × 12 × 128)
  edge tensor per operation, and its CPU ``softplus``, ``exp`` and ``log`` are slow on some machines (figures in
  benchmarks/README.md); the library does those passes in five
  vectorised loops (``-O3 -march=native -ffast-math``).

Each source is compiled to an object file and linked in a second step without the optimisation flags: gcc before
13 links ``crtfastmath.o`` into a shared library linked with ``-ffast-math``, and loading that library would switch
the whole process to flush-to-zero arithmetic (every float32 subnormal in NumPy and PyTorch read as 0).

Where no C compiler works (or with ``CRYSTAL_TRANSFER_NATIVE=0``) a library is None, ``unavailable_reason()`` says
why, and the callers keep their Python paths (``models.gated.TorchGatedMessages``): the
same numbers to float rounding, slower. The cache directory is ``native/`` in the project's cache folder
(:mod:`crystal_transfer.cache`); where that cannot be written, the system's temporary directory.
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
from dataclasses import dataclass
from pathlib import Path

from crystal_transfer.cache import cache_dir as project_cache

DISABLE_ENV = "CRYSTAL_TRANSFER_NATIVE"
_P, _I = ctypes.c_void_p, ctypes.c_int64


@dataclass(frozen=True)
class _Library:
    source: str
    flag_sets: tuple[tuple[str, ...], ...]  # tried in order; the second without -march=native (some arm64 compilers)
    functions: dict[str, tuple[list, object]]  # name -> (argtypes, restype)
    label: str  # how describe() names it
    fallback: str  # what runs without it (describe)
    warning: str  # the RuntimeWarning when it cannot be built ({reason})


LIBRARIES = {
    "gated": _Library(
        "gated_kernels.c",
        (("-O3", "-march=native", "-ffast-math"), ("-O3", "-ffast-math")),
        {
            "ct_gather_add": ([_P] * 4 + [_I] * 4, None),
            "ct_col_stats": ([_P, _I, _I, _I, _P, _P], None),
            "ct_gated_forward": ([_P] * 7 + [_I] * 4, None),
            "ct_gated_backward_dy": ([_P] * 8 + [_I] * 4, None),
            "ct_bn_backward_apply": ([_P] * 8 + [_I] * 4, None),
            "ct_gather_add_band": ([_P] * 9 + [_I] * 5 + [ctypes.c_float] * 3, None),
            "ct_bn_backward_apply_band": ([_P] * 12 + [_I] * 5 + [ctypes.c_float] * 3, None),
            "ct_gated_forward_inference": ([_P] * 4 + [_I] * 4, None),
            "ct_gaussian_expand": ([_P] * 3 + [_I] * 3 + [ctypes.c_float] * 2, None),
        },
        "compiled kernels",
        "PyTorch path",
        "compiled CGCNN kernels unavailable ({reason}); using the PyTorch path, same results, slower",
    ),
}
_LOCK = threading.Lock()
_STATE: dict[str, dict[str, object]] = {}


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``native/`` in the project's cache folder (:mod:`crystal_transfer.cache`)."""
    return project_cache("native")


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


def _build(name: str, compiler: str, target_dir: Path) -> tuple[Path, bool]:
    """Compile library ``name`` into ``target_dir`` (atomically) unless an identical build is there.

    Returns the library's path and whether it was built now.
    """
    spec = LIBRARIES[name]
    source_path = Path(__file__).with_name(spec.source)
    source = source_path.read_bytes()
    stem = source_path.stem
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"C compiler {compiler!r} does not run: {error}") from error
    errors = []
    for flags in spec.flag_sets:
        key = hashlib.sha256(
            b"\0".join(x.encode() if isinstance(x, str) else x for x in (source, compiler, version, " ".join(flags),
                                                                          "link-separately", _cpu_signature(),
                                                                          sys.platform))
        ).hexdigest()[:20]
        library = target_dir / f"{stem}-{key}.so"
        if library.exists():
            return library, False
        target_dir.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=target_dir, prefix=f".{stem}-", suffix=".so")
        os.close(fd)
        obj = temp[: -len(".so")] + ".o"
        try:
            # compile, then link without the optimisation flags (no crtfastmath.o: see the module's docstring)
            steps = (
                [compiler, *flags, "-fPIC", "-c", str(source_path), "-o", obj],
                [compiler, "-shared", obj, "-o", temp, "-lm"],
            )
            for step in steps:
                done = subprocess.run(step, capture_output=True, text=True, timeout=120)
                if done.returncode != 0:
                    errors.append(f"{' '.join(flags)}: {done.stderr.strip()[-400:]}")
                    break
            else:
                os.replace(temp, library)
                return library, True
        except (OSError, subprocess.SubprocessError) as error:
            errors.append(f"{' '.join(flags)}: {error}")
        finally:
            Path(temp).unlink(missing_ok=True)
            Path(obj).unlink(missing_ok=True)
    raise RuntimeError(f"{compiler} could not compile {spec.source}: " + " | ".join(errors))


def _load(name: str) -> ctypes.CDLL:
    """Build (or find) and load library ``name``; raises RuntimeError saying what failed."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    try:
        library, built = _build(name, compiler, cache_dir())
    except OSError:  # cache not writable (read-only home, quota): a per-user temporary directory
        user = getattr(os, "getuid", lambda: 0)()
        library, built = _build(name, compiler, Path(tempfile.gettempdir()) / f"crystal_transfer-{user}" / "native")
    lib = ctypes.CDLL(str(library))
    _STATE[name].update(path=library, built=built)
    for function_name, (argtypes, restype) in LIBRARIES[name].functions.items():
        function = getattr(lib, function_name)
        function.argtypes = argtypes
        function.restype = restype
    return lib


def library(name: str) -> ctypes.CDLL | None:
    """Library ``name`` of ``LIBRARIES`` loaded, or None where it cannot be built (why: ``unavailable_reason``).

    Built and loaded once per process; a failure warns once and is not retried.
    """
    state = _STATE.get(name)
    if state is not None and "lib" in state:
        return state["lib"]  # type: ignore[return-value]
    with _LOCK:
        state = _STATE.setdefault(name, {})
        if "lib" not in state:
            lib, reason = None, None
            if os.environ.get(DISABLE_ENV, "1") == "0":
                reason = f"{DISABLE_ENV}=0"
            else:
                try:
                    lib = _load(name)
                except (RuntimeError, OSError, AttributeError) as error:
                    reason = str(error)
                    warnings.warn(LIBRARIES[name].warning.format(reason=reason), RuntimeWarning, stacklevel=3)
            state["reason"] = reason
            state["lib"] = lib
    return state["lib"]  # type: ignore[return-value]


def kernels() -> ctypes.CDLL | None:
    """The gated convolution's kernels (``gated_kernels.c``), or None where they cannot be built."""
    return library("gated")


def unavailable_reason(name: str = "gated") -> str | None:
    """Why library ``name`` is None (None when it is loaded or not yet tried)."""
    return _STATE.get(name, {}).get("reason")  # type: ignore[return-value]


def describe(name: str = "gated") -> str:
    """One line on library ``name``: built now or taken from the cache (and where), or why unavailable."""
    state, label = _STATE.get(name, {}), LIBRARIES[name].label
    if "lib" not in state:
        return f"{label}: not loaded yet"
    if state["lib"] is None:
        return f"{label}: unavailable ({state['reason']}); {LIBRARIES[name].fallback}"
    how = "built now" if state.get("built") else "loaded from the cache"
    return f"{label}: {how}, {state['path']}"


def reset() -> None:
    """Forget the loaded libraries and failure reasons (tests; a changed ``CC`` or cache directory)."""
    with _LOCK:
        _STATE.clear()


_POOL: list[ThreadPoolExecutor] = []  # at most one, with as many workers as the largest split so far


def chunk_count(n: int) -> int:
    """How many pieces ``run_chunked`` splits ``n`` items into: torch's thread count, at least 256 items each."""
    import torch  # imported here: the graphs stage loads this module without needing torch

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
