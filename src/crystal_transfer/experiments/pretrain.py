"""The ``pretrain`` stage: convert a published CGCNN checkpoint, or train a model on a dataset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crystal_transfer.config import validate_model_spec
from crystal_transfer.data.table import label_values, read_table
from crystal_transfer.errors import InputError
from crystal_transfer.experiments.fit import MODEL_DIR, run_training
from crystal_transfer.graphs.stage import read_manifest
from crystal_transfer.models.cgcnn import CGCNN
from crystal_transfer.training.trainer import TrainSettings


def pretrain_split(
    table_path: str | Path, targets: Sequence[str], subsample: int, val: float, test: float, seed: int
) -> dict[str, list[str]]:
    """Ids with at least one target label, sorted, shuffled with ``seed``, optionally subsampled, then cut: ``val``
    and ``test`` are fractions below 1, else numbers of crystals."""
    import pyarrow.compute as pc

    table = read_table(table_path, columns=["id", *targets])
    labelled = np.zeros(table.num_rows, dtype=bool)
    for target in targets:
        labelled |= np.isfinite(label_values(table, target))
    ids = table.column("id").filter(labelled)
    usable = ids.take(pc.sort_indices(ids))  # UTF-8 byte order: code-point order, as Python sorts str
    order = np.random.default_rng(seed).permutation(len(usable))
    chosen = np.asarray(usable.take(order).to_pylist(), dtype=object)
    if subsample:
        if subsample > len(chosen):
            raise InputError(f"subsample={subsample} but only {len(chosen)} crystals have any of {list(targets)}")
        chosen = chosen[:subsample]
    n_val, n_test = (int(size) if size >= 1 else int(round(size * len(chosen))) for size in (val, test))
    if n_val + n_test >= len(chosen):
        raise InputError(f"val={val:g} and test={test:g} leave no training crystals of the {len(chosen)} with "
                         f"any of {list(targets)}")
    return {
        "val": chosen[:n_val].tolist(),
        "test": chosen[n_val : n_val + n_test].tolist(),
        "train": chosen[n_val + n_test :].tolist(),
    }


def run(name: str, spec: dict[str, Any], out: str | Path, table: str | Path | None = None,
        graphs: str | Path | None = None, log=print) -> None:
    """The ``pretrain`` stage for the model ``name`` of the config's ``pretrain`` section (``spec``)."""
    out = Path(out)
    spec = validate_model_spec(name, spec)
    if spec["kind"] == "published":
        from crystal_transfer.models.published import convert

        convert(spec["checkpoint"], out / MODEL_DIR)
        log(f"pretrained model '{name}': published CGCNN checkpoint {spec['checkpoint']} -> {out / MODEL_DIR}")
        return
    if not (table and graphs):
        raise InputError("a model of kind 'train' needs --table and --graphs")
    targets = list(spec["targets"])
    split = pretrain_split(
        table, targets, spec.get("subsample", 0), spec.get("val", 0.1), spec.get("test", 0.1), spec.get("seed", 0)
    )
    settings = TrainSettings.from_dict({**spec["train"], "seed": spec.get("seed", 0)})
    torch.manual_seed(settings.seed)
    radius = float(read_manifest(graphs)["settings"]["radius"])  # the model's Gaussians span the graphs' radius
    model = CGCNN(targets=targets, conv_type=spec.get("conv_type", "gated"), radius=radius, **spec["architecture"])
    record = {
        "name": name,
        "kind": "pretrain",
        "dataset": spec["dataset"],
        "subsample": spec.get("subsample", 0),
        "conv_type": model.conv_type,
    }
    log(
        f"pretraining '{name}' ({model.conv_type}, {model.parameter_count():,} parameters) on "
        f"{len(split['train'])} / {len(split['val'])} / {len(split['test'])} crystals, targets {targets}"
    )
    run_training(model, graphs, table, split, settings, out, record, log=log)
