"""The graphs stage: a canonical crystal table -> crystal-graph shards, a manifest and a rejection list.

Per crystal a shard keeps the atomic numbers and, per atom, up to ``max_num_nbr`` neighbours within
``radius``: their indices (local to the crystal) and distances. Gaussian edge features are never stored;
models expand the distances (:func:`crystal_transfer.models.layers.gaussian_expand`). One crystal's graph:
:mod:`crystal_transfer.graphs.crystal_graph`; the settings: :mod:`crystal_transfer.graphs.settings`.

Files in the output folder:

- ``plan.json``: the table (path, sha256, rows), the settings and the row range of each shard;
- ``shard-NNNNN.cgs``: one per plan entry (format: :mod:`crystal_transfer.graphs.shards`);
- ``manifest.json``: the plan plus counts, a sha256 per shard and the crystals whose radius was extended;
- ``rejected.csv``: ``id,reason,message`` of crystals the graph stage dropped.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from crystal_transfer import __version__
from crystal_transfer.atomic import recorded_sha256, write_csv, write_json
from crystal_transfer.atomic import sha256_file as file_sha256
from crystal_transfer.graphs import neighbours
from crystal_transfer.graphs.crystal_graph import (
    UNSEARCHABLE_CELL,
    CrystalGraph,
    GraphRejection,
    _index_dtype,
    _search_lists,
    crystal_graph,
)
from crystal_transfer.graphs.errors import GraphStageError, NeighbourSearchError
from crystal_transfer.graphs.settings import SEARCHES, GraphSettings
from crystal_transfer.graphs.shards import (
    ShardFormatError,
    check_graph_arrays,
    read_header,
    verified_arrays,
    write_shard,
)

PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
REJECTED_FILE = "rejected.csv"
SHARD_PATTERN = "shard-{index:05d}.cgs"
REJECTED_COLUMNS = ["id", "reason", "message"]
TABLE_COLUMNS = ["id", "num_sites", "lattice", "numbers", "frac_coords"]


# --------------------------------------------------------------------------------------------------------------
# Files: plan, shards, manifest




def make_plan(
    table: str | Path, dataset: str, settings: GraphSettings, shard_size: int, out: str | Path
) -> dict[str, Any]:
    """Write ``plan.json``: the table's identity, the settings and the row range of every shard."""
    if shard_size < 1:
        raise GraphStageError(f"shard_size must be at least 1, not {shard_size}")
    rows = pq.read_metadata(table).num_rows
    shards = [
        {"index": i, "file": SHARD_PATTERN.format(index=i), "rows": [start, min(start + shard_size, rows)]}
        for i, start in enumerate(range(0, rows, shard_size))
    ]
    plan = {
        "dataset": dataset,
        "table": str(table),
        "table_sha256": recorded_sha256(table),
        "table_rows": rows,
        "settings": settings.as_dict(),
        "shard_size": shard_size,
        "shards": shards,
    }
    if not (Path(out).is_file() and read_json(out) == plan):  # unchanged plans keep their time stamp
        write_json(out, plan)
    return plan


