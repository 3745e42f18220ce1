"""torch.compile (inductor, CPU) of the whole training step against the compiled C kernels (issue 15, point 3).

The published architecture (atom_fea_len 64, 4 convolutions, h_fea_len 32, n_h 1), batch 64, SGD lr 0.01 momentum
0.9, on ``--train`` mp2018 crystals (formation energy), with the batches and the step of benchmarks/train.py
(``ours_batches``; ``ours_step``: forward, masked MSE, zero_grad, backward, SGD step). Sides, each its own model
with seed 0:

- ``C kernels``: the default (``backend="compiled"``: ``CompiledGatedMessages``, gated_kernels.c);
- ``torch eager``: the fused edge path in PyTorch operations (``backend="torch"``: ``TorchGatedMessages``);
- ``chain eager``: the edge part as a chain of eager modules (``ConvLayer.eager``): plain PyTorch
  operations that AOTAutograd differentiates and inductor fuses itself (only ``_GatherRows`` is ours);
- ``compiled chain`` / ``compiled torch``: the whole ``ours_step`` of those under ``torch.compile`` (inductor,
  ``dynamic=True``; ``--dynamic mark``: ``dynamic=None`` with the atom and crystal dimensions marked dynamic);
  ``compiled torch*``, only when ``compiled torch`` fails: the same with ``TorchGatedMessages.backward`` kept out of
  dynamo (``torch._dynamo.disable``).

Every compiled side runs in its own Python process (dynamo's in-process caches would otherwise be shared between
sides with the same code): a cold one (``TORCHINDUCTOR_CACHE_DIR`` emptied) that times the first step and the first
epoch, counts dynamo's graph breaks and recompiles, then times steady-state passes of the compiled side and of the
C kernels interleaved in that process; then, for the compiled side closest to the C kernels, a warm one with the
same cache directory (FX graph and AOTAutograd caches; dynamo traces again in every process), which times its first
epoch. The decision rule of issue 15: replace the C kernels if compiled/C <= 1.15, first compile < 60 s and the
second process hits the FX graph cache only. Compile seconds are first epoch minus
the median steady pass. The eager sides' passes are interleaved in the main process.

The data stage builds what it needs when ``--table`` is not given: ``--crystals`` random CIFs of the archive with
their labels as a ``local`` source (``data.stage.build_dataset``), then graphs (``graphs.stage.build_graphs``), under
``--work``; a table (or graphs) already built there is reused.

    PYTHONPATH=src python benchmarks/compile.py --threads 1 --work /tmp/compile-bench
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from crystal_transfer.data.stage import build_dataset
from crystal_transfer.data.table import label_values
from crystal_transfer.graphs.settings import GraphSettings
from crystal_transfer.graphs.stage import build_graphs
from crystal_transfer.kernels import native
from crystal_transfer.models.gated import TorchGatedMessages
from crystal_transfer.training.trainer import tune_allocator

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "mp2018"


def train_bench():
    """benchmarks/train.py as a module (its batches, twins and step)."""
    spec = importlib.util.spec_from_file_location("train_bench", HERE / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_bench"] = module  # dynamo imports the module of a function it inlines by name
    spec.loader.exec_module(module)
    return module


TB = train_bench()


# -- data -----------------------------------------------------------------------------------------------------------


def build_table(archive: Path, labels: Path, count: int, seed: int, work: Path) -> Path:
    """A canonical table of ``count`` random crystals of ``archive`` (a local source), built under ``work``."""
    table = work / "data" / "crystals.parquet"
    if table.is_file():
        print(f"table: reused {table}")
        return table
    started = time.perf_counter()
    with tarfile.open(archive) as tar:
        names = sorted(m.name for m in tar if m.isfile() and m.name.lower().endswith(".cif"))
    chosen = set(random.Random(seed).sample(names, min(count, len(names))))
    cifs = work / "cifs"
    shutil.rmtree(cifs, ignore_errors=True)
    cifs.mkdir(parents=True)
    with tarfile.open(archive) as tar:  # one streaming pass: seeking back in a .tar.gz decompresses it again
        for member in tar:
            if member.name in chosen:
                (cifs / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    ids = {Path(name).stem for name in chosen}
    with open(labels, newline="") as source, open(work / "labels.csv", "w", newline="") as out:
        reader = csv.DictReader(source)
        writer = csv.DictWriter(out, reader.fieldnames)
        writer.writeheader()
        writer.writerows(row for row in reader if row["material_id"] in ids)
    spec = {
        "sources": [
            {
                "type": "local",
                "name": "mp2018",
                "path": str(cifs),
                "labels": str(work / "labels.csv"),
                "id_column": "material_id",
                "columns": {TB.TARGET: TB.TARGET},
            }
        ],
        "filters": {"max_z": 80, "max_rejected_fraction": 0.25},
    }
    summary = build_dataset("mp2018", spec, work / "data", workers=1, log=lambda _: None)
    print(f"table: {summary['kept']} of {len(chosen)} crystals kept, {time.perf_counter() - started:.1f} s")
    return table


def training_batches(table: Path, work: Path, n_train: int, seed: int) -> list:
    """The collated, standardised training batches of ``n_train`` random crystals of ``table``."""
    graph_dir = work / "graphs"
    if not (graph_dir / "manifest.json").is_file():
        build_graphs(table, graph_dir, GraphSettings(), shard_size=4096, dataset="bench", log=lambda _: None)
    train_ids, _ = TB.choose_ids(table, n_train, 0, seed)
    batches = TB.ours_batches(graph_dir, table, train_ids)
    labels = label_values(pq.read_table(table, columns=["id", TB.TARGET]), TB.TARGET)
    mean, std = float(np.nanmean(labels)), float(np.nanstd(labels))
    for batch in batches:
        batch.targets = (batch.targets - mean) / std
    return batches


# -- dynamo's reports -----------------------------------------------------------------------------------------------


class DynamoLog(logging.Handler):
    """Collects dynamo's graph-break and recompile reports (``torch._logging`` artifacts) instead of printing them."""

    def __init__(self) -> None:
        super().__init__()
        self.breaks: Counter[str] = Counter()
        self.recompiles: list[str] = []
        self._last: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record is self._last:  # the same record, propagated to a second logger with this handler
            return
        self._last = record
        lines = [line.strip() for line in record.getMessage().splitlines() if line.strip()]
        if not lines:
            return
        if record.name.endswith("__graph_breaks"):
            where = Path(lines[0].split(" at ")[-1]).name
            reason = lines[2] if len(lines) > 2 and lines[1].startswith("Graph Break Reason") else lines[-1]
            reason = reason.removeprefix("Explanation: ")
            self.breaks[f"{where}: {reason[:110]}"] += 1
        elif record.name.endswith("__recompiles"):
            function = lines[0].removeprefix("Recompiling function ").split(" in ")
            where = f"{function[0]} ({Path(function[-1]).name})"
            failure = next((line for line in lines if line.startswith("- ")), "?")
            self.recompiles.append(f"{where}: {failure[:150]}")


