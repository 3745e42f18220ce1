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

import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crystal_transfer import __version__
from crystal_transfer.atomic import atomic_path, record_sha256, write_csv, write_json
from crystal_transfer.data.batches import (
    BATCH_RECORDS,
    PARTS_FORMAT,
    PARTS_SUFFIX,
    Batch,
    Parser,
    Parts,
    batches_of,
    digest,
    process_batch,
    table_schema,
)
from crystal_transfer.data.sources import Source
from crystal_transfer.data.structures import DEFAULT_MIN_DISTANCE, DUPLICATE_CRYSTAL, Rejection
from crystal_transfer.data.table import REJECTED_COLUMNS, REJECTED_FILE, SUMMARY_FILE, TABLE_FILE
from crystal_transfer.errors import UserError

# Rows per Parquet row group of the table: a graph shard reads the groups that cover its rows and no others.
ROW_GROUP_ROWS = 1024


class DataStageError(UserError):
    """The data stage cannot produce a trustworthy table (too many rejections, no crystals)."""


def _structure(lattice, numbers, frac):
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(np.reshape(lattice, (3, 3))), list(numbers), np.reshape(frac, (-1, 3)))


def _by_part(rows: Iterable[int], starts: np.ndarray) -> dict[int, list[int]]:
    """Rows of the table (over the parts, in order) grouped by part: ``{part: [row within the part, ...]}``, where
    ``starts[k]`` is the first row of part ``k``."""
    grouped: dict[int, list[int]] = defaultdict(list)
    for row in sorted(rows):
        part = int(np.searchsorted(starts, row, side="right")) - 1
        grouped[part].append(row - int(starts[part]))
    return grouped


def _cross_source_duplicates(parts: list[Path], starts: np.ndarray, source_order: list[str]) -> dict[int, Rejection]:
    """Rows (in table order over the ``parts``, part ``k`` starting at row ``starts[k]``) that hold a crystal of an
    earlier-listed source (same formula, StructureMatcher). Reads the formula and source columns, then the
    structures of the formulas that two sources share only."""
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
    for part, rows in _by_part(shared, starts).items():  # the structures of the shared formulas, part by part
        table = pq.read_table(parts[part], columns=["lattice", "numbers", "frac_coords"])
        for row in rows:
            structures[int(starts[part]) + row] = _structure(*(table.column(c)[row].as_py()
                                                               for c in ("lattice", "numbers", "frac_coords")))
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
    schema = table_schema(units, metadata)
    parts = Parts(out_dir / (TABLE_FILE + PARTS_SUFFIX), {
        "format": PARTS_FORMAT, "batch_records": batch_records, "schema": schema.to_string(),
        "metadata": metadata,
    }, log)
    kept_ids: dict[str, str] = {}  # id -> the source that kept it, across batches (names are shared strings)
    batches: list[Batch] = []
    reused = parsed_count = read = 0
    resuming = True
    source_names = {n: n for n in names}
    parser = Parser(workers)
    try:
        for index, records in enumerate(batches_of(sources, batch_records)):
            records_digest = digest(records)
            batch = parts.written(index, records_digest) if resuming else None
            written_before = batch is not None
            if batch is None:
                if resuming:
                    parts.drop_from(index)
                    resuming = False
                batch, table = process_batch(index, records_digest, records, kept_ids, schema, parser, max_z,
                                             min_distance)
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


def _finish(name: str, sources: list[Source], names: list[str], units: dict[str, str], schema: pa.Schema,
            parts: Parts, batches: list[Batch], filters: dict[str, Any], out_dir: Path, started: float,
            run_counts: dict[str, int], log) -> dict[str, Any]:
    """Cross-source duplicates, the checks on the whole, and the table written part by part in row groups."""
    # long: the summary's counts, the refusal of too many rejections and the writing share one pass of figures
    part_files = [parts.table(batch.index) for batch in batches]
    starts = np.cumsum([0] + [len(batch.kept_ids) for batch in batches])
    rejected = [row for batch in batches for row in batch.rejected]
    reports = {source.name: report for source in sources if (report := source.report()) is not None}
    duplicates = _cross_source_duplicates(part_files, starts, names)
    dropped = _by_part(duplicates, starts)
    for part, rows in dropped.items():
        files = pq.read_table(part_files[part], columns=["source_file"]).column("source_file")
        batch = batches[part]
        for row in rows:
            rejection = duplicates[int(starts[part]) + row]
            rejected.append({"id": batch.kept_ids[row], "source": batch.kept_sources[row],
                             "source_file": files[row].as_py(), "reason": rejection.reason,
                             "message": rejection.message})
    kept_count = int(starts[-1]) - len(duplicates)
    read_per_source: Counter[str] = Counter()
    kept_per_source: Counter[str] = Counter()
    for part, batch in enumerate(batches):
        read_per_source.update(batch.read_per_source)
        kept_per_source.update(batch.kept_sources)
        kept_per_source.subtract(batch.kept_sources[row] for row in dropped.get(part, []))
    total = sum(read_per_source.values())
    by_reason = Counter(row["reason"] for row in rejected)
    summary: dict[str, Any] = {
        "dataset": name,
        "read": total,
        "kept": kept_count,
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "per_source": {
            source: {"read": read_per_source[source], "kept": kept_per_source[source]} for source in names
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
            for part, path in enumerate(part_files):
                table = pq.read_table(path)
                if part in dropped:
                    table = table.filter(pa.array(np.isin(np.arange(table.num_rows), dropped[part], invert=True)))
                for label in units:
                    labels[label] += table.num_rows - table.column(label).null_count
                writer.write_table(table.replace_schema_metadata(schema.metadata), row_group_size=ROW_GROUP_ROWS)
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


