"""The graph shard file format: a JSON header and raw little-endian arrays, memory-mappable.

Layout of a ``.cgs`` file (crystal graph shard):

- bytes 0-7: the magic ``b"CTGSHRD1"``;
- bytes 8-15: the header length ``h`` as an unsigned 64-bit little-endian integer;
- bytes 16 .. 16+h: the header, UTF-8 JSON: ``{"format", "version", "meta": {...}, "arrays": {name: {"dtype",
  "shape", "offset"}}, "content_sha256"}``, where ``offset`` is the absolute byte offset of the array (a multiple
  of 64) and ``content_sha256`` the sha256 of the arrays' bytes in header order, taken when the shard was written;
- the arrays, C order, each starting at its offset.

Readers map the file and take zero-copy views of the arrays (:func:`map_arrays`), or read one crystal's rows at a
time (:class:`ShardReader`, what training uses), so opening a shard costs its header only. :func:`verified_arrays`
first checks the content against ``content_sha256`` and :func:`check_graph_arrays`, so a damaged file is refused,
never trained on.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from crystal_transfer.atomic import atomic_path
from crystal_transfer.errors import UserError

MAGIC = b"CTGSHRD1"
FORMAT = "crystal_transfer graph shard"
VERSION = 1
ALIGN = 64


class ShardFormatError(UserError):
    """A file is not a readable graph shard (wrong magic, truncated, or an inconsistent header)."""


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def write_shard(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> int:
    """Write ``arrays`` (name -> array) and the JSON-serialisable ``meta`` to ``path`` atomically.

    Returns the file size in bytes.
    """
    arrays = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    for name, array in arrays.items():
        if array.dtype.byteorder == ">" or array.dtype.hasobject:
            raise ValueError(f"array '{name}' has dtype {array.dtype}; shards hold little-endian numeric arrays")

    def header_bytes(start: int) -> tuple[bytes, dict[str, dict[str, Any]]]:
        table: dict[str, dict[str, Any]] = {}
        offset = start
        for name, array in arrays.items():
            offset = _aligned(offset)
            table[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": offset}
            offset += array.nbytes
        header = {"format": FORMAT, "version": VERSION, "meta": meta, "arrays": table, "content_sha256": content}
        return json.dumps(header, separators=(",", ":")).encode(), table

    content = content_sha256(arrays)
    # The array offsets depend on the header length, which depends on the offsets: iterate to a fixed point.
    start = 16
    while True:
        encoded, table = header_bytes(_aligned(start))
        if _aligned(16 + len(encoded)) <= _aligned(start):
            break
        start = 16 + len(encoded)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(MAGIC + struct.pack("<Q", len(encoded)) + encoded)
        for name, array in arrays.items():
            handle.write(b"\0" * (table[name]["offset"] - handle.tell()))
            handle.write(array.tobytes(order="C"))
        size = handle.tell()
    return size


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a shard (reads only the start of the file)."""
    path = Path(path)
    with open(path, "rb") as handle:
        start = handle.read(16)
        if len(start) < 16 or start[:8] != MAGIC:
            raise ShardFormatError(f"{path} is not a graph shard (no {MAGIC!r} magic)")
        (length,) = struct.unpack("<Q", start[8:])
        size = os.fstat(handle.fileno()).st_size
        if length > size - 16:
            raise ShardFormatError(
                f"{path} is truncated or damaged (header of {length} bytes announced, a file of {size})"
            )
        raw = handle.read(length)
    if len(raw) != length:
        raise ShardFormatError(f"{path} is truncated (header of {length} bytes announced, {len(raw)} present)")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise ShardFormatError(f"{path} has an unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise ShardFormatError(f"{path} has an unreadable header (not a JSON object)")
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ShardFormatError(
            f"{path} is a '{header.get('format')}' file version {header.get('version')}, "
            f"expected '{FORMAT}' version {VERSION}"
        )
    if not (isinstance(header.get("meta"), dict) and isinstance(header.get("arrays"), dict)):
        raise ShardFormatError(f"{path} has a damaged header (no 'meta' or 'arrays' table)")
    return header


def map_arrays(path: str | Path, header: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Read-only, memory-mapped, zero-copy views of every array of the shard at ``path``."""
    path = Path(path)
    header = header or read_header(path)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    arrays: dict[str, np.ndarray] = {}
    for name, spec in header["arrays"].items():
        try:
            dtype = np.dtype(spec["dtype"])
            shape = tuple(int(n) for n in spec["shape"])
            offset = int(spec["offset"])
            count = int(np.prod(shape, dtype=np.int64))
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardFormatError(f"{path} has a damaged header entry for array '{name}': {exc}") from None
        end = offset + count * dtype.itemsize
        if min(shape, default=0) < 0 or offset < 0 or dtype.hasobject:
            raise ShardFormatError(f"{path} has a damaged header entry for array '{name}'")
        if end > size:
            raise ShardFormatError(f"{path} is truncated: array '{name}' ends at byte {end}, the file has {size}")
        arrays[name] = np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)
    return arrays


class ShardReader:
    """One crystal's rows of a shard at a time, by positioned reads of just those bytes: unlike a memory map, whose
    pages stay resident (and the kernel maps 64 KB around each one touched), the memory a reader holds is the
    crystals being batched, whatever the size of the dataset. The file is opened on the first read and may be
    closed (``close``) between reads, for a dataset of more shards than a process may hold open."""

    ROWS = ("numbers", "nbr_idx", "nbr_dist", "nbr_count")

    def __init__(self, path: str | Path, arrays: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.layout: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, spec in (arrays if arrays is not None else read_header(self.path)["arrays"]).items():
            try:
                dtype, shape = np.dtype(spec["dtype"]), tuple(int(n) for n in spec["shape"])
                row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                self.layout[name] = (dtype, shape, int(spec["offset"]), row_bytes)
            except (KeyError, TypeError, ValueError) as exc:
                raise ShardFormatError(f"{self.path} has a damaged header entry for array '{name}': {exc}") from None
        missing = [name for name in ("atom_ptr", "radius", *self.ROWS) if name not in self.layout]
        if missing:
            raise ShardFormatError(f"{self.path} lacks the arrays {', '.join(missing)}")
        self.fd: int | None = None
        self.atom_ptr = self._rows("atom_ptr", 0, self.layout["atom_ptr"][1][0])
        self.radius = self._rows("radius", 0, self.layout["radius"][1][0])
        if len(self.atom_ptr) != len(self.radius) + 1:
            raise ShardFormatError(f"{self.path} is damaged: its atom pointers do not match its crystals")

    def _rows(self, name: str, start: int, stop: int) -> np.ndarray:
        dtype, shape, offset, row_bytes = self.layout[name]
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        size = (stop - start) * row_bytes
        data = os.pread(self.fd, size, offset + start * row_bytes)
        if len(data) != size:
            raise ShardFormatError(f"{self.path} is truncated: array '{name}' ends past the end of the file")
        return np.frombuffer(data, dtype=dtype).reshape((stop - start, *shape[1:]))

    def crystal(self, position: int) -> dict[str, np.ndarray]:
        """The per-atom arrays (``numbers``, ``nbr_idx``, ``nbr_dist``, ``nbr_count``) of crystal ``position``,
        checked as :func:`check_graph_arrays` checks a shard (a file altered after its manifest is never trained on).
        """
        a0, a1 = int(self.atom_ptr[position]), int(self.atom_ptr[position + 1])
        if not 0 <= a0 <= a1:
            raise ShardFormatError(f"{self.path} is damaged: its atom pointers do not partition the atoms")
        arrays = {name: self._rows(name, a0, a1) for name in self.ROWS}
        problem = _crystal_problem(arrays, float(self.radius[position]))
        if problem:
            raise ShardFormatError(f"{self.path} is damaged: {problem} (its crystal {position})")
        return arrays

    def close(self) -> None:
        """Close the file (the next read opens it again)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "fd": None}  # a file descriptor does not cross to another process

    def __del__(self) -> None:
        self.close()


def _crystal_problem(arrays: dict[str, np.ndarray], radius: float) -> str | None:
    """What is wrong with one crystal's graph arrays, or None: the checks of :func:`check_graph_arrays`, per crystal."""
    numbers, idx, dist, counts = (arrays[name] for name in ShardReader.ROWS)
    atoms, slots = idx.shape if idx.ndim == 2 else (len(numbers), -1)
    if not len(numbers):
        return None
    if dist.shape != idx.shape or counts.shape != (atoms,) or atoms != len(numbers):
        return "its neighbour arrays do not match its atoms"
    if numbers.min() < 1 or numbers.max() > 118:
        return "atomic numbers outside 1-118"
    if counts.max() > slots:
        return f"more than max_num_nbr={slots} neighbours for an atom"
    if idx.max() >= atoms or idx.min() < 0:
        return "neighbour indices outside their crystal"
    real = dist[np.arange(slots)[None, :] < counts[:, None]]
    with np.errstate(invalid="ignore"):
        if not (np.isfinite(real) & (real > 0) & (real <= radius * (1 + 1e-6) + 1e-6)).all():
            return "neighbour distances that are not finite, positive and within the radius"
    return None


def content_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of the arrays' bytes in order (what ``content_sha256`` in a shard's header records)."""
    digest = hashlib.sha256()
    for array in arrays.values():
        digest.update(np.ascontiguousarray(array).tobytes(order="C"))
    return digest.hexdigest()


def verified_arrays(path: str | Path, header: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """:func:`map_arrays` after checking the bytes against the ``content_sha256`` the writer recorded."""
    header = header or read_header(path)
    arrays = map_arrays(path, header)
    recorded = header.get("content_sha256")
    if recorded is None:
        raise ShardFormatError(f"{path} records no content_sha256: it was not written by this version")
    if content_sha256(arrays) != recorded:
        raise ShardFormatError(f"{path} is damaged: its arrays no longer match the sha256 recorded when it was built")
    return arrays


def check_graph_arrays(arrays: dict[str, np.ndarray], max_num_nbr: int, what: str) -> None:
    """Raise :class:`ShardFormatError` (naming ``what``) unless the arrays are a consistent set of crystal graphs:
    pointers that partition the atoms, atomic numbers 1-118, neighbour indices inside their crystal, and real
    neighbour distances finite, positive and within the crystal's radius."""
    try:
        ptr, numbers, counts = arrays["atom_ptr"], arrays["numbers"], arrays["nbr_count"]
        idx, dist, radius = arrays["nbr_idx"], arrays["nbr_dist"], arrays["radius"]
    except KeyError as exc:
        raise ShardFormatError(f"{what} lacks the array {exc}") from None
    atoms = len(numbers)
    problems = []
    if len(ptr) != len(radius) + 1 or ptr[0] != 0 or ptr[-1] != atoms or (np.diff(ptr) < 0).any():
        problems.append("its atom pointers do not partition the atoms")
    elif idx.shape != (atoms, max_num_nbr) or dist.shape != (atoms, max_num_nbr) or counts.shape != (atoms,):
        problems.append(f"its neighbour arrays are not {atoms} x {max_num_nbr}")
    else:
        sizes = np.repeat(np.diff(ptr), np.diff(ptr))
        reach = np.repeat(radius.astype(np.float64), np.diff(ptr))
        real = np.arange(max_num_nbr)[None, :] < counts[:, None]
        with np.errstate(invalid="ignore"):
            if ((numbers < 1) | (numbers > 118)).any():
                problems.append("atomic numbers outside 1-118")
            if (counts > max_num_nbr).any():
                problems.append(f"more than max_num_nbr={max_num_nbr} neighbours for an atom")
            if (idx.astype(np.int64) >= sizes[:, None]).any() or (idx.astype(np.int64) < 0).any():
                problems.append("neighbour indices outside their crystal")
            bad = real & ~(np.isfinite(dist) & (dist > 0) & (dist <= (reach * (1 + 1e-6) + 1e-6)[:, None]))
            if bad.any():
                atom = int(np.flatnonzero(bad.any(axis=1))[0])
                problems.append(
                    f"neighbour distances that are not finite, positive and within the radius (atom {atom}: "
                    f"{dist[atom][bad[atom]][:3].tolist()})"
                )
    if problems:
        raise ShardFormatError(f"{what} is damaged: " + "; ".join(problems))
