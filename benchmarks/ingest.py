"""Ingest all of mp2018 from its tarball through the data stage; print crystals/s and peak memory.

Reference measured in the same run: pymatgen's CifParser on a sample, serially, extrapolated to the whole
archive (the cost of the naive path: parse every CIF in one process).

    python benchmarks/ingest.py [--data ../shared/data] [--workers 2] [--sample 1000]
"""

from __future__ import annotations

import argparse
import os
import resource
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

from crystal_transfer.data.stage import build_dataset

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory of this process and of its largest finished child, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def reference_seconds_per_crystal(archive: Path, sample: int) -> float:
    """Serial pymatgen CifParser time per crystal over the first ``sample`` CIFs."""
    from pymatgen.io.cif import CifParser

    texts = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile():
                texts.append(tar.extractfile(member).read().decode())
                if len(texts) == sample:
                    break
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in texts:
            CifParser.from_str(text).parse_structures(primitive=False)
    return (time.perf_counter() - started) / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = os.environ.get("CRYSTAL_TRANSFER_SHARED_DATA", REPO.parent / "shared" / "data")
    parser.add_argument("--data", default=default_data)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sample", type=int, default=1000, help="CIFs for the serial reference")
    args = parser.parse_args()
    data = Path(args.data) / "mp2018"
    spec = {
        "sources": [{
            "type": "local", "name": "mp2018", "path": str(data / "structures.tar.gz"),
            "labels": str(data / "labels.csv"), "id_column": "material_id",
            "columns": {"formation_energy_per_atom": "formation_energy_per_atom", "band_gap": "band_gap",
                        "energy_per_atom": "energy_per_atom", "K_VRH": "K_VRH", "G_VRH": "G_VRH"},
        }],
        "filters": {"max_z": 80, "max_rejected_fraction": 0.25},
    }
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        summary = build_dataset("mp2018", spec, out, workers=args.workers)
        wall = time.perf_counter() - started
        table_mb = (Path(out) / "crystals.parquet").stat().st_size / 1e6
    own, child = peak_rss_mb()
    reference = reference_seconds_per_crystal(data / "structures.tar.gz", args.sample)
    read = summary["read"]
    print(f"ingested {read} crystals ({summary['kept']} kept) in {wall:.1f} s wall with {args.workers} workers: "
          f"{read / wall:.0f} crystals/s; table {table_mb:.1f} MB")
    print(f"peak memory: main process {own:.0f} MB, largest worker {child:.0f} MB")
    print(f"reference (serial CifParser, {args.sample} crystals): {reference * 1e3:.2f} ms/crystal, "
          f"{read * reference:.1f} s extrapolated to {read}; ratio reference/ours {read * reference / wall:.2f}")


if __name__ == "__main__":
    main()
