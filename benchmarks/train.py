"""Training throughput of the published CGCNN architecture, ours against cgcnn2 0.6.0, measured in the same run.

Architecture and hyperparameters on both sides: atom_fea_len 64, 4 convolutions, h_fea_len 32, n_h 1, batch 64,
SGD lr 0.01 momentum 0.9, on the same ``--train`` + ``--val`` mp2018 crystals (formation energy per atom).

Measured:

- steady state: crystals/s of forward + backward + optimiser step over pre-collated training batches (our model
  expands the Gaussians inside its step, cgcnn2 gets them from its dataset), interleaved and repeated, medians;
  also our model with the fused edge path in PyTorch operations (``backend="torch"``, what runs where
  no C compiler works) and with the edge part as a chain of eager modules (``ConvLayer.eager``), to show
  what the compiled kernels (``crystal_transfer.kernels.native``) and the fused path gain; glibc's allocator is tuned
  (``train.tune_allocator``) for every side; the kernels are built (or loaded from the cache) before timing;
- first epoch including data preparation: ours builds the graphs of those crystals from the canonical table
  (``build_graphs``) and runs one epoch (train + validation) with our ``Trainer``; cgcnn2 featurises the CIF files
  with its ``CIFData`` (as its training script does, every crystal before training) and runs one epoch with its
  model and ``collate_pool``, the loop of ``cgcnn2/cli/cgcnn_tr.py`` (SGD instead of its default Adam);
- the machine's dense float32 matmul FLOP/s ((30000×169)·(169×128)) and the fraction of it our training step
  reaches. The FLOPs of our step are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls only,
  forward and backward) and checked against the formula printed with them.

    PYTHONPATH=src python benchmarks/train.py --table /tmp/bench-work/mp2018/crystals.parquet \
        --cifs ../shared/data/mp2018/structures.tar.gz --work /tmp/bench-work/train-bench
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import statistics
import tarfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from inputs import WORK, mp2018_cifs, mp2018_table
from torch.utils.flop_counter import FlopCounterMode

from crystal_transfer.data.table import label_values
from crystal_transfer.graphs.batch import GraphBatch
from crystal_transfer.graphs.dataset import GraphDataset
from crystal_transfer.graphs.settings import GraphSettings
from crystal_transfer.graphs.stage import build_graphs
from crystal_transfer.kernels import native
from crystal_transfer.models.cgcnn import CGCNN
from crystal_transfer.training.losses import masked_mse_loss
from crystal_transfer.training.normalizer import Normalizer
from crystal_transfer.training.trainer import Trainer, TrainSettings, tune_allocator

REPO = Path(__file__).resolve().parents[1]
TARGET = "formation_energy_per_atom"
ARCHITECTURE = {"atom_fea_len": 64, "n_conv": 4, "h_fea_len": 32, "n_h": 1}
BATCH_SIZE = 64
LR, MOMENTUM = 0.01, 0.9


def load_average() -> str:
    """The 1/5/15-minute load averages and the core count, as text."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores"


def matmul_flops(repeats: int) -> float:
    """Median FLOP/s of a (30000×169)·(169×128) float32 matmul over ``repeats`` timings."""
    left, right = torch.randn(30000, 169), torch.randn(169, 128)
    torch.mm(left, right)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(left, right)
        times.append(time.perf_counter() - started)
    return 2 * 30000 * 169 * 128 / statistics.median(times)


def choose_ids(table: Path, n_train: int, n_val: int, seed: int) -> tuple[list[str], list[str]]:
    """A random train / validation pick of crystals with a formation energy."""
    data = pq.read_table(table, columns=["id", TARGET])
    ids = np.asarray(data.column("id").to_pylist(), dtype=object)[np.isfinite(label_values(data, TARGET))]
    chosen = np.random.default_rng(seed).permutation(np.sort(ids.astype(str)))[: n_train + n_val].tolist()
    return chosen[:n_train], chosen[n_train:]


def write_subtable(table: Path, ids: Sequence[str], out: Path) -> None:
    """The canonical table's rows of ``ids`` (schema and metadata kept) as a new Parquet file."""
    data = pq.read_table(table)
    pq.write_table(data.filter(pc.is_in(data.column("id"), value_set=pa.array(list(ids)))), out)


