"""Predict with any saved model on a CIF/POSCAR folder, a .tar/.tar.gz of them, or a canonical table.

Graphs are built on the fly with the model's own graph settings. Every crystal of the input gets one row, in
the input's order. A crystal that cannot be predicted gets empty predictions and its reason in the ``error``
column (``reason: message``, the reason codes of the data and graph stages): a parse error, an element above the
data stage's ``max_z`` or overlapping atoms (the filters the model's training data went through, unless
``max_z`` / ``min_distance`` say otherwise), a cell the neighbour search refuses, an isolated atom, an element
without CGCNN features, or a non-finite output. Nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from crystal_transfer.atomic import write_csv
from crystal_transfer.data.sources.local import _crystal_id, structure_files, structure_format
from crystal_transfer.data.structures import (
    DEFAULT_MIN_DISTANCE,
    UNKNOWN_FORMAT,
    Rejection,
    check_arrays,
    parse_crystal,
)
from crystal_transfer.errors import InputError
from crystal_transfer.graphs.crystal_graph import GraphRejection, crystal_graph
from crystal_transfer.graphs.dataset import CrystalItem, collate_graphs
from crystal_transfer.graphs.settings import GraphSettings
from crystal_transfer.models.saved import SavedModel, load_model

BATCH = 128
DEFAULT_MAX_Z = 80  # the config schema's filters.max_z, for a model whose card records no data filters
NON_FINITE_PREDICTION = "non_finite_prediction"
UNSUPPORTED_ELEMENT = "unsupported_element"

Crystal = tuple[np.ndarray, np.ndarray, np.ndarray]  # lattice (3, 3), fractional coordinates (n, 3), numbers (n,)


def _table_crystals(path: Path, max_z: int, min_distance: float) -> Iterator[tuple[str, Crystal | Rejection]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "lattice", "frac_coords", "numbers"]).to_pydict()
    for crystal_id, lattice, frac, numbers in zip(
        table["id"], table["lattice"], table["frac_coords"], table["numbers"], strict=True
    ):
        lattice, frac, numbers = np.reshape(lattice, (3, 3)), np.reshape(frac, (-1, 3)), np.asarray(numbers)
        try:
            check_arrays("table row", lattice, frac, numbers, max_z, min_distance)
        except Rejection as rejection:
            yield crystal_id, rejection
            continue
        yield crystal_id, (lattice, frac, numbers)


def read_crystals(path: Path, max_z: int, min_distance: float) -> Iterator[tuple[str, Crystal | Rejection]]:
    """(id, crystal or the reason it cannot be used) for every crystal of a user's input (CIF/POSCAR folder,
    .tar/.tar.gz of them, or a canonical table), in its order."""
    if path.suffix == ".parquet":
        yield from _table_crystals(path, max_z, min_distance)
        return
    if not path.exists():
        raise FileNotFoundError(f"predict input not found: {path}")
    for member, payload, _ in structure_files(path):
        crystal_id = _crystal_id(member)
        fmt = structure_format(member)
        if payload is None or fmt is None:
            yield crystal_id, Rejection(UNKNOWN_FORMAT, f"skipped '{member}': unsafe name or not a CIF/POSCAR file")
            continue
        try:
            parsed = parse_crystal(fmt, payload.decode("utf-8", errors="replace"), max_z, min_distance)
        except Rejection as rejection:
            yield crystal_id, rejection
            continue
        yield crystal_id, (parsed.lattice, parsed.frac_coords, parsed.numbers)


def graph_item(crystal_id: str, crystal: Crystal, settings: GraphSettings) -> CrystalItem | GraphRejection:
    """The unlabelled graph of one crystal, or why its graph cannot be built."""
    lattice, frac, numbers = crystal
    graph = crystal_graph(lattice, frac, numbers, settings)
    if isinstance(graph, GraphRejection):
        return graph
    return CrystalItem(id=crystal_id, numbers=np.asarray(numbers), nbr_idx=graph.nbr_idx, nbr_dist=graph.nbr_dist,
                       nbr_count=graph.nbr_count, targets=np.zeros(0, np.float32))


def graph_model(model_dir: str | Path):
    """The saved model at ``model_dir``; refused in one line when it takes cached features, not crystal graphs."""
    saved = load_model(model_dir)
    if saved.graph_settings is None:
        raise InputError(
            f"{model_dir} holds a {type(saved.model).__name__} on cached features ({saved.inputs}): "
            "predict needs a model that takes crystal graphs"
        )
    return saved


def graph_predictions(
    models: Sequence[SavedModel], input_path: str | Path, max_z: int | None = None, min_distance: float | None = None
) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, errors, predictions) of graph models (the members of an ensemble, or one) for every crystal of
    ``input_path``, in its order: each crystal is read and its graph built once, then every model predicts it.
    Predictions are physical, shaped (models, crystals, targets); a crystal with an error has NaNs. ``max_z`` /
    ``min_distance`` default to the filters of the first model's training data (its card), else the defaults."""
    # long: the rows of one input in order, predicted in batches, with each reason a crystal fails in one place
    first = models[0]
    targets = list(first.model.targets)
    for number, saved in enumerate(models[1:], start=2):
        if saved.graph_settings != first.graph_settings or list(saved.model.targets) != targets:
            raise InputError(f"model {number} of the ensemble takes other graphs or predicts other targets than the "
                             "first: the models of one ensemble share their graph settings and targets")
    filters = first.training.get("data_filters", {})
    max_z = int(filters.get("max_z", DEFAULT_MAX_Z) if max_z is None else max_z)
    min_distance = float(filters.get("min_distance", DEFAULT_MIN_DISTANCE) if min_distance is None else min_distance)
    gs = first.graph_settings
    settings = GraphSettings(radius=gs["radius"], max_num_nbr=gs["max_num_nbr"], cgcnn_padding=gs["cgcnn_padding"])
    ids: list[str] = []
    errors: list[str] = []
    values: list[np.ndarray] = []  # per crystal: (models, targets)
    pending: list[tuple[int, CrystalItem]] = []

    def predict(items: list[tuple[int, CrystalItem]]) -> None:
        try:
            batch = collate_graphs([item for _, item in items], cgcnn_padding=settings.cgcnn_padding)
            outputs = [saved.predict(batch) for saved in models]
        except ValueError as exc:  # an element without CGCNN features: one by one, to find the crystal
            if len(items) > 1:
                for item in items:
                    predict([item])
            else:
                errors[items[0][0]] = f"{UNSUPPORTED_ELEMENT}: {exc}"
            return
        for index, (position, _) in enumerate(items):
            values[position] = np.array([[float(output[t][index]) for t in targets] for output in outputs])

    with torch.no_grad():
        for crystal_id, crystal in read_crystals(Path(input_path), max_z, min_distance):
            position = len(ids)
            ids.append(crystal_id)
            errors.append("")
            values.append(np.full((len(models), len(targets)), np.nan))
            item = crystal if isinstance(crystal, Rejection) else graph_item(crystal_id, crystal, settings)
            if not isinstance(item, CrystalItem):
                errors[position] = str(item)
                continue
            pending.append((position, item))
            if len(pending) == BATCH:
                predict(pending)
                pending = []
        if pending:
            predict(pending)
    stacked = np.stack(values, axis=1) if values else np.zeros((len(models), 0, len(targets)))
    return ids, errors, stacked