def read_manifest(graph_dir: str | Path) -> dict[str, Any]:
    """The manifest of a graph folder (its settings, shards and counts); refused in one line when absent."""
    path = Path(graph_dir) / MANIFEST_FILE
    if not path.is_file():
        raise GraphStageError(
            f"no {MANIFEST_FILE} in {graph_dir}: build the graphs first (python -m crystal_transfer "
            f"graphs build --table <crystals.parquet> --dataset <name> --out {graph_dir} --config <config>)"
        )
    return read_json(path)


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON file as a dict."""
    with open(path) as handle:
        return json.load(handle)


def table_rows(table: str | Path, start: int = 0, stop: int | None = None) -> dict[str, Any]:
    """Flat arrays of the structural columns of the table rows ``start:stop`` (default: all; ``ids``, ``lattice``,
    ``atom_ptr`` into ``numbers`` and ``frac``), read from the row groups that hold them only: a shard job's memory
    and time do not grow with the table."""
    handle = pq.ParquetFile(table)
    stop = handle.metadata.num_rows if stop is None else stop
    groups, first, offset = [], None, 0
    for group in range(handle.metadata.num_row_groups):
        rows = handle.metadata.row_group(group).num_rows
        if offset < stop and offset + rows > start:
            groups.append(group)
            first = offset if first is None else first
        offset += rows
    data = handle.read_row_groups(groups, columns=TABLE_COLUMNS) if groups else handle.schema_arrow.empty_table()
    data = data.select(TABLE_COLUMNS).slice(start - (first or 0), stop - start)
    frac = data.column("frac_coords").combine_chunks()
    numbers = data.column("numbers").combine_chunks()
    ptr = numbers.offsets.to_numpy().astype(np.int64)
    return {
        "ids": data.column("id").to_pylist(),
        "lattice": data.column("lattice").combine_chunks().flatten().to_numpy().reshape(-1, 3, 3),
        "atom_ptr": ptr - ptr[0],
        "numbers": numbers.flatten().to_numpy(),
        "frac": frac.flatten().to_numpy().reshape(-1, 3),
    }


def build_shard(
    plan_path: str | Path,
    index: int,
    table: str | Path | None = None,
    out: str | Path | None = None,
    search: str = "vesin",
):
    """Build shard ``index`` of the plan at ``plan_path`` (default output: beside the plan). Returns its header meta.

    ``search="pymatgen"``: pymatgen's neighbour search, crystal by crystal, instead of vesin's for the whole shard
    (the same shard; tests and benchmarks compare them)."""
    # long: reading the plan's rows, searching them, recording rejections and writing the shard are one pass
    if search not in SEARCHES:
        raise GraphStageError(f"search must be one of {', '.join(SEARCHES)}, not '{search}'")
    plan_path = Path(plan_path)
    plan = read_json(plan_path)
    if not 0 <= index < len(plan["shards"]):
        raise GraphStageError(f"{plan_path} has shards 0..{len(plan['shards']) - 1}, not {index}")
    entry = plan["shards"][index]
    table = Path(table or plan["table"])
    if recorded_sha256(table) != plan["table_sha256"]:
        raise GraphStageError(
            f"{table} changed since {plan_path} was written; rerun: python -m crystal_transfer graphs plan "
            f"--table {table} --dataset {plan['dataset']} --out {plan_path} --settings '{json.dumps(plan['settings'])}'"
        )
    settings = GraphSettings.from_dict(plan["settings"])
    start, stop = entry["rows"]
    arrays = table_rows(table, start, stop)
    ids: list[str] = []
    radii: list[float] = []
    atom_counts: list[int] = []
    numbers_out: list[np.ndarray] = []
    idx_out: list[np.ndarray] = []
    dist_out: list[np.ndarray] = []
    count_out: list[np.ndarray] = []
    extended: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    atom_ptr, frac, numbers_all = arrays["atom_ptr"], arrays["frac"], arrays["numbers"]
    lists, offsets, refused = (None, {}, {})
    if search == "vesin":
        lists, offsets, refused = _shard_lists(arrays, range(stop - start), settings)
    for row in range(stop - start):  # rows of the shard, counted from its first
        a0, a1 = atom_ptr[row], atom_ptr[row + 1]
        numbers = numbers_all[a0:a1]
        crystal_id = arrays["ids"][row]
        if row in refused:
            rejected.append({"id": crystal_id, "reason": UNSEARCHABLE_CELL, "message": refused[row]})
            continue
        local = slice(offsets[row], offsets[row] + a1 - a0) if lists is not None else None
        if local is not None and (settings.isolated_atoms == "keep" or lists[2][local].all()):
            graph = CrystalGraph(lists[0][local], lists[1][local], lists[2][local].astype(np.uint8), settings.radius)
        else:  # pymatgen's search, or an isolated atom: the one-crystal path applies the policy
            graph = crystal_graph(arrays["lattice"][row], frac[a0:a1], numbers, settings, search)
        if isinstance(graph, GraphRejection):
            rejected.append({"id": crystal_id, "reason": graph.reason, "message": graph.message})
            continue
        if graph.radius != settings.radius:
            extended.append({"id": crystal_id, "radius": graph.radius})
        ids.append(crystal_id)
        radii.append(graph.radius)
        atom_counts.append(len(numbers))
        numbers_out.append(numbers)
        idx_out.append(graph.nbr_idx)
        dist_out.append(graph.nbr_dist)
        count_out.append(graph.nbr_count)
    m = settings.max_num_nbr
    ptr = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(atom_counts, out=ptr[1:])
    index_dtype = _index_dtype(max(atom_counts, default=0))
    shard_arrays = {
        "atom_ptr": ptr,
        "numbers": np.concatenate(numbers_out).astype(np.uint8) if ids else np.zeros(0, np.uint8),
        "nbr_idx": np.concatenate(idx_out).astype(index_dtype) if ids else np.zeros((0, m), index_dtype),
        "nbr_dist": np.concatenate(dist_out) if ids else np.zeros((0, m), np.float32),
        "nbr_count": np.concatenate(count_out) if ids else np.zeros(0, np.uint8),
        "radius": np.asarray(radii, dtype=np.float32),
    }
    meta = {
        "dataset": plan["dataset"],
        "index": index,
        "rows": entry["rows"],
        "table_sha256": plan["table_sha256"],
        "settings": settings.as_dict(),
        "ids": ids,
        "extended": extended,
        "rejected": rejected,
        "created_by": f"crystal_transfer {__version__}",
    }
    out = Path(out) if out else plan_path.parent / entry["file"]
    check_graph_arrays(shard_arrays, m, f"shard {index} of {plan_path} as built")  # a bug, if ever: never written
    write_shard(out, shard_arrays, meta)
    return meta


def _shard_lists(
    arrays: dict[str, Any], rows: range, settings: GraphSettings
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray] | None, dict[int, int], dict[int, str]]:
    """vesin's neighbour lists of the table ``rows`` in one call: ``(lists, first atom of each row in the lists,
    {row: why} for the rows the search refuses)``. A refused crystal is left out and the rest searched again, so
    one broken cell costs its own graph only."""
    atom_ptr, lattices = arrays["atom_ptr"], arrays["lattice"]
    if not rows:
        return None, {}, {}
    start, stop = rows[0], rows[-1] + 1
    found = neighbours.refusals(
        lattices[start:stop], atom_ptr[start : stop + 1] - atom_ptr[start],
        arrays["frac"][atom_ptr[start] : atom_ptr[stop]], settings.radius,
    )
    refused = {start + c: f"neighbour search failed: {why}" for c, why in found.items()}
    while True:
        keep = [row for row in rows if row not in refused]
        sizes = atom_ptr[np.asarray(keep, dtype=np.int64) + 1] - atom_ptr[np.asarray(keep, dtype=np.int64)]
        ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        atoms = np.concatenate([np.arange(atom_ptr[r], atom_ptr[r + 1]) for r in keep]) if keep else np.zeros(0, int)
        try:
            lists = _search_lists(
                lattices[keep], ptr, arrays["frac"][atoms], arrays["numbers"][atoms], settings.radius,
                settings.max_num_nbr, settings.tie_tolerance,
            )
        except NeighbourSearchError as error:  # vesin's own refusal of one crystal: leave it out, search the rest
            refused[keep[error.crystal]] = error.what
            continue
        return lists, {row: int(ptr[k]) for k, row in enumerate(keep)}, refused


def rebuild_command(graph_dir: str | Path, plan: dict[str, Any], shards: list[int] | None = None) -> str:
    """The command that rebuilds a graph folder (or some of its shards) from its plan and rewrites the manifest."""
    section = {key: value for key, value in plan["settings"].items() if key != "tie_tolerance"}  # fixed in code
    command = (
        f"python -m crystal_transfer graphs build --table {plan['table']} --dataset {plan['dataset']} "
        f"--out {graph_dir} --shard-size {plan['shard_size']} --settings '{json.dumps(section)}'"
    )
    if shards:
        command += " --shards " + ",".join(str(i) for i in shards)
    return command




def write_manifest(plan_path: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Check every shard of the plan against it (its settings, table and rows, and its content against the hash and
    the checks of :func:`crystal_transfer.graphs.shards.check_graph_arrays`), then write ``manifest.json`` and
    ``rejected.csv`` beside it. A shard that was altered after it was built is refused, never re-hashed into it."""
    # long: every check of every shard against the plan, each with its own rebuild message
    plan_path = Path(plan_path)
    plan = read_json(plan_path)
    folder = plan_path.parent
    out = Path(out) if out else folder / MANIFEST_FILE
    entries: list[dict[str, Any]] = []
    extended: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    totals = {"crystals": 0, "atoms": 0, "neighbours": 0, "bytes": 0}
    for entry in plan["shards"]:
        path = folder / entry["file"]
        if not path.is_file():
            command = rebuild_command(folder, plan, [entry["index"]])
            raise GraphStageError(f"shard {path} is missing; build it with: {command}")
        try:
            header = read_header(path)
            arrays = verified_arrays(path, header)
            check_graph_arrays(arrays, int(plan["settings"]["max_num_nbr"]), f"shard {path}")
        except ShardFormatError as exc:
            command = rebuild_command(folder, plan, [entry["index"]])
            raise GraphStageError(f"{exc}; rebuild it with: {command}") from None
        meta = header["meta"]
        if (
            meta["settings"] != plan["settings"]
            or meta["table_sha256"] != plan["table_sha256"]
            or meta["rows"] != entry["rows"]
        ):
            raise GraphStageError(
                f"shard {path} was built with other settings or from another table than {plan_path}; rebuild it "
                f"with: {rebuild_command(folder, plan, [entry['index']])}"
            )
        size = path.stat().st_size
        entries.append(
            {
                **entry,
                "sha256": file_sha256(path),
                "bytes": size,
                "mtime_ns": path.stat().st_mtime_ns,
                "crystals": len(meta["ids"]),
                "atoms": int(arrays["atom_ptr"][-1]),
                "rejected": len(meta["rejected"]),
                "extended": len(meta["extended"]),
            }
        )
        totals["crystals"] += len(meta["ids"])
        totals["atoms"] += int(arrays["atom_ptr"][-1])
        totals["neighbours"] += int(arrays["nbr_count"].sum(dtype=np.int64))
        totals["bytes"] += size
        extended += meta["extended"]
        rejected += meta["rejected"]
    manifest = {
        "format": "crystal_transfer graph shards",
        "version": 1,
        "created_by": f"crystal_transfer {__version__}",
        "dataset": plan["dataset"],
        "table": plan["table"],
        "table_sha256": plan["table_sha256"],
        "table_rows": plan["table_rows"],
        "settings": plan["settings"],
        "shard_size": plan["shard_size"],
        "counts": {**totals, "rejected": len(rejected), "extended": len(extended)},
        "shards": entries,
        "extended": extended,
        "rejected_file": REJECTED_FILE,
    }
    write_csv(out.parent / REJECTED_FILE, REJECTED_COLUMNS, rejected)
    write_json(out, manifest)
    return manifest


