"""Command-line stages that train or use models: pretrain, frozen-features, transfer, predict.

Registered on the main parser by :func:`add_commands`; every one writes its outputs atomically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _depth(text: str) -> int | str:
    """A feature level: an integer number of convolutions, or 'crystal'."""
    return text if text == "crystal" else int(text)


def _json_arg(text: str) -> Any:
    """JSON given inline or as @file."""
    return json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from crystal_transfer.experiments.fit import MODEL_DIR, pretrain_split, run_training
    from crystal_transfer.models.cgcnn import CGCNN
    from crystal_transfer.models.published import convert
    from crystal_transfer.training.trainer import TrainSettings

    spec = _json_arg(args.spec)
    out = Path(args.out)
    if spec["kind"] == "published":
        convert(spec["checkpoint"], out / MODEL_DIR)
        print(f"pretrained model '{args.name}': published CGCNN checkpoint {spec['checkpoint']} -> {out / MODEL_DIR}")
        return 0
    if not (args.table and args.graphs):
        raise ValueError("a model of kind 'train' needs --table and --graphs")
    targets = list(spec["targets"])
    split = pretrain_split(
        args.table, targets, spec.get("subsample", 0), spec.get("val", 0.1), spec.get("test", 0.1), spec.get("seed", 0)
    )
    settings = TrainSettings.from_dict({**spec["train"], "seed": spec.get("seed", 0)})
    import torch

    torch.manual_seed(settings.seed)
    model = CGCNN(targets=targets, conv_type=spec.get("conv_type", "gated"), **spec["architecture"])
    record = {
        "name": args.name,
        "kind": "pretrain",
        "dataset": spec["dataset"],
        "subsample": spec.get("subsample", 0),
        "conv_type": model.conv_type,
    }
    print(
        f"pretraining '{args.name}' ({model.conv_type}, {model.parameter_count():,} parameters) on "
        f"{len(split['train'])} / {len(split['val'])} / {len(split['test'])} crystals, targets {targets}"
    )
    run_training(model, args.graphs, args.table, split, settings, out, record)
    return 0


def _cmd_frozen_features(args: argparse.Namespace) -> int:
    from crystal_transfer.data.split import read_split
    from crystal_transfer.experiments.frozen_features import compute_frozen_features, save_frozen_features
    from crystal_transfer.graphs.dataset import GraphDataset
    from crystal_transfer.models.saved import load_model

    saved = load_model(args.source)
    split = read_split(args.split)
    ids = split["train"] + split["val"] + split["test"]
    dataset = GraphDataset(args.graphs, ids=ids, table=args.table)
    check_transfer_graphs(saved.graph_settings, dataset.settings.as_dict(), args.source, args.graphs)
    cache = compute_frozen_features(saved.model, args.depth, dataset)
    save_frozen_features(cache, args.out, {"source": str(args.source), "depth": args.depth, "graphs": str(args.graphs)})
    print(
        f"cached atom features after depth {args.depth} of {args.source}: {len(cache['ids'])} crystals, "
        f"{tuple(cache['features'].shape)} -> {args.out}"
    )
    return 0


def check_transfer_graphs(
    model_settings: dict[str, Any], graph_settings: dict[str, Any], model: str, graphs: str
) -> None:
    """A trunk can be transferred to graphs with its radius and neighbour count; padding may differ."""
    for key in ("radius", "max_num_nbr"):
        if float(model_settings[key]) != float(graph_settings[key]):
            raise ValueError(
                f"model {model} was trained with {key}={model_settings[key]} but the graphs in {graphs} use "
                f"{key}={graph_settings[key]}: set graphs.{key}: {model_settings[key]} in the config and rebuild"
            )


def _cmd_transfer(args: argparse.Namespace) -> int:
    from crystal_transfer.data.split import read_split
    from crystal_transfer.experiments.fit import run_training, source_model
    from crystal_transfer.experiments.frozen_features import (
        CachedFeatureDataset,
        build_transfer_model,
        load_frozen_features,
    )
    from crystal_transfer.graphs.dataset import GraphDataset
    from crystal_transfer.models.saved import load_model
    from crystal_transfer.training.trainer import TrainSettings

    spec = _json_arg(args.spec)
    split = read_split(args.split)
    if args.train_size:
        split = {**split, "train": split["train"][: args.train_size]}
    source = source_model(args.source)
    if source is not None:
        check_transfer_graphs(
            load_model(args.source).graph_settings,
            GraphDataset(args.graphs, ids=split["test"][:1], table=args.table).settings.as_dict(),
            args.source,
            args.graphs,
        )
    model = build_transfer_model(args.target, args.mode, args.depth, args.seed, source, spec.get("architecture"))
    datasets = {
        part: GraphDataset(args.graphs, ids=split[part], targets=[args.target], table=args.table)
        for part in ("train", "val", "test")
    }
    if args.cache:
        cache = load_frozen_features(args.cache)
        if int(cache["depth"]) != args.depth:
            raise ValueError(f"{args.cache} holds features at depth {cache['depth']}, not {args.depth}")
        datasets = {part: CachedFeatureDataset(data, cache) for part, data in datasets.items()}
    settings = TrainSettings.from_dict({**spec["train"], "seed": args.seed})
    record = {
        "source": args.name,
        "mode": args.mode,
        "depth": args.depth if args.mode == "freeze" else 0,
        "seed": args.seed,
        "target": args.target,
        "train_size": len(split["train"]),
        "cached": bool(args.cache),
    }
    run_training(model, args.graphs, args.table, split, settings, args.out, record, datasets=datasets)
    return 0


def _cmd_atomsets(args: argparse.Namespace) -> int:
    from crystal_transfer.data.split import read_split
    from crystal_transfer.experiments.atomsets import SetModelSettings, train_set_model
    from crystal_transfer.experiments.frozen_features import load_frozen_features

    settings = SetModelSettings(**_json_arg(args.spec))
    split = read_split(args.split)
    if args.train_size:
        split = {**split, "train": split["train"][: args.train_size]}
    result = train_set_model(load_frozen_features(args.cache), args.table, split, args.target, settings, args.seed,
                             args.out)
    result["source"] = args.name
    from crystal_transfer.atomic import write_json

    write_json(Path(args.out) / "test.json", result)
    print(f"AtomSets on {args.name} features at level {result['level']}: {result['train_size']} training crystals, "
          f"test MAE {result['test_mae']:.4f} ({result['seconds']} s)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from crystal_transfer.experiments.predict import predict_to_csv

    count = predict_to_csv(args.model, args.input, args.out, workers=args.workers)
    print(f"wrote {count} predictions -> {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from crystal_transfer.report.stage import build_report

    summary = build_report(_json_arg(args.spec), args.out)
    best = summary["best"]
    print(
        f"report written to {args.out}; best transfer cell: {best['source']} at depth {best['depth']}, "
        f"mean test MAE {best['mean_test_mae']:.3f}"
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the training-stage subcommands."""
    pretrain = sub.add_parser("pretrain", help="convert a published CGCNN checkpoint or train a model on a dataset")
    pretrain.add_argument("--name", required=True, help="model name (config key under pretrain)")
    pretrain.add_argument("--spec", required=True, help="the model's config section as JSON (or @file)")
    pretrain.add_argument("--table", help="canonical table (kind: train)")
    pretrain.add_argument("--graphs", help="graph folder of the dataset (kind: train)")
    pretrain.add_argument("--out", required=True, help="output folder (model/, metrics.csv, test.json)")
    pretrain.set_defaults(func=_cmd_pretrain)

    frozen = sub.add_parser("frozen-features", help="cache the atom features after a frozen trunk's first k layers")
    frozen.add_argument("--source", required=True, help="saved model folder of the pretrained trunk")
    frozen.add_argument("--depth", type=_depth, required=True,
                        help="frozen convolutions (0: the embedding alone) or 'crystal' (the pooled crystal vector)")
    frozen.add_argument("--graphs", required=True)
    frozen.add_argument("--table", required=True)
    frozen.add_argument("--split", required=True, help="split CSV: features are cached for all its crystals")
    frozen.add_argument("--out", required=True, help="cache file (.pt)")
    frozen.set_defaults(func=_cmd_frozen_features)

    transfer = sub.add_parser("transfer", help="one transfer run (or the from-scratch baseline) on a split")
    transfer.add_argument("--name", required=True, help="name of the source in the results ('scratch' for baseline)")
    transfer.add_argument("--source", default="none", help="saved model folder of the source, or 'none'")
    transfer.add_argument("--mode", choices=("scratch", "freeze", "finetune"), required=True)
    transfer.add_argument("--depth", type=int, default=0, help="frozen convolutions (mode freeze)")
    transfer.add_argument("--seed", type=int, default=0)
    transfer.add_argument("--target", required=True, help="label to learn, e.g. band_gap")
    transfer.add_argument("--graphs", required=True)
    transfer.add_argument("--table", required=True)
    transfer.add_argument("--split", required=True)
    transfer.add_argument("--train-size", type=int, default=0, help="use only the first N training crystals")
    transfer.add_argument("--cache", help="frozen-feature cache of the source at --depth")
    transfer.add_argument("--spec", required=True, help='{"train": {...}, "architecture": {...}} as JSON')
    transfer.add_argument("--out", required=True)
    transfer.set_defaults(func=_cmd_transfer)

    atomsets = sub.add_parser("atomsets", help="train a small set model on a frozen trunk's cached features")
    atomsets.add_argument("--name", required=True, help="name of the source model")
    atomsets.add_argument("--cache", required=True, help="frozen-feature cache (frozen-features --depth k|crystal)")
    atomsets.add_argument("--table", required=True)
    atomsets.add_argument("--split", required=True)
    atomsets.add_argument("--target", required=True)
    atomsets.add_argument("--train-size", type=int, default=0, help="use only the first N training crystals")
    atomsets.add_argument("--seed", type=int, default=0)
    atomsets.add_argument("--spec", default="{}", help="set-model settings as JSON (hidden, pooling, epochs, lr...)")
    atomsets.add_argument("--out", required=True)
    atomsets.set_defaults(func=_cmd_atomsets)

    predict = sub.add_parser("predict", help="predict with any saved model")
    predict.add_argument("--model", required=True, help="saved model folder")
    predict.add_argument("--input", required=True, help="CIF/POSCAR folder, .tar/.tar.gz, or crystals.parquet")
    predict.add_argument("--out", required=True, help="CSV: id, one column per target in physical units")
    predict.add_argument("--workers", type=int, default=0)
    predict.set_defaults(func=_cmd_predict)

    report = sub.add_parser("report", help="Tables 2 and 3, loss curves, attention figure, parity plot")
    report.add_argument("--spec", required=True, help="JSON (or @file) naming the jobs' result files")
    report.add_argument("--out", required=True, help="output folder, e.g. results/report")
    report.set_defaults(func=_cmd_report)
