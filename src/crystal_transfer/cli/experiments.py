"""Commands that train or use models: ``pretrain``, ``frozen-features``, ``transfer``, ``atomsets``, ``predict``,
``features``, ``select`` and ``report``.

Argument parsing only: each command calls the ``run`` function of the module of its name.
"""

from __future__ import annotations

import argparse

from crystal_transfer.cli.arguments import json_arg, level
from crystal_transfer.data.labels import TRANSFORMS
from crystal_transfer.errors import InputError

TRANSFORM_HELP = "learn the label as is (identity) or its log10 (default: log10 for the moduli K_VRH, G_VRH)"


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from crystal_transfer.experiments import pretrain

    pretrain.run(args.name, json_arg(args.spec), args.out, table=args.table, graphs=args.graphs)
    return 0


def _cmd_frozen_features(args: argparse.Namespace) -> int:
    from crystal_transfer.experiments import frozen_features

    if args.universal:
        if args.name is None or args.levels is None or args.out_dir is None:
            raise InputError("frozen-features --universal needs --name, --levels and --out-dir")
        frozen_features.run_universal(args.name, json_arg(args.universal), args.levels, args.table, args.split,
                                      args.out_dir)
        return 0
    if args.source is None or args.depth is None or args.graphs is None or args.out is None:
        raise InputError("frozen-features needs --source, --depth, --graphs and --out (or --universal)")
    frozen_features.run(args.source, args.depth, args.graphs, args.table, args.split, args.out)
    return 0


def _cmd_transfer(args: argparse.Namespace) -> int:
    from crystal_transfer.experiments import transfer

    transfer.run(
        args.name, args.source, args.mode, args.depth, args.seed, args.target, args.graphs, args.table, args.split,
        json_arg(args.spec), args.out, train_size=args.train_size, cache=args.cache, transform=args.transform,
    )
    return 0