def _artifact(record: logging.LogRecord) -> bool:
    return record.name.endswith(("__graph_breaks", "__recompiles"))


def install_dynamo_log() -> DynamoLog:
    """Route dynamo's graph-break and recompile reports into a :class:`DynamoLog` (and off stderr)."""
    torch._logging.set_logs(graph_breaks=True, recompiles=True)
    handler = DynamoLog()
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("torch") and isinstance(logger, logging.Logger) and logger.handlers:
            for existing in logger.handlers:
                existing.addFilter(lambda record: not _artifact(record))
            logger.addHandler(handler)
    logging.getLogger("torch._dynamo.variables.tensor").setLevel(logging.ERROR)  # the .item() advice, per call
    return handler


def cache_counters() -> dict[str, int]:
    """Inductor's FX graph cache and AOTAutograd cache hits and misses, and dynamo's graphs, so far."""
    from torch._dynamo.utils import counters

    return {
        "fx_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
        "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "aot_miss": counters["aot_autograd"]["autograd_cache_miss"],
        "graphs": counters["stats"]["unique_graphs"],
    }


# -- sides ----------------------------------------------------------------------------------------------------------

FLAGS = {
    "C kernels": {"backend": "compiled"},
    "torch eager": {"backend": "torch"},
    "chain eager": {"backend": "torch", "eager": True},
    "compiled chain": {"backend": "torch", "eager": True},
    "compiled torch": {"backend": "torch"},
    "compiled torch*": {"backend": "torch"},
}
EAGER = [name for name in FLAGS if not name.startswith("compiled")]


