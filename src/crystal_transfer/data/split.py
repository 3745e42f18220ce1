"""Deterministic named split plans.

A plan names a label and the sizes of ``train``, ``val`` and ``test`` (counts, or fractions of the crystals
that have the label). Crystals with the label are sorted by id, shuffled with the plan's seed, and cut in
that order, so the same table, plan and seed always give the same split.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from crystal_transfer.atomic import write_csv
from crystal_transfer.data.table import label_values, read_table
from crystal_transfer.errors import UserError

PARTS = ("train", "val", "test")


class SplitError(UserError):
    """A split plan cannot be satisfied by the table."""


def _counts(plan_name: str, plan: dict[str, Any], available: int) -> dict[str, int]:
    sizes = {part: plan[part] for part in PARTS}
    if all(isinstance(v, float) and v <= 1.0 for v in sizes.values()):
        if sum(sizes.values()) > 1.0 + 1e-9:
            raise SplitError(f"split plan '{plan_name}': fractions sum to {sum(sizes.values()):g} > 1")
        counts = {part: int(math.floor(value * available)) for part, value in sizes.items()}
    elif all(isinstance(v, int) for v in sizes.values()):
        counts = dict(sizes)
    else:
        raise SplitError(
            f"split plan '{plan_name}': give train/val/test all as counts (integers) or all as fractions "
            f"(floats <= 1), not {sizes}"
        )
    if sum(counts.values()) > available:
        raise SplitError(
            f"split plan '{plan_name}' asks for {sum(counts.values())} crystals with label '{plan['label']}' "
            f"({counts['train']} / {counts['val']} / {counts['test']}) but the table has {available}; "
            f"lower the sizes or use fractions"
        )
    if counts["train"] < 1 or counts["test"] < 1:
        raise SplitError(f"split plan '{plan_name}' leaves no training or no test crystal ({counts})")
    return counts


def make_split(table_path: str | Path, plan_name: str, plan: dict[str, Any]) -> dict[str, list[str]]:
    """Return ``{'train': ids, 'val': ids, 'test': ids}`` for ``plan`` on the table at ``table_path``."""
    label = plan["label"]
    table = read_table(table_path, columns=None)
    if label not in table.column_names:
        labels = [c for c in table.column_names if table.schema.field(c).metadata]
        raise SplitError(f"split plan '{plan_name}': the table has no label '{label}' (labels: {', '.join(labels)})")
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    values = label_values(table, label)
    usable = np.sort(ids[np.isfinite(values)].astype(str))
    counts = _counts(plan_name, plan, len(usable))
    order = np.random.default_rng(int(plan["seed"])).permutation(len(usable))
    shuffled = usable[order]
    result: dict[str, list[str]] = {}
    start = 0
    for part in PARTS:
        result[part] = shuffled[start : start + counts[part]].tolist()
        start += counts[part]
    return result


def write_split(split: dict[str, list[str]], out: str | Path) -> None:
    """Write a split as CSV ``id,split`` (atomically)."""
    write_csv(out, ["id", "split"], ((crystal_id, part) for part in PARTS for crystal_id in split[part]))


def read_split(path: str | Path) -> dict[str, list[str]]:
    """Read a split CSV written by :func:`write_split`."""
    result: dict[str, list[str]] = {part: [] for part in PARTS}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            result[row["split"]].append(row["id"])
    return result


def run(table: str | Path, name: str, plan: dict[str, Any], out: str | Path, log=print) -> dict[str, list[str]]:
    """The ``split`` stage: the split plan ``name`` of a table, written as ``id,split`` to ``out``."""
    plan = {"seed": 0, **plan}
    split = make_split(table, name, plan)
    write_split(split, out)
    sizes = " / ".join(f"{len(split[p])} {p}" for p in PARTS)
    log(f"split '{name}' on label {plan['label']}: {sizes} -> {out}")
    return split
