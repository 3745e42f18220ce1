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

TABLE_FILE = "crystals.parquet"
REJECTED_FILE = "rejected.csv"
SUMMARY_FILE = "summary.json"
REJECTED_COLUMNS = ["id", "source", "source_file", "reason", "message"]


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a canonical crystal table (optionally only some columns)."""
    return pq.read_table(path, columns=columns)


def table_units(path: str | Path) -> dict[str, str]:
    """Label -> unit, from a canonical table's schema metadata."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"crystal_transfer", b"{}")).get("units", {})


def label_values(table: pa.Table, label: str) -> np.ndarray:
    """A label column as float64 with NaN where a crystal has no value."""
    return table.column(label).to_numpy(zero_copy_only=False).astype(np.float64)