def _build_shard_job(job: tuple[str, int, str]) -> int:
    plan_path, index, search = job
    build_shard(plan_path, index, search=search)
    return index


def build_graphs(
    table: str | Path,
    out_dir: str | Path,
    settings: GraphSettings,
    shard_size: int,
    dataset: str = "dataset",
    workers: int = 1,
    shards: list[int] | None = None,
    log=print,
    search: str = "vesin",
) -> dict[str, Any]:
    """Plan, build every shard (or only ``shards``) in ``workers`` spawned processes, and write the manifest.

    ``search``: the neighbour search, ``vesin`` or ``pymatgen`` (the same graphs; see :func:`build_shard`)."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    plan_path = out_dir / PLAN_FILE
    plan = make_plan(table, dataset, settings, shard_size, plan_path)
    indices = list(range(len(plan["shards"]))) if shards is None else sorted(set(shards))
    jobs = [(str(plan_path), i, search) for i in indices]
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            _build_shard_job(job)
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for _ in pool.imap_unordered(_build_shard_job, jobs):
                pass
    manifest = write_manifest(plan_path)
    counts = manifest["counts"]
    log(
        f"graphs of '{dataset}': {counts['crystals']} crystals, {counts['atoms']} atoms "
        f"in {len(plan['shards'])} shards "
        f"({counts['bytes'] / 1e6:.1f} MB), {counts['rejected']} rejected, {counts['extended']} with extended radius, "
        f"{time.perf_counter() - started:.1f} s"
    )
    return manifest
