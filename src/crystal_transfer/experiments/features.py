"""The ``features`` command: a pretrained representation's features of a user's crystals, for other tools.

Any saved CGCNN model (a published checkpoint converted here, or one trained or transferred by the pipeline) at
a level 0..n_conv (atom features after the embedding and that many convolutions, mean-pooled per crystal, as
CGCNN pools) or ``crystal`` (its crystal vector, the input of the output head: ``CGCNN.crystal_features``), or a
universal potential (``chgnet``, ``sevenn``: the optional extra) at one of its levels. The output is one Parquet
row per crystal of the input, in its order: ``id``, ``n_atoms``, ``error`` (empty, or ``reason: message`` for a
crystal without features, whose feature columns are then null) and ``f0 .. f{F-1}``; with ``per_atom`` a second
file holds one row per atom (``id``, ``atom``, ``Z``, ``f...``). The source, level, pooling and the weights' sha256
are in the Parquet schema's metadata (key ``crystal_transfer``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crystal_transfer.atomic import atomic_path, sha256_file
from crystal_transfer.data.structures import DEFAULT_MIN_DISTANCE, Rejection
from crystal_transfer.errors import InputError
from crystal_transfer.experiments.predict import (
    BATCH,
    DEFAULT_MAX_Z,
    UNSUPPORTED_ELEMENT,
    Crystal,
    graph_item,
    graph_model,
    read_crystals,
)
from crystal_transfer.graphs.dataset import CrystalItem, collate_graphs
from crystal_transfer.graphs.settings import GraphSettings
from crystal_transfer.models.cgcnn import CGCNN
from crystal_transfer.models.universal import FEATURISATION_FAILED, SOURCES

METADATA_KEY = b"crystal_transfer"
MAX_Z = 118


class CrystalFeatures:
    """Per crystal of the input (by position): its atom count and pooled features, or why it has none; per atom
    (when asked for) the atom features of each crystal that has them."""

    def __init__(self, per_atom: bool) -> None:
        self.ids: list[str] = []
        self.numbers: list[np.ndarray | None] = []
        self.pooled: list[np.ndarray | None] = []
        self.errors: list[str] = []
        self.atoms: dict[int, np.ndarray] | None = {} if per_atom else None

    def add(self, crystal_id: str, numbers: np.ndarray | None) -> int:
        self.ids.append(crystal_id)
        self.numbers.append(numbers)
        self.pooled.append(None)
        self.errors.append("")
        return len(self.ids) - 1

    def fail(self, position: int, reason: object) -> None:
        self.errors[position] = str(reason)

    def set(self, position: int, pooled: np.ndarray, atoms: np.ndarray | None) -> None:
        if not (np.isfinite(pooled).all() and (atoms is None or np.isfinite(atoms).all())):
            self.fail(position, "non_finite_features: the model gave non-finite features")
            return
        self.pooled[position] = pooled.astype(np.float32)
        if self.atoms is not None and atoms is not None:
            self.atoms[position] = atoms.astype(np.float32)


def _cgcnn_features(model: CGCNN, level: int | str, items: list[CrystalItem], cgcnn_padding: bool
                    ) -> tuple[np.ndarray, list[torch.Tensor] | None]:
    """(crystals, F) pooled features of ``items`` and, for an atom level, each crystal's (atoms, F) features."""
    device = next(model.parameters()).device
    batch = collate_graphs(items, cgcnn_padding=cgcnn_padding).to(device)
    if level == "crystal":
        return model.crystal_features(batch).cpu().numpy(), None
    atoms = model.atom_features(batch, depth=int(level))
    pooled = CGCNN.pool(atoms, batch.crystal, batch.num_crystals).cpu().numpy()
    sizes = torch.bincount(batch.crystal, minlength=batch.num_crystals).tolist()
    return pooled, list(torch.split(atoms.cpu(), sizes))


