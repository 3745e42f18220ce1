"""The ``frozen-features`` stage: a frozen trunk's features, computed once and shared by every seed.

The atom features after the frozen layers do not change during training, so they are
computed once per (source, depth, dataset) by :func:`compute_frozen_features` and served with each batch
(``GraphBatch.atom_fea``); the model then runs only the layers it trains. Identical numbers, less work.
:class:`FeatureSetDataset` serves the same cache without graphs, to the AtomSets set model.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from crystal_transfer.atomic import sha256_file
from crystal_transfer.errors import InputError, MissingError
from crystal_transfer.graphs.batch import GraphBatch
from crystal_transfer.graphs.dataset import CrystalItem, GraphDataset, collate_graphs
from crystal_transfer.models.cgcnn import CGCNN
from crystal_transfer.models.set_model import FeatureBatch
from crystal_transfer.tensor_files import load_tensors, save_tensors

# A cache whose features are larger than this is written as parts of about this size beside an index file, and read
# a part at a time (at most PARTS_HELD in memory): at a million crystals a cache is gigabytes.
CACHE_PART_BYTES = 256 * 2**20
PARTS_HELD = 2


@torch.no_grad()
def _feature_batches(model: CGCNN, depth: int | str, dataset: GraphDataset, batch_size: int,
                     device: str | torch.device) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """(ids, feature rows, rows per crystal) of each batch of ``dataset``, from the frozen trunk in eval mode."""
    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate)
    for batch in loader:
        batch = batch.to(device)
        if depth == "crystal":
            yield batch.ids, model.crystal_features(batch).float().cpu(), torch.ones(batch.num_crystals,
                                                                                   dtype=torch.long)
        else:
            counts = torch.bincount(batch.crystal, minlength=batch.num_crystals).cpu()
            yield batch.ids, model.atom_features(batch, depth=int(depth)).float().cpu(), counts


def _offsets(counts: Sequence[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat(list(counts)) if counts else torch.zeros(0, dtype=torch.long)
    offsets = torch.zeros(len(flat) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(flat, 0)
    return offsets


def compute_frozen_features(model: CGCNN, depth: int | str, dataset: GraphDataset, batch_size: int = 256,
                            device: str | torch.device = "cpu") -> dict[str, Any]:
    """Features of every crystal from a frozen trunk (eval mode), at ``depth``, in memory.

    ``depth`` k: atom features after the embedding and the first k convolutions (0: the embedding alone);
    ``"crystal"``: the pooled crystal vector after ``conv_to_fc`` (one row per crystal). Returns
    ``{"ids", "offsets", "features", "depth"}``: crystal ``i`` owns rows ``offsets[i]:offsets[i+1]``.
    """
    chunks, ids, sizes = [], [], []
    for batch_ids, features, counts in _feature_batches(model, depth, dataset, batch_size, device):
        ids.extend(batch_ids)
        chunks.append(features)
        sizes.append(counts)
    return {"ids": ids, "offsets": _offsets(sizes), "features": torch.cat(chunks) if chunks else torch.zeros(0, 0),
            "depth": depth}


def _part_path(path: Path, index: int) -> Path:
    return path.with_name(f"{path.stem}.part{index:04d}{path.suffix}")


def write_frozen_features(model: CGCNN, depth: int | str, dataset: GraphDataset, path: str | Path,
                          provenance: dict[str, Any], batch_size: int = 256, device: str | torch.device = "cpu",
                          part_bytes: int = CACHE_PART_BYTES) -> dict[str, Any]:
    """:func:`compute_frozen_features` written as it is computed: memory holds one part (``part_bytes``) of features
    at most. A cache of one part is the single file of :func:`save_frozen_features`. Returns the index: ids,
    offsets, depth, provenance and the shape of the features."""
    path = Path(path)
    ids: list[str] = []
    sizes: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    parts: list[dict[str, Any]] = []
    held = rows = 0

    def flush() -> None:
        nonlocal held
        features = torch.cat(pending)
        pending.clear()
        held = 0
        start = parts[-1]["rows"][1] if parts else 0
        file = _part_path(path, len(parts))
        save_tensors({"features": features}, file)
        parts.append({"file": file.name, "rows": [start, start + len(features)], "sha256": sha256_file(file)})

    width = 0
    for batch_ids, features, counts in _feature_batches(model, depth, dataset, batch_size, device):
        ids.extend(batch_ids)
        sizes.append(counts)
        pending.append(features)
        width = features.shape[1]
        held += features.numel() * features.element_size()
        rows += len(features)
        if held >= part_bytes:  # batches end on crystals: a crystal's rows never straddle two parts
            flush()
    index = {"ids": ids, "offsets": _offsets(sizes), "depth": depth, "provenance": provenance,
             "shape": [rows, width]}
    if not parts:  # it fits in one file
        features = torch.cat(pending) if pending else torch.zeros(0, 0)
        save_tensors({"ids": ids, "offsets": index["offsets"], "features": features, "depth": depth,
                      "provenance": provenance}, path)
        return index
    if pending:
        flush()
    save_tensors({**index, "parts": parts}, path)
    return index


def save_frozen_features(cache: dict[str, Any], path: str | Path, provenance: dict[str, Any],
                         part_bytes: int = CACHE_PART_BYTES) -> None:
    """Write a feature cache (plain tensors, lists and strings: loadable with ``weights_only=True``); features larger
    than ``part_bytes`` go to parts beside an index file, cut on crystal boundaries."""
    path = Path(path)
    features: torch.Tensor = cache["features"]
    total = features.numel() * features.element_size()
    if total <= part_bytes:
        save_tensors({**cache, "provenance": provenance}, path)
        return
    offsets = cache["offsets"]
    per_row = max(total // max(len(features), 1), 1)
    parts, start, crystal = [], 0, 0
    while start < len(features):
        # the last crystal whose rows end within part_bytes of ``start`` (at least one crystal)
        limit = start + max(part_bytes // per_row, 1)
        crystal = max(int(torch.searchsorted(offsets, limit, right=True)) - 1, crystal + 1)
        stop = int(offsets[min(crystal, len(offsets) - 1)])
        file = _part_path(path, len(parts))
        save_tensors({"features": features[start:stop].clone()}, file)
        parts.append({"file": file.name, "rows": [start, stop], "sha256": sha256_file(file)})
        start = stop
    index = {key: value for key, value in cache.items() if key != "features"}
    save_tensors({**index, "provenance": provenance, "shape": list(features.shape), "parts": parts}, path)


class FeatureParts:
    """The features of a cache written in parts: rows sliced as a tensor's are, each part read (and its sha256
    checked against the index) when first needed, at most :data:`PARTS_HELD` held at once."""

    def __init__(self, path: Path, parts: list[dict[str, Any]], shape: Sequence[int]) -> None:
        self.path, self.parts, self.shape = path, parts, torch.Size(shape)
        self.starts = [part["rows"][0] for part in parts]
        self.held: dict[int, torch.Tensor] = {}
        self.checked: set[int] = set()

    def __len__(self) -> int:
        return self.shape[0]

    def _part(self, index: int) -> torch.Tensor:
        if index not in self.held:
            part = self.parts[index]
            file = self.path.with_name(part["file"])
            if index not in self.checked:
                if not file.is_file() or sha256_file(file) != part["sha256"]:
                    raise InputError(f"feature cache {self.path}: its part {file.name} is missing or damaged; "
                                     "rebuild the cache (rerun its frozen_features job)")
                self.checked.add(index)
            while len(self.held) >= PARTS_HELD:
                self.held.pop(next(iter(self.held)))
            self.held[index] = load_tensors(file, f"feature cache part {file}")["features"]
        return self.held[index]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("FeatureParts takes a slice of rows (a crystal's)")
        start, stop, _ = rows.indices(self.shape[0])
        index = bisect.bisect_right(self.starts, start) - 1
        first, last = self.parts[index]["rows"]
        if stop > last:
            raise IndexError(f"rows {start}:{stop} span two parts of {self.path}")
        return self._part(index)[start - first : stop - first]


def load_frozen_features(path: str | Path) -> dict[str, Any]:
    """Read a cache written by :func:`save_frozen_features` or :func:`write_frozen_features`; the features of a
    cache in parts are a :class:`FeatureParts`, read a part at a time."""
    cache = load_tensors(path, f"feature cache {path}")
    if "parts" in cache:
        cache["features"] = FeatureParts(Path(path), cache.pop("parts"), cache.pop("shape"))
    return cache


@dataclass
class CachedItem:
    """A crystal with its cached frozen atom features."""

    graph: CrystalItem
    atom_fea: np.ndarray


class CachedFeatureDataset(Dataset):
    """A :class:`GraphDataset` whose batches carry the cached atom features after the frozen layers."""

    def __init__(self, graphs: GraphDataset, cache: dict[str, Any]) -> None:
        self.graphs = graphs
        self.depth = int(cache["depth"])
        row = {crystal_id: index for index, crystal_id in enumerate(cache["ids"])}
        missing = [i for i in graphs.ids if i not in row]
        if missing:
            raise MissingError(
                f"{len(missing)} crystals have no cached features, e.g. {missing[:3]}; rebuild the cache"
            )
        self.features = cache["features"]  # a tensor, or a FeatureParts
        self.offsets = cache["offsets"].numpy()
        self.rows = [row[i] for i in graphs.ids]

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, index: int) -> CachedItem:
        item = self.graphs[index]
        row = self.rows[index]
        features = self.features[int(self.offsets[row]) : int(self.offsets[row + 1])].numpy()
        if len(features) != len(item.numbers):
            raise InputError(f"cached features of {item.id} have {len(features)} atoms, the graph {len(item.numbers)}")
        return CachedItem(item, features)

    def collate(self, items: Sequence[CachedItem]) -> GraphBatch:
        """A GraphBatch with ``atom_fea`` set to the cached features (``atom_fea_depth`` = frozen depth)."""
        batch = collate_graphs([item.graph for item in items], cgcnn_padding=self.graphs.settings.cgcnn_padding)
        batch.atom_fea = torch.from_numpy(np.concatenate([item.atom_fea for item in items]))
        batch.atom_fea_depth = self.depth
        return batch


@dataclass
class FeatureItem:
    """One crystal's cached feature rows (n, F), labels (T,) and id."""

    features: torch.Tensor
    targets: torch.Tensor
    id: str


