"""What the benchmarks read, built on first use: the mp2018 canonical table and its graph shards.

Every benchmark runs in a fresh clone (``make bench``): a missing table is built by the data stage from
``../shared/data/mp2018`` (or ``$CRYSTAL_TRANSFER_SHARED_DATA/mp2018``), missing graphs by the graphs stage,
into ``$CRYSTAL_TRANSFER_BENCH`` (default ``/tmp/crystal_transfer-bench``). Building is not timed.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("CRYSTAL_TRANSFER_BENCH") or "/tmp/crystal_transfer-bench")
SHARED_DATA = Path(os.environ.get("CRYSTAL_TRANSFER_SHARED_DATA") or REPO.parent / "shared" / "data")


def mp2018_cifs() -> Path:
    """The mp2018 CIF archive; exits with a message when the shared data is absent."""
    archive = SHARED_DATA / "mp2018" / "structures.tar.gz"
    if not archive.is_file():
        raise SystemExit(f"the benchmarks need the mp2018 data at {archive.parent} (set CRYSTAL_TRANSFER_SHARED_DATA)")
    return archive


def mp2018_table(path: Path | None = None) -> Path:
    """``path`` (default ``<WORK>/mp2018/crystals.parquet``), built by the data stage of configs/mp2018.yaml."""
    table = Path(path) if path else WORK / "mp2018" / "crystals.parquet"
    if table.is_file():
        return table
    from crystal_transfer.config import load_config
    from crystal_transfer.data import stage
    from crystal_transfer.data.spec import dataset_spec

    config = load_config(REPO / "configs" / "mp2018.yaml")
    spec = dataset_spec(config, "mp2018")
    for source in spec["sources"]:  # the config's paths are relative to the project root
        for key in ("path", "labels"):
            if key in source and not Path(source[key]).is_absolute():
                source[key] = str(SHARED_DATA / "mp2018" / Path(source[key]).name)
    mp2018_cifs()
    print(f"building the mp2018 table into {table.parent} (not timed) ...", flush=True)
    stage.run("mp2018", spec, table.parent, log=lambda _: None)
    return table


def mp2018_graphs(table: Path, path: Path | None = None) -> Path:
    """Graph shards of ``table`` with CGCNN's settings (default ``<WORK>/mp2018/graphs``), built if absent."""
    graphs = Path(path) if path else table.parent / "graphs"
    if (graphs / "manifest.json").is_file():
        return graphs
    from crystal_transfer.graphs.settings import GraphSettings
    from crystal_transfer.graphs.stage import build_graphs

    print(f"building the graphs of {table} into {graphs} (not timed) ...", flush=True)
    build_graphs(table, graphs, GraphSettings(), 2048, dataset="mp2018", workers=2, log=lambda _: None)
    return graphs