def predict_to_csv(
    model_dir: str | Path,
    input_path: str | Path,
    out: str | Path,
    workers: int = 0,
    max_z: int | None = None,
    min_distance: float | None = None,
) -> dict[str, int]:
    """Write ``id, <target> (unit)..., error`` for every crystal of ``input_path``, in its order; returns counts
    (``rows``, ``predicted``, ``failed``). ``max_z`` / ``min_distance`` default to the filters of the model's
    training data (its card), else the config's defaults."""
    saved = graph_model(model_dir)
    targets = list(saved.model.targets)
    header = ["id"] + [f"{t} ({saved.normalizers[t].unit})" if saved.normalizers[t].unit else t for t in targets]
    ids, errors, values = graph_predictions([saved], input_path, max_z, min_distance)
    rows: list[list[str]] = []
    for position, crystal_id in enumerate(ids):
        row = values[0, position]
        if not errors[position] and not np.isfinite(row).all():
            errors[position] = f"{NON_FINITE_PREDICTION}: the model's output is {row.tolist()}"
        predicted = [""] * len(targets) if errors[position] else [f"{v:.6g}" for v in row]
        rows.append([crystal_id, *predicted, errors[position]])
    write_csv(out, header + ["error"], rows)
    failed = sum(1 for row in rows if row[-1])
    return {"rows": len(rows), "predicted": len(rows) - failed, "failed": failed}