class FeatureSetDataset(Dataset):
    """Cached features of a list of crystals with their labels, the input of a set model (no graphs needed)."""

    def __init__(self, cache: dict[str, Any], ids: Sequence[str], targets: np.ndarray | torch.Tensor) -> None:
        row = {crystal_id: index for index, crystal_id in enumerate(cache["ids"])}
        rejected = {entry["id"] for entry in cache.get("rejected", [])}
        missing = [i for i in ids if i not in row and i not in rejected]
        if missing:
            raise MissingError(
                f"{len(missing)} crystals have no cached features, e.g. {missing[:3]}; rebuild the cache"
            )
        keep = [index for index, crystal_id in enumerate(ids) if crystal_id in row]
        self.left_out = [ids[index] for index in range(len(ids)) if ids[index] not in row]  # rejected by the source
        self.features = cache["features"]
        self.offsets = cache["offsets"].tolist()
        self.ids = [ids[index] for index in keep]
        self.rows = [row[i] for i in self.ids]
        values = np.array(targets, dtype=np.float32).reshape(len(ids), -1)[keep]
        self.targets = torch.from_numpy(values)  # (n, T) physical

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> FeatureItem:
        start, end = self.offsets[self.rows[index]], self.offsets[self.rows[index] + 1]
        return FeatureItem(self.features[start:end], self.targets[index], self.ids[index])

    @staticmethod
    def collate(items: Sequence[FeatureItem]) -> FeatureBatch:
        """The :class:`FeatureBatch` of ``items`` (of any :class:`FeatureSetDataset`: the trainer collates its
        validation and test sets with the training set's ``collate``)."""
        sizes = torch.tensor([len(item.features) for item in items], dtype=torch.long)
        return FeatureBatch(
            torch.cat([item.features for item in items]),
            torch.repeat_interleave(torch.arange(len(items)), sizes),
            len(items),
            torch.stack([item.targets for item in items]),
            [item.id for item in items],
        )


