"""Source ``matminer_legacy``: real Materials Project tables from the matminer 0.3.9 source archive.

The archive comes from the package registry (``pip download``, never installed) and its sha256 is checked.
Three tables are read straight from it: ``flla_2015.csv`` (formation energy per atom, structure as a
pymatgen dict repr), ``elastic_tensor.csv`` (K_VRH, G_VRH, structure as POSCAR) and
``dielectric_constant.csv`` (band gap and refractive index n, structure as POSCAR). A material id found in several
tables becomes one crystal with all its labels; its structure comes from the first table listed here.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from crystal_transfer.data.labels import unit_of
from crystal_transfer.data.sources.base import RawCrystal, Source, SourceError, sha256_of
from crystal_transfer.data.structures import DUPLICATE_ID, Rejection
from crystal_transfer.registry import RegistryDownloadError, download_verified

MATMINER_VERSION = "0.3.9"
MATMINER_SHA256 = "3faf9e83464f3d48f68a759bf476ad24da4c8c3e950c8f340cb917d3bb906400"

# table file -> (structure column, structure format, {canonical label: table column})
TABLES: dict[str, tuple[str, str, dict[str, str]]] = {
    "flla_2015.csv": ("structure", "pymatgen_dict", {"formation_energy_per_atom": "formation_energy_per_atom"}),
    "elastic_tensor.csv": ("poscar", "poscar", {"K_VRH": "K_VRH", "G_VRH": "G_VRH"}),
    "dielectric_constant.csv": ("poscar", "poscar", {"band_gap": "band_gap", "refractive_index": "n"}),
}


def fetch_archive(dest_dir: str | Path, version: str = MATMINER_VERSION, sha256: str = MATMINER_SHA256) -> Path:
    """Download the matminer source archive with pip (no install) into ``dest_dir`` and verify it.

    An archive already present with the right checksum is reused.
    """
    try:
        return download_verified(f"matminer=={version}", f"matminer-{version}.tar.gz", sha256, dest_dir, binary=False)
    except RegistryDownloadError as exc:
        raise SourceError(str(exc)) from None


def read_table(archive: tarfile.TarFile, version: str, table: str) -> pd.DataFrame:
    """Read one CSV of ``matminer/datasets/`` from the open archive, all columns as strings."""
    member = f"matminer-{version}/matminer/datasets/{table}"
    try:
        handle = archive.extractfile(member)
    except KeyError:
        raise SourceError(f"matminer archive has no member {member}") from None
    if handle is None:
        raise SourceError(f"matminer archive member {member} is not a file")
    text = handle.read().decode("utf-8")
    return pd.read_csv(io.StringIO(text), comment=None, skiprows=1, dtype=str, keep_default_na=False)


class MatminerLegacySource(Source):
    """The embedded default dataset: MP formation energy, elasticity and band-gap tables of matminer 0.3.9."""

    type_name = "matminer_legacy"

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self.archive = Path(options["archive"])
        self.version: str = options.get("version", MATMINER_VERSION)
        self.sha256: str = options.get("sha256", MATMINER_SHA256)

    def label_units(self) -> dict[str, str]:
        return {label: unit_of(label) for _, _, columns in TABLES.values() for label in columns}

    def crystals(self) -> Iterator[RawCrystal]:
        if not self.archive.is_file():
            raise SourceError(
                f"source '{self.name}': archive {self.archive} not found; fetch it with "
                f"'python -m crystal_transfer fetch-matminer --out {self.archive}'"
            )
        actual = sha256_of(self.archive)
        if actual != self.sha256:
            raise SourceError(f"source '{self.name}': {self.archive} has sha256 {actual}, expected {self.sha256}")
        records: dict[str, RawCrystal] = {}
        duplicates: list[RawCrystal] = []
        with tarfile.open(self.archive, "r:gz") as archive:
            for table, (structure_column, fmt, columns) in TABLES.items():
                frame = read_table(archive, self.version, table)
                in_table: set[str] = set()
                for row_number, row in enumerate(frame.itertuples(index=False), start=0):
                    values = row._asdict()
                    crystal_id = values["material_id"].strip()
                    labels = {label: values[column] for label, column in columns.items()}
                    where = f"{self.archive.name}:{table}#row{row_number}"
                    if crystal_id in in_table:
                        duplicates.append(
                            RawCrystal(
                                id=crystal_id,
                                fmt=fmt,
                                text="",
                                labels=labels,
                                source_file=where,
                                source_sha256=actual,
                                rejection=Rejection(DUPLICATE_ID, f"duplicate id '{crystal_id}' in {table}"),
                            )
                        )
                        continue
                    in_table.add(crystal_id)
                    if crystal_id in records:
                        records[crystal_id].labels.update(labels)
                        continue
                    records[crystal_id] = RawCrystal(
                        id=crystal_id,
                        fmt=fmt,
                        text=values[structure_column],
                        labels=labels,
                        source_file=where,
                        source_sha256=actual,
                    )
        yield from records.values()
        yield from duplicates
