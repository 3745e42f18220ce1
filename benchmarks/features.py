"""Featurisation speed and peak memory of each frozen-feature source on the same mp2018 crystals, in one run.

Sources: the published CGCNN formation-energy trunk (atom features after its 4 convolutions, from the graph
shards the pipeline builds anyway: the neighbour search is not counted), CHGNet 0.3.0 and SevenNet-0 (every
level in one pass, their own graph construction included, as the frozen-features stage runs them). Each
source runs in a child process of its own, so its peak resident memory is its own; crystals per second and
the ratio to CGCNN are printed. The crystals: the first N (default 1,000) of the mp2018 band-gap split's
training, validation and test crystals.

    PYTHONPATH=src python benchmarks/features.py [--crystals 1000] [--device auto] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from inputs import mp2018_graphs, mp2018_table

SOURCES = ("cgcnn", "chgnet", "sevenn")


def crystal_ids(table: Path, count: int) -> list[str]:
    from crystal_transfer.data.split import make_split

    plan = {"label": "band_gap", "train": 1000, "val": 1000, "test": 1000, "seed": 0}
    split = make_split(table, "band_gap", plan)
    return (split["train"] + split["val"] + split["test"])[:count]


def one_source(source: str, table: Path, graphs: Path, count: int, device: str, batch_size: int) -> dict:
    """Featurise the crystals with one source in this process; seconds, rate and peak memory."""
    import torch

    from crystal_transfer.training.trainer import pick_device

    ids = crystal_ids(table, count)
    device = pick_device(device)
    if source == "cgcnn":
        from crystal_transfer.experiments.frozen_features import compute_frozen_features
        from crystal_transfer.graphs.dataset import GraphDataset
        from crystal_transfer.models.published import load_published

        model = load_published("formation-energy-per-atom").model
        dataset = GraphDataset(graphs, ids=ids, table=table)
        loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        cache = compute_frozen_features(model, 4, dataset, device=device)
        seconds = time.perf_counter() - started
        kept, atoms = len(cache["ids"]), int(cache["features"].shape[0])
    else:
        from crystal_transfer.data.table import structures
        from crystal_transfer.models import universal

        crystals = structures(table, ids)
        model = universal.extractor(source, str(device))
        loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        result = model.features(ids, crystals, batch_size=batch_size, log=lambda _: None)
        seconds = time.perf_counter() - started
        kept, atoms = len(result.ids), int(result.levels[0].shape[0])
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {
        "source": source, "crystals": len(ids), "kept": kept, "atoms": atoms, "seconds": seconds,
        "rate": len(ids) / seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loaded_rss_mib": loaded, "peak_gpu_mib": peak_gpu, "threads": torch.get_num_threads(), "device": str(device),
    }


def main() -> None:
    """Run every source in a child process and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, help="mp2018 crystals.parquet (default: built on first use)")
    parser.add_argument("--graphs", type=Path, help="its graph folder (default: built on first use)")
    parser.add_argument("--crystals", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--one", choices=SOURCES, help=argparse.SUPPRESS)  # a child's single source
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one_source(args.one, args.table, args.graphs, args.crystals, args.device, args.batch_size)))
        return
    args.table = mp2018_table(args.table)
    args.graphs = mp2018_graphs(args.table, args.graphs)
    one, five, fifteen = os.getloadavg()
    print(f"{args.crystals} mp2018 crystals, device {args.device}, batch {args.batch_size}; "
          f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores")
    rows = []
    for source in SOURCES:
        command = [sys.executable, __file__, "--one", source, "--table", str(args.table), "--graphs",
                   str(args.graphs), "--crystals", str(args.crystals), "--device", args.device,
                   "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            last = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"
            print(f"  {source}: failed ({last})")
            continue
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    reference = next((row for row in rows if row["source"] == "cgcnn"), None)
    for row in rows:
        slower = reference["rate"] / row["rate"] if reference else None
        ratio = f", {slower:.1f}x the CGCNN trunk's time" if reference and row is not reference else ""
        gpu = f", peak GPU {row['peak_gpu_mib']:.0f} MiB" if row["peak_gpu_mib"] is not None else ""
        print(f"  {row['source']:7s} {row['seconds']:7.1f} s  {row['rate']:7.1f} crystals/s  "
              f"({row['kept']} kept, {row['atoms']} atoms, {row['threads']} threads, {row['device']})  "
              f"peak RSS {row['peak_rss_mib']:.0f} MiB (after loading model and crystals: "
              f"{row['loaded_rss_mib']:.0f}){gpu}{ratio}")


if __name__ == "__main__":
    main()
