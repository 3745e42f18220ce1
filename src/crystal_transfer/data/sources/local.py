"""Source ``local``: a folder or a .tar/.tar.gz of CIF or POSCAR files plus a labels CSV.

Options (see the config schema): ``path`` (folder or tarball), ``labels`` (CSV), ``id_column`` (the CSV
column holding the id, matched to the structure file's name without suffix), ``columns`` (canonical label ->
CSV column) and ``units`` (unit of any label the pipeline does not already know).
"""

from __future__ import annotations

import csv
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from crystal_transfer.data.labels import unit_of
from crystal_transfer.data.sources.base import RawCrystal, Source, SourceError, sha256_of
from crystal_transfer.data.structures import (
    DUPLICATE_ID,
    MISSING_ID,
    MISSING_LABELS,
    MISSING_STRUCTURE,
    UNKNOWN_FORMAT,
    UNSAFE_PATH,
    Rejection,
    _first_line,
)

_SUFFIX_FORMATS = {".cif": "cif", ".vasp": "poscar", ".poscar": "poscar"}
# A label row is held as its values joined by this character (a tuple where a value holds it): a million rows of
# strings in dicts would take gigabytes.
_SEPARATOR = "\x1f"


def _packed(values) -> str | tuple[str, ...]:
    values = tuple(value if value is not None else "" for value in values)
    return values if any(_SEPARATOR in value for value in values) else _SEPARATOR.join(values)


def structure_format(name: str) -> str | None:
    """The structure format implied by a file name, or None if it is not a structure file."""
    path = PurePosixPath(name)
    if path.suffix.lower() in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[path.suffix.lower()]
    if path.name.upper().startswith(("POSCAR", "CONTCAR")):
        return "poscar"
    return None


def _crystal_id(name: str) -> str:
    path = PurePosixPath(name)
    return path.stem if path.suffix else path.name


def is_unsafe_member(name: str) -> bool:
    """True for an archive member name that is absolute or climbs out with '..'."""
    path = PurePosixPath(name)
    return path.is_absolute() or ".." in path.parts or name.startswith("\\")


def structure_files(path: Path) -> Iterator[tuple[str, bytes | None, str]]:
    """Yield (member name, bytes or None when unsafe, checksum of the container) of a folder or tarball."""
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            yield str(file.relative_to(path)), file.read_bytes(), sha256_of(file)
        return
    if not path.is_file():
        raise SourceError(f"structures path not found: {path}")
    if not tarfile.is_tarfile(path):
        raise SourceError(f"{path} is neither a folder nor a .tar/.tar.gz archive")
    checksum = sha256_of(path)
    members = 0
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if member.isdir():
                    continue
                if is_unsafe_member(member.name) or not member.isfile():
                    yield member.name, None, checksum
                    continue
                handle = archive.extractfile(member)
                payload = handle.read() if handle else b""
                members += 1
                archive.members.clear()  # tarfile keeps every member's header: memory would grow with the archive
                yield member.name, payload, checksum
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:  # gzip/bz2/lzma damage surfaces as these
        raise SourceError(
            f"archive {path} is damaged or truncated after {members} readable members ({_first_line(exc)}); "
            "download or copy it again"
        ) from None