def split_paths(splits: str | Path | Sequence[str | Path]) -> list[str]:
    """One split CSV or several, as a list of paths."""
    return [str(splits)] if isinstance(splits, (str, Path)) else [str(path) for path in splits]


def split_ids(splits: str | Path | Sequence[str | Path]) -> list[str]:
    """Every crystal of one split CSV or several (each once, in first-seen order): a cache serves them all."""
    from crystal_transfer.data.split import read_split

    ids: dict[str, None] = {}
    for path in split_paths(splits):
        parts = read_split(path)
        ids.update(dict.fromkeys(parts["train"] + parts["val"] + parts["test"]))
    return list(ids)


def run(source: str | Path, depth: int | str, graphs: str | Path, table: str | Path,
        split: str | Path | Sequence[str | Path], out: str | Path, log=print) -> dict[str, Any]:
    """The ``frozen-features`` stage: cache ``source``'s features at ``depth`` for every crystal of the split
    CSV(s) ``split``."""
    from crystal_transfer.models.saved import TRANSFER_KEYS, WEIGHTS_FILE, check_graph_settings, load_model

    saved = load_model(source)
    dataset = GraphDataset(graphs, ids=split_ids(split), table=table)
    check_graph_settings(saved.graph_settings, dataset.settings.as_dict(), keys=TRANSFER_KEYS, graphs=graphs)
    provenance = {
        "source": str(source),
        "source_weights_sha256": sha256_file(Path(source) / WEIGHTS_FILE),
        "depth": depth,
        "graphs": str(graphs),
    }
    index = write_frozen_features(saved.model, depth, dataset, out, provenance)
    log(
        f"cached atom features after depth {depth} of {source}: {len(index['ids'])} crystals, "
        f"{tuple(index['shape'])} -> {out}"
    )
    return index