def write_cif_folders(archive: Path, labels: dict[str, float], parts: dict[str, list[str]], root: Path) -> None:
    """cgcnn2's input layout per part: ``<root>/<part>/{<id>.cif, id_prop.csv, atom_init.json}``."""
    import cgcnn2

    atom_init = Path(cgcnn2.__file__).parent / "asset" / "atom_init.json"
    part_of = {crystal_id: part for part, ids in parts.items() for crystal_id in ids}
    for part, ids in parts.items():
        folder = root / part
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(atom_init, folder / "atom_init.json")
        with open(folder / "id_prop.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([crystal_id, repr(labels[crystal_id])] for crystal_id in ids)
    with tarfile.open(archive) as tar:
        for member in tar:
            crystal_id = Path(member.name).stem
            if member.isfile() and crystal_id in part_of:
                (root / part_of[crystal_id] / f"{crystal_id}.cif").write_bytes(tar.extractfile(member).read())


# -- ours -------------------------------------------------------------------------------------------------------


def ours_first_epoch(subtable: Path, train_ids: list[str], val_ids: list[str], work: Path) -> tuple[float, float]:
    """Seconds for graph building from the table plus one epoch (train + val) of our Trainer; also epoch 2's."""
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    build_graphs(subtable, work / "graphs", GraphSettings(), shard_size=4096, dataset="bench", log=lambda _: None)
    train = GraphDataset(work / "graphs", ids=train_ids, targets=[TARGET], table=subtable)
    val = GraphDataset(work / "graphs", ids=val_ids, targets=[TARGET], table=subtable)
    normalizer = Normalizer.fit(train._targets[:, 0], "identity", "eV/atom")
    torch.manual_seed(0)
    model = CGCNN(targets=[TARGET], **ARCHITECTURE)
    settings = TrainSettings(epochs=1, batch_size=BATCH_SIZE, optimizer="sgd", lr=LR, momentum=MOMENTUM)
    trainer = Trainer(model, [normalizer], settings, work / "run", train.collate, log=lambda _: None)
    trainer.fit(train, val)
    first = time.perf_counter() - started
    trainer.settings = TrainSettings(epochs=2, batch_size=BATCH_SIZE, optimizer="sgd", lr=LR, momentum=MOMENTUM)
    started = time.perf_counter()
    trainer._run_epoch(train, 2, training=True)
    trainer._run_epoch(val, 2, training=False)
    return first, time.perf_counter() - started


def ours_batches(graph_dir: Path, subtable: Path, ids: list[str]) -> list[GraphBatch]:
    """Our collated training batches of ``ids``."""
    data = GraphDataset(graph_dir, ids=ids, targets=[TARGET], table=subtable)
    return [data.collate([data[i] for i in range(s, min(s + BATCH_SIZE, len(data)))]) for s in range(0, len(data), 64)]


def ours_step(model: CGCNN, optimizer: torch.optim.Optimizer, batch: GraphBatch) -> None:
    """One training step as our Trainer does it (targets standardised beforehand)."""
    loss = masked_mse_loss(model(batch), batch.targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def ours_twin(backend: str, eager: bool = False) -> tuple[CGCNN, torch.optim.Optimizer]:
    """Our model (seed 0, as ``ours``) with ``backend``; with ``eager`` every gated layer runs its chain of PyTorch
    modules (``ConvLayer.eager``, the tests' reference) instead of a backend's fused edge part."""
    torch.manual_seed(0)
    model = CGCNN(targets=[TARGET], backend=backend, **ARCHITECTURE)
    if eager:
        for conv in model.convs:
            conv.forward = lambda atom_fea, nbr_idx, edge_fea, mask, band=None, conv=conv: conv.eager(
                atom_fea, nbr_idx, edge_fea, mask
            )
    return model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


# -- cgcnn2 -----------------------------------------------------------------------------------------------------


def cgcnn2_model():
    """cgcnn2's CrystalGraphConvNet with the published architecture."""
    from cgcnn2.model import CrystalGraphConvNet

    return CrystalGraphConvNet(orig_atom_fea_len=92, nbr_fea_len=41, **ARCHITECTURE)


def cgcnn2_epoch(model, optimizer, train_loader, val_loader) -> None:
    """One epoch of cgcnn2's training loop (cgcnn2/cli/cgcnn_tr.py): train, then validation."""
    criterion = torch.nn.MSELoss(reduction="none")
    model.train()
    for (atom_fea, nbr_fea, nbr_fea_idx, crystal_atom_idx), targets, _ in train_loader:
        optimizer.zero_grad()
        outputs, _ = model(atom_fea, nbr_fea, nbr_fea_idx, crystal_atom_idx)
        loss = criterion(outputs, targets).mean()
        loss.backward()
        optimizer.step()
        loss.item()
    model.eval()
    with torch.inference_mode():
        for (atom_fea, nbr_fea, nbr_fea_idx, crystal_atom_idx), targets, _ in val_loader:
            outputs, _ = model(atom_fea, nbr_fea, nbr_fea_idx, crystal_atom_idx)
            criterion(outputs, targets).mean().item()


def cgcnn2_first_epoch(root: Path) -> tuple[float, float]:
    """Seconds for cgcnn2's CIFData featurisation of train + val plus one epoch; also epoch 2's."""
    from cgcnn2.data import CIFData, collate_pool
    from torch.utils.data import DataLoader

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, val = CIFData(str(root / "train")), CIFData(str(root / "val"))
        full = [*train, *val]  # the script featurises every crystal (and fits its normaliser on a sample)
    _, sample, _ = collate_pool(random.Random(0).sample(full, min(500, len(full))))
    torch.manual_seed(0)
    model = cgcnn2_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    train_loader = DataLoader(train, batch_size=BATCH_SIZE, shuffle=True, collate_fn=collate_pool)
    val_loader = DataLoader(val, batch_size=BATCH_SIZE, shuffle=False, collate_fn=collate_pool)
    cgcnn2_epoch(model, optimizer, train_loader, val_loader)
    first = time.perf_counter() - started
    started = time.perf_counter()
    cgcnn2_epoch(model, optimizer, train_loader, val_loader)
    return first, time.perf_counter() - started


def cgcnn2_batches(root: Path) -> list[tuple]:
    """cgcnn2's collated training batches (inputs, targets) of the train folder."""
    from cgcnn2.data import CIFData, collate_pool

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = CIFData(str(root / "train"))
        items = [data[i] for i in range(len(data))]
    return [collate_pool(items[s : s + BATCH_SIZE])[:2] for s in range(0, len(items), BATCH_SIZE)]


def cgcnn2_step(model, optimizer: torch.optim.Optimizer, batch: tuple) -> None:
    """One training step of cgcnn2's loop."""
    inputs, targets = batch
    optimizer.zero_grad()
    outputs, _ = model(*inputs)
    loss = torch.nn.functional.mse_loss(outputs, targets)
    loss.backward()
    optimizer.step()


# -- measurement ----------------------------------------------------------------------------------------------------


def pass_seconds(step: Callable[[object], None], batches: Sequence[object]) -> float:
    """Seconds for one pass of ``step`` over ``batches``."""
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    return time.perf_counter() - started


def step_flops(model: CGCNN, batches: Sequence[GraphBatch]) -> int:
    """Matmul FLOPs of forward + backward over ``batches``, counted by FlopCounterMode (no optimiser step)."""
    counter = FlopCounterMode(display=False)
    with counter:
        for batch in batches:
            masked_mse_loss(model(batch), batch.targets).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def formula_flops(batches: Sequence[GraphBatch], a: int = 64, g: int = 41, h: int = 32) -> int:
    """Matmul FLOPs of our forward + backward by formula (see the printed formula)."""
    total = 0
    for batch in batches:
        n, m = batch.nbr_idx.shape
        b = batch.num_crystals
        embedding = 2 * n * 92 * a * 2  # forward + weight gradient (the element table needs no gradient)
        convs = 4 * (3 * 2 * (2 * n * a * 2 * a) + 2 * 2 * n * m * g * 2 * a)
        # conv 1's atom input comes from the embedding, which is trained: it needs its input gradient too
        head = 3 * 2 * b * a * h + 3 * 2 * b * h
        total += embedding + convs + head
    return total


def banded_flops(model: CGCNN, batches: Sequence[GraphBatch], dense: int, a: int = 64) -> tuple[int, float]:
    """The matmul FLOPs our compiled path really does: ``dense`` less the edge-matmul terms of the Gaussian
    features that are exactly zero (skipped by the banded kernels), and the fraction of edge features used."""
    nonzero = total = 0
    for batch in batches:
        features = model.edge_features(batch.nbr_dist)
        nonzero += int((features != 0).sum())
        total += features.numel()
    # the edge block of fc_full: forward + weight gradient, 4 layers, 2 * (2a) multiply-adds per feature
    skipped = 4 * 2 * 2 * (total - nonzero) * 2 * a
    return dense - skipped, nonzero / total


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, help="mp2018 crystals.parquet (default: built on first use)")
    parser.add_argument("--cifs", type=Path, help="the mp2018 CIF archive (default: the shared data)")
    parser.add_argument("--work", type=Path, default=WORK / "train-bench")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved steady-state passes per side")
    parser.add_argument("--first-epoch-repeats", type=int, default=2, help="interleaved first epochs per side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: torch default)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    # our Trainer raises glibc's mmap threshold (train.tune_allocator); do it up front so both sides run with it
    tuned = tune_allocator()
    started = time.perf_counter()
    native.kernels()  # built once per machine, like an install step: not part of the first epoch
    print(f"{native.describe()} ({time.perf_counter() - started:.2f} s)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; at start: {load_average()}")
    print(f"allocator tuning (glibc mmap threshold 32 MB, for both sides): {'on' if tuned else 'off'}")
    args.work.mkdir(parents=True, exist_ok=True)
    args.table = mp2018_table(args.table)
    args.cifs = args.cifs or mp2018_cifs()
    train_ids, val_ids = choose_ids(args.table, args.train, args.val, args.seed)
    subtable = args.work / "crystals.parquet"
    write_subtable(args.table, train_ids + val_ids, subtable)
    labels_table = pq.read_table(subtable, columns=["id", TARGET])
    labels = dict(zip(labels_table.column("id").to_pylist(), label_values(labels_table, TARGET).tolist(), strict=True))
    cif_root = args.work / "cifs"
    shutil.rmtree(cif_root, ignore_errors=True)
    write_cif_folders(args.cifs, labels, {"train": train_ids, "val": val_ids}, cif_root)
    print(f"{len(train_ids)} train + {len(val_ids)} val crystals of {args.table}", flush=True)

    first: dict[str, list[float]] = {"ours": [], "cgcnn2": []}
    second: dict[str, list[float]] = {"ours": [], "cgcnn2": []}
    for _ in range(args.first_epoch_repeats):
        for name, run in (
            ("cgcnn2", lambda: cgcnn2_first_epoch(cif_root)),
            ("ours", lambda: ours_first_epoch(subtable, train_ids, val_ids, args.work / "ours")),
        ):
            one, two = run()
            first[name].append(one)
            second[name].append(two)
    print(f"after first epochs: {load_average()}", flush=True)

    ours_train = ours_batches(args.work / "ours" / "graphs", subtable, train_ids)
    mean, std = float(np.nanmean(labels_table.column(TARGET))), float(np.nanstd(labels_table.column(TARGET)))
    for batch in ours_train:
        batch.targets = (batch.targets - mean) / std
    theirs_train = cgcnn2_batches(cif_root)
    torch.manual_seed(0)
    ours = CGCNN(targets=[TARGET], **ARCHITECTURE)
    ours_opt = torch.optim.SGD(ours.parameters(), lr=LR, momentum=MOMENTUM)
    # backend torch (the fused edge path in PyTorch operations), and the chain of eager modules
    plain, plain_opt = ours_twin("torch")
    eager, eager_opt = ours_twin("torch", eager=True)
    theirs = cgcnn2_model()
    theirs_opt = torch.optim.SGD(theirs.parameters(), lr=LR, momentum=MOMENTUM)
    ours.train()
    plain.train()
    eager.train()
    theirs.train()
    runs = {
        "ours": (lambda b: ours_step(ours, ours_opt, b), ours_train),
        "torch": (lambda b: ours_step(plain, plain_opt, b), ours_train),
        "eager": (lambda b: ours_step(eager, eager_opt, b), ours_train),
        "cgcnn2": (lambda b: cgcnn2_step(theirs, theirs_opt, b), theirs_train),
    }
    for step, batches in runs.values():  # warm-up
        pass_seconds(step, batches)
    steady: dict[str, list[float]] = {name: [] for name in runs}
    matmul: list[float] = []
    for _ in range(args.repeats):
        matmul.append(matmul_flops(5))
        for name, (step, batches) in runs.items():
            steady[name].append(pass_seconds(step, batches))
    # counted on the eager twin: FlopCounterMode has no entry for the in-place addmm_ of the fused edge path,
    # which does the same matmuls
    flops = step_flops(eager, ours_train)
    by_formula = formula_flops(ours_train)
    banded, used = banded_flops(ours, ours_train, by_formula)
    n_train = len(train_ids)
    atoms = sum(int(b.numbers.numel()) for b in ours_train)

    med = {name: statistics.median(times) for name, times in steady.items()}
    peak = statistics.median(matmul)
    print(f"\nat end: {load_average()}")
    print(f"dense matmul (30000x169)·(169x128) float32: {peak / 1e9:.1f} GFLOP/s (median of {len(matmul)})")
    print(
        f"steady state, forward + backward + SGD step over {n_train} train crystals ({atoms} atoms), "
        f"median of {args.repeats} interleaved passes:"
    )
    for name in ("ours", "torch", "eager", "cgcnn2"):
        spread = ", ".join(f"{t:.2f}" for t in steady[name])
        print(f"  {name:7s} {n_train / med[name]:8.0f} crystals/s  ({med[name]:.3f} s per pass; all: {spread})")
    print("  (torch: our model with backend torch, the fused edge path in PyTorch operations, as on a")
    print("   machine without a C compiler; eager: ConvLayer.eager, the edge part as a chain of PyTorch modules)")
    print(
        f"  ratio ours / cgcnn2: {med['cgcnn2'] / med['ours']:.2f}x (target >= 3x); "
        f"torch / cgcnn2: {med['cgcnn2'] / med['torch']:.2f}x; ours / torch: {med['torch'] / med['ours']:.2f}x; "
        f"ours / eager: {med['eager'] / med['ours']:.2f}x"
    )
    print(
        f"our step: {flops / 1e9:.2f} GFLOP per pass by FlopCounterMode (eager twin), "
        f"{by_formula / 1e9:.2f} by formula "
        f"sum over batches of [2·N·92·a·2 + 4·(3·2·(2·N·a·2a) + 2·2·N·M·g·2a) + 3·2·B·(a·h + h)], a=64, g=41, "
        f"h=32, M=12 (matmuls; 3x forward where the input needs a gradient, 2x where it does not)"
    )
    print(
        f"  dense-equivalent: {flops / med['ours'] / 1e9:.1f} GFLOP/s = {flops / med['ours'] / peak:.0%} of the dense "
        f"matmul rate (cgcnn2: {flops / med['cgcnn2'] / 1e9:.1f} GFLOP/s, the same work)"
    )
    print(
        f"  done: the compiled kernels multiply only the {used:.0%} of the Gaussian edge features that are not "
        f"exactly zero: {banded / 1e9:.2f} GFLOP per pass, {banded / med['ours'] / 1e9:.1f} GFLOP/s = "
        f"{banded / med['ours'] / peak:.0%} of the dense matmul rate"
    )
    print(
        f"first epoch including data preparation ({len(train_ids)} train + {len(val_ids)} val crystals), "
        f"median of {args.first_epoch_repeats} interleaved:"
    )
    for name, what in (("ours", "graphs from the table + epoch"), ("cgcnn2", "CIFData featurisation + epoch")):
        spread = ", ".join(f"{t:.2f}" for t in first[name])
        print(
            f"  {name:7s} {statistics.median(first[name]):7.2f} s  ({what}; all: {spread}); "
            f"second epoch {statistics.median(second[name]):.2f} s"
        )
    ratio = statistics.median(first["cgcnn2"]) / statistics.median(first["ours"])
    print(f"  ratio ours / cgcnn2: {ratio:.1f}x (target >= 10x)")
    print(f"  second-epoch ratio: {statistics.median(second['cgcnn2']) / statistics.median(second['ours']):.2f}x")


if __name__ == "__main__":
    main()
