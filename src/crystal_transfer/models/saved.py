"""One saved-model format for every model of the project: a folder with plain weights and a JSON card.

Layout of ``<folder>/``:

- ``weights.pt``: the state dict (plain tensors only) written by ``torch.save``; read with
  ``torch.load(..., weights_only=True)``, so loading never unpickles arbitrary objects.
- ``model.json``: ``format`` / ``format_version``; ``architecture`` {``class``, ``init_args``};
  ``graph_settings`` {radius, max_num_nbr, cgcnn_padding, gaussian_min, gaussian_step, gaussian_width} for a
  model that takes graphs (CGCNN), else null; ``inputs`` (what a model that does not take graphs reads, e.g.
  the frozen features of a set model: source model and its weights' sha256, level, feature width), else null;
  ``normalizers`` {target: {mean, std, transform, unit}}; ``training`` (free-form config);
  ``data_fingerprint`` {``sha256`` of the sorted training ids joined by newlines, ``num_ids``} or null;
  ``provenance`` (free-form, e.g. the published checkpoint a model was converted from);
  ``weights_sha256`` (checked on load).

``weights.pt`` is written first and ``model.json`` last, each atomically: a folder whose ``model.json``
is missing, or names other weights, is an unfinished save and fails to load.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crystal_transfer.atomic import sha256_file, write_json
from crystal_transfer.errors import InputError, UserError
from crystal_transfer.models.cgcnn import CGCNN
from crystal_transfer.models.set_model import SetModel
from crystal_transfer.tensor_files import load_tensors, save_tensors
from crystal_transfer.training.normalizer import Normalizer

FORMAT = "crystal_transfer.models.saved"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.pt"
CARD_FILE = "model.json"
# Every class a card may name. A class whose ``takes_graphs`` is False (the set model) is saved with ``inputs``
# instead of graph settings.
MODEL_CLASSES: dict[str, type[nn.Module]] = {"CGCNN": CGCNN, "SetModel": SetModel}
# Settings the graph shards must share with the model; the Gaussian settings are the model's own.
GRAPH_KEYS = ("radius", "max_num_nbr", "cgcnn_padding")
# A trunk transferred to new graphs needs their radius and neighbour count; the padding may differ, because the
# transferred model is trained again on the new graphs.
TRANSFER_KEYS = ("radius", "max_num_nbr")
GAUSSIAN_KEYS = ("gaussian_min", "gaussian_step", "gaussian_width")
CARD_KEYS = ("architecture", "graph_settings", "normalizers", "training", "data_fingerprint", "provenance",
             "weights_sha256")


class GraphSettingsMismatch(UserError, ValueError):
    """The graphs were built with settings other than those the model was trained with."""


def data_fingerprint(ids: Iterable[str]) -> dict[str, Any]:
    """``{"sha256", "num_ids"}`` of a training set: sha256 (hex) of its sorted, de-duplicated ids joined by newlines,
    and their number (NumPy's sort: code-point order, as Python's, for a million ids in a fraction of the time)."""
    unique = np.unique(np.asarray(list(ids), dtype=str)).tolist()
    return {"sha256": hashlib.sha256("\n".join(unique).encode()).hexdigest(), "num_ids": len(unique)}


def fingerprint_ids(ids: Iterable[str]) -> str:
    """sha256 (hex) of the sorted, de-duplicated ids joined by newlines: the identity of a training set."""
    return data_fingerprint(ids)["sha256"]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def check_graph_settings(
    model_settings: Mapping[str, Any] | None,
    data_settings: Mapping[str, Any],
    keys: Sequence[str] = GRAPH_KEYS,
    graphs: str | Path | None = None,
) -> None:
    """Raise :class:`GraphSettingsMismatch` naming every setting in which the graphs differ from the model.

    ``keys`` (by default ``radius``, ``max_num_nbr`` and ``cgcnn_padding``; :data:`TRANSFER_KEYS` for a
    transferred trunk) must be present in both; Gaussian settings are compared when the graphs record them.
    ``graphs`` (their folder) is named in the message. ``model_settings`` None (a model that does not take
    graphs) is an :class:`InputError`.
    """
    if model_settings is None:
        raise InputError(
            f"graphs{f' in {graphs}' if graphs else ''}: the model does not take graphs (it reads cached features)"
        )
    problems = []
    for key in keys:
        if key not in model_settings:
            raise KeyError(f"model graph settings lack {key!r}")
        if key not in data_settings:
            problems.append(
                f"the graphs do not record {key} (the model was trained with {key}={model_settings[key]!r})"
            )
        elif not _same(model_settings[key], data_settings[key]):
            problems.append(
                f"model was trained with {key}={model_settings[key]!r} but the graphs use "
                f"{key}={data_settings[key]!r}; set graphs.{key}: {model_settings[key]} in the config and rebuild "
                "the graphs, or use a matching model"
            )
    for key in GAUSSIAN_KEYS:
        if key in data_settings and key in model_settings and not _same(model_settings[key], data_settings[key]):
            problems.append(
                f"model was trained with {key}={model_settings[key]!r} but the graphs use "
                f"{key}={data_settings[key]!r}; use a model trained with matching edge features"
            )
    if problems:
        where = f"graphs in {graphs}: " if graphs else ""
        raise GraphSettingsMismatch(where + "; ".join(problems))


@dataclass
class SavedModel:
    """A model with everything needed to use it correctly: its inputs (graph settings, or ``inputs`` for a model
    on cached features), normalisers, provenance."""

    model: nn.Module
    graph_settings: dict[str, Any] | None
    normalizers: dict[str, Normalizer]
    training: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] | None = None

    @torch.no_grad()
    def predict(self, batch: Any) -> dict[str, torch.Tensor]:
        """Predictions in physical units (e.g. eV/atom, GPa) per target, in eval mode; (B,) each."""
        self.model.eval()
        outputs = self.model(batch)
        return {name: self.normalizers[name].to_physical(outputs[:, i]) for i, name in enumerate(self.model.targets)}


def model_graph_settings(model: CGCNN, radius: float, max_num_nbr: int, cgcnn_padding: bool) -> dict[str, Any]:
    """The graph settings of ``model`` trained on graphs built with ``radius``, ``max_num_nbr``, padding."""
    if not _same(float(radius), model.radius):
        raise InputError(f"graphs use radius={radius} but the model's Gaussians end at radius={model.radius}")
    return {
        "radius": float(radius),
        "max_num_nbr": int(max_num_nbr),
        "cgcnn_padding": bool(cgcnn_padding),
        "gaussian_min": model.gaussian_min,
        "gaussian_step": model.gaussian_step,
        "gaussian_width": model.gaussian_width,
    }


def save_model(
    folder: str | Path,
    model: nn.Module,
    graph_settings: Mapping[str, Any] | None,
    normalizers: Mapping[str, Normalizer],
    training: Mapping[str, Any] | None = None,
    train_ids: Iterable[str] | None = None,
    provenance: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Any] | None = None,
    fingerprint: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model`` into ``folder`` (created if needed) and return the folder.

    ``graph_settings`` come from :func:`model_graph_settings` and are required for a model that takes graphs,
    None otherwise; ``inputs`` (what the model reads instead) is required for a model that does not;
    ``normalizers`` must cover every target; ``train_ids`` (the ids the model was fitted on) are stored as a
    fingerprint only (``fingerprint``: that of :func:`data_fingerprint`, when the caller has it already).
    """
    folder = Path(folder)
    class_name = type(model).__name__
    if MODEL_CLASSES.get(class_name) is not type(model):
        raise TypeError(f"cannot save a {class_name}: known model classes are {sorted(MODEL_CLASSES)}")
    missing = [name for name in model.targets if name not in normalizers]
    if missing:
        raise ValueError(f"no normaliser for targets {missing}")
    if getattr(model, "takes_graphs", True):
        if graph_settings is None:
            raise ValueError(f"a {class_name} takes graphs: its graph settings are required")
        missing_keys = [key for key in (*GRAPH_KEYS, *GAUSSIAN_KEYS) if key not in graph_settings]
        if missing_keys:
            raise ValueError(f"graph settings lack {missing_keys}")
    elif graph_settings is not None or not inputs:
        raise ValueError(f"a {class_name} does not take graphs: give the inputs it reads, not graph settings")
    if fingerprint is None and train_ids is not None:
        fingerprint = data_fingerprint(train_ids)
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    weights_sha256 = sha256_file(save_tensors(state, folder / WEIGHTS_FILE))
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": {"class": class_name, "init_args": model.init_args},
        "graph_settings": None if graph_settings is None else dict(graph_settings),
        **({} if inputs is None else {"inputs": dict(inputs)}),  # absent for graph models: their cards unchanged
        "normalizers": {name: normalizers[name].as_dict() for name in model.targets},
        "training": dict(training or {}),
        "data_fingerprint": None if fingerprint is None else dict(fingerprint),
        "provenance": dict(provenance or {}),
        "weights_sha256": weights_sha256,
    }
    write_json(folder / CARD_FILE, json.loads(json.dumps(card)))
    return folder


