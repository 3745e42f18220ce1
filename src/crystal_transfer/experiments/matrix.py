"""The transfer plan: every (source, target, mode, depth, seed) run a config's ``transfer`` section asks for.

A target is a split plan and the label learned on it; its runs live under ``transfer/<split>/``: a source
transferred by ``freeze`` (``<source>/depth<k>``: embedding and first k convolutions frozen, as the study),
``finetune`` (``<source>/finetune``: every layer trained, layer-wise learning-rate decay) or ``atomsets``
(``<source>/atomsets-level<L>``: a set model on the frozen features), and the baseline trained from scratch
(``scratch/depth0``), each at every seed. The first target is the study's (Table 2, Table 3, Figure 5, the
learning curves). The rules and the report take their paths from here, and a target, source or mode that
cannot work is refused here, with the key named, before any job runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from crystal_transfer.data.labels import transform_of
from crystal_transfer.errors import InputError
from crystal_transfer.models.universal import SOURCES as UNIVERSAL

MODES = ("freeze", "finetune", "atomsets")


@dataclass(frozen=True)
class Target:
    """One transfer target: its split plan (which names its folder), label, dataset, how the label is learned
    (``transform``: identity or log10) and what runs on it."""

    split: str
    label: str
    dataset: str
    transform: str
    sources: tuple[str, ...]
    modes: tuple[str, ...]
    depths: tuple[int, ...]
    seeds: tuple[int, ...]
    train: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Run:
    """One job: ``source`` (``scratch`` for the baseline) on the target of ``split`` by ``mode`` at ``depth``
    (frozen convolutions for freeze, feature level for atomsets, 0 otherwise) and ``seed``."""

    split: str
    source: str
    mode: str
    depth: int | str
    seed: int

    @property
    def segment(self) -> str:
        if self.mode == "freeze":
            return f"depth{self.depth}"
        if self.mode == "atomsets":
            return f"atomsets-level{self.depth}"
        return "finetune" if self.mode == "finetune" else "depth0"

    def test_json(self, results: str) -> str:
        return f"{results}/transfer/{self.split}/{self.source}/{self.segment}/seed{self.seed}/test.json"


def choice_text(mode: str, depth: int | str) -> str:
    """A (mode, depth) as a matrix cell names it."""
    if mode == "freeze":
        return f"freeze {depth}"
    if mode == "atomsets":
        return f"AtomSets L{depth}"
    return "fine-tune" if mode == "finetune" else "scratch"


def _kind(config: dict[str, Any], name: str) -> str:
    return config["pretrain"][name]["kind"]


def atomsets_level(config: dict[str, Any], source: str) -> int | str:
    """The feature level an atomsets run reads: a universal potential's default, a CGCNN trunk's
    ``transfer.atomsets.level``."""
    kind = _kind(config, source)
    if kind in UNIVERSAL:
        return UNIVERSAL[kind].default_level
    return config["transfer"].get("atomsets", {}).get("level", 4)


def targets(config: dict[str, Any]) -> list[Target]:
    """The targets of ``config["transfer"]`` (empty without that section), checked against splits and pretrain."""
    section = config.get("transfer")
    if not section:
        return []
    if section.get("targets") and section.get("split"):
        raise InputError("transfer: give either split (one target) or targets (a list), not both; move "
                         f"split {section['split']!r} into targets")
    single = {key: section[key] for key in ("split", "target", "transform") if section.get(key)}
    entries = section.get("targets") or ([single] if section.get("split") else [])
    if not entries:
        raise InputError("transfer: name the target's split plan (transfer.split) or list targets (transfer.targets)")
    found: list[Target] = []
    for index, entry in enumerate(entries):
        where = f"transfer.targets[{index}]" if section.get("targets") else "transfer"
        split = entry["split"]
        if split not in config["splits"]:
            raise InputError(f"{where}: split {split!r} is not a plan under splits "
                             f"(plans: {', '.join(config['splits']) or 'none'})")
        if any(t.split == split for t in found):
            raise InputError(f"{where}: split {split!r} is listed twice; each target needs its own split plan")
        plan = config["splits"][split]
        label = entry.get("target") or plan["label"]
        target = Target(
            split=split,
            label=label,
            dataset=plan["dataset"],
            transform=entry.get("transform") or transform_of(label),
            sources=tuple(entry.get("sources", section.get("sources", []))),
            modes=tuple(dict.fromkeys(entry.get("modes", section.get("modes", ["freeze"])))),
            depths=tuple(entry.get("depths", section.get("depths", [1, 2, 3]))),
            seeds=tuple(entry.get("seeds", section.get("seeds", [0, 1, 2]))),
            train={**section.get("train", {}), **entry.get("train", {})},
        )
        _check_target(config, target, where)
        found.append(target)
    return found


def _check_target(config: dict[str, Any], target: Target, where: str) -> None:
    pretrain = config.get("pretrain", {})
    for name in target.sources:
        if name not in pretrain:
            raise InputError(f"{where}: source {name!r} is not a model under pretrain "
                             f"(known: {', '.join(pretrain) or 'none'})")
        kind = pretrain[name]["kind"]
        if kind in UNIVERSAL and "atomsets" not in target.modes:
            raise InputError(
                f"{where}: {name} ({UNIVERSAL[kind].model}) is a universal potential; it serves frozen features to "
                f"mode atomsets, not CGCNN layers to freeze or fine-tune, and this target's modes are "
                f"{', '.join(target.modes)}: add atomsets or drop {name}"
            )


def runs(config: dict[str, Any], target: Target) -> list[Run]:
    """Every run of ``target``: each source by each of its modes at each depth and seed, then the baseline."""
    plan: list[Run] = []
    for source in target.sources:
        universal = _kind(config, source) in UNIVERSAL
        for mode in target.modes:
            if universal and mode != "atomsets":
                continue
            depths = target.depths if mode == "freeze" else (
                [atomsets_level(config, source)] if mode == "atomsets" else [0])
            plan += [Run(target.split, source, mode, depth, seed) for depth in depths for seed in target.seeds]
    return plan + [Run(target.split, "scratch", "scratch", 0, seed) for seed in target.seeds]


def all_runs(config: dict[str, Any]) -> list[Run]:
    return [run for target in targets(config) for run in runs(config, target)]


def feature_levels(config: dict[str, Any]) -> dict[tuple[str, str], list[int | str]]:
    """(dataset, source) -> the frozen-feature levels the transfer runs read (freeze with the cache on, and
    atomsets), in first-use order."""
    levels: dict[tuple[str, str], list[int | str]] = {}
    cache = config.get("transfer", {}).get("cache_frozen", True)
    for target in targets(config):
        for run in runs(config, target):
            if run.mode == "atomsets" or (run.mode == "freeze" and cache):
                entry = levels.setdefault((target.dataset, run.source), [])
                if run.depth not in entry:
                    entry.append(run.depth)
    return levels