def set_model_predictions(source: str | Path, level: int | str, members: list[Path], target: str,
                          input_path: str | Path, max_z: int | None, min_distance: float | None
                          ) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, errors, (members, crystals) physical predictions) of set models on the features of ``source`` (a
    CGCNN trunk's folder or a universal potential's kind) at ``level``: the crystals are featurised once."""
    from crystal_transfer.experiments.features import collect_features
    from crystal_transfer.models.set_model import FeatureBatch

    found, _ = collect_features(source, level, input_path, per_atom=True, max_z=max_z, min_distance=min_distance)
    positions = [p for p in range(len(found.ids)) if not found.errors[p]]
    values = np.full((len(members), len(found.ids)), np.nan)
    for index, member in enumerate(members):
        saved = load_model(member)
        for start in range(0, len(positions), BATCH):
            part = positions[start:start + BATCH]
            # a set model at level 'crystal' reads one row per crystal: the pooled vector
            rows = [torch.from_numpy(found.atoms[p] if p in found.atoms else found.pooled[p][None]) for p in part]
            sizes = torch.tensor([len(r) for r in rows])
            batch = FeatureBatch(torch.cat(rows), torch.repeat_interleave(torch.arange(len(part)), sizes), len(part),
                                 torch.zeros(len(part), 0), [found.ids[p] for p in part])
            values[index, part] = saved.predict(batch)[target].numpy()
    return found.ids, found.errors, values


def predict_set_model(model_dir: str | Path, input_path: str | Path, out: str | Path, max_z: int | None = None,
                      min_distance: float | None = None) -> dict[str, int]:
    """Write ``id, <target> (unit), error`` for every crystal of ``input_path`` with a set model (AtomSets): the
    crystals are featurised by its source first (:func:`~crystal_transfer.experiments.features.set_model_source`)."""
    from crystal_transfer.experiments.features import set_model_source

    saved = load_model(model_dir)
    targets = list(saved.model.targets)
    ids, errors, values = set_model_predictions(set_model_source(saved.inputs), saved.inputs["level"],
                                                [Path(model_dir)], targets[0], input_path, max_z, min_distance)
    unit = saved.normalizers[targets[0]].unit
    rows = []
    for position, crystal_id in enumerate(ids):
        value = float(values[0, position])
        if errors[position] or not np.isfinite(value):
            rows.append([crystal_id, "", errors[position] or f"{NON_FINITE_PREDICTION}: the model's output is {value}"])
        else:
            rows.append([crystal_id, f"{value:.6g}", ""])
    write_csv(out, ["id", f"{targets[0]} ({unit})" if unit else targets[0], "error"], rows)
    failed = sum(1 for row in rows if row[-1])
    return {"rows": len(rows), "predicted": len(rows) - failed, "failed": failed}


def predict_ensemble(bundle: str | Path, input_path: str | Path, out: str | Path, max_z: int | None = None,
                     min_distance: float | None = None) -> dict[str, int]:
    """Write ``id, prediction, std, error`` for every crystal of ``input_path``: the mean and the spread (std over
    the members, population form) of a seed ensemble written by the ``select`` stage, in physical units."""
    from crystal_transfer.experiments.select import ENSEMBLE_CARD

    bundle = Path(bundle)
    card = json.loads((bundle / ENSEMBLE_CARD).read_text())
    members = [bundle / member["path"] for member in card["members"]]
    if card.get("source"):
        source = card["source"]
        ids, errors, values = set_model_predictions(
            bundle / source["path"] if source["kind"] == "cgcnn" else source["kind"], source["level"], members,
            card["target"], input_path, max_z, min_distance)
    else:
        models = [graph_model(member) for member in members]
        ids, errors, predictions = graph_predictions(models, input_path, max_z, min_distance)
        targets = list(models[0].model.targets)
        if card["target"] not in targets:
            raise InputError(f"{members[0]} predicts {targets}, not the ensemble's target '{card['target']}'")
        values = predictions[:, :, targets.index(card["target"])]
    rows = []
    for position, crystal_id in enumerate(ids):
        column = values[:, position]
        if errors[position] or not np.isfinite(column).all():
            rows.append([crystal_id, "", "", errors[position] or f"{NON_FINITE_PREDICTION}: members gave {column}"])
        else:
            rows.append([crystal_id, f"{column.mean():.6g}", f"{column.std():.6g}", ""])
    write_csv(out, ["id", "prediction", "std", "error"], rows)
    failed = sum(1 for row in rows if row[-1])
    return {"rows": len(rows), "predicted": len(rows) - failed, "failed": failed, "members": len(values)}


def run(
    model: str | Path,
    input_path: str | Path,
    out: str | Path,
    workers: int = 0,
    max_z: int | None = None,
    min_distance: float | None = None,
    log=print,
) -> dict[str, int]:
    """The ``predict`` command: predictions of a saved model, or of a seed ensemble (``results/best/<target>``:
    mean and std over its members), for every crystal of ``input_path``."""
    from crystal_transfer.experiments.select import ENSEMBLE_CARD

    if (Path(model) / ENSEMBLE_CARD).is_file():
        counts = predict_ensemble(model, input_path, out, max_z=max_z, min_distance=min_distance)
    elif load_model(model).inputs:  # a set model on a source's features
        counts = predict_set_model(model, input_path, out, max_z=max_z, min_distance=min_distance)
    else:
        counts = predict_to_csv(model, input_path, out, workers=workers, max_z=max_z, min_distance=min_distance)
    failed = f", {counts['failed']} without a prediction (reason in the error column)" if counts["failed"] else ""
    log(f"wrote {counts['rows']} rows -> {out}: {counts['predicted']} predicted{failed}")
    return counts
