"""The ``init`` command: a study config for a user's own crystals and property, written after looking at the data.

It runs the data stage on the files (so every crystal the pipeline would reject is found now, with the same
reasons and messages), describes what is there (files, formats, labels, rejections), and writes a config whose
split is sized to the labelled crystals that are kept, whose sources and modes fit that size, and whose single
transfer target ends in ``results/best/<target>/``: the seed ensemble chosen on validation. It prints the command
that runs it. The inspection's table, rejections and summary stay in ``<config>-inspection/``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from crystal_transfer.data.labels import KNOWN_UNITS, LOG10_LABELS
from crystal_transfer.errors import InputError

MIN_CRYSTALS = 50  # below this, a validation and a test set of any use cannot be cut
LOG_SPAN = 100.0  # positive labels spanning this factor or more are learned on log10


def _label_key(column: str) -> str:
    key = re.sub(r"\W+", "_", column.strip()).strip("_")
    if not key:
        raise InputError(f"--target {column!r}: name a label column of the CSV")
    return key


def split_plan(n: int) -> dict[str, float]:
    """Fractions of the labelled crystals for train / val / test: a fifth each for val and test below 1,000
    crystals (enough to rank models and to report an error), 15 % each above."""
    if n < MIN_CRYSTALS:
        raise InputError(f"only {n} labelled crystals are usable; at least {MIN_CRYSTALS} are needed for a "
                         "training, a validation and a test set")
    held = 0.2 if n < 1000 else 0.15
    return {"train": round(1 - 2 * held, 2), "val": held, "test": held}


def _transform(label: str, values: np.ndarray) -> tuple[str, str]:
    if label in LOG10_LABELS:
        return "log10", f"{label} is an elastic modulus: learned on log10, as CGCNN did"
    low, high = float(values.min()), float(values.max())
    if low > 0 and high / low >= LOG_SPAN:
        return "log10", f"all labels are positive and span {high / low:.0f}x: learned on log10"
    return "identity", "learned as is"


def _describe_files(structures: Path) -> Counter[str]:
    from crystal_transfer.data.sources.local import structure_files, structure_format

    formats: Counter[str] = Counter()
    for member, payload, _ in structure_files(structures):
        fmt = structure_format(member) if payload is not None else None
        formats[fmt or "not a CIF/POSCAR file"] += 1
    return formats


def study_config(name: str, structures: str, labels: str, target: str, column: str, id_column: str, unit: str,
                 n: int, transform: str, universal: list[str]) -> dict[str, Any]:
    """The config of a study of one property: the study's graph and training settings, the split sized to
    ``n`` labelled crystals, the published formation-energy model and the installed universal potentials as
    sources, every transfer mode, and seeds enough for a paired test."""
    fractions = split_plan(n)
    n_train = int(n * fractions["train"])
    seeds = list(range(5 if n_train < 1000 else 3))
    sources = ["formation_energy", *universal]
    return {
        "results_dir": f"results/{name}",
        "filters": {"max_z": 80, "max_rejected_fraction": 0.25},
        "graphs": {"radius": 8.0, "max_num_nbr": 12, "shard_size": 2048, "isolated_atoms": "extend",
                   "cgcnn_padding": False},
        "datasets": {name: {"description": f"{target} of the crystals in {structures}", "sources": [{
            "type": "local", "name": name, "path": structures, "labels": labels, "id_column": id_column,
            "columns": {target: column}, **({"units": {target: unit}} if target not in KNOWN_UNITS else {}),
        }]}},
        "splits": {target: {"dataset": name, "label": target, **fractions, "seed": 0}},
        "train": {"epochs": 30, "batch_size": 64 if n_train >= 256 else 32, "optimizer": "sgd", "lr": 0.01,
                  "momentum": 0.9, "device": "auto", "monitor": "val_mae"},
        "architecture": {"atom_fea_len": 64, "n_conv": 4, "h_fea_len": 32, "n_h": 1},
        "pretrain": {
            "formation_energy": {"kind": "published", "checkpoint": "formation-energy-per-atom",
                                 "role": "formation_energy"},
            **{kind: {"kind": kind} for kind in universal},
        },
        "transfer": {
            "sources": sources,
            "depths": [1, 2, 3],
            "seeds": seeds,
            "cache_frozen": True,
            "train": {"layer_lr_decay": 0.5},
            "atomsets": {"level": 4, "pooling": "mean", "hidden": 64, "epochs": 300, "patience": 50, "lr": 0.001,
                         "monitor": "val_mae"},
            "targets": [{"split": target, "transform": transform, "modes": ["freeze", "finetune", "atomsets"]}],
        },
        "report": {},
    }


def run(structures: str | Path, labels: str | Path, target: str, id_column: str = "id", out: str | Path = "",
        unit: str | None = None, name: str = "", workers: int = 0, log=print) -> dict[str, Any]:
    """The ``init`` command: inspect the files, write the config to ``out`` (default ``<name>.yaml``) and say how
    to run it; returns what it found."""
    # long: the inspection's findings are printed in the order a user reads them, then the config is written
    import yaml

    from crystal_transfer.atomic import write_text
    from crystal_transfer.data.stage import build_dataset
    from crystal_transfer.data.table import read_table
    from crystal_transfer.models.universal import SOURCES, MissingExtra, installed

    structures, labels = Path(structures), Path(labels)
    for path, what in ((structures, "--structures"), (labels, "--labels")):
        if not path.exists():
            raise InputError(f"{what} {path} does not exist")
    key = _label_key(target)
    name = name or re.sub(r"\W+", "_", labels.stem).strip("_") or "my_study"
    out = Path(out or f"{name}.yaml")
    unit = unit if unit is not None else KNOWN_UNITS.get(key, "")
    formats = _describe_files(structures)
    log(f"{structures}: {sum(formats.values())} files ({', '.join(f'{v} {k}' for k, v in formats.most_common())})")
    spec = {"sources": [{"type": "local", "name": name, "path": str(structures), "labels": str(labels),
                         "id_column": id_column, "columns": {key: target}, "units": {key: unit}}],
            "filters": {"max_z": 80, "max_rejected_fraction": 1.0}}
    inspection = out.with_name(f"{out.stem}-inspection")  # the data stage's record, kept for the user to read
    summary = build_dataset(name, spec, inspection, workers=workers or None, log=lambda _: None)
    frame = read_table(inspection / "crystals.parquet", columns=["id", key]).to_pandas()
    values = frame[key].to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    reasons = Counter(summary["rejected_by_reason"])
    log(f"{labels}: {summary['read']} crystals read, {summary['kept']} kept, {len(values)} of them labelled with "
        f"{target}")
    if reasons:
        log("rejected (as the pipeline's data stage will record them): "
            + ", ".join(f"{reason} {count}" for reason, count in reasons.most_common())
            + f"; each with its message in {inspection / 'rejected.csv'}")
    if len(values) == 0:
        raise InputError(f"no kept crystal has a finite {target!r} label: check --target and --id-column")
    transform, why = _transform(key, values)
    log(f"{target}: mean {values.mean():.4g}, std {values.std():.4g}, min {values.min():.4g}, "
        f"median {np.median(values):.4g}, max {values.max():.4g}{' ' + unit if unit else ''}; {why}")
    if not unit and key not in KNOWN_UNITS:
        log(f"no unit given for {target}: written as dimensionless; pass --unit (e.g. --unit eV/atom) to have "
            "tables and figures name it")
    universal = []
    for kind in SOURCES:
        try:
            installed(kind)
            universal.append(kind)
        except MissingExtra:
            continue
    config = study_config(name, str(structures), str(labels), key, target, id_column, unit, len(values), transform,
                          universal)
    plan = config["splits"][key]
    n_train = math.floor(len(values) * plan["train"])
    header = (f"# A study of {target} ({len(values)} labelled crystals of {structures}), written by "
              "`python -m crystal_transfer init`.\n"
              f"# Split {plan['train']} / {plan['val']} / {plan['test']}; sources: "
              f"{', '.join(config['transfer']['sources'])}; modes freeze, fine-tune and AtomSets; "
              f"{len(config['transfer']['seeds'])} seeds.\n"
              f"# The best model (lowest mean validation MAE) lands in {config['results_dir']}/best/{key}/.\n")
    share = summary["rejected"] / max(summary["read"], 1)
    if share > config["filters"]["max_rejected_fraction"]:  # the data stage would stop: say so, and allow it
        config["filters"]["max_rejected_fraction"] = min(1.0, round(share + 0.05, 2))
        log(f"{share:.0%} of the crystals are rejected (above the usual 25 % that stops the data stage): the config "
            f"allows {config['filters']['max_rejected_fraction']:.0%}; look at the reasons above first")
    write_text(out, header + yaml.safe_dump(config, sort_keys=False, width=110, default_flow_style=None))
    if not universal:
        log("the universal potentials (CHGNet, SevenNet) are not installed: pip install -e '.[universal]' and "
            "run init again to compare them too")
    log(f"wrote {out}: split {plan['train']} / {plan['val']} / {plan['test']} (about {n_train} training "
        f"crystals), {len(config['transfer']['seeds'])} seeds, sources {', '.join(config['transfer']['sources'])}")
    log(f"run it:  snakemake --cores all all --configfile {out}")
    log(f"then:    python -m crystal_transfer predict --model {config['results_dir']}/best/{key} --input NEW_CIFS/ "
        "--out predictions.csv")
    return {"config": str(out), "kept": summary["kept"], "labelled": len(values), "rejected": dict(reasons),
            "transform": transform, "sources": config["transfer"]["sources"]}