def _from_cgcnn(model_dir: str | Path, level: int | str, input_path: Path, found: CrystalFeatures,
                max_z: int | None, min_distance: float | None, device: str) -> dict[str, Any]:
    from crystal_transfer.training.trainer import pick_device

    saved = graph_model(model_dir)
    model = saved.model.to(pick_device(device)).eval()
    n_conv = len(model.convs)
    if level != "crystal" and not 0 <= int(level) <= n_conv:
        raise InputError(f"{model_dir} has levels 0..{n_conv} (atom features after that many convolutions) and "
                         f"'crystal', not {level!r}")
    filters = saved.training.get("data_filters", {})
    max_z = int(filters.get("max_z", DEFAULT_MAX_Z) if max_z is None else max_z)
    min_distance = float(filters.get("min_distance", DEFAULT_MIN_DISTANCE) if min_distance is None else min_distance)
    gs = saved.graph_settings
    settings = GraphSettings(radius=gs["radius"], max_num_nbr=gs["max_num_nbr"], cgcnn_padding=gs["cgcnn_padding"])

    def featurise(pending: list[tuple[int, CrystalItem]]) -> None:
        try:
            pooled, atoms = _cgcnn_features(model, level, [item for _, item in pending], settings.cgcnn_padding)
        except InputError as exc:  # e.g. an element without CGCNN features: one by one, to find the crystal
            if len(pending) > 1:
                for entry in pending:
                    featurise([entry])
            else:
                reason = UNSUPPORTED_ELEMENT if "element features" in str(exc) else FEATURISATION_FAILED
                found.fail(pending[0][0], f"{reason}: {exc}")
            return
        for index, (position, _) in enumerate(pending):
            found.set(position, pooled[index], None if atoms is None else atoms[index].numpy())

    pending: list[tuple[int, CrystalItem]] = []
    with torch.no_grad():
        for crystal_id, crystal in read_crystals(input_path, max_z, min_distance):
            position = found.add(crystal_id, None if isinstance(crystal, Rejection) else np.asarray(crystal[2]))
            item = crystal if isinstance(crystal, Rejection) else graph_item(crystal_id, crystal, settings)
            if not isinstance(item, CrystalItem):
                found.fail(position, item)
                continue
            pending.append((position, item))
            if len(pending) == BATCH:
                featurise(pending)
                pending = []
        if pending:
            featurise(pending)
    weights = Path(model_dir) / "weights.pt"
    return {"source": str(model_dir), "source_weights_sha256": sha256_file(weights) if weights.is_file() else None,
            "graph_settings": gs, "pooling": "none" if level == "crystal" else "mean"}


def _from_universal(kind: str, level: int | str, input_path: Path, found: CrystalFeatures, max_z: int | None,
                    min_distance: float | None, device: str, log) -> dict[str, Any]:
    from pymatgen.core import Lattice, Structure

    from crystal_transfer.models import universal

    source = universal.source_of(kind)
    if level not in source.levels:
        raise InputError(f"{kind} ({source.model}) has no feature level {level!r}; its levels: "
                         f"{', '.join(map(str, source.levels))}")
    extractor = universal.extractor(kind, device)
    keys: list[str] = []  # the input position of each crystal handed to the model (ids may repeat in an input)
    structures: list[Structure] = []
    crystal: Crystal | Rejection
    # no element cut by default: the potential refuses what it was not trained on, each with its reason
    for crystal_id, crystal in read_crystals(input_path, MAX_Z if max_z is None else max_z,
                                             DEFAULT_MIN_DISTANCE if min_distance is None else min_distance):
        if isinstance(crystal, Rejection):
            found.fail(found.add(crystal_id, None), crystal)
            continue
        lattice, frac, numbers = crystal
        keys.append(str(found.add(crystal_id, np.asarray(numbers))))
        structures.append(Structure(Lattice(lattice), [int(z) for z in numbers], frac))
    result = extractor.features(keys, structures, log=log)
    for entry in result.rejected:
        found.fail(int(entry["id"]), f"{entry['reason']}: {entry['message']}")
    features = result.levels[level].numpy()
    start = 0
    for row, (key, count) in enumerate(zip(result.ids, result.atom_counts, strict=True)):
        if level == "crystal":
            found.set(int(key), features[row], None)
            continue
        atoms = features[start:start + count]
        start += count
        found.set(int(key), atoms.mean(axis=0), atoms)
    return {"source": f"{source.requirement()} ({source.model})", "source_weights_sha256": source.sha256,
            "pooling": "the model's own" if level == "crystal" else "mean"}


