"""A PyTorch dataset over graph shards, and the collate that turns crystals into one :class:`GraphBatch`.

Shards are checked (sha256 and graph settings against the manifest, whose shards passed the content checks of
:func:`crystal_transfer.graphs.shards.check_graph_arrays`) when the dataset is built, only those holding a selected
crystal. A crystal is read when it is served, its rows only (:class:`~crystal_transfer.graphs.shards.ShardReader`),
so the memory in use does not grow with the dataset: a million crystals train within the memory of a thousand.
Labels come from the canonical table; the table must be the one the shards were built from.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crystal_transfer.atomic import recorded_sha256
from crystal_transfer.errors import MissingError
from crystal_transfer.graphs.batch import GraphBatch
from crystal_transfer.graphs.errors import GraphStageError
from crystal_transfer.graphs.settings import GraphSettings
from crystal_transfer.graphs.shards import (
    ShardFormatError,
    ShardReader,
    read_header,
)
from crystal_transfer.graphs.stage import REJECTED_FILE, file_sha256, read_manifest, rebuild_command

# Shard files held open at once by a dataset (a dataset of a million crystals has about 500 shards).
OPEN_SHARDS = 64
_SHARD_SHA256: dict[tuple[str, int, int], str] = {}
_TABLE_INDEX: dict[str, Any] = {}
_SHARD_HEADERS: dict[tuple[str, int, int], dict[str, Any]] = {}


def _shard_header(path: Path) -> dict[str, Any]:
    """What a dataset needs of a shard's header (layout, settings, table, crystal count), parsed once per process
    while the file's size and time stay the same (the train, validation and test sets of a run share it)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHARD_HEADERS:
        header = read_header(path)
        meta = header["meta"]
        _SHARD_HEADERS[key] = {"arrays": header["arrays"], "settings": meta.get("settings"),
                               "table_sha256": meta.get("table_sha256"), "crystals": len(meta.get("ids", []))}
    return _SHARD_HEADERS[key]


def _shard_sha256(path: Path, entry: dict[str, Any]) -> str:
    """A shard file's sha256: the manifest's while the file keeps the size and time the manifest recorded with it
    (a file altered since has another time; a crystal's values are checked again when it is read), else hashed,
    once per process while its size and time stay the same."""
    stat = path.stat()
    if entry.get("bytes") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["sha256"])
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHARD_SHA256:
        _SHARD_SHA256[key] = file_sha256(path)
    return _SHARD_SHA256[key]


@dataclass
class CrystalItem:
    """One crystal as returned by :class:`GraphDataset` (numpy views into a shard)."""

    id: str
    numbers: np.ndarray  # (n,) atomic numbers
    nbr_idx: np.ndarray  # (n, M) neighbour index within the crystal
    nbr_dist: np.ndarray  # (n, M) float32 distances, Å
    nbr_count: np.ndarray  # (n,) real neighbour slots per atom
    targets: np.ndarray  # (T,) float32, NaN where missing


def collate_graphs(items: Sequence[CrystalItem], cgcnn_padding: bool = False) -> GraphBatch:
    """Stack crystals into a :class:`GraphBatch`: flat arrays concatenated, neighbour indices shifted by offsets.

    ``nbr_mask`` is True for real neighbours, or everywhere with ``cgcnn_padding`` (the original code uses
    padded slots, which point at the crystal's atom 0 at distance radius + 1).
    """
    batch_size = len(items)
    sizes = np.fromiter((len(item.numbers) for item in items), dtype=np.int64, count=batch_size)
    starts = np.cumsum(sizes) - sizes
    numbers = np.concatenate([item.numbers for item in items]).astype(np.int64)
    nbr_idx = np.concatenate([item.nbr_idx for item in items]).astype(np.int64)
    nbr_idx += np.repeat(starts, sizes)[:, None]
    nbr_dist = np.concatenate([item.nbr_dist for item in items])
    if cgcnn_padding:
        nbr_mask = np.ones(nbr_idx.shape, dtype=bool)
    else:
        counts = np.concatenate([item.nbr_count for item in items])
        nbr_mask = np.arange(nbr_idx.shape[1]) < counts[:, None]
    targets = np.stack([item.targets for item in items]) if batch_size else np.zeros((0, 0), np.float32)
    return GraphBatch(
        numbers=torch.from_numpy(numbers),
        nbr_idx=torch.from_numpy(nbr_idx),
        nbr_dist=torch.from_numpy(np.ascontiguousarray(nbr_dist, dtype=np.float32)),
        nbr_mask=torch.from_numpy(nbr_mask),
        crystal=torch.from_numpy(np.repeat(np.arange(batch_size, dtype=np.int64), sizes)),
        num_crystals=batch_size,
        targets=torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32)),
        ids=[item.id for item in items],
    )