def load_model(folder: str | Path, map_location: str | torch.device = "cpu") -> SavedModel:
    """Load a folder written by :func:`save_model` (weights through ``weights_only=True``), in eval mode."""
    folder = Path(folder)
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise FileNotFoundError(f"{card_path} is missing: not a saved model, or an unfinished save")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{card_path} is not a readable model card ({type(exc).__name__}: {exc})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT or card.get("format_version") != FORMAT_VERSION:
        found = (card.get("format"), card.get("format_version")) if isinstance(card, dict) else (None, None)
        raise InputError(f"{card_path}: unknown format {found[0]!r} v{found[1]!r}")
    missing = [key for key in CARD_KEYS if key not in card]
    if missing:
        raise InputError(f"{card_path} is damaged: it lacks {', '.join(missing)}")
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file() or sha256_file(weights_path) != card["weights_sha256"]:
        raise InputError(f"{weights_path} is missing or does not match the sha256 in {card_path} (unfinished or "
                         "altered save)")
    architecture = card["architecture"]
    class_name = architecture.get("class") if isinstance(architecture, dict) else None
    if class_name not in MODEL_CLASSES:
        raise InputError(f"{card_path}: unknown model class {class_name!r}")
    try:
        model = MODEL_CLASSES[class_name](**architecture["init_args"])
        model.load_state_dict(load_tensors(weights_path, f"weights {weights_path}", map_location=map_location))
        normalizers = {name: Normalizer.from_dict(data) for name, data in card["normalizers"].items()}
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        if isinstance(exc, UserError):
            raise
        first = " ".join(str(exc).split())[:200]
        raise InputError(
            f"{card_path} does not describe the weights beside it ({type(exc).__name__}: {first})"
        ) from None
    model.to(map_location).eval()
    return SavedModel(
        model=model,
        graph_settings=card["graph_settings"],
        normalizers=normalizers,
        training=card["training"],
        data_fingerprint=card["data_fingerprint"],
        provenance=card["provenance"],
        inputs=card.get("inputs"),
    )
