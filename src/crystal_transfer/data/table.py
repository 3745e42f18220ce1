"""The canonical crystal table (``crystals.parquet``) that the data stage writes and every later stage reads.

Columns ``id, source, formula, num_sites, lattice`` (9 floats, lattice rows in Å), ``numbers`` (atomic
numbers), ``frac_coords`` (3 * num_sites floats, row major), one float column per label (unit in the schema
metadata, null where the crystal has no such label), ``source_file`` and ``source_sha256``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crystal_transfer.errors import MissingError

TABLE_FILE = "crystals.parquet"
REJECTED_FILE = "rejected.csv"
SUMMARY_FILE = "summary.json"
REJECTED_COLUMNS = ["id", "source", "source_file", "reason", "message"]


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a canonical crystal table (optionally only some columns); a column it lacks is named with the
    labels it has."""
    if columns is not None:
        names = pq.read_schema(path).names
        missing = [column for column in columns if column not in names]
        if missing:
            raise MissingError(
                f"{path} has no column {', '.join(repr(m) for m in missing)}; its labels are: "
                f"{', '.join(label_names(pq.read_schema(path))) or 'none'}"
            )
    return pq.read_table(path, columns=columns)


def table_filters(path: str | Path) -> dict[str, float]:
    """The data stage's per-crystal filters the table was built with (``max_z``, ``min_distance``), as recorded."""
    meta = pq.read_schema(path).metadata or {}
    recorded = json.loads(meta.get(b"crystal_transfer", b"{}"))
    return {key: recorded[key] for key in ("max_z", "min_distance") if key in recorded}


def table_units(path: str | Path) -> dict[str, str]:
    """Label -> unit, from a canonical table's schema metadata."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"crystal_transfer", b"{}")).get("units", {})


def label_names(schema: pa.Schema) -> list[str]:
    """The label columns of a canonical table: the numeric columns that carry a unit."""
    return [field.name for field in schema if field.metadata and b"unit" in field.metadata]


def label_values(table: pa.Table, label: str) -> np.ndarray:
    """A label column as float64 with NaN where a crystal has no value; a column that is not a label is named."""
    field = table.schema.field(label) if label in table.column_names else None
    if field is None or not pa.types.is_floating(field.type):
        what = "not a column" if field is None else f"a column of {field.type}, not a label"
        raise MissingError(f"'{label}' is {what}; the table's labels are: {', '.join(label_names(table.schema))}")
    return table.column(label).to_numpy(zero_copy_only=False).astype(np.float64)


def structures(path: str | Path, ids: list[str]) -> list:
    """pymatgen Structures of the crystals ``ids`` of a canonical table, in that order (for libraries that take
    them, such as the universal potentials); an id the table lacks is named."""
    from pymatgen.core import Lattice, Structure

    frame = read_table(path, columns=["id", "lattice", "numbers", "frac_coords"])
    row = {crystal_id: index for index, crystal_id in enumerate(frame.column("id").to_pylist())}
    missing = [crystal_id for crystal_id in ids if crystal_id not in row]
    if missing:
        raise MissingError(f"{path} lacks {len(missing)} crystals of the split, e.g. {missing[:3]}; "
                           "the split was made from another table: rebuild it")
    lattices, numbers, coords = (frame.column(name) for name in ("lattice", "numbers", "frac_coords"))
    result = []
    for crystal_id in ids:
        index = row[crystal_id]
        species = numbers[index].as_py()
        result.append(Structure(
            Lattice(np.reshape(lattices[index].as_py(), (3, 3))), species,
            np.reshape(coords[index].as_py(), (len(species), 3)),
        ))
    return result
