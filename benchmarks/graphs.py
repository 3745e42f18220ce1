"""Benchmark of the graphs stage on all of mp2018, against the original CGCNN featurisation in the same run.

Prints: crystals/s and wall time of building every shard (spawned workers) with vesin's neighbour search, the same
with pymatgen's search (``search="pymatgen"``) and whether the two graph folders agree (indices and counts equal,
distances within 1e-6 Å), peak memory of the process tree, bytes per atom on disk against the Gaussian-expanded
features CGCNN keeps in memory (float32 N x 12 x 41), and, on a random sample of crystals, the per-crystal time
of the original path (pymatgen ``get_all_neighbors``, per-site sort, padding, Gaussian expansion, as CGCNN's
``CIFData``), of ``crystal_graph`` with vesin and with pymatgen, timed alternately crystal by crystal so that
load from other processes hits all alike.

    python benchmarks/graphs.py [--table results/data/mp2018/crystals.parquet] [--workers 2] [--sample 500]

Without --table the data stage first builds the mp2018 table from ../shared/data (about a minute, not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
from inputs import WORK, mp2018_table
from memory import PeakMemory

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CRYSTAL_TRANSFER_SHARED_DATA", REPO.parent / "shared" / "data"))


def cgcnn_features(structure, radius: float = 8.0, max_num_nbr: int = 12, dmin: float = 0.0, step: float = 0.2):
    """The original CGCNN featurisation of one structure: neighbour indices and Gaussian edge features."""
    all_nbrs = structure.get_all_neighbors(radius, include_index=True)
    all_nbrs = [sorted(nbrs, key=lambda x: x[1]) for nbrs in all_nbrs]
    nbr_fea_idx, nbr_fea = [], []
    for nbr in all_nbrs:
        if len(nbr) < max_num_nbr:
            nbr_fea_idx.append([x[2] for x in nbr] + [0] * (max_num_nbr - len(nbr)))
            nbr_fea.append([x[1] for x in nbr] + [radius + 1.0] * (max_num_nbr - len(nbr)))
        else:
            nbr_fea_idx.append([x[2] for x in nbr[:max_num_nbr]])
            nbr_fea.append([x[1] for x in nbr[:max_num_nbr]])
    nbr_fea_idx, nbr_fea = np.array(nbr_fea_idx), np.array(nbr_fea)
    centres = np.arange(dmin, radius + step, step)
    return nbr_fea_idx, nbr_fea, np.exp(-((nbr_fea[..., np.newaxis] - centres) ** 2) / step**2)


def main() -> None:
    """Run the benchmark and print its figures (and a JSON line with all of them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", help="mp2018 crystals.parquet (default: built on first use)")
    parser.add_argument("--work", default=str(WORK / "graphs-bench"), help="scratch folder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=2048)
    parser.add_argument("--sample", type=int, default=500, help="crystals timed against the original path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from crystal_transfer.graphs.crystal_graph import crystal_graph
    from crystal_transfer.graphs.settings import GraphSettings
    from crystal_transfer.graphs.shards import map_arrays
    from crystal_transfer.graphs.stage import build_graphs, table_rows

    work = Path(args.work)
    table = mp2018_table(Path(args.table) if args.table else None)

    settings = GraphSettings()
    out = work / "graphs"
    with PeakMemory() as memory:
        started = time.perf_counter()
        manifest = build_graphs(
            table, out, settings, args.shard_size, dataset="mp2018", workers=args.workers, log=lambda _: None
        )
        wall = time.perf_counter() - started
    # the same stage with pymatgen's neighbour search, same process
    started = time.perf_counter()
    pymatgen_manifest = build_graphs(
        table, work / "graphs-pymatgen", settings, args.shard_size, dataset="mp2018", workers=args.workers,
        log=lambda _: None, search="pymatgen",
    )
    wall_pymatgen = time.perf_counter() - started
    # both folders hold the same graphs: indices, counts and radii equal, distances within 1e-6 Å
    differing = []
    for ours, theirs in zip(manifest["shards"], pymatgen_manifest["shards"], strict=True):
        first, second = map_arrays(out / ours["file"]), map_arrays(work / "graphs-pymatgen" / theirs["file"])
        same = first.keys() == second.keys() and all(
            np.allclose(first[k], second[k], rtol=0, atol=1e-6)
            if k == "nbr_dist"
            else np.array_equal(first[k], second[k])
            for k in first
        )
        if not same:
            differing.append(ours["file"])
    if differing or manifest["counts"] != pymatgen_manifest["counts"]:
        raise SystemExit(f"vesin's and pymatgen's graphs differ: {differing or 'counts'}")
    counts = manifest["counts"]
    gaussian_bytes = counts["atoms"] * settings.max_num_nbr * 41 * 4

    # The same crystals through both paths, alternating; structures are built before the clock starts.
    from pymatgen.core import Lattice, Structure

    arrays = table_rows(table)
    rows = np.random.default_rng(args.seed).choice(len(arrays["ids"]), size=args.sample, replace=False)
    ours = reference = pymatgen_path = 0.0
    atoms = 0
    for search in ("vesin", "pymatgen"):  # libraries loaded before the clock starts
        a0, a1 = arrays["atom_ptr"][rows[0]], arrays["atom_ptr"][rows[0] + 1]
        crystal_graph(arrays["lattice"][rows[0]], arrays["frac"][a0:a1], arrays["numbers"][a0:a1], settings, search)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for row in rows:
            a0, a1 = arrays["atom_ptr"][row], arrays["atom_ptr"][row + 1]
            lattice, frac, numbers = arrays["lattice"][row], arrays["frac"][a0:a1], arrays["numbers"][a0:a1]
            structure = Structure(Lattice(lattice), numbers.tolist(), frac)
            t0 = time.perf_counter()
            _, ref_dist, _ = cgcnn_features(structure)
            t1 = time.perf_counter()
            graph = crystal_graph(lattice, frac, numbers, settings)
            t2 = time.perf_counter()
            crystal_graph(lattice, frac, numbers, settings, search="pymatgen")
            t3 = time.perf_counter()
            reference += t1 - t0
            ours += t2 - t1
            pymatgen_path += t3 - t2
            atoms += a1 - a0
            if not np.allclose(graph.nbr_dist, ref_dist, atol=2e-6):
                raise SystemExit(f"distances differ from the original path for {arrays['ids'][row]}")

    figures = {
        "crystals": counts["crystals"],
        "atoms": counts["atoms"],
        "shards": len(manifest["shards"]),
        "workers": args.workers,
        "wall_s": round(wall, 2),
        "wall_pymatgen_search_s": round(wall_pymatgen, 2),
        "identical_shards": len(manifest["shards"]) - len(differing),
        "crystals_per_s": round(counts["crystals"] / wall, 1),
        "peak_memory_mb": round(memory.peak / 1e6, 1),
        "disk_bytes": counts["bytes"],
        "disk_bytes_per_atom": round(counts["bytes"] / counts["atoms"], 1),
        "gaussian_bytes_per_atom": settings.max_num_nbr * 41 * 4,
        "gaussian_to_disk_ratio": round(gaussian_bytes / counts["bytes"], 1),
        "sample_crystals": int(args.sample),
        "sample_atoms": int(atoms),
        "original_ms_per_crystal": round(reference / args.sample * 1e3, 3),
        "ours_ms_per_crystal": round(ours / args.sample * 1e3, 3),
        "speedup": round(reference / ours, 1),
        "pymatgen_search_ms_per_crystal": round(pymatgen_path / args.sample * 1e3, 3),
        "speedup_over_pymatgen_search": round(pymatgen_path / ours, 2),
        "stage_ms_per_crystal": round(wall / counts["crystals"] * 1e3, 3),
        "stage_pymatgen_ms_per_crystal": round(wall_pymatgen / counts["crystals"] * 1e3, 3),
    }
    print(
        f"built {figures['crystals']} crystals ({figures['atoms']} atoms, {figures['shards']} shards) in "
        f"{figures['wall_s']} s with {args.workers} workers: {figures['crystals_per_s']} crystals/s (vesin, "
        f"{figures['stage_ms_per_crystal']} ms/crystal); with pymatgen's search instead: "
        f"{figures['wall_pymatgen_search_s']} s ({wall_pymatgen / wall:.2f}x); the same graphs in all "
        f"{figures['identical_shards']} shards\n"
        f"peak memory (process tree): {figures['peak_memory_mb']} MB\n"
        f"on disk: {figures['disk_bytes'] / 1e6:.1f} MB, {figures['disk_bytes_per_atom']} bytes/atom; "
        f"CGCNN's Gaussian features: {figures['gaussian_bytes_per_atom']} bytes/atom "
        f"({figures['gaussian_to_disk_ratio']}x the shards)\n"
        f"sample of {args.sample} crystals ({atoms} atoms), crystal by crystal: original path "
        f"{figures['original_ms_per_crystal']} ms/crystal, ours with vesin {figures['ours_ms_per_crystal']} "
        f"ms/crystal ({figures['speedup']}x faster), ours with pymatgen's search "
        f"{figures['pymatgen_search_ms_per_crystal']} ms/crystal ({figures['speedup_over_pymatgen_search']}x "
        f"vesin's time)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
