"""How the data, graphs and pretraining stages scale: mp2018 replicated 1, 3, 10 and 30 times (about a million
crystals), each stage run as the workflow runs it (one command per job), timed, with the peak resident memory
of its largest job, and the ratios against x1.

    PYTHONPATH=src python benchmarks/scale.py                  # x1, x3, x10, x30
    PYTHONPATH=src python benchmarks/scale.py --sizes 1,3      # a quick run

The synthetic dataset: every mp2018 structure (the real CIF text) ``size`` times, copy ``k > 0`` of ``mp-1`` named
``mp-1~k``, with its labels, as a local source (a .tar.gz and a labels CSV; building it is not timed). Stages:

- data: ``crystal_transfer data`` (one job, ``--workers`` parser processes); time per crystal over the records read;
- graphs: ``graphs plan``, then every ``graphs shard`` job (``--workers`` at a time, as ``snakemake --cores``
  would), then ``graphs manifest``; time per crystal over the table's rows, the largest shard job's memory;
- pretrain: ``crystal_transfer pretrain`` of a formation-energy CGCNN (published architecture, batch 64) on the
  whole table, for one epoch of ``--max-batches`` training batches, then its 2,000 validation and 2,000 test
  crystals (the same work at every size, so what grows with the dataset shows); time per crystal over the
  crystals the passes saw.

Peak memory of a job: the largest sum of the resident set sizes of the job's process and its children, sampled
every 20 ms, and at least the process's own ``ru_maxrss``. The last line reads
``scale: xN peak RSS ratio R, time per crystal ratio T``: for the largest size run, the largest job's peak over
x1's (over the stages run at both), and the largest of the stages' time-per-crystal ratios.

The data stage parses (pymatgen's CIF parser, about 4 ms a crystal): x30 is about 40 minutes of it on 2 cores.
``--parse-up-to 10`` runs it at x1..x10 only; larger sizes then start from the x1 table replicated (the rows the
data stage would write, under the same ids) and measure the graph and pretraining stages.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from inputs import REPO, SHARED_DATA, WORK, mp2018_cifs
from memory import PeakMemory

STAGES = ("data", "graphs", "pretrain")
LABELS = ["formation_energy_per_atom", "band_gap", "energy_per_atom", "efermi", "K_VRH", "G_VRH"]


def replicate(size: int, folder: Path) -> tuple[Path, Path, int]:
    """mp2018's structures and labels ``size`` times under distinct ids (copy-major order); returns the archive,
    the labels CSV and the record count. Reused when already built."""
    archive, labels = folder / "structures.tar.gz", folder / "labels.csv"
    done = folder / "records.txt"
    if done.is_file():
        return archive, labels, int(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(mp2018_cifs()) as source:
        texts = [(Path(m.name).stem, source.extractfile(m).read()) for m in source if m.isfile()]
    with open(SHARED_DATA / "mp2018" / "labels.csv", newline="") as handle:
        rows = {row["material_id"]: row for row in csv.DictReader(handle)}
    count = 0
    with tarfile.open(archive, "w:gz", compresslevel=1) as out, open(labels, "w", newline="") as table:
        writer = csv.writer(table)
        writer.writerow(["material_id", *LABELS])
        for copy in range(size):
            for crystal_id, payload in texts:
                name = crystal_id if copy == 0 else f"{crystal_id}~{copy}"
                info = tarfile.TarInfo(f"structures/{name}.cif")
                info.size = len(payload)
                out.addfile(info, io.BytesIO(payload))
                writer.writerow([name, *(rows[crystal_id][label] for label in LABELS)])
                count += 1
    done.write_text(str(count))
    return archive, labels, count


class Job:
    """One command run as a job: its wall time and peak memory (MB)."""

    def __init__(self, command: list[str], log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                                                   "1")}
        self.log = log
        self.handle = open(log, "w")  # noqa: SIM115 (closed in wait)
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.handle, stderr=subprocess.STDOUT)
        self.memory = PeakMemory(self.process.pid, interval=0.02).__enter__()

    def wait(self) -> tuple[float, float]:
        _, status, usage = os.wait4(self.process.pid, 0)
        self.process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - self.started
        self.memory.__exit__()
        self.handle.close()
        if self.process.returncode != 0:
            raise SystemExit(f"{self.log.name} failed (exit {self.process.returncode}):\n"
                             + self.log.read_text()[-3000:])
        return seconds, max(self.memory.peak, usage.ru_maxrss * 1024) / 1e6


def run_jobs(commands: list[tuple[list[str], Path]], parallel: int) -> tuple[float, float]:
    """Run the commands ``parallel`` at a time; (wall seconds of them all, the largest job's peak MB)."""
    started = time.perf_counter()
    pending, running, peak = list(commands), [], 0.0
    while pending or running:
        while pending and len(running) < parallel:
            running.append(Job(*pending.pop(0)))
        finished = running.pop(0)
        peak = max(peak, finished.wait()[1])
    return time.perf_counter() - started, peak


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "crystal_transfer", *args]