class GraphDataset(torch.utils.data.Dataset):
    """Crystals of a graph folder (``results/graphs/<dataset>``), selected by id, with label columns as targets.

    Args:
        graph_dir: folder holding ``manifest.json`` and the shards.
        ids: crystals to serve, in this order (default: every crystal of the shards, in table order).
        targets: label columns of the canonical table, in order; missing values are NaN.
        table: the canonical table (default: the manifest's); its sha256 must match the manifest's.
        on_rejected: ``skip`` (warn and leave out) or ``raise`` for selected ids the graph stage rejected.

    Use ``DataLoader(dataset, batch_size=..., collate_fn=dataset.collate)``.
    """

    def __init__(
        self,
        graph_dir: str | Path,
        ids: Sequence[str] | None = None,
        targets: Sequence[str] = (),
        table: str | Path | None = None,
        on_rejected: str = "skip",
    ) -> None:
        # long: each check of the graphs against the table and the selection names its own fix
        self.graph_dir = Path(graph_dir)
        self.manifest = read_manifest(self.graph_dir)
        self.settings = GraphSettings.from_dict(self.manifest["settings"])
        self.targets = list(targets)
        self.skipped: list[str] = []
        table = Path(table or self.manifest["table"])
        if recorded_sha256(table) != self.manifest["table_sha256"]:
            raise GraphStageError(
                f"the graphs in {self.graph_dir} were built from another version of {table} (sha256 differs from "
                f"the manifest's); rebuild them with: {rebuild_command(self.graph_dir, self.manifest)}"
            )
        table_ids, labels, row_of = self._read_table(table)
        rejected = self._rejected_ids()
        wanted = [i for i in table_ids if i not in rejected] if ids is None else list(ids)
        found = np.fromiter((row_of.get(i, -1) for i in wanted), dtype=np.int64, count=len(wanted))
        if (found < 0).any():
            unknown = [wanted[k] for k in np.flatnonzero(found < 0)]
            raise MissingError(f"{len(unknown)} ids are not in {table}, e.g. {', '.join(map(str, unknown[:5]))}")
        dropped = [i for i in wanted if i in rejected] if rejected else []
        if dropped:
            if on_rejected == "raise":
                raise GraphStageError(
                    f"{len(dropped)} selected crystals were rejected by the graph stage (see "
                    f"{self.graph_dir / REJECTED_FILE}), e.g. {', '.join(dropped[:5])}: {rejected[dropped[0]]}"
                )
            warnings.warn(
                f"leaving out {len(dropped)} selected crystals that the graph stage rejected "
                f"(listed in {self.graph_dir / REJECTED_FILE})",
                stacklevel=2,
            )
            self.skipped = dropped
            keep = np.fromiter((i not in rejected for i in wanted), dtype=bool, count=len(wanted))
            wanted, found = [i for i in wanted if i not in rejected], found[keep]
        self.ids = wanted
        rows = found
        self._targets = labels[rows] if len(self.targets) else np.zeros((len(rows), 0), np.float32)
        # A shard holds its table rows less those the graph stage rejected, in order: a crystal's position in its
        # shard is its row's offset less the rejected rows before it (checked below against each shard's count).
        bounds = np.array([entry["rows"] for entry in self.manifest["shards"]], dtype=np.int64).reshape(-1, 2)
        self._shard = np.searchsorted(bounds[:, 0], rows, side="right") - 1
        gone = np.sort(np.fromiter((row_of[i] for i in rejected if i in row_of), dtype=np.int64))
        first = bounds[self._shard, 0] if len(rows) else np.zeros(0, np.int64)
        self._position = rows - first - (np.searchsorted(gone, rows) - np.searchsorted(gone, first))
        self._layouts: dict[int, dict[str, Any]] = {}
        for shard in np.unique(self._shard).tolist():
            header = self._verified_header(shard)
            start, stop = bounds[shard]
            expected = int(stop - start - (np.searchsorted(gone, stop) - np.searchsorted(gone, start)))
            if header["crystals"] != expected:
                raise self._stale(shard, f"it holds {header['crystals']} crystals, not the {expected} of its table "
                                         "rows that the graph stage kept")
            self._layouts[shard] = header["arrays"]
        self._readers: dict[int, ShardReader] = {}  # a reader holds its shard's pointers and radii: kilobytes
        self._open: dict[int, None] = {}  # shards whose file is open, least recently read first

    @classmethod
    def from_split(
        cls, graph_dir: str | Path, split_csv: str | Path, part: str, targets: Sequence[str] = (), **kwargs: Any
    ) -> GraphDataset:
        """The crystals of one part (``train``, ``val``, ``test``) of a split CSV (``id,split``)."""
        from crystal_transfer.data.split import read_split

        return cls(graph_dir, ids=read_split(split_csv)[part], targets=targets, **kwargs)

    def _read_table(self, table: Path) -> tuple[list[str], np.ndarray, dict[str, int]]:
        """The table's ids, the target labels and each id's row; the last table read is kept for the next dataset
        (a run's train, validation and test sets read one table of up to millions of rows)."""
        import pyarrow.parquet as pq

        from crystal_transfer.data.table import label_values, read_table

        key = (str(table.resolve()), self.manifest["table_sha256"], tuple(self.targets))
        if _TABLE_INDEX.get("key") == key:
            return _TABLE_INDEX["value"]
        available = pq.read_schema(table).names
        missing = [t for t in self.targets if t not in available]
        if missing:
            raise MissingError(f"{table} has no label {', '.join(missing)} (columns: {', '.join(available)})")
        data = read_table(table, columns=["id", *self.targets])
        labels = np.stack([label_values(data, t) for t in self.targets], axis=1) if self.targets else None
        ids = data.column("id").to_pylist()
        value = (ids, labels.astype(np.float32) if labels is not None else np.zeros(0),
                 {crystal_id: row for row, crystal_id in enumerate(ids)})
        _TABLE_INDEX.update(key=key, value=value)
        return value

    def _rejected_ids(self) -> dict[str, str]:
        path = self.graph_dir / REJECTED_FILE
        if not path.is_file():
            return {}
        with open(path, newline="") as handle:
            return {row["id"]: f"{row['reason']}: {row['message']}" for row in csv.DictReader(handle)}

    def _stale(self, shard: int, problem: str) -> GraphStageError:
        path = self.graph_dir / self.manifest["shards"][shard]["file"]
        return GraphStageError(
            f"graph shard {path} cannot be used: {problem}; rebuild it with: "
            f"{rebuild_command(self.graph_dir, self.manifest, [shard])}"
        )

    def _verified_header(self, shard: int) -> dict[str, Any]:
        """The shard's array layout and crystal count, once its file matches the manifest's sha256 and its header
        the manifest's settings and table."""
        entry = self.manifest["shards"][shard]
        path = self.graph_dir / entry["file"]
        if not path.is_file():
            raise self._stale(shard, "the file is missing")
        digest = _shard_sha256(path, entry)
        if digest != entry["sha256"]:
            raise self._stale(
                shard, f"it is corrupted or was replaced (sha256 {digest[:12]}…, manifest {entry['sha256'][:12]}…)"
            )
        try:
            header = _shard_header(path)
        except ShardFormatError as exc:
            raise self._stale(shard, str(exc)) from None
        if header["settings"] != self.manifest["settings"] or header["table_sha256"] != self.manifest["table_sha256"]:
            raise self._stale(
                shard, "it was built with other graph settings or from another table than the manifest says"
            )
        return header

    def _reader(self, shard: int) -> ShardReader:
        reader = self._readers.get(shard)
        if reader is None:
            path = self.graph_dir / self.manifest["shards"][shard]["file"]
            try:  # its sha256 matched the manifest's, which was written only after its content passed every check
                reader = self._readers[shard] = ShardReader(path, self._layouts[shard])
            except (ShardFormatError, OSError) as exc:
                raise self._stale(shard, str(exc)) from None
        self._open.pop(shard, None)
        self._open[shard] = None  # most recently read last; the least recent file is closed beyond OPEN_SHARDS
        if len(self._open) > OPEN_SHARDS:
            oldest = next(iter(self._open))
            del self._open[oldest]
            self._readers[oldest].close()
        return reader

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> CrystalItem:
        shard = int(self._shard[index])
        try:
            arrays = self._reader(shard).crystal(int(self._position[index]))
        except ShardFormatError as exc:
            raise self._stale(shard, str(exc)) from None
        return CrystalItem(
            id=self.ids[index],
            numbers=arrays["numbers"],
            nbr_idx=arrays["nbr_idx"],
            nbr_dist=arrays["nbr_dist"],
            nbr_count=arrays["nbr_count"],
            targets=self._targets[index],
        )

    def collate(self, items: Sequence[CrystalItem]) -> GraphBatch:
        """:func:`collate_graphs` with this dataset's padding convention."""
        return collate_graphs(items, cgcnn_padding=self.settings.cgcnn_padding)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"], state["_open"] = {}, {}  # files are reopened in the receiving process (DataLoader workers)
        return state
