"""The data stage at scale: it streams in batches, a rerun after SIGKILL finishes with the table an uninterrupted run
writes and parses only what was not yet written, and a crystal's graph and tensors do not depend on the dataset's
size (mp2018 crystals, once and replicated three times under other ids)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, subprocess_env

LABELS = ["formation_energy_per_atom", "band_gap"]


def write_replicated(texts: dict[str, str], labels: dict[str, dict[str, str]], copies: int, folder: Path) -> dict:
    """A local source of the crystals ``texts`` written ``copies`` times, copy ``k > 0`` of ``id`` as ``id~k``,
    each crystal followed by its copies (so shard boundaries fall elsewhere than in the single copy)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with tarfile.open(folder / "structures.tar.gz", "w:gz") as archive:
        for crystal_id, text in texts.items():
            for copy in range(copies):
                name = crystal_id if copy == 0 else f"{crystal_id}~{copy}"
                payload = text.encode()
                info = tarfile.TarInfo(f"structures/{name}.cif")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
                rows.append([name] + [labels[crystal_id][label] for label in LABELS])
    with open(folder / "labels.csv", "w") as handle:
        handle.write(",".join(["material_id", *LABELS]) + "\n")
        handle.writelines(",".join(row) + "\n" for row in rows)
    return {
        "sources": [{"type": "local", "name": "mp2018", "path": str(folder / "structures.tar.gz"),
                     "labels": str(folder / "labels.csv"), "id_column": "material_id",
                     "columns": {label: label for label in LABELS}}],
        "filters": {"max_z": 80, "max_rejected_fraction": 0.5},
    }


@pytest.fixture(scope="module")
def mp2018_labels() -> dict[str, dict[str, str]]:
    import csv

    from conftest import shared

    with open(shared("mp2018", "labels.csv"), newline="") as handle:
        return {row["material_id"]: row for row in csv.DictReader(handle)}


def _data_command(spec: dict, out: Path, batch: int) -> list[str]:
    return [sys.executable, "-m", "crystal_transfer", "data", "--dataset", "mp2018", "--spec", json.dumps(spec),
            "--out", str(out), "--workers", "1", "--batch-records", str(batch)]