def make_step(name: str, dynamic: str) -> Callable[[object], None]:
    """The training step of side ``name`` (its own model and SGD), compiled for the ``compiled`` sides."""
    if name == "compiled torch*":
        gated = TorchGatedMessages
        gated.backward = staticmethod(torch._dynamo.disable(gated.backward))
    net, optimizer = TB.ours_twin(**FLAGS[name])
    net.train()

    def step(batch) -> None:
        TB.ours_step(net, optimizer, batch)

    if not name.startswith("compiled"):
        return step
    return torch.compile(step, dynamic=True if dynamic == "true" else None)


def mark(batches: list, dynamic: str) -> None:
    """With ``--dynamic mark``: the atom (and crystal) dimension of every batch tensor marked dynamic."""
    if dynamic != "mark":
        return
    for batch in batches:
        for tensor in (batch.numbers, batch.nbr_idx, batch.nbr_dist, batch.nbr_mask, batch.crystal, batch.targets):
            torch._dynamo.mark_dynamic(tensor, 0)


def interleaved(steps: dict[str, Callable[[object], None]], batches: list, repeats: int) -> dict[str, list[float]]:
    """Seconds per pass of every step over ``batches``, ``repeats`` rounds, the sides interleaved in each."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(TB.pass_seconds(step, batches))
    return times


def cpu_seconds() -> float:
    """CPU seconds so far of this process and its descendants (inductor's compile workers, their compilers)."""
    try:
        import psutil
    except ImportError:  # without psutil: this process and the children it has waited for
        import resource

        return sum(
            usage.ru_utime + usage.ru_stime
            for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        )
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:  # ended meanwhile: counted in its parent's children times once waited for
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def compiled_side(args: argparse.Namespace, batches: list) -> dict:
    """In a child process: compile ``args.side``, time its first epoch, then (cold) its steady state against C."""
    log = install_dynamo_log()
    result: dict = {"side": args.side}
    step = make_step(args.side, args.dynamic)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    try:
        step(batches[0])
        result["first_step"] = time.perf_counter() - started
        result["recompiles_first_step"] = len(log.recompiles)
        for batch in batches[1:]:
            step(batch)
        result["first_epoch"] = time.perf_counter() - started
        result["first_epoch_cpu"] = cpu_seconds() - cpu_started
        result["recompiles_first_epoch"] = list(log.recompiles)
        cpu_started = cpu_seconds()
        result["pass_after"] = TB.pass_seconds(step, batches)
        result["pass_after_cpu"] = cpu_seconds() - cpu_started
        if args.warm:
            result["steady"] = [result["pass_after"]]
        else:
            reference = make_step("C kernels", args.dynamic)
            TB.pass_seconds(reference, batches)  # warm-up
            times = interleaved({args.side: step, "C kernels": reference}, batches, args.repeats)
            result["steady"], result["C kernels"] = times[args.side], times["C kernels"]
        result["recompiles_steady"] = log.recompiles[len(result["recompiles_first_epoch"]) :]
    except Exception as error:  # noqa: BLE001 - reported; the side has no figures
        frames = traceback.extract_tb(error.__traceback__)
        ours = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames) if "src/" in f.filename)
        message = str(error).splitlines()[0][:160] if str(error) else ""
        result["error"] = (
            f"{type(error).__name__}: {message} (innermost of our frames first: {ours}; "
            f"after {time.perf_counter() - started:.1f} s, {len(log.recompiles)} recompiles)"
        )
    result["breaks"] = dict(log.breaks)
    return result | cache_counters()


