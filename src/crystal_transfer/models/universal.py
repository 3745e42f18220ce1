"""Frozen features of universal interatomic potentials whose weights ship in their wheels: CHGNet and SevenNet.

Each is a feature source beside the CGCNN trunks: ``features(structures)`` returns, per level, the per-atom
features (``0``: the element embedding; ``k``: after k interaction blocks) and, as level ``crystal``, the
pooled crystal vector; :func:`crystal_transfer.experiments.frozen_features.run_universal` writes them in the
cache format of a CGCNN trunk. The package versions and the checkpoints' sha256 are pinned here: another
version, or a checkpoint whose bytes differ, is refused before anything is loaded.

- CHGNet 0.3.0 (``chgnet==0.4.2``): the checkpoint holds plain tensors and is read with ``weights_only=True``.
  Its levels 1-4 are the outputs of the four atom convolutions; ``crystal`` is the mean of the last one after
  the readout LayerNorm (CHGNet's ``crystal_fea``); level 3 is CHGNet's ``atom_fea``.
- SevenNet-0 (11 Jul 2024, ``sevenn==0.13.0``): its checkpoint stores numpy arrays and a ``torch.device`` in
  its config, so only sevenn's own loader (``weights_only=False``) reads it; it is called only after the file's
  sha256 matched the pin. Its levels 1-5 are the invariant (0e) channels of the node features after each
  interaction block's gate; ``crystal`` is their mean after the last block.

Crystals a model cannot handle are returned as rejections with a reason, never dropped: an element outside
its training set (``unsupported_element``), an atom with no neighbour within its cut-off (``isolated_atom``),
anything the library raises (``featurisation_failed``) and features that are not finite
(``non_finite_features``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crystal_transfer.atomic import sha256_file
from crystal_transfer.errors import InputError, UserError
from crystal_transfer.progress import Counter

UNSUPPORTED_ELEMENT = "unsupported_element"
ISOLATED_ATOM = "isolated_atom"
FEATURISATION_FAILED = "featurisation_failed"
NON_FINITE_FEATURES = "non_finite_features"

EXTRA = "universal"


class MissingExtra(UserError):
    """A universal feature source whose package is not installed (or is another version)."""


@dataclass(frozen=True)
class UniversalSource:
    """A pinned universal potential: package, version, checkpoint inside the wheel, its sha256, its levels."""

    kind: str
    package: str
    version: str
    model: str
    checkpoint: str
    sha256: str
    levels: tuple[int | str, ...]
    width: int
    cutoff: float
    default_level: int | str

    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SOURCES: dict[str, UniversalSource] = {
    "chgnet": UniversalSource(
        kind="chgnet",
        package="chgnet",
        version="0.4.2",
        model="CHGNet 0.3.0",
        checkpoint="pretrained/0.3.0/chgnet_0.3.0_e29f68s314m37.pth.tar",
        sha256="d14ab7c0f093efe64b60a7bcd540bca10e74fb7f46c86108a079af60524659d1",
        levels=(0, 1, 2, 3, 4, "crystal"),
        width=64,
        cutoff=6.0,
        default_level=4,
    ),
    "sevenn": UniversalSource(
        kind="sevenn",
        package="sevenn",
        version="0.13.0",
        model="SevenNet-0 (11Jul2024)",
        checkpoint="pretrained_potentials/SevenNet_0__11Jul2024/checkpoint_sevennet_0.pth",
        sha256="7052cb42b7b3be42b40b97fa0d21077a48c54b5548948fc4dcf346629f813c36",
        levels=(0, 1, 2, 3, 4, 5, "crystal"),
        width=128,
        cutoff=5.0,
        default_level=5,
    ),
}


def source_of(kind: str) -> UniversalSource:
    """The pinned source of a ``pretrain`` kind (``chgnet`` or ``sevenn``)."""
    if kind not in SOURCES:
        raise InputError(f"unknown universal feature source {kind!r}; known: {', '.join(SOURCES)}")
    return SOURCES[kind]


def installed(kind: str) -> Path:
    """The installed package's folder, after checking it is the pinned version (no import: the workflow calls this
    when it reads the config, so a missing extra stops the run at once); else :class:`MissingExtra`."""
    source = source_of(kind)
    how = (f"install the project's optional extra: pip install -e '.[{EXTRA}]' (make setup does), "
           f"or pip install {source.requirement()}")
    try:
        spec = importlib.util.find_spec(source.package)
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules, i.e. blocked
        spec = None
    try:
        version = importlib.metadata.version(source.package) if spec is not None else None
    except importlib.metadata.PackageNotFoundError:
        version = None
    if spec is None or spec.origin is None or version is None:
        raise MissingExtra(
            f"feature source kind {kind!r} needs the package {source.requirement()}, which is not installed: {how}"
        )
    if version != source.version:
        raise MissingExtra(
            f"feature source kind {kind!r} is pinned to {source.requirement()} (its checkpoint's sha256 and "
            f"feature levels are checked against that release), but {source.package} {version} is installed: {how}"
        )
    return Path(spec.origin).parent


def require(kind: str) -> Path:
    """:func:`installed`, then the package imported (an import that fails is named with the extra to reinstall)."""
    folder = installed(kind)
    source = source_of(kind)
    try:
        _quiet_import(source.package)
    except ImportError as exc:
        raise MissingExtra(f"{source.requirement()} is installed but cannot be imported ({exc}); reinstall the "
                           f"project's extra: pip install --force-reinstall -e '.[{EXTRA}]'") from None
    return folder


def check_installed(kinds) -> None:
    """:func:`installed` for each kind (the workflow's check of a config, before any job runs)."""
    for kind in sorted(set(kinds)):
        installed(kind)


def checkpoint(kind: str) -> Path:
    """The checkpoint file inside the installed wheel, after its sha256 matched the pin."""
    source = source_of(kind)
    path = require(kind) / source.checkpoint
    if not path.is_file():
        raise MissingExtra(f"{source.requirement()} is installed without its checkpoint {source.checkpoint}; "
                           f"reinstall it: pip install --force-reinstall {source.requirement()}")
    digest = sha256_file(path)
    if digest != source.sha256:
        raise InputError(f"{path}: sha256 {digest} differs from the pinned {source.sha256} of {source.model}; "
                         f"the file is not the one this project was tested with: reinstall {source.requirement()}")
    return path


def _one_line(exc: Exception) -> str:
    """An exception as a short one-line rejection message: its type and the first line of its text."""
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


@dataclass
class FeatureResult:
    """Features of the crystals a model handled, per level, and the ones it rejected with reasons."""

    ids: list[str]
    atom_counts: list[int]
    levels: dict[int | str, Any]  # torch tensors: level -> (sum of atoms, F), 'crystal' -> (crystals, F)
    rejected: list[dict[str, str]]


class _Extractor:
    """Shared batching, rejection and assembly; a subclass knows its library."""

    kind = ""

    def __init__(self, device: str = "auto") -> None:
        from crystal_transfer.training.trainer import pick_device

        self.source = source_of(self.kind)
        self.device = pick_device(device)  # auto: CUDA when available, else the CPU; an unusable one is named

    def prepare(self, crystal_id: str, structure) -> Any:
        """The library's input for one crystal; raises :class:`_Refused` for a crystal it cannot handle."""
        raise NotImplementedError

    def forward(self, inputs: list[Any]) -> dict[int | str, list[np.ndarray]]:
        """Per level, one array per crystal of ``inputs``."""
        raise NotImplementedError

    def features(self, ids: Sequence[str], structures: Sequence, batch_size: int = 32,
                 log: Callable[[str], None] = print) -> FeatureResult:
        """Features at every level of each crystal the model can handle; the rest rejected with a reason."""
        rows: dict[int | str, list[np.ndarray]] = {level: [] for level in self.source.levels}
        kept, counts, rejected = [], [], []
        progress = Counter(len(ids), f"{self.source.model} features", log)
        for start in range(0, len(ids), batch_size):
            batch_ids, inputs = [], []
            for crystal_id, structure in zip(ids[start:start + batch_size], structures[start:start + batch_size],
                                             strict=True):
                try:
                    inputs.append(self.prepare(crystal_id, structure))
                    batch_ids.append(crystal_id)
                except _Refused as refusal:
                    rejected.append({"id": crystal_id, "reason": refusal.reason, "message": refusal.message})
                except Exception as exc:  # noqa: BLE001 - the library's graph builders raise any type
                    rejected.append({"id": crystal_id, "reason": FEATURISATION_FAILED, "message": _one_line(exc)})
            for crystal_id, per_level in self._forward_guarded(batch_ids, inputs, rejected):
                for level, array in per_level.items():
                    rows[level].append(array)
                kept.append(crystal_id)
                counts.append(len(per_level[0]))
            progress.advance(len(ids[start:start + batch_size]))
        import torch

        width = self.source.width
        levels = {
            level: torch.from_numpy(np.concatenate(arrays).astype(np.float32)) if arrays
            else torch.zeros(0, width) for level, arrays in rows.items()
        }
        return FeatureResult(kept, counts, levels, rejected)

    def _forward_guarded(self, ids: list[str], inputs: list[Any], rejected: list[dict[str, str]]):
        """(id, {level: array}) of each crystal; a failing batch is retried crystal by crystal to find the culprit."""
        import torch

        if not inputs:
            return []
        try:
            with torch.no_grad():
                outputs = self.forward(inputs)
        except Exception as exc:  # noqa: BLE001 - the library's own errors, any type: find the crystal by itself
            if len(inputs) == 1:
                rejected.append({"id": ids[0], "reason": FEATURISATION_FAILED, "message": _one_line(exc)})
                return []
            results = []
            for crystal_id, item in zip(ids, inputs, strict=True):
                results.extend(self._forward_guarded([crystal_id], [item], rejected))
            return results
        results = []
        for index, crystal_id in enumerate(ids):
            per_level = {level: arrays[index] for level, arrays in outputs.items()}
            if not all(np.isfinite(array).all() for array in per_level.values()):
                rejected.append({"id": crystal_id, "reason": NON_FINITE_FEATURES,
                                 "message": f"{self.source.model} gave non-finite features"})
                continue
            results.append((crystal_id, per_level))
        return results


class _Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def _quiet_import(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


class ChgnetFeatures(_Extractor):
    """CHGNet 0.3.0's atom features at levels 0-4 and its crystal vector, batched."""

    kind = "chgnet"

    def __init__(self, device: str = "auto") -> None:
        import torch

        super().__init__(device)
        path = checkpoint(self.kind)
        model_module = _quiet_import("chgnet.model.model")
        state = torch.load(path, map_location="cpu", weights_only=True)
        # as CHGNet.load("0.3.0") builds it (mlp_out_bias only for 0.2.0), from the pinned file
        self.model = model_module.CHGNet.from_dict(state["model"], mlp_out_bias=False, version="0.3.0")
        self.model = self.model.to(self.device).eval()
        self.max_z = self.model.atom_embedding.embedding.num_embeddings  # H is row 0
        # MPtrj, CHGNet's training set, has no Po-Ra (Z 84-88; SevenNet-0's type map, fitted to the same
        # data, lacks exactly these): their embedding rows were never trained, so their features mean nothing
        self.untrained = frozenset(range(84, 89))
        self.converter = self.model.graph_converter
        self.levels_seen: dict[int, Any] = {}
        self.model.atom_embedding.register_forward_hook(self._keep(0))
        for index, layer in enumerate(self.model.atom_conv_layers):
            layer.register_forward_hook(self._keep(index + 1))

    def _keep(self, level: int):
        def hook(_module, _inputs, output):
            self.levels_seen[level] = output.detach()
        return hook

    def prepare(self, crystal_id: str, structure):
        unknown = sorted({site.specie.symbol for site in structure
                          if site.specie.Z > self.max_z or site.specie.Z in self.untrained})
        if unknown:
            raise _Refused(UNSUPPORTED_ELEMENT, f"CHGNet 0.3.0 was not trained on {', '.join(unknown)} "
                           f"(MPtrj: Z <= {self.max_z} without Po-Ra)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return self.converter(structure, graph_id=crystal_id)
            except ValueError as exc:
                if "isolated atom" in str(exc):
                    raise _Refused(ISOLATED_ATOM, f"an atom has no neighbour within CHGNet's "
                                   f"{self.converter.atom_graph_cutoff} Å") from None
                raise _Refused(FEATURISATION_FAILED, str(exc).splitlines()[0][:200]) from None

    def forward(self, inputs: list[Any]) -> dict[int | str, list[np.ndarray]]:
        import torch

        self.levels_seen.clear()
        graphs = [graph.to(self.device) for graph in inputs]
        prediction = self.model(graphs, task="e", return_crystal_feas=True)
        sizes = [graph.atomic_number.shape[0] for graph in inputs]
        out: dict[int | str, list[np.ndarray]] = {
            level: [t.cpu().numpy() for t in torch.split(self.levels_seen[level], sizes)]
            for level in range(len(self.model.atom_conv_layers) + 1)
        }
        out["crystal"] = [row[None, :] for row in prediction["crystal_fea"].cpu().numpy()]
        return out


class SevennetFeatures(_Extractor):
    """SevenNet-0's invariant node features at levels 0-5 and their mean, batched with torch_geometric."""

    kind = "sevenn"

    def __init__(self, device: str = "auto") -> None:
        super().__init__(device)
        path = checkpoint(self.kind)  # sha256 checked: only then may sevenn's loader unpickle it
        util = _quiet_import("sevenn.util")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, config = util.model_from_checkpoint(str(path))
        self.model = model.to(self.device).eval()
        self.model.set_is_batch_data(True)
        self.cutoff = float(config["cutoff"])
        self.type_map = dict(config["_type_map"])
        self.n_blocks = int(config["num_convolution_layer"])
        self.scalars = int(self.model._modules["onehot_to_feature_x"].linear.irreps_out[0].mul)
        self.dataload = _quiet_import("sevenn.train.dataload")
        self.graph_data = _quiet_import("sevenn.atom_graph_data")
        self.batch_class = _quiet_import("torch_geometric.data").Batch
        self.ase_adaptor = _quiet_import("pymatgen.io.ase").AseAtomsAdaptor

    def prepare(self, crystal_id: str, structure):
        missing = sorted({site.specie.symbol for site in structure if site.specie.Z not in self.type_map})
        if missing:
            raise _Refused(UNSUPPORTED_ELEMENT, f"SevenNet-0 was not trained on {', '.join(missing)}")
        atoms = self.ase_adaptor.get_atoms(structure)
        graph = self.dataload.unlabeled_atoms_to_graph(atoms, self.cutoff)
        lonely = len(structure) - len(np.unique(graph["edge_index"][1]))
        if lonely:
            raise _Refused(ISOLATED_ATOM, f"{lonely} atom(s) have no neighbour within SevenNet's {self.cutoff} Å")
        return self.graph_data.AtomGraphData.from_numpy_dict(graph)

    def forward(self, inputs: list[Any]) -> dict[int | str, list[np.ndarray]]:
        import torch

        data = self.batch_class.from_data_list(inputs).to(self.device)
        data = self.model._preprocess(data)
        seen: dict[int, Any] = {}
        last_gate = f"{self.n_blocks - 1}_equivariant_gate"
        for name, module in self.model._modules.items():
            data = module(data)
            if name == "onehot_to_feature_x":
                seen[0] = data["x"][:, : self.scalars]
            elif name.endswith("_equivariant_gate"):
                seen[int(name.split("_")[0]) + 1] = data["x"][:, : self.scalars]
                if name == last_gate:
                    break  # the energy readout and the forces are not features
        sizes = [int(item["num_atoms"]) for item in inputs]
        out: dict[int | str, list[np.ndarray]] = {
            level: [t.cpu().numpy() for t in torch.split(seen[level].detach(), sizes)] for level in seen
        }
        out["crystal"] = [array.mean(axis=0, keepdims=True) for array in out[self.n_blocks]]
        return out


EXTRACTORS: dict[str, type[_Extractor]] = {"chgnet": ChgnetFeatures, "sevenn": SevennetFeatures}


def extractor(kind: str, device: str = "auto") -> _Extractor:
    """The feature extractor of ``kind``, its package and checkpoint checked first."""
    require(kind)
    return EXTRACTORS[kind](device)
