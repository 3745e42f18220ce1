"""The ``transfer`` stage: one transfer run (or the from-scratch baseline) of a pretrained source on a split.

``freeze`` copies the source's embedding and first k convolutions and freezes them, re-initialising the rest;
``finetune`` copies every layer but the head and trains them all; ``scratch`` copies nothing. With a
frozen-feature cache (:mod:`crystal_transfer.experiments.frozen_features`) the frozen layers are not rerun.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from crystal_transfer.config import validate_transfer_spec
from crystal_transfer.errors import InputError
from crystal_transfer.experiments.fit import run_training
from crystal_transfer.models.cgcnn import CGCNN

MODES = ("scratch", "freeze", "finetune")


def build_transfer_model(
    target: str,
    mode: str,
    depth: int,
    seed: int,
    source: CGCNN | None = None,
    architecture: dict[str, Any] | None = None,
    layer_lr_decay: float = 1.0,
) -> CGCNN:
    """A one-target model for transfer, its parameters initialised from ``seed``.

    ``scratch``: fresh model of ``architecture`` (or the source's). ``freeze``: copy the source's embedding and
    first ``depth`` convolutions and freeze them; the deeper layers and the head stay freshly initialised.
    ``finetune``: copy the embedding, every convolution and ``conv_to_fc`` (and hidden layers), train them all;
    only the output head is new; with ``layer_lr_decay`` d < 1 the last convolution learns at d times the
    learning rate, the one below at d², ..., the embedding at d^(n_conv + 1) (``model.lr_scales``).
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, not {mode!r}")
    if mode != "scratch" and source is None:
        raise InputError(f"mode {mode!r} needs a pretrained source model")
    args = dict(source.init_args if source is not None else {})
    args.update(architecture or {})
    args["targets"] = [target]
    torch.manual_seed(seed)
    model = CGCNN(**args)
    if mode == "scratch":
        return model
    assert source is not None
    if mode == "freeze":
        if not 1 <= depth <= len(model.convs):
            raise InputError(f"freeze depth must be in 1..{len(model.convs)}, not {depth}")
        modules = [("embedding", model.embedding, source.embedding)] + [
            (f"convs.{i}", model.convs[i], source.convs[i]) for i in range(depth)
        ]
    else:
        modules = [
            ("embedding", model.embedding, source.embedding),
            ("convs", model.convs, source.convs),
            ("conv_to_fc", model.conv_to_fc, source.conv_to_fc),
        ]
        if hasattr(model, "fcs"):
            modules.append(("fcs", model.fcs, source.fcs))
    for _, new, old in modules:
        new.load_state_dict(old.state_dict())
        if mode == "freeze":
            for parameter in new.parameters():
                parameter.requires_grad_(False)
    if mode == "freeze":
        model.frozen_depth = depth
    elif layer_lr_decay != 1.0:
        n = len(model.convs)
        model.lr_scales = {f"convs.{i}.": layer_lr_decay ** (n - i) for i in range(n)}
        model.lr_scales["embedding."] = layer_lr_decay ** (n + 1)
    return model


def run(
    name: str,
    source: str | Path,
    mode: str,
    depth: int,
    seed: int,
    target: str,
    graphs: str | Path,
    table: str | Path,
    split: str | Path,
    spec: dict[str, Any],
    out: str | Path,
    train_size: int = 0,
    cache: str | Path | None = None,
    log=print,
    transform: str | None = None,
) -> dict[str, Any]:
    """The ``transfer`` stage: train ``source`` transferred by ``mode`` (at ``depth``) on ``target``, one seed;
    the label learned transformed by ``transform`` (identity or log10; default: the label's own)."""
    from crystal_transfer.data.split import read_split
    from crystal_transfer.experiments.frozen_features import CachedFeatureDataset, load_frozen_features
    from crystal_transfer.graphs.dataset import GraphDataset
    from crystal_transfer.models.saved import TRANSFER_KEYS, check_graph_settings, load_model
    from crystal_transfer.training.trainer import TrainSettings

    spec = validate_transfer_spec(spec)
    parts = read_split(split)
    if train_size:
        parts = {**parts, "train": parts["train"][:train_size]}
    datasets = {
        part: GraphDataset(graphs, ids=parts[part], targets=[target], table=table) for part in ("train", "val", "test")
    }
    trunk = None
    if source not in (None, "", "none"):
        saved = load_model(source)
        check_graph_settings(
            saved.graph_settings, datasets["train"].settings.as_dict(), keys=TRANSFER_KEYS, graphs=graphs
        )
        trunk = saved.model
    # a model trained from scratch takes its Gaussians' range from the graphs (a source's equals them: checked)
    architecture = {"radius": datasets["train"].settings.radius, **(spec.get("architecture") or {})}
    settings = TrainSettings.from_dict({**spec["train"], "seed": seed})
    model = build_transfer_model(target, mode, depth, seed, trunk, architecture, settings.layer_lr_decay)
    if cache:
        features = load_frozen_features(cache)
        if int(features["depth"]) != depth:
            raise InputError(f"{cache} holds features at depth {features['depth']}, not {depth}")
        datasets = {part: CachedFeatureDataset(data, features) for part, data in datasets.items()}
    record = {
        "source": name,
        "mode": mode,
        "depth": depth if mode == "freeze" else 0,
        "seed": seed,
        "target": target,
        "train_size": len(parts["train"]),
        "cached": bool(cache),
    }
    return run_training(model, graphs, table, parts, settings, out, record, datasets=datasets, log=log,
                        transforms={target: transform} if transform else None)