def test_a_rerun_after_sigkill_parses_only_the_unwritten_batches(mp2018_texts, mp2018_labels, tmp_path):
    texts = dict(list(mp2018_texts.items())[:900])
    spec = write_replicated(texts, mp2018_labels, 1, tmp_path / "source")
    env = subprocess_env()
    # the uninterrupted run
    done = subprocess.run(_data_command(spec, tmp_path / "whole", 100), env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    # killed once three batches are written
    killed = tmp_path / "killed"
    parts = killed / "crystals.parquet.parts"
    process = subprocess.Popen(_data_command(spec, killed, 100), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (parts / "part-000002.json").is_file():
        assert process.poll() is None, "the data stage ended before it was killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "crystals.parquet").exists()
    written = len(list(parts.glob("part-*.json")))
    assert 3 <= written < 9
    from crystal_transfer.data.stage import build_dataset

    lines: list[str] = []
    summary = build_dataset("mp2018", spec, killed, workers=1, log=lines.append, batch_records=100)
    assert summary["reused_records"] == 100 * written
    assert summary["parsed_records"] == 900 - 100 * written
    assert sum(" (written before: reused)" in line for line in lines) == written
    whole = pq.read_table(tmp_path / "whole" / "crystals.parquet")
    resumed = pq.read_table(killed / "crystals.parquet")
    assert resumed.equals(whole) and resumed.schema.metadata == whole.schema.metadata
    assert resumed.num_rows > 800
    for name in ("rejected.csv",):
        assert (killed / name).read_text() == (tmp_path / "whole" / name).read_text()
    assert not parts.exists()  # the batches are removed once the table is written
    # row groups of ROW_GROUP_ROWS rows at most, so a shard reads only the groups holding its rows
    from crystal_transfer.data.stage import ROW_GROUP_ROWS

    metadata = pq.read_metadata(killed / "crystals.parquet")
    assert metadata.num_row_groups >= 9
    assert max(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)) <= ROW_GROUP_ROWS


def test_changed_records_are_parsed_again(mp2018_texts, mp2018_labels, tmp_path, monkeypatch):
    """A written batch is reused only for the same records, provenance included: after an interruption, a rerun on
    an archive with one structure changed parses every record again (each row records the archive's sha256)."""
    from crystal_transfer.data import stage

    texts = dict(list(mp2018_texts.items())[:300])
    spec = write_replicated(texts, mp2018_labels, 1, tmp_path / "source")
    changed = dict(texts)
    moved = list(texts)[150]
    changed[moved] = texts[list(texts)[0]]  # another crystal's structure under this id, in the second batch
    spec_changed = write_replicated(changed, mp2018_labels, 1, tmp_path / "changed")
    reference = stage.build_dataset("mp2018", spec_changed, tmp_path / "reference", workers=1, log=lambda _: None,
                                    batch_records=100)
    assert reference["parsed_records"] == 300 and reference["reused_records"] == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(stage, "_finish", interrupted)
        with pytest.raises(KeyboardInterrupt):
            stage.build_dataset("mp2018", spec, out, workers=1, log=lambda _: None, batch_records=100)
    assert len(list((out / "crystals.parquet.parts").glob("part-*.json"))) == 3
    summary = stage.build_dataset("mp2018", spec_changed, out, workers=1, log=lambda _: None, batch_records=100)
    assert summary["reused_records"] == 0 and summary["parsed_records"] == 300
    assert pq.read_table(out / "crystals.parquet").equals(pq.read_table(tmp_path / "reference" / "crystals.parquet"))


def test_a_crystal_has_the_same_graph_and_tensors_at_x1_and_x3(mp2018_texts, mp2018_labels, tmp_path):
    import torch

    from crystal_transfer.data.stage import build_dataset
    from crystal_transfer.graphs.dataset import GraphDataset
    from crystal_transfer.graphs.settings import GraphSettings
    from crystal_transfer.graphs.shards import map_arrays
    from crystal_transfer.graphs.stage import build_graphs
    from crystal_transfer.models.cgcnn import CGCNN

    texts = dict(list(mp2018_texts.items())[:400])
    built = {}
    for copies in (1, 3):
        spec = write_replicated(texts, mp2018_labels, copies, tmp_path / f"x{copies}")
        out = tmp_path / f"data{copies}"
        build_dataset("mp2018", spec, out, workers=1, log=lambda _: None, batch_records=128)
        table = out / "crystals.parquet"
        graphs = tmp_path / f"graphs{copies}"
        build_graphs(table, graphs, GraphSettings(), shard_size=100, dataset="mp2018", workers=1, log=lambda _: None)
        built[copies] = (table, graphs)
    ids = pq.read_table(built[1][0], columns=["id"]).column("id").to_pylist()
    assert pq.read_metadata(built[3][0]).num_rows == 3 * len(ids)

    def graph_of(graphs: Path) -> dict[str, tuple[np.ndarray, ...]]:
        found = {}
        manifest = json.loads((graphs / "manifest.json").read_text())
        from crystal_transfer.graphs.shards import read_header

        for entry in manifest["shards"]:
            arrays = map_arrays(graphs / entry["file"])
            meta = read_header(graphs / entry["file"])["meta"]
            ptr = arrays["atom_ptr"]
            for k, crystal_id in enumerate(meta["ids"]):
                a0, a1 = ptr[k], ptr[k + 1]
                found[crystal_id] = tuple(np.array(arrays[name][a0:a1]) for name in
                                          ("numbers", "nbr_idx", "nbr_dist", "nbr_count")) + (arrays["radius"][k],)
        return found

    single, triple = graph_of(built[1][1]), graph_of(built[3][1])
    assert len(single) >= 350 and len(triple) == 3 * len(single)
    for crystal_id, arrays in single.items():
        for copy in (crystal_id, f"{crystal_id}~1", f"{crystal_id}~2"):
            for ours, theirs in zip(arrays, triple[copy], strict=True):
                np.testing.assert_array_equal(ours, theirs, err_msg=copy)
    # the batch a model sees, and the model's output, for the same crystals out of either dataset
    chosen = sorted(single)[::7]
    torch.manual_seed(0)
    model = CGCNN(targets=LABELS).eval()
    outputs = []
    for table, graphs in built.values():
        dataset = GraphDataset(graphs, ids=chosen, targets=LABELS, table=table)
        batch = dataset.collate([dataset[i] for i in range(len(dataset))])
        with torch.no_grad():
            outputs.append((batch, model(batch)))
    (first, out1), (second, out3) = outputs
    for name in ("numbers", "nbr_idx", "nbr_dist", "nbr_mask", "crystal", "targets"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert torch.equal(out1, out3)


def test_a_dataset_over_more_shards_than_it_keeps_open(mp2018_texts, mp2018_labels, tmp_path, monkeypatch):
    """Reading in random order across more shards than OPEN_SHARDS closes the least recently read files and reopens
    them on demand; every crystal is served as when every file stays open."""
    from crystal_transfer.data.stage import build_dataset
    from crystal_transfer.graphs import dataset as graph_dataset
    from crystal_transfer.graphs.settings import GraphSettings
    from crystal_transfer.graphs.stage import build_graphs

    spec = write_replicated(dict(list(mp2018_texts.items())[:200]), mp2018_labels, 1, tmp_path / "source")
    build_dataset("mp2018", spec, tmp_path / "data", workers=1, log=lambda _: None)
    table = tmp_path / "data" / "crystals.parquet"
    build_graphs(table, tmp_path / "graphs", GraphSettings(), shard_size=16, dataset="mp2018", workers=1,
                 log=lambda _: None)
    every = graph_dataset.GraphDataset(tmp_path / "graphs", targets=LABELS, table=table)
    order = np.random.default_rng(0).permutation(len(every)).tolist() * 2
    expected = {i: every[i] for i in order}
    monkeypatch.setattr(graph_dataset, "OPEN_SHARDS", 3)
    few = graph_dataset.GraphDataset(tmp_path / "graphs", targets=LABELS, table=table)
    for i in order:
        item = few[i]
        assert len(few._open) <= 3
        for name in ("numbers", "nbr_idx", "nbr_dist", "nbr_count"):
            np.testing.assert_array_equal(getattr(item, name), getattr(expected[i], name))
    assert len(few._readers) > 10 and sum(reader.fd is not None for reader in few._readers.values()) <= 3