def _cmd_atomsets(args: argparse.Namespace) -> int:
    from crystal_transfer.experiments import atomsets

    atomsets.run(
        args.name, args.cache, args.table, args.split, args.target, json_arg(args.spec), args.out,
        seed=args.seed, train_size=args.train_size, transform=args.transform,
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from crystal_transfer.experiments import predict

    predict.run(
        args.model, args.input, args.out, workers=args.workers, max_z=args.max_z, min_distance=args.min_distance
    )
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from crystal_transfer.experiments import features

    features.run(args.model, args.level, args.input, args.out, per_atom=args.per_atom, max_z=args.max_z,
                 min_distance=args.min_distance, device=args.device)
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from crystal_transfer.experiments import select

    select.run(args.name, args.results, args.out, label=args.label)
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from crystal_transfer import init

    init.run(args.structures, args.labels, args.target, id_column=args.id_column, out=args.out or "",
             unit=args.unit, name=args.name or "")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from crystal_transfer.report import stage

    stage.run(json_arg(args.spec), args.out)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the commands that train or use models."""
    # long: one block of arguments per command, in the order `--help` lists them
    pretrain = sub.add_parser("pretrain", help="convert a published CGCNN checkpoint or train a model on a dataset")
    pretrain.add_argument("--name", required=True, help="model name (config key under pretrain)")
    pretrain.add_argument("--spec", required=True, help="the model's config section as JSON (or @file)")
    pretrain.add_argument("--table", help="canonical table (kind: train)")
    pretrain.add_argument("--graphs", help="graph folder of the dataset (kind: train)")
    pretrain.add_argument("--out", required=True, help="output folder (model/, metrics.csv, test.json)")
    pretrain.set_defaults(func=_cmd_pretrain)

    frozen = sub.add_parser("frozen-features", help="cache the atom features after a frozen trunk's first k layers, "
                            "or those of a universal potential (CHGNet, SevenNet) at its levels")
    frozen.add_argument("--source", help="saved model folder of the pretrained CGCNN trunk")
    frozen.add_argument("--depth", type=level,
                        help="frozen convolutions (0: the embedding alone) or 'crystal' (the pooled crystal vector)")
    frozen.add_argument("--graphs", help="graph folder of the dataset (CGCNN trunks)")
    frozen.add_argument("--table", required=True)
    frozen.add_argument("--split", required=True, nargs="+",
                        help="split CSV(s): features are cached for every crystal of them")
    frozen.add_argument("--out", help="cache file (.pt) of a CGCNN trunk")
    frozen.add_argument("--universal",
                        help='the pretrain entry of a universal potential as JSON, e.g. {"kind": "chgnet"}')
    frozen.add_argument("--name",
                        help="its name (config key under pretrain): caches are <out-dir>/<name>-depth<level>.pt")
    frozen.add_argument("--levels", type=level, nargs="+", help="levels to cache (integers and/or 'crystal')")
    frozen.add_argument("--out-dir", help="folder of the universal potential's caches")
    frozen.set_defaults(func=_cmd_frozen_features)

    transfer = sub.add_parser("transfer", help="one transfer run (or the from-scratch baseline) on a split")
    transfer.add_argument("--name", required=True, help="name of the source in the results ('scratch' for baseline)")
    transfer.add_argument("--source", default="none", help="saved model folder of the source, or 'none'")
    transfer.add_argument("--mode", choices=("scratch", "freeze", "finetune"), required=True)
    transfer.add_argument("--depth", type=int, default=0, help="frozen convolutions (mode freeze)")
    transfer.add_argument("--seed", type=int, default=0)
    transfer.add_argument("--target", required=True, help="label to learn, e.g. band_gap")
    transfer.add_argument("--transform", choices=TRANSFORMS, help=TRANSFORM_HELP)
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
    atomsets.add_argument("--transform", choices=TRANSFORMS, help=TRANSFORM_HELP)
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
    predict.add_argument("--max-z", type=int, help="refuse crystals with an element above this Z (default: the "
                         "filters.max_z the model's training data went through, else 80)")
    predict.add_argument("--min-distance", type=float, help="refuse crystals with two atoms closer than this, Å "
                         "(default: the model's training data's filters.min_distance, else 0.5)")
    predict.set_defaults(func=_cmd_predict)

    features = sub.add_parser("features", help="export a pretrained model's features of crystals to Parquet")
    features.add_argument("--model", required=True,
                          help="saved model folder (CGCNN), or chgnet / sevenn (the universal potentials)")
    features.add_argument("--level", type=level, required=True,
                          help="atom features after this many convolutions / interaction blocks, mean-pooled "
                          "(0: the element embedding), or 'crystal' (the model's own crystal vector)")
    features.add_argument("--input", required=True, help="CIF/POSCAR folder, .tar/.tar.gz, or crystals.parquet")
    features.add_argument("--out", required=True, help="Parquet: id, n_atoms, error, f0..f{F-1}, a row per crystal")
    features.add_argument("--per-atom", help="also write per-atom features here (Parquet: id, atom, Z, f...)")
    features.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    features.add_argument("--max-z", type=int, help="refuse crystals with an element above this Z (default: a "
                          "CGCNN model's training data's filters.max_z, else 80; none for a universal potential)")
    features.add_argument("--min-distance", type=float, help="refuse crystals with two atoms closer than this, Å "
                          "(default: the model's training data's filters.min_distance, else 0.5)")
    features.set_defaults(func=_cmd_features)

    init = sub.add_parser("init", help="look at your crystals and labels and write a study config for them")
    init.add_argument("--structures", required=True, help="CIF/POSCAR folder or .tar/.tar.gz of them")
    init.add_argument("--labels", required=True, help="CSV with an id column and the property")
    init.add_argument("--target", required=True, help="the CSV column of the property to learn")
    init.add_argument("--id-column", default="id", help="the CSV column naming each structure file (default: id)")
    init.add_argument("--unit", help="the property's unit (default: known for the pipeline's labels, else none)")
    init.add_argument("--name", help="the study's name: its dataset and results/<name> (default: the CSV's name)")
    init.add_argument("--out", help="config file to write (default: <name>.yaml)")
    init.set_defaults(func=_cmd_init)

    select = sub.add_parser("select", help="choose a target's best transferred model on validation MAE and write "
                            "its seed ensemble")
    select.add_argument("--name", required=True, help="the target (its split plan's name)")
    select.add_argument("--results", required=True, nargs="+", help="test.json of every candidate run")
    select.add_argument("--label", default="", help="the target's label as figures name it")
    select.add_argument("--out", required=True, help="output folder, e.g. results/best/band_gap")
    select.set_defaults(func=_cmd_select)

    report = sub.add_parser("report", help="Tables 2 and 3, loss curves, attention figure, parity plot")
    report.add_argument("--spec", required=True, help="JSON (or @file) naming the jobs' result files")
    report.add_argument("--out", required=True, help="output folder, e.g. results/report")
    report.set_defaults(func=_cmd_report)
