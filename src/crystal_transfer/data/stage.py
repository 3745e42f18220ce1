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
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from crystal_transfer import __version__
from crystal_transfer.atomic import atomic_path, write_csv, write_json
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


@dataclass
class Kept:
    """A crystal that passed every filter."""

    raw: RawCrystal
    source: str
    parsed: ParsedCrystal
    labels: dict[str, float | None]


def _parse_job(job: tuple[str, str, int, float]) -> ParsedCrystal | Rejection:
    fmt, text, max_z, min_distance = job
    try:
        return parse_crystal(fmt, text, max_z, min_distance)
    except Rejection as rejection:
        return rejection


def _parse_all(jobs: list[tuple[str, str, int, float]], workers: int) -> list[ParsedCrystal | Rejection]:
    if workers <= 1 or len(jobs) < 200:
        return [_parse_job(job) for job in jobs]
    chunk = max(16, len(jobs) // (workers * 16))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(_parse_job, jobs, chunksize=chunk)


def _check_labels(raw: RawCrystal) -> dict[str, float | None]:
    labels = {name: parse_label(name, value) for name, value in raw.labels.items()}
    if all(value is None for value in labels.values()):
        raise Rejection(NO_LABELS, "no label has a value")
    return labels


def _structure(parsed: ParsedCrystal):
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(parsed.lattice), parsed.numbers.tolist(), parsed.frac_coords)


def _cross_source_duplicates(kept: list[Kept], source_order: list[str]) -> dict[int, Rejection]:
    """Indices of crystals that match a crystal of an earlier-listed source (same formula, StructureMatcher)."""
    if len(source_order) < 2:
        return {}
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher()
    by_formula: dict[str, list[int]] = defaultdict(list)
    for index, crystal in enumerate(kept):
        by_formula[crystal.parsed.formula].append(index)
    rank = {name: position for position, name in enumerate(source_order)}
    duplicates: dict[int, Rejection] = {}
    for indices in by_formula.values():
        if len({kept[i].source for i in indices}) < 2:
            continue
        structures = {i: _structure(kept[i].parsed) for i in indices}
        ordered = sorted(indices, key=lambda i: (rank[kept[i].source], i))
        for position, later in enumerate(ordered):
            for earlier in ordered[:position]:
                if earlier in duplicates or kept[earlier].source == kept[later].source:
                    continue
                if matcher.fit(structures[earlier], structures[later]):
                    duplicates[later] = Rejection(
                        DUPLICATE_CRYSTAL,
                        f"same crystal as '{kept[earlier].raw.id}' from source '{kept[earlier].source}' "
                        f"(kept that one: its source is listed first)",
                    )
                    break
    return duplicates


def _table(kept: list[Kept], units: dict[str, str], metadata: dict[str, Any]) -> pa.Table:
    labels = list(units)
    lattice = pa.array([c.parsed.lattice.ravel() for c in kept], type=pa.list_(pa.float64()))
    numbers = pa.array([c.parsed.numbers for c in kept], type=pa.list_(pa.int16()))
    frac = pa.array([c.parsed.frac_coords.ravel() for c in kept], type=pa.list_(pa.float64()))
    columns: dict[str, pa.Array] = {
        "id": pa.array([c.raw.id for c in kept], type=pa.string()),
        "source": pa.array([c.source for c in kept], type=pa.string()),
        "formula": pa.array([c.parsed.formula for c in kept], type=pa.string()),
        "num_sites": pa.array([len(c.parsed.numbers) for c in kept], type=pa.int32()),
        "lattice": lattice,
        "numbers": numbers,
        "frac_coords": frac,
    }
    fields = [pa.field(name, array.type) for name, array in columns.items()]
    for label in labels:
        columns[label] = pa.array([c.labels.get(label) for c in kept], type=pa.float64())
        fields.append(pa.field(label, pa.float64(), metadata={"unit": units[label]}))
    for name in ("source_file", "source_sha256"):
        columns[name] = pa.array([getattr(c.raw, name) for c in kept], type=pa.string())
        fields.append(pa.field(name, pa.string()))
    schema = pa.schema(fields, metadata={"crystal_transfer": json.dumps(metadata)})
    return pa.Table.from_arrays(list(columns.values()), schema=schema)


def _describe(sources: list[Source]) -> str:
    """The sources with the files they read, for a message."""
    parts = []
    for source in sources:
        files = [str(source.options[key]) for key in ("path", "labels", "archive") if source.options.get(key)]
        parts.append(f"source '{source.name}' ({source.type_name}{': ' + ', '.join(files) if files else ''})")
    return "; ".join(parts)


def run(name: str, spec: dict[str, Any], out_dir: str | Path, workers: int = 0, fetch: bool = False, log=print):
    """The ``data`` stage: with ``fetch``, first download what the spec's sources need and is not on disk."""
    if fetch:
        from crystal_transfer.data.fetch import fetch_missing

        fetch_missing(spec, log=log)
    return build_dataset(name, spec, out_dir, workers=workers or None, log=log)