def run_side(args: argparse.Namespace, side: str, cache: Path, warm: bool) -> dict:
    """``compiled_side`` in a fresh Python process with ``cache`` as inductor's cache directory."""
    if not warm:
        shutil.rmtree(cache, ignore_errors=True)
    command = [
        sys.executable,
        __file__,
        "--work",
        str(args.work),
        "--train",
        str(args.train),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--dynamic",
        args.dynamic,
        "--repeats",
        str(args.repeats),
        "--side",
        side,
    ] + (["--warm"] if warm else [])
    if args.table:
        command += ["--table", str(args.table)]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache))
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("SIDE ")]
    if not lines:
        return {"side": side, "error": f"process failed (rc {done.returncode}): {done.stderr[-2000:]}", "breaks": {}}
    return json.loads(lines[-1][5:]) | {"wall": time.perf_counter() - started}


def report(info: dict, warm: dict | None) -> tuple[float, float, float, bool]:
    """Print a compiled side's figures; (ratio to C, compile s, warm compile s, cached across processes)."""
    name = info["side"]
    print(f"{name} (own process, cold cache):")
    cpu = info.get("first_epoch_cpu", math.nan) - info.get("pass_after_cpu", math.nan)
    print("  graph breaks (where: reason, count):")
    for where, count in sorted(info["breaks"].items()):
        print(f"    {count:3d}x {where}")
    if "error" in info:
        print(f"  FAILED: {info['error']}")
        return math.nan, math.nan, math.nan, False
    compiled, reference = statistics.median(info["steady"]), statistics.median(info["C kernels"])
    compile_s = info["first_epoch"] - compiled
    print(
        f"  first step {info['first_step']:.1f} s, first epoch {info['first_epoch']:.1f} s, compile (first epoch "
        f"- steady pass) {compile_s:.1f} s, CPU seconds of it {cpu:.1f} (first epoch {info['first_epoch_cpu']:.1f} - a "
        f"pass {info['pass_after_cpu']:.1f}); {info['graphs']} graphs; FX graph cache {info['fx_miss']} misses / "
        f"{info['fx_hit']} hits, AOTAutograd cache {info['aot_miss']} misses / {info['aot_hit']} hits"
    )
    first = info["recompiles_first_epoch"]
    print(
        f"  recompiles: {len(first)} in the first epoch ({info['recompiles_first_step']} at its first step), "
        f"{len(info['recompiles_steady'])} in the {len(info['steady'])} steady passes"
    )
    for line in first + info["recompiles_steady"]:
        print(f"    {line}")
    print(
        f"  steady state in that process, median of {len(info['steady'])} interleaved passes: {compiled:.3f} s "
        f"(all: {', '.join(f'{t:.3f}' for t in info['steady'])}) vs C kernels {reference:.3f} s (all: "
        f"{', '.join(f'{t:.3f}' for t in info['C kernels'])}): {compiled / reference:.2f}x"
    )
    if warm is None or "error" in warm:
        print(f"  second process (warm cache): {'not run (not the best side)' if warm is None else warm['error']}")
        return compiled / reference, compile_s, math.nan, False
    warm_s = warm["first_epoch"] - warm["steady"][0]
    warm_cpu = warm["first_epoch_cpu"] - warm["pass_after_cpu"]
    cached = warm["fx_miss"] == 0 and warm["fx_hit"] > 0
    print(
        f"  second process, same cache dir ({warm['wall']:.1f} s wall incl. start-up and data): first step "
        f"{warm['first_step']:.1f} s, first epoch {warm['first_epoch']:.1f} s, a pass after it "
        f"{warm['steady'][0]:.3f} s, compile {warm_s:.1f} s ({warm_cpu:.1f} CPU s); FX graph cache "
        f"{warm['fx_miss']} misses / {warm['fx_hit']} hits, AOTAutograd cache {warm['aot_miss']} misses / "
        f"{warm['aot_hit']} hits; {len(warm['recompiles_first_epoch'])} recompiles"
    )
    return compiled / reference, compile_s, warm_s, cached


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, help="a canonical crystals.parquet (default: build one under --work)")
    parser.add_argument("--archive", type=Path, default=DATA / "structures.tar.gz")
    parser.add_argument("--labels", type=Path, default=DATA / "labels.csv")
    parser.add_argument("--crystals", type=int, default=2000, help="CIFs drawn for the table built here")
    parser.add_argument("--work", type=Path, default=Path("/tmp/compile-bench"))
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved steady-state passes per side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    parser.add_argument("--dynamic", choices=("true", "mark"), default="true")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one compiled side in this process
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    native.kernels()
    args.work.mkdir(parents=True, exist_ok=True)
    table = args.table or build_table(args.archive, args.labels, args.crystals, args.seed, args.work)
    batches = training_batches(table, args.work, args.train, args.seed)
    mark(batches, args.dynamic)
    if args.side:
        print("SIDE " + json.dumps(compiled_side(args, batches)), flush=True)
        return

    print(
        f"{native.describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads, inductor "
        f"compile_threads {torch._inductor.config.compile_threads}, dynamic={args.dynamic}"
    )
    print(f"at start: {TB.load_average()}")
    atoms = sum(int(b.numbers.numel()) for b in batches)
    real = sum(bool(b.nbr_mask.all()) for b in batches)
    print(
        f"{args.train} train crystals of {table}: {len(batches)} batches, {atoms} atoms ({real} of {len(batches)} "
        f"batches with every neighbour slot real, i.e. on the fused / C path)",
        flush=True,
    )

    steps = {name: make_step(name, args.dynamic) for name in EAGER}
    for step in steps.values():
        TB.pass_seconds(step, batches)  # warm-up (and the C kernels' load)
    eager = interleaved(steps, batches, args.repeats)
    print(
        f"eager sides, seconds per pass over {args.train} crystals (forward + loss + backward + SGD step), median "
        f"of {args.repeats} interleaved passes:"
    )
    for name, times in eager.items():
        median = statistics.median(times)
        print(
            f"  {name:12s} {median:.3f} s ({args.train / median:4.0f} crystals/s, "
            f"{median / statistics.median(eager['C kernels']):.2f}x C kernels; all: "
            f"{', '.join(f'{t:.3f}' for t in times)})",
            flush=True,
        )

    colds, caches = {}, {}
    for side in ("compiled chain", "compiled torch", "compiled torch*"):
        if side == "compiled torch*" and "error" not in colds["compiled torch"]:
            continue
        caches[side] = args.work / f"inductor-cache-{side.split()[1].replace('*', '-eager-backward')}-{args.dynamic}"
        colds[side] = run_side(args, side, caches[side], warm=False)
    ran = [side for side, cold in colds.items() if "error" not in cold]
    ratio_of = {
        side: statistics.median(colds[side]["steady"]) / statistics.median(colds[side]["C kernels"]) for side in ran
    }
    best = min(ran, key=ratio_of.get) if ran else None
    # the second process only for the best side (each costs a compile from the cache)
    warms = {best: run_side(args, best, caches[best], warm=True)} if best else {}
    print(f"\nat end: {TB.load_average()}")
    results = {side: report(cold, warms.get(side)) for side, cold in colds.items()}
    if best is None:
        print("compile: no compiled side ran, decision: keep C kernels")
        return
    ratio, compile_s, warm_s, cached = results[best]
    replace = ratio <= 1.15 and compile_s < 60 and cached
    print(f"best compiled side: {best}; cached across processes: {'yes' if cached else 'no'}")
    print(
        f"compile: steady-state ratio compiled/C = {ratio:.2f}, first compile {compile_s:.1f} s, warm-cache compile "
        f"{warm_s:.1f} s, decision: {'replace' if replace else 'keep C kernels'}"
    )


if __name__ == "__main__":
    main()