def _write(path: Path, columns: dict[str, Any], width: int, features: Sequence[np.ndarray | None],
           metadata: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    matrix = np.full((len(features), width), np.nan, dtype=np.float32)
    present = np.array([f is not None for f in features], dtype=bool)
    for row, values in enumerate(features):
        if values is not None:
            matrix[row] = values
    arrays = {name: pa.array(values) for name, values in columns.items()}
    for column in range(width):
        arrays[f"f{column}"] = pa.array(matrix[:, column], mask=~present)
    table = pa.table(arrays).replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def set_model_source(inputs: dict[str, Any]) -> str | Path:
    """What featurises new crystals for a set model saved with ``inputs`` (its card's): the CGCNN trunk's saved
    folder when it is still there with the weights the model was trained on, else the universal potential whose
    pinned checkpoint has those weights; an :class:`InputError` when neither."""
    folder = Path(str(inputs.get("source", "")))
    sha = inputs.get("source_weights_sha256")
    if (folder / "weights.pt").is_file() and sha256_file(folder / "weights.pt") == sha:
        return folder
    kind = next((kind for kind, source in SOURCES.items() if source.sha256 == sha), None)
    if kind is None:
        raise InputError(f"the set model's feature source {inputs.get('source')!r} (weights sha256 {sha}) is neither "
                         "a saved model folder with those weights nor a known universal potential: it is needed to "
                         "featurise new crystals")
    return kind


def collect_features(model: str | Path, level: int | str, input_path: str | Path, per_atom: bool = False,
                     max_z: int | None = None, min_distance: float | None = None, device: str = "cpu",
                     log=print) -> tuple[CrystalFeatures, dict[str, Any]]:
    """The features of ``model`` (a saved CGCNN folder, or ``chgnet`` / ``sevenn``) at ``level`` for every crystal
    of ``input_path``, in memory, and their provenance."""
    found = CrystalFeatures(per_atom=per_atom)
    if str(model) in SOURCES:
        provenance = _from_universal(str(model), level, Path(input_path), found, max_z, min_distance, device, log)
    else:
        provenance = _from_cgcnn(model, level, Path(input_path), found, max_z, min_distance, device)
    return found, provenance


def export_features(model: str | Path, level: int | str, input_path: str | Path, out: str | Path,
                    per_atom: str | Path | None = None, max_z: int | None = None, min_distance: float | None = None,
                    device: str = "cpu", log=print) -> dict[str, int]:
    """Write the features of ``model`` (a saved model folder, or ``chgnet`` / ``sevenn``) at ``level`` for every
    crystal of ``input_path`` to the Parquet file ``out`` (and per atom to ``per_atom``); returns counts
    (``rows``, ``featurised``, ``failed``, ``width``)."""
    input_path = Path(input_path)
    if per_atom and level == "crystal":
        raise InputError("per-atom features need an atom level (0..n); 'crystal' is one vector per crystal")
    found, provenance = collect_features(model, level, input_path, bool(per_atom), max_z, min_distance, device, log)
    width = next((len(f) for f in found.pooled if f is not None), 0)
    metadata = {**provenance, "level": level, "width": width}
    counts = [len(n) if n is not None else None for n in found.numbers]
    _write(Path(out), {"id": found.ids, "n_atoms": counts, "error": found.errors}, width, found.pooled, metadata)
    if found.atoms is not None:
        positions = sorted(found.atoms)
        atom_ids = [found.ids[p] for p in positions for _ in range(len(found.atoms[p]))]
        index = [i for p in positions for i in range(len(found.atoms[p]))]
        numbers = [int(z) for p in positions for z in found.numbers[p]]
        rows = [row for p in positions for row in found.atoms[p]]
        _write(Path(per_atom), {"id": atom_ids, "atom": index, "Z": numbers}, width, rows,
               {**metadata, "pooling": "none (per atom)"})
    failed = sum(1 for error in found.errors if error)
    return {"rows": len(found.ids), "featurised": len(found.ids) - failed, "failed": failed, "width": width}


def run(model: str | Path, level: int | str, input_path: str | Path, out: str | Path,
        per_atom: str | Path | None = None, max_z: int | None = None, min_distance: float | None = None,
        device: str = "cpu", log=print) -> dict[str, int]:
    """The ``features`` command: ``model``'s features at ``level`` for every crystal of ``input_path``."""
    counts = export_features(model, level, input_path, out, per_atom, max_z, min_distance, device, log)
    failed = f", {counts['failed']} without features (reason in the error column)" if counts["failed"] else ""
    log(f"wrote {counts['rows']} rows of {counts['width']} features -> {out}: {counts['featurised']} featurised"
        f"{failed}" + (f"; per atom -> {per_atom}" if per_atom else ""))
    return counts