def build_dataset(
    name: str,
    spec: dict[str, Any],
    out_dir: str | Path,
    workers: int | None = None,
    log=print,
) -> dict[str, Any]:
    """Read every source of dataset ``name``, filter, and write the table, rejections and summary.

    ``spec`` is the dataset's config section plus ``filters`` (``max_z``, ``min_distance``, ``max_rejected_fraction``).
    Returns the summary. Raises :class:`DataStageError` when too much is rejected.
    """
    # long: the stage's steps in reading order (read, parse, de-duplicate, check, write), one rejection record
    started = time.perf_counter()
    out_dir = Path(out_dir)
    filters = spec["filters"]
    max_z = int(filters["max_z"])
    min_distance = float(filters.get("min_distance", DEFAULT_MIN_DISTANCE))
    workers = workers or min(os.cpu_count() or 1, 8)
    sources = [Source.from_config(source_spec) for source_spec in spec["sources"]]
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise DataStageError(f"dataset '{name}': two sources share a name ({', '.join(names)}); name each uniquely")

    units: dict[str, str] = {}
    rejected: list[dict[str, str]] = []
    candidates: list[tuple[RawCrystal, str, dict[str, float | None]]] = []
    read_per_source: Counter[str] = Counter()

    def reject(raw: RawCrystal, source: str, rejection: Rejection) -> None:
        rejected.append(
            {
                "id": raw.id,
                "source": source,
                "source_file": raw.source_file,
                "reason": rejection.reason,
                "message": rejection.message,
            }
        )

    for source in sources:
        for label, unit in source.label_units().items():
            if units.setdefault(label, unit) != unit:
                raise DataStageError(
                    f"label '{label}' has unit {units[label]} in one source and {unit} in '{source.name}'"
                )
        for raw in source.crystals():
            read_per_source[source.name] += 1
            if raw.rejection is not None:
                reject(raw, source.name, raw.rejection)
                continue
            try:
                labels = _check_labels(raw)
            except Rejection as rejection:
                reject(raw, source.name, rejection)
                continue
            candidates.append((raw, source.name, labels))

    parsed = _parse_all([(raw.fmt, raw.text, max_z, min_distance) for raw, _, _ in candidates], workers)
    kept: list[Kept] = []
    kept_ids: dict[str, Kept] = {}
    for (raw, source_name, labels), result in zip(candidates, parsed, strict=True):
        if isinstance(result, Rejection):
            reject(raw, source_name, result)
            continue
        if raw.id in kept_ids:
            first = kept_ids[raw.id]
            reject(
                raw,
                source_name,
                Rejection(
                    DUPLICATE_ID,
                    f"duplicate id '{raw.id}': already kept from source '{first.source}' ({first.raw.source_file})",
                ),
            )
            continue
        crystal = Kept(raw=raw, source=source_name, parsed=result, labels=labels)
        kept_ids[raw.id] = crystal
        kept.append(crystal)
        raw.text = ""  # the arrays are all we keep

    reports = {source.name: report for source in sources if (report := source.report()) is not None}
    duplicates = _cross_source_duplicates(kept, names)
    for index, rejection in sorted(duplicates.items()):
        reject(kept[index].raw, kept[index].source, rejection)
    kept = [crystal for index, crystal in enumerate(kept) if index not in duplicates]

    total = sum(read_per_source.values())
    by_reason = Counter(row["reason"] for row in rejected)
    summary: dict[str, Any] = {
        "dataset": name,
        "read": total,
        "kept": len(kept),
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "per_source": {
            source: {"read": read_per_source[source], "kept": sum(c.source == source for c in kept)} for source in names
        },
        "labels": {label: int(sum(c.labels.get(label) is not None for c in kept)) for label in units},
        "units": units,
        "max_z": max_z,
        "min_distance": min_distance,
        "seconds": None,
    }
    if total == 0:
        raise DataStageError(
            f"dataset '{name}': its sources yielded no records at all ({_describe(sources)}); check their paths, "
            "archives and label files"
        )
    fraction = len(rejected) / total
    limit = float(filters["max_rejected_fraction"])
    out_dir.mkdir(parents=True, exist_ok=True)
    if not kept or fraction > limit:
        failed = out_dir / f"failed-{REJECTED_FILE}"
        write_csv(failed, REJECTED_COLUMNS, rejected)
        for source_name, report in reports.items():
            write_json(out_dir / f"failed-{source_name}.report.json", report)
        reasons = ", ".join(f"{reason} {count}" for reason, count in by_reason.most_common())
        what = (
            f"no crystal kept: all {total} records were rejected ({_describe(sources)})" if not kept else
            f"rejected {len(rejected)} of {total} records ({fraction:.1%}), more than max_rejected_fraction="
            f"{limit:g} allows"
        )
        raise DataStageError(
            f"dataset '{name}': {what}; reasons: {reasons or 'none'}. Every rejection with its message is in "
            f"{failed}. Fix the input" + (" or raise filters.max_rejected_fraction." if kept else ".")
        )

    metadata = {
        "dataset": name,
        "created_by": f"crystal_transfer {__version__}",
        "sources": [{"name": s.name, "type": s.type_name} for s in sources],
        "units": units,
        "max_z": max_z,
        "min_distance": min_distance,
    }
    with atomic_path(out_dir / TABLE_FILE) as tmp:
        pq.write_table(_table(kept, units, metadata), tmp, compression="zstd")
    write_csv(out_dir / REJECTED_FILE, REJECTED_COLUMNS, rejected)
    for source_name, report in reports.items():
        write_json(out_dir / f"{source_name}.report.json", report)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    write_json(out_dir / SUMMARY_FILE, summary)
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


