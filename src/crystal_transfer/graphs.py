"""The graphs stage: a canonical crystal table -> crystal-graph shards, a manifest and a rejection list.

Per crystal a shard keeps the atomic numbers and, per atom, up to ``max_num_nbr`` neighbours within
``radius``: their indices (local to the crystal) and distances. Gaussian edge features are never stored;
models expand the distances (:func:`gaussian_expand`).

Neighbour selection reproduces CGCNN (``CIFData``): all neighbours within the radius (periodic images
included, as pymatgen's ``get_all_neighbors``), sorted by distance, the first ``max_num_nbr`` kept. The search
runs in ``vesin`` with CGCNN's rules on top (:mod:`crystal_transfer.neighbours`, one call per shard);
``search="pymatgen"`` takes pymatgen's ``find_points_in_spheres`` (the routine behind ``get_all_neighbors``) plus
the same NumPy selection instead, the reference the tests compare with (the same graphs on every test crystal).
Ties are broken deterministically: distances within ``TIE_TOLERANCE`` of
each other form one shell, ordered by neighbour index, then by periodic image. CGCNN keeps pymatgen's
output order inside a tie, which differs between pymatgen versions.

Padding: an atom with fewer neighbours than ``max_num_nbr`` gets padded slots that point at the crystal's
atom 0 at distance ``radius + 1`` (CGCNN's values). They are masked out unless ``cgcnn_padding`` asks for
the original behaviour (padded slots used as real ones).

Files in the output folder:

- ``plan.json``: the table (path, sha256, rows), the settings and the row range of each shard;
- ``shard-NNNNN.cgs``: one per plan entry (format: :mod:`crystal_transfer.shards`);
- ``manifest.json``: the plan plus counts, a sha256 per shard and the crystals whose radius was extended;
- ``rejected.csv``: ``id,reason,message`` of crystals the graph stage dropped.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from crystal_transfer import __version__, neighbours
from crystal_transfer.atomic import csv_text, write_json, write_text
from crystal_transfer.atomic import sha256_file as file_sha256  # noqa: F401  (public name used by callers)
from crystal_transfer.neighbours import NUMERICAL_TOL, PARTITION_MARGIN, TIE_TOLERANCE, select_neighbours
from crystal_transfer.shards import map_arrays, read_header, write_shard

PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
REJECTED_FILE = "rejected.csv"
SHARD_PATTERN = "shard-{index:05d}.cgs"
REJECTED_COLUMNS = ["id", "reason", "message"]
ISOLATED_ATOM = "isolated_atom"
ISOLATED_POLICIES = ("extend", "drop", "keep")
SEARCHES = ("vesin", "pymatgen")
TABLE_COLUMNS = ["id", "num_sites", "lattice", "numbers", "frac_coords"]


class GraphStageError(Exception):
    """The graphs stage cannot run or its outputs cannot be trusted (stale, corrupted or missing shards)."""


class NeighbourSearchError(GraphStageError, neighbours.NeighbourSearchError):
    """The neighbour search refused crystal ``crystal`` (index in its batch) of a batch; ``what`` says why."""


@dataclass(frozen=True)
class GraphSettings:
    """Everything that determines a crystal graph; stored in the plan, every shard and the manifest.

    Attributes:
        radius: neighbour cut-off in Å (CGCNN: 8).
        max_num_nbr: neighbour slots per atom (CGCNN: 12).
        isolated_atoms: what to do with a crystal where an atom has no neighbour within the radius:
            ``extend`` grows that crystal's radius by ``extend_step`` until every atom has one (up to
            ``max_radius``, else it is dropped), ``drop`` rejects the crystal, ``keep`` leaves the atom with
            padded slots only (the original CGCNN behaviour).
        cgcnn_padding: mark padded slots as real (the original code does not mask them).
        extend_step: radius increment in Å for ``extend``.
        max_radius: largest radius ``extend`` may reach.
        tie_tolerance: distances closer than this are a tie (fixed, recorded for provenance).
    """

    radius: float = 8.0
    max_num_nbr: int = 12
    isolated_atoms: str = "extend"
    cgcnn_padding: bool = False
    extend_step: float = 1.0
    max_radius: float = 16.0
    tie_tolerance: float = TIE_TOLERANCE

    def __post_init__(self) -> None:
        if self.isolated_atoms not in ISOLATED_POLICIES:
            raise GraphStageError(
                f"isolated_atoms must be one of {', '.join(ISOLATED_POLICIES)}, not '{self.isolated_atoms}'"
            )
        if not (self.radius > 0 and self.max_num_nbr > 0 and self.extend_step > 0):
            raise GraphStageError(f"radius, max_num_nbr and extend_step must be positive: {self}")
        if self.max_radius < self.radius:
            raise GraphStageError(f"max_radius ({self.max_radius}) is below radius ({self.radius})")

    def as_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (floats and ints normalised, so equal settings compare equal)."""
        data = asdict(self)
        for key in ("radius", "extend_step", "max_radius", "tie_tolerance"):
            data[key] = float(data[key])
        data["max_num_nbr"] = int(data["max_num_nbr"])
        data["cgcnn_padding"] = bool(data["cgcnn_padding"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSettings:
        """Build settings from a dict (a config's ``graphs`` section; ``shard_size`` is ignored)."""
        known = {key: value for key, value in data.items() if key in cls.__dataclass_fields__}
        unknown = set(data) - set(known) - {"shard_size"}
        if unknown:
            raise GraphStageError(f"unknown graph settings: {', '.join(sorted(unknown))}")
        return cls(**known).normalised()

    def normalised(self) -> GraphSettings:
        """A copy with plain Python types."""
        return GraphSettings(**self.as_dict())


def graph_config(section: dict[str, Any] | None) -> tuple[GraphSettings, int]:
    """Validate a config ``graphs`` section against the schema (defaults filled); return settings and shard size."""
    import jsonschema

    from crystal_transfer.config import ConfigError, _fill_defaults, load_schema

    schema = load_schema()
    subschema = schema["properties"]["graphs"]
    section = json.loads(json.dumps(section or {}))
    _fill_defaults(section, subschema, schema)
    errors = list(jsonschema.Draft202012Validator(subschema).iter_errors(section))
    if errors:
        raise ConfigError("invalid graphs settings: " + "; ".join(sorted(e.message for e in errors)))
    return GraphSettings.from_dict(section), int(section["shard_size"])


# --------------------------------------------------------------------------------------------------------------
# One crystal


@dataclass
class CrystalGraph:
    """The graph of one crystal.

    Attributes:
        nbr_idx: (n, M) neighbour atom index within the crystal (padded slots: 0).
        nbr_dist: (n, M) float32 distances in Å (padded slots: radius + 1).
        nbr_count: (n,) number of real neighbour slots of each atom (the rest is padding).
        radius: the radius used (larger than the setting if the crystal was extended).
    """

    nbr_idx: np.ndarray
    nbr_dist: np.ndarray
    nbr_count: np.ndarray
    radius: float


def neighbour_pairs(
    lattice: np.ndarray, frac_coords: np.ndarray, numbers: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every (centre, neighbour) pair within ``radius`` over periodic images, as pymatgen's get_all_neighbors.

    Returns ``(centre, neighbour, image (E, 3) float, distance)``; the atom itself (distance below
    pymatgen's 1e-8 Å tolerance, same element) is excluded, exactly as ``get_all_neighbors`` does.
    """
    from pymatgen.optimization.neighbors import find_points_in_spheres

    lattice = np.ascontiguousarray(lattice, dtype=np.float64).reshape(3, 3)
    cart = np.ascontiguousarray(np.asarray(frac_coords, dtype=np.float64).reshape(-1, 3) @ lattice)
    centre, neighbour, image, distance = find_points_in_spheres(
        cart, cart, r=float(radius), pbc=np.ones(3, dtype=np.int64), lattice=lattice, tol=NUMERICAL_TOL
    )
    numbers = np.asarray(numbers)
    itself = (distance <= NUMERICAL_TOL) & (numbers[centre] == numbers[neighbour])
    if itself.any():
        keep = ~itself
        centre, neighbour, image, distance = centre[keep], neighbour[keep], image[keep], distance[keep]
    return centre, neighbour, image, distance


def _index_dtype(num_atoms: int) -> type:
    """The smallest integer type that holds atom indices of a crystal (or shard) with ``num_atoms`` atoms."""
    return np.uint8 if num_atoms <= 256 else np.uint16 if num_atoms <= 65536 else np.int32


def _search_lists(
    lattices: np.ndarray,
    atom_ptr: np.ndarray,
    frac: np.ndarray,
    numbers: np.ndarray,
    radii: np.ndarray | float,
    max_num_nbr: int,
    tie_tolerance: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`crystal_transfer.neighbours.neighbour_lists` (vesin) with the graphs stage's errors."""
    try:
        return neighbours.neighbour_lists(
            lattices, atom_ptr, frac, numbers, radii, max_num_nbr, tie_tolerance, NUMERICAL_TOL, PARTITION_MARGIN
        )
    except neighbours.NeighbourSearchError as error:
        raise NeighbourSearchError(error.crystal, error.what.removeprefix("neighbour search failed: ")) from None
    except ValueError as error:
        raise GraphStageError(str(error)) from None


def crystal_graph(
    lattice: np.ndarray,
    frac_coords: np.ndarray,
    numbers: np.ndarray,
    settings: GraphSettings,
    search: str = "vesin",
) -> CrystalGraph | str:
    """The graph of one crystal, or a rejection message when an isolated atom makes the policy drop it.

    ``search="pymatgen"`` takes pymatgen's search instead of vesin's (the reference the tests compare with).
    """
    if search not in SEARCHES:
        raise GraphStageError(f"search must be one of {', '.join(SEARCHES)}, not '{search}'")
    numbers = np.asarray(numbers)
    num_atoms = len(numbers)
    m = settings.max_num_nbr
    radius = settings.radius
    while True:
        if search == "vesin":
            lists = _search_lists(
                np.asarray(lattice).reshape(1, 3, 3), np.array([0, num_atoms]), frac_coords, numbers, radius, m,
                settings.tie_tolerance,
            )
            counts = lists[2]
        else:
            centre, neighbour, image, distance = neighbour_pairs(lattice, frac_coords, numbers, radius)
            counts = np.bincount(centre, minlength=num_atoms)
        isolated = np.flatnonzero(counts == 0)
        if len(isolated) == 0 or settings.isolated_atoms == "keep":
            break
        if settings.isolated_atoms == "drop" or radius + settings.extend_step > settings.max_radius + 1e-9:
            first = int(isolated[0])
            reach = f"{radius:g} Å" + (
                f" (extended up to max_radius {settings.max_radius:g} Å)" if settings.isolated_atoms == "extend" else ""
            )
            return f"{len(isolated)} atom(s) without a neighbour within {reach}, e.g. atom {first} (Z={numbers[first]})"
        radius = radius + settings.extend_step
    if search == "vesin":
        nbr_idx, nbr_dist, nbr_count = lists
        return CrystalGraph(nbr_idx.astype(_index_dtype(num_atoms)), nbr_dist, nbr_count.astype(np.uint8), radius)
    centre, neighbour, distance = select_neighbours(
        centre, neighbour, image, distance, num_atoms, m, settings.tie_tolerance, PARTITION_MARGIN
    )
    nbr_count = np.bincount(centre, minlength=num_atoms)
    slot = np.arange(len(centre)) - np.repeat(np.cumsum(nbr_count) - nbr_count, nbr_count)
    nbr_idx = np.zeros((num_atoms, m), dtype=_index_dtype(num_atoms))
    nbr_dist = np.full((num_atoms, m), radius + 1.0, dtype=np.float32)
    nbr_idx[centre, slot] = neighbour
    nbr_dist[centre, slot] = distance
    return CrystalGraph(nbr_idx=nbr_idx, nbr_dist=nbr_dist, nbr_count=nbr_count.astype(np.uint8), radius=radius)


def gaussian_expand(distances: Any, radius: float = 8.0, step: float = 0.2, dmin: float = 0.0) -> Any:
    """CGCNN's Gaussian edge features of ``distances`` (a torch tensor): exp(-(d - μ)² / step²).

    Centres μ are ``dmin, dmin + step, ..., radius`` as CGCNN's ``GaussianDistance`` builds them
    (``np.arange(dmin, radius + step, step)``: 41 centres for 0..8 Å in steps of 0.2). Adds a last axis.
    """
    import torch

    centres = torch.as_tensor(np.arange(dmin, radius + step, step), dtype=distances.dtype, device=distances.device)
    return torch.exp(-((distances.unsqueeze(-1) - centres) ** 2) / step**2)


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
        "table_sha256": file_sha256(table),
        "table_rows": rows,
        "settings": settings.as_dict(),
        "shard_size": shard_size,
        "shards": shards,
    }
    if not (Path(out).is_file() and read_json(out) == plan):  # unchanged plans keep their time stamp
        write_json(out, plan)
    return plan


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON file as a dict."""
    with open(path) as handle:
        return json.load(handle)


_TABLE_CACHE: dict[tuple[str, str], Any] = {}


def _table_arrays(table: str | Path, sha256: str) -> dict[str, Any]:
    """Flat arrays of the structural columns (cached per process: pool workers build several shards)."""
    key = (str(Path(table).resolve()), sha256)
    if key not in _TABLE_CACHE:
        _TABLE_CACHE.clear()
        data = pq.read_table(table, columns=TABLE_COLUMNS)
        frac = data.column("frac_coords").combine_chunks()
        numbers = data.column("numbers").combine_chunks()
        _TABLE_CACHE[key] = {
            "ids": data.column("id").to_pylist(),
            "lattice": data.column("lattice").combine_chunks().values.to_numpy().reshape(-1, 3, 3),
            "atom_ptr": numbers.offsets.to_numpy().astype(np.int64),
            "numbers": numbers.values.to_numpy(),
            "frac": frac.values.to_numpy().reshape(-1, 3),
        }
    return _TABLE_CACHE[key]


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
    if search not in SEARCHES:
        raise GraphStageError(f"search must be one of {', '.join(SEARCHES)}, not '{search}'")
    plan_path = Path(plan_path)
    plan = read_json(plan_path)
    if not 0 <= index < len(plan["shards"]):
        raise GraphStageError(f"{plan_path} has shards 0..{len(plan['shards']) - 1}, not {index}")
    entry = plan["shards"][index]
    table = Path(table or plan["table"])
    if file_sha256(table) != plan["table_sha256"]:
        raise GraphStageError(
            f"{table} changed since {plan_path} was written; rerun: python -m crystal_transfer graphs plan "
            f"--table {table} --dataset {plan['dataset']} --out {plan_path} --settings '{json.dumps(plan['settings'])}'"
        )
    settings = GraphSettings.from_dict(plan["settings"])
    arrays = _table_arrays(table, plan["table_sha256"])
    start, stop = entry["rows"]
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
    batched = search == "vesin" and stop > start
    if batched:  # the whole shard in one call; rows with an isolated atom redone below
        first = atom_ptr[start]
        try:
            lists = _search_lists(
                arrays["lattice"][start:stop], atom_ptr[start : stop + 1], frac[first : atom_ptr[stop]],
                numbers_all[first : atom_ptr[stop]], settings.radius, settings.max_num_nbr, settings.tie_tolerance,
            )
        except NeighbourSearchError as error:
            row = start + error.crystal
            raise GraphStageError(f"crystal {arrays['ids'][row]} (row {row} of {table}): {error.what}") from None
    for row in range(start, stop):
        a0, a1 = atom_ptr[row], atom_ptr[row + 1]
        numbers = numbers_all[a0:a1]
        if batched and (settings.isolated_atoms == "keep" or lists[2][a0 - first : a1 - first].all()):
            local = slice(a0 - first, a1 - first)
            graph = CrystalGraph(
                lists[0][local], lists[1][local], lists[2][local].astype(np.uint8), settings.radius
            )
        else:
            graph = crystal_graph(arrays["lattice"][row], frac[a0:a1], numbers, settings, search)
        crystal_id = arrays["ids"][row]
        if isinstance(graph, str):
            rejected.append({"id": crystal_id, "reason": ISOLATED_ATOM, "message": graph})
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
    write_shard(out, shard_arrays, meta)
    return meta


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
    """Check every shard of the plan against it, then write ``manifest.json`` and ``rejected.csv`` beside it."""
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
        header = read_header(path)
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
        arrays = map_arrays(path, header)
        size = path.stat().st_size
        entries.append(
            {
                **entry,
                "sha256": file_sha256(path),
                "bytes": size,
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
    write_text(out.parent / REJECTED_FILE, csv_text(rejected, REJECTED_COLUMNS))
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
