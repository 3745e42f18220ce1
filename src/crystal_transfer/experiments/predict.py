"""Predict with any saved model on a CIF/POSCAR folder, a .tar/.tar.gz of them, or a canonical table.

Graphs are built on the fly with the model's own graph settings. A crystal that cannot be predicted (parse
error, isolated atom under the ``drop`` policy, unknown element) gets an empty prediction and its reason in
the ``error`` column: nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from crystal_transfer.atomic import write_csv
from crystal_transfer.data.sources.local import _crystal_id, structure_files, structure_format
from crystal_transfer.data.structures import Rejection, parse_crystal
from crystal_transfer.errors import InputError
from crystal_transfer.graphs.crystal_graph import crystal_graph
from crystal_transfer.graphs.dataset import CrystalItem, collate_graphs
from crystal_transfer.graphs.settings import GraphSettings
from crystal_transfer.models.saved import load_model

BATCH = 128


def _crystals(path: Path) -> Iterator[tuple[str, tuple[np.ndarray, np.ndarray, np.ndarray] | str]]:
    """(id, (lattice, frac_coords, numbers) or an error message) for every crystal of the input."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["id", "lattice", "frac_coords", "numbers"]).to_pydict()
        for crystal_id, lattice, frac, numbers in zip(
            table["id"], table["lattice"], table["frac_coords"], table["numbers"], strict=True
        ):
            yield crystal_id, (np.reshape(lattice, (3, 3)), np.reshape(frac, (-1, 3)), np.asarray(numbers))
        return
    for member, payload, _ in structure_files(path):
        crystal_id = _crystal_id(member)
        fmt = structure_format(member)
        if payload is None or fmt is None:
            yield crystal_id, f"skipped '{member}': unsafe name or not a CIF/POSCAR file"
            continue
        try:
            parsed = parse_crystal(fmt, payload.decode("utf-8", errors="replace"), max_z=118)
        except Rejection as rejection:
            yield crystal_id, str(rejection)
            continue
        yield crystal_id, (parsed.lattice, parsed.frac_coords, parsed.numbers)


def _graph_model(model_dir: str | Path):
    """The saved model at ``model_dir``; refused in one line when it takes cached features, not crystal graphs."""
    saved = load_model(model_dir)
    if saved.graph_settings is None:
        raise InputError(
            f"{model_dir} holds a {type(saved.model).__name__} on cached features ({saved.inputs}): "
            "predict needs a model that takes crystal graphs"
        )
    return saved


def predict_to_csv(model_dir: str | Path, input_path: str | Path, out: str | Path, workers: int = 0) -> int:
    """Write ``id, <target> (unit)..., error`` for every crystal of ``input_path``; returns the row count."""
    saved = _graph_model(model_dir)
    gs = saved.graph_settings
    settings = GraphSettings(radius=gs["radius"], max_num_nbr=gs["max_num_nbr"], cgcnn_padding=gs["cgcnn_padding"])
    targets = list(saved.model.targets)
    header = ["id"] + [f"{t} ({saved.normalizers[t].unit})" if saved.normalizers[t].unit else t for t in targets]
    rows: list[list[str]] = []
    pending: list[CrystalItem] = []

    def flush() -> None:
        if not pending:
            return
        batch = collate_graphs(pending, cgcnn_padding=settings.cgcnn_padding)
        try:
            outputs = saved.predict(batch)
        except ValueError as exc:  # e.g. an element without CGCNN features: predict one by one to isolate it
            if len(pending) > 1:
                items = list(pending)
                pending.clear()
                for item in items:
                    pending.append(item)
                    flush()
                return
            rows.append([pending[0].id] + [""] * len(targets) + [str(exc)])
            pending.clear()
            return
        for index, item in enumerate(pending):
            rows.append([item.id] + [f"{float(outputs[t][index]):.6g}" for t in targets] + [""])
        pending.clear()

    with torch.no_grad():
        for crystal_id, crystal in _crystals(Path(input_path)):
            if isinstance(crystal, str):
                rows.append([crystal_id] + [""] * len(targets) + [crystal])
                continue
            lattice, frac, numbers = crystal
            graph = crystal_graph(lattice, frac, numbers, settings)
            if isinstance(graph, str):
                rows.append([crystal_id] + [""] * len(targets) + [graph])
                continue
            pending.append(
                CrystalItem(
                    id=crystal_id,
                    numbers=np.asarray(numbers),
                    nbr_idx=graph.nbr_idx,
                    nbr_dist=graph.nbr_dist,
                    nbr_count=graph.nbr_count,
                    targets=np.zeros(0, np.float32),
                )
            )
            if len(pending) == BATCH:
                flush()
        flush()
    write_csv(out, header + ["error"], rows)
    return len(rows)


def run(model: str | Path, input_path: str | Path, out: str | Path, workers: int = 0, log=print) -> int:
    """The ``predict`` command: predictions of a saved model for every crystal of ``input_path``."""
    count = predict_to_csv(model, input_path, out, workers=workers)
    log(f"wrote {count} predictions -> {out}")
    return count