class LocalSource(Source):
    """Structures from a folder or tarball, labels from a CSV."""

    type_name = "local"

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self.path = Path(options["path"])
        self.labels_path = Path(options["labels"])
        self.id_column: str = options.get("id_column", "id")
        self.columns: dict[str, str] = dict(options["columns"])
        self.units: dict[str, str] = dict(options.get("units", {}))
        if not self.columns:
            raise SourceError(f"source '{name}': 'columns' maps no label")
        for label in self.columns:
            unit_of(label, self.units)  # fails early, naming the label, when its unit is unknown

    def label_units(self) -> dict[str, str]:
        return {label: unit_of(label, self.units) for label in self.columns}

    def _read_labels(self) -> tuple[dict[str, str | tuple[str, ...]], list[RawCrystal]]:
        if not self.labels_path.is_file():
            raise SourceError(f"source '{self.name}': labels CSV not found: {self.labels_path}")
        checksum = sha256_of(self.labels_path)
        try:
            return self._parse_labels(checksum)
        except UnicodeDecodeError as exc:
            line = self.labels_path.read_bytes()[: exc.start].count(b"\n") + 1
            raise SourceError(
                f"source '{self.name}': labels CSV {self.labels_path} is not UTF-8 text (byte {exc.start}, line "
                f"{line}: {exc.object[exc.start : exc.start + 1]!r}); save it as UTF-8"
            ) from None
        except csv.Error as exc:
            raise SourceError(
                f"source '{self.name}': labels CSV {self.labels_path} is not a readable CSV: {exc}"
            ) from None

    def _labels(self, packed: str | tuple[str, ...]) -> dict[str, str]:
        values = packed if isinstance(packed, tuple) else packed.split(_SEPARATOR)
        return dict(zip(self.columns, values, strict=True))

    def _parse_labels(self, checksum: str) -> tuple[dict[str, str | tuple[str, ...]], list[RawCrystal]]:
        rows: dict[str, str | tuple[str, ...]] = {}
        refused_rows: list[RawCrystal] = []
        # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name
        with open(self.labels_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            wanted = [("id_column", self.id_column, None)] + [
                ("columns", column, label) for label, column in self.columns.items()
            ]
            for key, column, label in wanted:
                if column not in header:
                    role = "the id column" if label is None else f"mapped to label '{label}'"
                    raise SourceError(
                        f"source '{self.name}': labels CSV {self.labels_path} has no column '{column}' "
                        f"({role}, config key '{key}'); its columns are: {', '.join(header)}"
                    )
            for line, row in enumerate(reader, start=2):
                crystal_id = (row[self.id_column] or "").strip()  # None: a row shorter than the header
                labels = {label: row[column] for label, column in self.columns.items()}
                if not crystal_id:
                    refused_rows.append(
                        RawCrystal(
                            id=f"{self.labels_path.name}:line {line}",
                            fmt="",
                            text="",
                            labels=labels,
                            source_file=f"{self.labels_path.name}:line {line}",
                            source_sha256=checksum,
                            rejection=Rejection(MISSING_ID, f"line {line} of the labels CSV has no id"),
                        )
                    )
                    continue
                if crystal_id in rows:
                    refused_rows.append(
                        RawCrystal(
                            id=crystal_id,
                            fmt="",
                            text="",
                            labels=labels,
                            source_file=f"{self.labels_path.name}:line {line}",
                            source_sha256=checksum,
                            rejection=Rejection(
                                DUPLICATE_ID, f"duplicate id '{crystal_id}' in labels CSV (line {line})"
                            ),
                        )
                    )
                    continue
                rows[crystal_id] = _packed(labels.values())
        return rows, refused_rows

    def _structure_files(self) -> Iterator[tuple[str, bytes | None, str]]:
        try:
            yield from structure_files(self.path)
        except SourceError as exc:
            raise SourceError(f"source '{self.name}': {exc}") from None

    def crystals(self) -> Iterator[RawCrystal]:
        rows, refused_rows = self._read_labels()
        yield from refused_rows
        container = self.path.name
        seen: set[str] = set()
        for member, payload, checksum in self._structure_files():
            where = f"{container}:{member}" if not self.path.is_dir() else f"{container}/{member}"
            crystal_id = _crystal_id(member)
            seen.add(crystal_id)  # its label row is accounted for by this record, whatever becomes of it
            if payload is None:
                yield RawCrystal(
                    id=crystal_id,
                    fmt="",
                    text="",
                    labels={},
                    source_file=where,
                    source_sha256=checksum,
                    rejection=Rejection(
                        UNSAFE_PATH, f"unsafe archive member '{member}' (absolute, '..' or not a regular file)"
                    ),
                )
                continue
            fmt = structure_format(member)
            if fmt is None:
                yield RawCrystal(
                    id=crystal_id,
                    fmt="",
                    text="",
                    labels={},
                    source_file=where,
                    source_sha256=checksum,
                    rejection=Rejection(UNKNOWN_FORMAT, f"'{member}' is not a CIF or POSCAR file"),
                )
                continue
            packed = rows.get(crystal_id)
            labels = None if packed is None else self._labels(packed)
            rejection = None
            if labels is None:
                rejection = Rejection(MISSING_LABELS, f"no row for id '{crystal_id}' in {self.labels_path.name}")
            yield RawCrystal(
                id=crystal_id,
                fmt=fmt,
                text=payload.decode("utf-8", errors="replace"),
                labels=labels or {},
                source_file=where,
                source_sha256=checksum,
                rejection=rejection,
            )
        for crystal_id, packed in rows.items():
            if crystal_id not in seen:
                yield RawCrystal(
                    id=crystal_id,
                    fmt="",
                    text="",
                    labels=self._labels(packed),
                    source_file=self.labels_path.name,
                    source_sha256="",
                    rejection=Rejection(MISSING_STRUCTURE, f"no structure file for id '{crystal_id}'"),
                )
