"""The data stage's batches: records read, checked, parsed and written a batch at a time into a parts folder
(``crystals.parquet.parts/``), so that the stage's memory does not grow with the dataset and a rerun after a kill
reuses what was written. :func:`crystal_transfer.data.stage.build_dataset` drives them and writes the table.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from crystal_transfer.atomic import atomic_path, write_json
from crystal_transfer.data.sources import RawCrystal, Source
from crystal_transfer.data.structures import (
    DUPLICATE_ID,
    NO_LABELS,
    ParsedCrystal,
    Rejection,
    parse_crystal,
    parse_label,
)

# Records parsed and written together: the memory the stage holds (their text and parsed arrays) and the work a
# kill can lose. 4,096 CIFs are about 6 MB of text; a batch is seconds of parsing.
BATCH_RECORDS = 4096
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


def parse_job(job: tuple[str, str, int, float]) -> ParsedCrystal | Rejection:
    fmt, text, max_z, min_distance = job
    try:
        return parse_crystal(fmt, text, max_z, min_distance)
    except Rejection as rejection:
        return rejection


class Parser:
    """Parses batches of structure texts, in ``workers`` spawned processes started on first need."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = None

    def __call__(self, jobs: list[tuple[str, str, int, float]]) -> list[ParsedCrystal | Rejection]:
        if self.workers <= 1 or len(jobs) < 200:
            return [parse_job(job) for job in jobs]
        if self.pool is None:
            self.pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self.pool.map(parse_job, jobs, chunksize=max(16, len(jobs) // (self.workers * 16)))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None


def check_labels(raw: RawCrystal) -> dict[str, float | None]:
    """A record's labels as floats (None where missing); a record with none at all is rejected."""
    labels = {name: parse_label(name, value) for name, value in raw.labels.items()}
    if all(value is None for value in labels.values()):
        raise Rejection(NO_LABELS, "no label has a value")
    return labels


def table_schema(units: dict[str, str], metadata: dict[str, Any]) -> pa.Schema:
    """The canonical table's schema (:mod:`crystal_transfer.data.table`): a column per label with its unit."""
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


def batch_table(kept: list[Kept], schema: pa.Schema) -> pa.Table:
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


def batches_of(sources: list[Source], batch_records: int) -> Iterator[list[tuple[RawCrystal, str]]]:
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


def digest(records: list[tuple[RawCrystal, str]]) -> str:
    digest = hashlib.sha256()
    for raw, source in records:
        rejection = (raw.rejection.reason, raw.rejection.message) if raw.rejection else None
        digest.update(json.dumps([source, raw.id, raw.fmt, raw.source_file, raw.source_sha256, raw.labels,
                                  rejection], sort_keys=True, default=str).encode())
        digest.update(hashlib.sha256(raw.text.encode()).digest())
    return digest.hexdigest()


class Parts:
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
            pq.write_table(table, tmp, compression="zstd")
        write_json(self.folder / f"part-{batch.index:06d}.json", {
            "digest": batch.digest, "rejected": batch.rejected, "read_per_source": batch.read_per_source,
            "kept_ids": batch.kept_ids, "kept_sources": batch.kept_sources,
        })

    def drop_from(self, index: int) -> None:
        """Remove the batches from ``index`` on (their records changed or came after a changed batch)."""
        for path in self.folder.glob("part-*"):
            if int(path.name.split("-")[1].split(".")[0]) >= index:
                path.unlink()


def process_batch(index: int, digest: str, records: list[tuple[RawCrystal, str]], kept_ids: dict[str, str],
             schema: pa.Schema, parser: Parser, max_z: int, min_distance: float) -> tuple[Batch, pa.Table]:
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
            candidates.append((raw, source, check_labels(raw)))
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
    return batch, batch_table(kept, schema)
