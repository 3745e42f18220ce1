"""The learning-curve plan: which curves a config's ``learning_curves`` section draws, and where each lives.

A curve is AtomSets on one source's frozen features at one level (``atomsets-<source>-level<L>``), fine-tuning
a CGCNN model's every layer (``finetune-<source>``) or CGCNN from scratch (``scratch``); each is trained at
every training size and seed on the transfer split, so all share one test set. The workflow's rules and the
report take their paths and labels from here, and a source, level or model the section names that cannot
work is refused here with the key named, before any job runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crystal_transfer.errors import InputError
from crystal_transfer.models.universal import SOURCES as UNIVERSAL
from crystal_transfer.report.study import source_label

CGCNN_KINDS = frozenset({"published", "train"})


@dataclass(frozen=True)
class Curve:
    """One learning curve: its path segment under ``curves/<split>/``, mode, source, level and legend label."""

    key: str
    mode: str
    source: str | None
    level: int | str | None
    label: str


def model_label(name: str, entry: dict[str, Any]) -> str:
    """How tables and figures name a pretrained model: :func:`source_label`, a universal potential by its model."""
    if entry["kind"] in UNIVERSAL and not entry.get("label"):
        return UNIVERSAL[entry["kind"]].model
    return source_label(name, entry)


def level_text(kind: str, level: int | str) -> str:
    """Where the features are taken, in words."""
    if level == "crystal":
        return "pooled crystal vector"
    if level == 0:
        return "element embedding"
    block = "conv layer" if kind in CGCNN_KINDS else "interaction block"
    return f"after {level} {block}{'s' if int(level) > 1 else ''}"


def _entries(curves: dict[str, Any]) -> list[tuple[str, list[int | str] | None]]:
    entries = []
    for entry in curves["sources"]:
        if isinstance(entry, str):
            entries.append((entry, None))
        else:
            entries.append((entry["name"], entry.get("levels")))
    return entries


def default_level(config: dict[str, Any], name: str) -> int | str:
    """The level of a source listed without levels: the universal potential's default, else ``atomsets.level``."""
    kind = config["pretrain"][name]["kind"]
    if kind in UNIVERSAL:
        return UNIVERSAL[kind].default_level
    return config["learning_curves"].get("atomsets", {}).get("level", 4)


def finetune_source(config: dict[str, Any]) -> str | None:
    """The CGCNN model that the ``finetune`` curve fine-tunes: ``learning_curves.finetune``, else the first CGCNN
    model of ``learning_curves.sources``."""
    curves = config["learning_curves"]
    if curves.get("finetune"):
        return curves["finetune"]
    cgcnn = [name for name, _ in _entries(curves) if config["pretrain"].get(name, {}).get("kind") in CGCNN_KINDS]
    return cgcnn[0] if cgcnn else None


def curve_plan(config: dict[str, Any]) -> list[Curve]:
    """Every curve of ``config["learning_curves"]`` (empty without that section), checked against ``pretrain``."""
    curves = config.get("learning_curves")
    if not curves:
        return []
    pretrain = config.get("pretrain", {})
    modes = curves.get("modes", ["atomsets", "finetune", "scratch"])
    plan: list[Curve] = []
    if "atomsets" in modes:
        seen = set()
        for name, levels in _entries(curves):
            if name not in pretrain:
                raise InputError(f"learning_curves.sources names {name!r}, which is not a model under pretrain "
                                 f"(known: {', '.join(pretrain) or 'none'})")
            kind = pretrain[name]["kind"]
            for level in levels or [default_level(config, name)]:
                if kind in UNIVERSAL and level not in UNIVERSAL[kind].levels:
                    raise InputError(
                        f"learning_curves.sources: {name} ({UNIVERSAL[kind].model}) has no level {level!r}; "
                        f"its levels are {', '.join(map(str, UNIVERSAL[kind].levels))}"
                    )
                key = f"atomsets-{name}-level{level}"
                if key in seen:
                    raise InputError(f"learning_curves.sources lists {name} at level {level} twice")
                seen.add(key)
                label = f"AtomSets on {model_label(name, pretrain[name])} ({level_text(kind, level)})"
                plan.append(Curve(key, "atomsets", name, level, label))
    if "finetune" in modes:
        name = finetune_source(config)
        if name is None:
            raise InputError("learning_curves.modes has finetune but no CGCNN model to fine-tune: set "
                             "learning_curves.finetune to a pretrain model of kind published or train")
        if name not in pretrain or pretrain[name]["kind"] not in CGCNN_KINDS:
            what = "not a model under pretrain" if name not in pretrain else f"of kind {pretrain[name]['kind']}"
            raise InputError(f"learning_curves.finetune: {name!r} is {what}; fine-tuning needs a CGCNN model "
                             "(kind published or train)")
        plan.append(Curve(f"finetune-{name}", "finetune", name, None,
                          f"fine-tuned {model_label(name, pretrain[name])} (all layers)"))
    if "scratch" in modes:
        plan.append(Curve("scratch", "scratch", None, None, "CGCNN from scratch"))
    return plan


def universal_levels(config: dict[str, Any]) -> dict[str, list[int | str]]:
    """Universal potential -> the levels the curves and the transfer runs read of it (one featurisation job per
    dataset writes them all)."""
    from crystal_transfer.experiments.matrix import feature_levels

    levels: dict[str, list[int | str]] = {}
    wanted = [(c.source, c.level) for c in curve_plan(config) if c.mode == "atomsets"]
    wanted += [(source, level) for (_, source), found in feature_levels(config).items() for level in found]
    for source, level in wanted:
        if config["pretrain"][source]["kind"] in UNIVERSAL and level not in levels.setdefault(source, []):
            levels[source].append(level)
    return levels


def check_config(config: dict[str, Any]) -> None:
    """What the workflow checks when it reads a config, beyond its schema: the transfer targets and sources, the
    curve plan and the packages of the universal potentials they read (a missing extra stops the run at once)."""
    from crystal_transfer.experiments.matrix import targets
    from crystal_transfer.models.universal import check_installed

    targets(config)
    check_installed(config["pretrain"][name]["kind"] for name in universal_levels(config))