def universal_cache_path(out_dir: str | Path, name: str, level: int | str) -> Path:
    """Where :func:`run_universal` writes source ``name``'s features at ``level`` (the CGCNN caches' naming)."""
    return Path(out_dir) / f"{name}-depth{level}.pt"


def run_universal(name: str, spec: dict[str, Any], levels: Sequence[int | str], table: str | Path,
                  split: str | Path | Sequence[str | Path], out_dir: str | Path,
                  log=print) -> dict[int | str, dict[str, Any]]:
    """The ``frozen-features`` stage for a universal potential (``spec["kind"]``: chgnet or sevenn): one pass over
    every crystal of the split CSV(s) ``split`` gives the caches of all ``levels`` (each in a CGCNN trunk's cache
    format, plus the crystals the model rejected) and ``<name>-rejected.csv``."""
    from crystal_transfer.atomic import write_csv
    from crystal_transfer.data.table import structures
    from crystal_transfer.models import universal

    source = universal.source_of(spec["kind"])
    unknown = [level for level in levels if level not in source.levels]
    if unknown:
        raise InputError(f"{name} ({source.model}) has no feature level {', '.join(map(str, unknown))}; "
                         f"its levels: {', '.join(map(str, source.levels))}")
    model = universal.extractor(source.kind, spec.get("device", "auto"))
    ids = split_ids(split)
    result = model.features(ids, structures(table, ids), batch_size=int(spec.get("batch_size", 32)), log=log)
    counts = torch.tensor(result.atom_counts, dtype=torch.long)
    atom_offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    atom_offsets[1:] = torch.cumsum(counts, 0)
    provenance = {
        "source": f"{source.requirement()} ({source.model})",
        "source_weights_sha256": source.sha256,
        "kind": source.kind,
        "table": str(table),
        "split": split_paths(split),
    }
    caches = {}
    for level in levels:
        offsets = torch.arange(len(counts) + 1, dtype=torch.long) if level == "crystal" else atom_offsets
        cache = {"ids": result.ids, "offsets": offsets, "features": result.levels[level], "depth": level,
                 "rejected": result.rejected}
        path = universal_cache_path(out_dir, name, level)
        save_frozen_features(cache, path, {**provenance, "depth": level})
        caches[level] = {**cache, "provenance": {**provenance, "depth": level}}
    write_csv(Path(out_dir) / f"{name}-rejected.csv", ["id", "reason", "message"], result.rejected)
    reasons = Counter(entry["reason"] for entry in result.rejected)
    log(f"{source.model} features of {len(result.ids)} of {len(ids)} crystals at levels "
        f"{', '.join(map(str, levels))} -> {out_dir}; rejected {len(result.rejected)}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))})" if reasons else ""))
    return caches
