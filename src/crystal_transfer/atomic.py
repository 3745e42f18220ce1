"""File helpers. Atomic output: write to a temporary file beside the target, then rename over it.

An interrupted run never leaves a half-written file that Snakemake would take as done.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():  # mkstemp makes 0600 files; give results the usual umask-based mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json(target: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _sha256_record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def record_sha256(path: str | os.PathLike[str]) -> str:
    """Hash ``path`` and record the hash beside it (``<name>.sha256.json``, with the file's size and time), for
    :func:`recorded_sha256`; a folder that cannot be written just gets no record."""
    path = Path(path)
    digest = sha256_file(path)
    stat = path.stat()
    with contextlib.suppress(OSError):
        write_json(_sha256_record(path), {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return digest


def recorded_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of ``path``: the one recorded beside it while the file's size and modification time are those
    recorded, else hashed anew (and recorded). Jobs that each read part of a large file check its identity without
    each reading all of it."""
    path = Path(path)
    record = _sha256_record(path)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(record.read_text())
        stat = path.stat()
        if saved["size"] == stat.st_size and saved["mtime_ns"] == stat.st_mtime_ns:
            return str(saved["sha256"])
    return record_sha256(path)


def write_csv(
    target: str | os.PathLike[str], fieldnames: Sequence[str], rows: Iterable[Mapping[str, object] | Sequence[object]]
) -> None:
    """Write a header line and ``rows`` as CSV (``\\n`` line ends) to ``target`` atomically.

    A row is a mapping (keyed by the field names; a missing field is written empty) or a sequence in their order.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fieldnames)
    for row in rows:
        writer.writerow([row.get(name, "") for name in fieldnames] if isinstance(row, Mapping) else row)
    write_text(target, buffer.getvalue())