def replicate_table(reference: Path, size: int, data: Path) -> int:
    """The x1 table's rows ``size`` times (copy ``k > 0`` of ``mp-1`` as ``mp-1~k``, copy-major), written as the data
    stage writes a table (row groups, recorded sha256): the table the data stage would give, without parsing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from crystal_transfer.atomic import record_sha256
    from crystal_transfer.data.stage import ROW_GROUP_ROWS

    source = pq.read_table(reference)
    data.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(data / "crystals.parquet", source.schema, compression="zstd") as writer:
        for copy in range(size):
            ids = source.column("id") if copy == 0 else pc.binary_join_element_wise(
                source.column("id"), pa.scalar(str(copy)), "~")
            writer.write_table(source.set_column(0, "id", ids), row_group_size=ROW_GROUP_ROWS)
    record_sha256(data / "crystals.parquet")
    return source.num_rows * size


def measure(size: int, work: Path, workers: int, max_batches: int, shard_size: int, parse: bool,
            stages: set[str]) -> dict[str, dict]:
    """The ``stages`` at one size: {stage: {crystals, seconds, peak_mb}}; without ``parse`` the table is the x1
    table replicated (no data stage). A stage left out reuses the outputs of an earlier run."""
    folder = work / f"x{size}"
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    result: dict[str, dict] = {}
    table = data / "crystals.parquet"
    if "data" not in stages:
        kept = pq.read_metadata(table).num_rows
    elif parse:
        for stale in (table, data / "crystals.parquet.parts"):
            subprocess.run(["rm", "-rf", str(stale)], check=True)
        archive, labels, records = replicate(size, folder / "source")
        spec = {
            "sources": [{"type": "local", "name": "mp2018", "path": str(archive), "labels": str(labels),
                         "id_column": "material_id", "columns": {label: label for label in LABELS}}],
            "filters": {"max_z": 80, "max_rejected_fraction": 0.25},
        }
        seconds, peak = run_jobs([(cli("data", "--dataset", "mp2018", "--spec", json.dumps(spec), "--out",
                                       str(data), "--workers", str(workers)), logs / "data.log")], 1)
        result["data"] = {"crystals": records, "seconds": seconds, "peak_mb": peak}
        kept = json.loads((data / "summary.json").read_text())["kept"]
    else:
        kept = replicate_table(work / "x1" / "data" / "crystals.parquet", size, data)
    if "graphs" in stages:
        result["graphs"] = graph_stage(table, folder / "graphs", kept, workers, shard_size, logs)
    if "pretrain" in stages:
        result["pretrain"] = pretrain_stage(table, folder / "graphs", folder / "pretrain", max_batches, logs)
    return result


def graph_stage(table: Path, graphs: Path, kept: int, workers: int, shard_size: int, logs: Path) -> dict:
    """plan, the shard jobs (``workers`` at a time), manifest."""
    subprocess.run(["rm", "-rf", str(graphs)], check=True)
    settings = json.dumps({"shard_size": shard_size})
    started = time.perf_counter()
    _, plan_peak = run_jobs([(cli("graphs", "plan", "--table", str(table), "--dataset", "mp2018", "--settings",
                                  settings, "--out", str(graphs / "plan.json")), logs / "graph_plan.log")], 1)
    shards = json.loads((graphs / "plan.json").read_text())["shards"]
    _, shard_peak = run_jobs(
        [(cli("graphs", "shard", "--plan", str(graphs / "plan.json"), "--table", str(table), "--index",
              str(entry["index"])), logs / f"graph_shard-{entry['index']:05d}.log") for entry in shards], workers)
    _, manifest_peak = run_jobs([(cli("graphs", "manifest", "--plan", str(graphs / "plan.json"), "--out",
                                      str(graphs / "manifest.json")), logs / "graph_manifest.log")], 1)
    return {"crystals": kept, "seconds": time.perf_counter() - started,
            "peak_mb": max(plan_peak, shard_peak, manifest_peak), "shards": len(shards)}


def pretrain_stage(table: Path, graphs: Path, out: Path, max_batches: int, logs: Path) -> dict:
    """One capped epoch of a formation-energy CGCNN on the whole table."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    # 2,000 validation and 2,000 test crystals at every size, and max_batches of training: the same work at every size
    model = {"kind": "train", "dataset": "mp2018", "targets": ["formation_energy_per_atom"], "val": 2000,
             "test": 2000, "seed": 0, "architecture": {},
             "train": {"epochs": 1, "batch_size": 64, "max_batches": max_batches, "lr": 0.01}}
    seconds, peak = run_jobs([(cli("pretrain", "--name", "scale", "--spec", json.dumps(model), "--table", str(table),
                                   "--graphs", str(graphs), "--out", str(out)), logs / "pretrain.log")], 1)
    record = json.loads((out / "test.json").read_text())
    seen = sum(min(record[f"n_{part}"], max_batches * 64) for part in ("train", "val", "test"))
    if record["n_train"] < max_batches * 64:
        raise SystemExit(f"{record['n_train']} training crystals: fewer than --max-batches takes at this size")
    return {"crystals": seen, "seconds": seconds, "peak_mb": peak, "dataset": sum(
        record[f"n_{part}"] for part in ("train", "val", "test"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,3,10,30", help="replication factors, comma-separated (first: reference)")
    parser.add_argument("--work", default=str(WORK / "scale"), help="folder for the datasets and outputs")
    parser.add_argument("--workers", type=int, default=2, help="data-stage parser processes; shard jobs at a time")
    parser.add_argument("--max-batches", type=int, default=300, help="training batches (of 64) in the epoch")
    parser.add_argument("--shard-size", type=int, default=2048, help="graphs.shard_size")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="stages to measure (the others' outputs and figures come from an earlier run)")
    parser.add_argument("--parse-up-to", type=int, default=30,
                        help="sizes above this take the x1 table replicated instead of running the data stage")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if sizes[0] != 1:
        raise SystemExit("--sizes must start with 1 (the reference)")
    work = Path(args.work)
    print(f"scale benchmark: sizes {sizes}, {args.workers} workers, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    figures: dict[int, dict[str, dict]] = {}
    header = f"{'stage':<9} {'size':>5} {'crystals':>10} {'wall s':>9} {'crystals/s':>11} {'peak MB':>8} " \
             f"{'s/crystal ratio':>15} {'RSS ratio':>9}"
    stages = set(args.stages.split(","))
    partial = stages != set(STAGES) and (work / "scale.json").is_file()
    earlier = json.loads((work / "scale.json").read_text()) if partial else {}
    if stages != set(STAGES):
        print(f"measuring {', '.join(sorted(stages))}; the other stages' figures are those of the earlier run in "
              f"{work / 'scale.json'}", flush=True)
    for size in sizes:
        measured = measure(size, work, args.workers, args.max_batches, args.shard_size, size <= args.parse_up_to,
                           stages)
        figures[size] = {stage: row for stage, row in {**earlier.get(str(size), {}), **measured}.items()
                         if stage in STAGES}
        earlier[str(size)] = figures[size]
        (work / "scale.json").write_text(json.dumps(earlier, indent=2))  # kept if a later size fails
        print(f"x{size} done, load average {os.getloadavg()[0]:.2f}", flush=True)
        print(header)
        for stage in STAGES:
            for done in figures:
                if stage not in figures[done]:
                    print(f"{stage:<9} x{done:<4} (not run: the x1 table replicated, --parse-up-to)")
                    continue
                row, ref = figures[done][stage], figures[sizes[0]][stage]
                per = row["seconds"] / row["crystals"]
                time_ratio = per / (ref["seconds"] / ref["crystals"])
                print(f"{stage:<9} x{done:<4} {row['crystals']:>10,} {row['seconds']:>9.1f} "
                      f"{row['crystals'] / row['seconds']:>11.1f} {row['peak_mb']:>8.0f} {time_ratio:>15.2f} "
                      f"{row['peak_mb'] / ref['peak_mb']:>9.2f}")
        print(flush=True)
    largest, first = figures[sizes[-1]], figures[sizes[0]]
    both = [stage for stage in STAGES if stage in largest and stage in first]
    rss = max(largest[s]["peak_mb"] for s in both) / max(first[s]["peak_mb"] for s in both)
    per_crystal = max((largest[s]["seconds"] / largest[s]["crystals"]) / (first[s]["seconds"] / first[s]["crystals"])
                      for s in both)
    print(f"scale: x{sizes[-1]} peak RSS ratio {rss:.2f}, time per crystal ratio {per_crystal:.2f}")


if __name__ == "__main__":
    main()
