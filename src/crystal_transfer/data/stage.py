"""The data stage (``data``): sources -> one canonical crystal table per dataset, with a record of every rejection.

Outputs in the dataset folder:

- ``crystals.parquet``: one row per kept crystal. Columns ``id, source, formula, num_sites, lattice``
  (9 floats, lattice rows in Å), ``numbers`` (atomic numbers), ``frac_coords`` (3 * num_sites floats, row
  major), one float column per label (unit in the field metadata, null where the crystal has no such
  label), ``source_file`` and ``source_sha256`` (provenance).
- ``rejected.csv``: ``id, source, source_file, reason, message`` for every record not kept.
- ``summary.json``: counts read / kept / rejected, per reason and per source, labels present.
- ``<source>.report.json``: for sources that give an account of their reading (``oqmd_mp``: the match
  report, counts per outcome and the OQMD-MP pairs).
- ``crystals.parquet.sha256.json``: the table's sha256 with its size and time, so that each graph-shard job checks
  the table's identity without reading all of it.

The stage streams: records are parsed and written in batches (``crystals.parquet.parts/``, removed at the end),
so its memory does not grow with the dataset, and a rerun after a kill parses only the batches not yet written.
The table is then written part by part in row groups of :data:`ROW_GROUP_ROWS` rows.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crystal_transfer import __version__
from crystal_transfer.atomic import atomic_path, record_sha256, write_csv, write_json
from crystal_transfer.data.sources import RawCrystal, Source
from crystal_transfer.data.structures import (
    DEFAULT_MIN_DISTANCE,
    DUPLICATE_CRYSTAL,
    DUPLICATE_ID,
    NO_LABELS,
    ParsedCrystal,
    Rejection,
    parse_crystal,
    parse_label,
)
from crystal_transfer.data.table import REJECTED_COLUMNS, REJECTED_FILE, SUMMARY_FILE, TABLE_FILE
from crystal_transfer.errors import UserError


class DataStageError(UserError):
    """The data stage cannot produce a trustworthy table (too many rejections, no crystals)."""


# Records parsed and written together: the memory the stage holds (their text and parsed arrays) and the work a
# kill can lose. 4,096 CIFs are about 6 MB of text; a batch is seconds of parsing.
BATCH_RECORDS = 4096
# Rows per Parquet row group of the table: a graph shard reads the groups that cover its rows and no others.
ROW_GROUP_ROWS = 1024
PARTS_SUFFIX = ".parts"  # crystals.parquet.parts/: the batches written so far, removed when the table is done
PARTS_FORMAT = 1


@dataclass
class Kept:
    """A crystal that passed every filter."""

    raw: RawCrystal
    source: str
    parsed: ParsedCrystal
    labels: dict[str, float | None]


@dataclass
class Batch:
    """The outcome of one batch of records: its kept rows (a Parquet part), rejections and counts."""

    index: int
    digest: str  # of the records' content: a written batch is reused only for the same records
    rejected: list[dict[str, str]]
    read_per_source: dict[str, int]
    kept_ids: list[str]
    kept_sources: list[str]


def _parse_job(job: tuple[str, str, int, float]) -> ParsedCrystal | Rejection:
    fmt, text, max_z, min_distance = job
    try:
        return parse_crystal(fmt, text, max_z, min_distance)
    except Rejection as rejection:
        return rejection


class _Parser:
    """Parses batches of structure texts, in ``workers`` spawned processes started on first need."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = None

    def __call__(self, jobs: list[tuple[str, str, int, float]]) -> list[ParsedCrystal | Rejection]:
        if self.workers <= 1 or len(jobs) < 200:
            return [_parse_job(job) for job in jobs]
        if self.pool is None:
            self.pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self.pool.map(_parse_job, jobs, chunksize=max(16, len(jobs) // (self.workers * 16)))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None


def _check_labels(raw: RawCrystal) -> dict[str, float | None]:
    labels = {name: parse_label(name, value) for name, value in raw.labels.items()}
    if all(value is None for value in labels.values()):
        raise Rejection(NO_LABELS, "no label has a value")
    return labels


def _structure(lattice, numbers, frac):
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(np.reshape(lattice, (3, 3))), list(numbers), np.reshape(frac, (-1, 3)))


def _cross_source_duplicates(parts: list[Path], source_order: list[str]) -> dict[int, Rejection]:
    """Rows (in table order over the ``parts``) that hold a crystal of an earlier-listed source (same formula,
    StructureMatcher). Reads the formula and source columns, then the structures of the formulas that two
    sources share only."""
    if len(source_order) < 2 or not parts:
        return {}
    from pymatgen.analysis.structure_matcher import StructureMatcher

    columns = pa.concat_tables(pq.read_table(part, columns=["id", "source", "formula"]) for part in parts)
    ids, sources, formulas = (columns.column(name).to_pylist() for name in ("id", "source", "formula"))
    by_formula: dict[str, list[int]] = defaultdict(list)
    for index, formula in enumerate(formulas):
        by_formula[formula].append(index)
    shared = {i for rows in by_formula.values() if len({sources[r] for r in rows}) > 1 for i in rows}
    if not shared:
        return {}
    structures: dict[int, Any] = {}
    offset = 0
    for part in parts:  # the structures of the shared formulas, part by part
        rows = pq.read_metadata(part).num_rows
        wanted = [i for i in range(offset, offset + rows) if i in shared]
        if wanted:
            table = pq.read_table(part, columns=["lattice", "numbers", "frac_coords"])
            for i in wanted:
                structures[i] = _structure(*(table.column(c)[i - offset].as_py()
                                             for c in ("lattice", "numbers", "frac_coords")))
        offset += rows
    matcher = StructureMatcher()
    rank = {name: position for position, name in enumerate(source_order)}
    duplicates: dict[int, Rejection] = {}
    for indices in by_formula.values():
        if len({sources[i] for i in indices}) < 2:
            continue
        ordered = sorted(indices, key=lambda i: (rank[sources[i]], i))
        for position, later in enumerate(ordered):
            for earlier in ordered[:position]:
                if earlier in duplicates or sources[earlier] == sources[later]:
                    continue
                if matcher.fit(structures[earlier], structures[later]):
                    duplicates[later] = Rejection(
                        DUPLICATE_CRYSTAL,
                        f"same crystal as '{ids[earlier]}' from source '{sources[earlier]}' "
                        f"(kept that one: its source is listed first)",
                    )
                    break
    return duplicates


def _schema(units: dict[str, str], metadata: dict[str, Any]) -> pa.Schema:
    fields = [
        pa.field("id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("formula", pa.string()),
        pa.field("num_sites", pa.int32()),
        pa.field("lattice", pa.list_(pa.float64())),
        pa.field("numbers", pa.list_(pa.int16())),
        pa.field("frac_coords", pa.list_(pa.float64())),
    ]
    fields += [pa.field(label, pa.float64(), metadata={"unit": unit}) for label, unit in units.items()]
    fields += [pa.field("source_file", pa.string()), pa.field("source_sha256", pa.string())]
    return pa.schema(fields, metadata={"crystal_transfer": json.dumps(metadata)})


def _table(kept: list[Kept], schema: pa.Schema) -> pa.Table:
    columns = {
        "id": [c.raw.id for c in kept],
        "source": [c.source for c in kept],
        "formula": [c.parsed.formula for c in kept],
        "num_sites": [len(c.parsed.numbers) for c in kept],
        "lattice": [c.parsed.lattice.ravel() for c in kept],
        "numbers": [c.parsed.numbers for c in kept],
        "frac_coords": [c.parsed.frac_coords.ravel() for c in kept],
        "source_file": [c.raw.source_file for c in kept],
        "source_sha256": [c.raw.source_sha256 for c in kept],
    }
    arrays = [
        pa.array(columns[field.name] if field.name in columns else [c.labels.get(field.name) for c in kept],
                 type=field.type)
        for field in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _describe(sources: list[Source]) -> str:
    """The sources with the files they read, for a message."""
    parts = []
    for source in sources:
        files = [str(source.options[key]) for key in ("path", "labels", "archive") if source.options.get(key)]
        parts.append(f"source '{source.name}' ({source.type_name}{': ' + ', '.join(files) if files else ''})")
    return "; ".join(parts)


def run(name: str, spec: dict[str, Any], out_dir: str | Path, workers: int = 0, fetch: bool = False, log=print,
        batch_records: int | None = None):
    """The ``data`` stage: with ``fetch``, first download what the spec's sources need and is not on disk."""
    if fetch:
        from crystal_transfer.data.fetch import fetch_missing

        fetch_missing(spec, log=log)
    return build_dataset(name, spec, out_dir, workers=workers or None, log=log,
                         batch_records=batch_records or BATCH_RECORDS)


def _records(sources: list[Source], batch_records: int) -> Iterator[list[tuple[RawCrystal, str]]]:
    """Every source's records in order, ``batch_records`` at a time, each with its source's name."""
    batch: list[tuple[RawCrystal, str]] = []
    for source in sources:
        for raw in source.crystals():
            batch.append((raw, source.name))
            if len(batch) == batch_records:
                yield batch
                batch = []
    if batch:
        yield batch


def _digest(records: list[tuple[RawCrystal, str]]) -> str:
    digest = hashlib.sha256()
    for raw, source in records:
        rejection = (raw.rejection.reason, raw.rejection.message) if raw.rejection else None
        digest.update(json.dumps([source, raw.id, raw.fmt, raw.source_file, raw.source_sha256, raw.labels,
                                  rejection], sort_keys=True, default=str).encode())
        digest.update(hashlib.sha256(raw.text.encode()).digest())
    return digest.hexdigest()


class _Parts:
    """The folder of written batches (``crystals.parquet.parts/``): part ``k`` is ``part-k.parquet`` (kept rows)
    and ``part-k.json`` (its digest, rejections and counts), the JSON written last, so a batch counts as written
    only when both are whole. Batches written for other filters are removed on start."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any], log) -> None:
        self.folder = folder
        state = folder / "parts.json"
        if folder.is_dir() and (not state.is_file() or json.loads(state.read_text()) != fingerprint):
            log(f"{folder}: batches written with other settings, starting afresh")
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not state.is_file():
            write_json(state, fingerprint)

    def table(self, index: int) -> Path:
        return self.folder / f"part-{index:06d}.parquet"

    def written(self, index: int, digest: str) -> Batch | None:
        path = self.folder / f"part-{index:06d}.json"
        if not (path.is_file() and self.table(index).is_file()):
            return None
        try:
            record = json.loads(path.read_text())
            rows = pq.read_metadata(self.table(index)).num_rows
        except (ValueError, OSError, pa.ArrowException):
            return None
        if record.get("digest") != digest or rows != len(record["kept_ids"]):
            return None
        return Batch(index, digest, record["rejected"], record["read_per_source"], record["kept_ids"],
                     record["kept_sources"])

    def write(self, batch: Batch, table: pa.Table) -> None:
        with atomic_path(self.table(batch.index)) as tmp:
            pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        write_json(self.folder / f"part-{batch.index:06d}.json", {
            "digest": batch.digest, "rejected": batch.rejected, "read_per_source": batch.read_per_source,
            "kept_ids": batch.kept_ids, "kept_sources": batch.kept_sources,
        })

    def drop_from(self, index: int) -> None:
        """Remove the batches from ``index`` on (their records changed or came after a changed batch)."""
        for path in self.folder.glob("part-*"):
            if int(path.name.split("-")[1].split(".")[0]) >= index:
                path.unlink()


def build_dataset(
    name: str,
    spec: dict[str, Any],
    out_dir: str | Path,
    workers: int | None = None,
    log=print,
    batch_records: int = BATCH_RECORDS,
) -> dict[str, Any]:
    """Read every source of dataset ``name``, filter, and write the table, rejections and summary.

    Records are parsed and written ``batch_records`` at a time, so memory does not grow with the dataset, and a
    rerun after a kill reuses the batches already written (those whose records are unchanged) and parses the
    rest. ``spec`` is the dataset's config section plus ``filters`` (``max_z``, ``min_distance``,
    ``max_rejected_fraction``). Returns the summary. Raises :class:`DataStageError` when too much is rejected.
    """
    # long: the stage's steps in reading order (read, parse, de-duplicate, check, write), one rejection record
    started = time.perf_counter()
    out_dir = Path(out_dir)
    filters = spec["filters"]
    max_z = int(filters["max_z"])
    min_distance = float(filters.get("min_distance", DEFAULT_MIN_DISTANCE))
    workers = workers or min(os.cpu_count() or 1, 8)
    if batch_records < 1:
        raise DataStageError(f"batch_records must be at least 1, not {batch_records}")
    sources = [Source.from_config(source_spec) for source_spec in spec["sources"]]
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise DataStageError(f"dataset '{name}': two sources share a name ({', '.join(names)}); name each uniquely")
    units: dict[str, str] = {}
    for source in sources:
        for label, unit in source.label_units().items():
            if units.setdefault(label, unit) != unit:
                raise DataStageError(
                    f"label '{label}' has unit {units[label]} in one source and {unit} in '{source.name}'"
                )
    metadata = {
        "dataset": name,
        "created_by": f"crystal_transfer {__version__}",
        "sources": [{"name": s.name, "type": s.type_name} for s in sources],
        "units": units,
        "max_z": max_z,
        "min_distance": min_distance,
    }
    schema = _schema(units, metadata)
    parts = _Parts(out_dir / (TABLE_FILE + PARTS_SUFFIX), {
        "format": PARTS_FORMAT, "batch_records": batch_records, "schema": schema.to_string(),
        "metadata": metadata,
    }, log)
    kept_ids: dict[str, str] = {}  # id -> the source that kept it, across batches (names are shared strings)
    batches: list[Batch] = []
    reused = parsed_count = read = 0
    resuming = True
    source_names = {n: n for n in names}
    parser = _Parser(workers)
    try:
        for index, records in enumerate(_records(sources, batch_records)):
            digest = _digest(records)
            batch = parts.written(index, digest) if resuming else None
            written_before = batch is not None
            if batch is None:
                if resuming:
                    parts.drop_from(index)
                    resuming = False
                batch, table = _process(index, digest, records, kept_ids, schema, parser, max_z, min_distance)
                parts.write(batch, table)
                parsed_count += len(records)
            else:
                reused += len(records)
            for crystal_id, source in zip(batch.kept_ids, batch.kept_sources, strict=True):
                kept_ids[crystal_id] = source_names[source]
            batches.append(batch)
            read += len(records)
            log(f"batch {index}: {read} records read, {len(kept_ids)} kept"
                + (" (written before: reused)" if written_before else ""))
    finally:
        parser.close()
    if resuming:
        parts.drop_from(len(batches))
    if reused:
        log(f"resumed: {reused} records of earlier batches reused, {parsed_count} parsed in this run")
    return _finish(name, sources, names, units, schema, parts, batches, filters, out_dir, started,
                   {"reused_records": reused, "parsed_records": parsed_count}, log)


def _process(index: int, digest: str, records: list[tuple[RawCrystal, str]], kept_ids: dict[str, str],
             schema: pa.Schema, parser: _Parser, max_z: int, min_distance: float) -> tuple[Batch, pa.Table]:
    """Check, parse and de-duplicate (by id, against every earlier batch) one batch of records."""
    rejected: list[dict[str, str]] = []
    read: Counter[str] = Counter()

    def reject(raw: RawCrystal, source: str, rejection: Rejection) -> None:
        rejected.append({"id": raw.id, "source": source, "source_file": raw.source_file,
                         "reason": rejection.reason, "message": rejection.message})

    candidates: list[tuple[RawCrystal, str, dict[str, float | None]]] = []
    for raw, source in records:
        read[source] += 1
        if raw.rejection is not None:
            reject(raw, source, raw.rejection)
            continue
        try:
            candidates.append((raw, source, _check_labels(raw)))
        except Rejection as rejection:
            reject(raw, source, rejection)
    results = parser([(raw.fmt, raw.text, max_z, min_distance) for raw, _, _ in candidates])
    kept: list[Kept] = []
    batch_ids: dict[str, Kept] = {}
    for (raw, source, labels), result in zip(candidates, results, strict=True):
        if isinstance(result, Rejection):
            reject(raw, source, result)
            continue
        if raw.id in kept_ids or raw.id in batch_ids:
            first = kept_ids.get(raw.id) or batch_ids[raw.id].source
            reject(raw, source, Rejection(
                DUPLICATE_ID, f"duplicate id '{raw.id}': already kept from source '{first}' (the first record with "
                "an id is kept)",
            ))
            continue
        batch_ids[raw.id] = crystal = Kept(raw=raw, source=source, parsed=result, labels=labels)
        kept.append(crystal)
    batch = Batch(index, digest, rejected, dict(read), [c.raw.id for c in kept], [c.source for c in kept])
    return batch, _table(kept, schema)


def _finish(name: str, sources: list[Source], names: list[str], units: dict[str, str], schema: pa.Schema,
            parts: _Parts, batches: list[Batch], filters: dict[str, Any], out_dir: Path, started: float,
            run_counts: dict[str, int], log) -> dict[str, Any]:
    """Cross-source duplicates, the checks on the whole, and the table written part by part in row groups."""
    part_files = [parts.table(batch.index) for batch in batches]
    rejected = [row for batch in batches for row in batch.rejected]
    reports = {source.name: report for source in sources if (report := source.report()) is not None}
    duplicates = _cross_source_duplicates(part_files, names)
    all_ids = [(crystal_id, source) for batch in batches
               for crystal_id, source in zip(batch.kept_ids, batch.kept_sources, strict=True)]
    for index, rejection in sorted(duplicates.items()):
        crystal_id, source = all_ids[index]
        rejected.append({"id": crystal_id, "source": source, "source_file": _source_file(part_files, index),
                         "reason": rejection.reason, "message": rejection.message})
    kept_count = len(all_ids) - len(duplicates)
    read_per_source: Counter[str] = Counter()
    for batch in batches:
        read_per_source.update(batch.read_per_source)
    total = sum(read_per_source.values())
    by_reason = Counter(row["reason"] for row in rejected)
    summary: dict[str, Any] = {
        "dataset": name,
        "read": total,
        "kept": kept_count,
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "per_source": {
            source: {"read": read_per_source[source],
                     "kept": sum(s == source for i, (_, s) in enumerate(all_ids) if i not in duplicates)}
            for source in names
        },
        "labels": {},
        "units": units,
        "max_z": int(filters["max_z"]),
        "min_distance": float(filters.get("min_distance", DEFAULT_MIN_DISTANCE)),
        "seconds": None,
        **run_counts,
    }
    if total == 0:
        raise DataStageError(
            f"dataset '{name}': its sources yielded no records at all ({_describe(sources)}); check their paths, "
            "archives and label files"
        )
    fraction = len(rejected) / total
    limit = float(filters["max_rejected_fraction"])
    out_dir.mkdir(parents=True, exist_ok=True)
    if not kept_count or fraction > limit:
        failed = out_dir / f"failed-{REJECTED_FILE}"
        write_csv(failed, REJECTED_COLUMNS, rejected)
        for source_name, report in reports.items():
            write_json(out_dir / f"failed-{source_name}.report.json", report)
        reasons = ", ".join(f"{reason} {count}" for reason, count in by_reason.most_common())
        what = (
            f"no crystal kept: all {total} records were rejected ({_describe(sources)})" if not kept_count else
            f"rejected {len(rejected)} of {total} records ({fraction:.1%}), more than max_rejected_fraction="
            f"{limit:g} allows"
        )
        raise DataStageError(
            f"dataset '{name}': {what}; reasons: {reasons or 'none'}. Every rejection with its message is in "
            f"{failed}. Fix the input" + (" or raise filters.max_rejected_fraction." if kept_count else ".")
        )
    labels = Counter({label: 0 for label in units})
    with atomic_path(out_dir / TABLE_FILE) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            offset = 0
            for part in part_files:
                table = pq.read_table(part)
                rows = table.num_rows
                drop = [i - offset for i in duplicates if offset <= i < offset + rows]
                if drop:
                    table = table.filter(pa.array(np.isin(np.arange(rows), drop, invert=True)))
                for label in units:
                    labels[label] += table.num_rows - table.column(label).null_count
                writer.write_table(table.replace_schema_metadata(schema.metadata), row_group_size=ROW_GROUP_ROWS)
                offset += rows
    record_sha256(out_dir / TABLE_FILE)
    summary["labels"] = dict(labels)
    write_csv(out_dir / REJECTED_FILE, REJECTED_COLUMNS, rejected)
    for source_name, report in reports.items():
        write_json(out_dir / f"{source_name}.report.json", report)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    write_json(out_dir / SUMMARY_FILE, summary)
    shutil.rmtree(parts.folder, ignore_errors=True)
    log(format_summary(summary))
    return summary


def _source_file(parts: list[Path], index: int) -> str:
    """The ``source_file`` of row ``index`` over the parts (for a cross-source duplicate's rejection)."""
    for part in parts:
        rows = pq.read_metadata(part).num_rows
        if index < rows:
            return pq.read_table(part, columns=["source_file"]).column("source_file")[index].as_py()
        index -= rows
    raise IndexError(index)


def format_summary(summary: dict[str, Any]) -> str:
    """A few human lines: what was kept and what was dropped, by reason."""
    lines = [
        f"dataset '{summary['dataset']}': read {summary['read']}, kept {summary['kept']}, "
        f"rejected {summary['rejected']}"
    ]
    for reason, count in summary["rejected_by_reason"].items():
        lines.append(f"  rejected {count:>6}  {reason}")
    for label, count in summary["labels"].items():
        lines.append(f"  label {label:<28} {count:>6} crystals ({summary['units'][label]})")
    return "\n".join(lines)


