"""The graphs stage on real Materials Project crystals: exactness against CGCNN, isolated atoms, shards, dataset.

Data: ``$CRYSTAL_TRANSFER_SHARED_DATA/mp2018`` (default ``<repo>/../shared/data``). A random sample of 240 crystals
(seeded) goes through the data stage and the graphs stage, and is compared with a reference written here from
the definition of CGCNN's ``CIFData`` featurisation, run on structures parsed straight from the CIF files.

Ties: CGCNN sorts each atom's neighbours by distance with a stable sort, so inside a group of equal distances the
order, and which members survive the cut at 12, follow pymatgen's output order. The stage breaks ties
deterministically (neighbour index, then image). The comparison therefore groups the reference's full sorted
neighbour list into distance shells (consecutive distances within 1e-6 Å) and requires, slot by slot, equal
distances and, per shell, the same multiset of neighbour indices (for the shell cut by the 12th slot: a
sub-multiset of that shell, of the same size).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from crystal_transfer.cli.main import main
from crystal_transfer.config import ConfigError, load_config, validate_config
from crystal_transfer.data.split import write_split
from crystal_transfer.data.stage import build_dataset
from crystal_transfer.graphs.crystal_graph import GraphRejection, crystal_graph
from crystal_transfer.graphs.dataset import GraphDataset, collate_graphs
from crystal_transfer.graphs.errors import GraphStageError
from crystal_transfer.graphs.neighbours import TIE_TOLERANCE
from crystal_transfer.graphs.settings import SEARCHES, GraphSettings, graph_config
from crystal_transfer.graphs.shards import (
    ShardFormatError,
    check_graph_arrays,
    map_arrays,
    read_header,
    write_shard,
)
from crystal_transfer.graphs.stage import build_graphs, file_sha256, read_json
from crystal_transfer.models.layers import gaussian_centres, gaussian_expand

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CRYSTAL_TRANSFER_SHARED_DATA", REPO.parent / "shared" / "data"))
MP2018 = SHARED / "mp2018"
SAMPLE_SIZE = 240
STRETCHED_ID = "mp-2-stretched"
LABELS = ["formation_energy_per_atom", "band_gap", "energy_per_atom", "efermi", "K_VRH", "G_VRH"]

pytestmark = pytest.mark.skipif(
    not (MP2018 / "structures.tar.gz").is_file(),
    reason=f"real data not found at {MP2018} (set CRYSTAL_TRANSFER_SHARED_DATA to the shared data folder)",
)


# ----------------------------------------------------------------------------------------------------------------
# The reference: CGCNN's CIFData featurisation, written from its definition.


def _cgcnn_gaussians(distances) -> np.ndarray:
    """The model's Gaussian edge features (41 centres 0..8 Å, width 0.2) of ``distances``, in float64."""
    values = torch.from_numpy(np.array(distances, dtype=np.float64))
    return gaussian_expand(values, gaussian_centres(0.0, 8.0, 0.2), 0.2).numpy()


def cgcnn_reference(structure, radius: float = 8.0, max_num_nbr: int = 12, dmin: float = 0.0, step: float = 0.2):
    """CGCNN: get_all_neighbors, stable sort by distance, first 12, pad with (atom 0, radius + 1), Gaussians.

    Returns (nbr_idx, nbr_dist, gaussian features, full sorted neighbour lists as (distance, index) pairs).
    """
    all_nbrs = structure.get_all_neighbors(radius, include_index=True)
    all_nbrs = [sorted(nbrs, key=lambda x: x[1]) for nbrs in all_nbrs]
    nbr_fea_idx, nbr_fea = [], []
    for nbr in all_nbrs:
        if len(nbr) < max_num_nbr:
            nbr_fea_idx.append([x[2] for x in nbr] + [0] * (max_num_nbr - len(nbr)))
            nbr_fea.append([x[1] for x in nbr] + [radius + 1.0] * (max_num_nbr - len(nbr)))
        else:
            nbr_fea_idx.append([x[2] for x in nbr[:max_num_nbr]])
            nbr_fea.append([x[1] for x in nbr[:max_num_nbr]])
    nbr_fea_idx, nbr_fea = np.array(nbr_fea_idx), np.array(nbr_fea)
    centres = np.arange(dmin, radius + step, step)
    gaussians = np.exp(-((nbr_fea[..., np.newaxis] - centres) ** 2) / step**2)
    full = [[(x[1], x[2]) for x in nbrs] for nbrs in all_nbrs]
    return nbr_fea_idx, nbr_fea, gaussians, full


def shells(distances: list[float]) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive distances within the tie tolerance of the previous one."""
    ranges: list[tuple[int, int]] = []
    start = 0
    for k in range(1, len(distances) + 1):
        if k == len(distances) or distances[k] - distances[k - 1] > TIE_TOLERANCE:
            ranges.append((start, k))
            start = k
    return ranges


def compare_with_reference(item, reference, max_num_nbr: int = 12) -> dict[str, int]:
    """Assert that one crystal's graph equals the reference up to ties; count the cut shells seen."""
    ref_idx, ref_dist, ref_gauss, full = reference
    stats = Counter()
    assert item.nbr_dist.shape == ref_dist.shape
    np.testing.assert_allclose(item.nbr_dist, ref_dist, rtol=0, atol=2e-6)
    ours = _cgcnn_gaussians(item.nbr_dist)
    np.testing.assert_allclose(ours, ref_gauss, rtol=0, atol=1e-5)
    for atom, neighbours in enumerate(full):
        count = min(len(neighbours), max_num_nbr)
        assert item.nbr_count[atom] == count
        mine = [int(i) for i in item.nbr_idx[atom, :count]]
        for start, stop in shells([d for d, _ in neighbours]):
            if start >= count:
                break
            shell_indices = Counter(i for _, i in neighbours[start:stop])
            chosen = Counter(mine[start : min(stop, count)])
            assert mine[start : min(stop, count)] == sorted(mine[start : min(stop, count)]), "tie order"
            if stop <= count:
                assert chosen == shell_indices, f"atom {atom}: shell {start}..{stop} differs"
            else:
                assert not chosen - shell_indices, f"atom {atom}: cut shell {start}..{stop} has foreign atoms"
                # The deterministic rule keeps the lowest neighbour indices of the cut shell.
                lowest = Counter(sorted(i for _, i in neighbours[start:stop])[: count - start])
                assert chosen == lowest, f"atom {atom}: cut shell {start}..{stop} not broken by neighbour index"
                stats["cut_shells"] += 1
                stats["cut_shells_with_choice"] += len(set(shell_indices)) > 1
            stats["shells"] += 1
        stats["padded_atoms"] += count < max_num_nbr
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: a real sample through the data stage, then the graphs stage.


def _sample_ids() -> list[str]:
    with open(MP2018 / "labels.csv", newline="") as handle:
        ids = [row["material_id"] for row in csv.DictReader(handle)]
    rng = np.random.default_rng(20240)
    return sorted(rng.choice(ids, size=SAMPLE_SIZE + 60, replace=False).tolist())


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    """CIF texts and label rows of the sample (plus a stretched crystal), and the data stage's table."""
    wanted = set(_sample_ids()) | {"mp-2"}
    cifs: dict[str, str] = {}
    with tarfile.open(MP2018 / "structures.tar.gz", "r:gz") as archive:
        for member in archive:
            crystal_id = Path(member.name).stem
            if crystal_id in wanted:
                cifs[crystal_id] = archive.extractfile(member).read().decode()
    with open(MP2018 / "labels.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames
        rows = {row["material_id"]: row for row in reader if row["material_id"] in wanted}
    # A real crystal (mp-2, fcc Pd, one atom per cell) stretched until its atoms are 10.4 Å apart.
    from pymatgen.core import Structure

    base = Structure.from_str(cifs["mp-2"], fmt="cif")
    nearest = min(n.nn_distance for n in base.get_neighbors(base[0], 4.0))
    stretched = base.copy()
    stretched.scale_lattice(base.volume * (10.4 / nearest) ** 3)
    cifs[STRETCHED_ID] = stretched.to(fmt="cif")
    rows[STRETCHED_ID] = {**rows["mp-2"], "material_id": STRETCHED_ID}

    folder = tmp_path_factory.mktemp("sample")
    with tarfile.open(folder / "structures.tar.gz", "w:gz") as archive:
        for crystal_id, text in cifs.items():
            data = text.encode()
            info = tarfile.TarInfo(f"structures/{crystal_id}.cif")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows.values())
    spec = {
        "sources": [
            {
                "type": "local",
                "name": "mp2018",
                "path": str(folder / "structures.tar.gz"),
                "labels": str(folder / "labels.csv"),
                "id_column": "material_id",
                "columns": {label: label for label in LABELS},
            }
        ]
    }
    config = validate_config({"datasets": {"sample": spec}, "splits": {}, "filters": {"max_z": 80}})
    checked = {**config["datasets"]["sample"], "filters": config["filters"]}
    summary = build_dataset("sample", checked, folder / "data", workers=1, log=lambda _: None)
    return {"cifs": cifs, "rows": rows, "table": folder / "data" / "crystals.parquet", "summary": summary}


@pytest.fixture(scope="module")
def default_graphs(sample, tmp_path_factory) -> Path:
    """Graphs with the default settings (mask, extend), built through the command line, two processes."""
    out = tmp_path_factory.mktemp("graphs-default")
    status = main(
        ["graphs", "build", "--table", str(sample["table"]), "--dataset", "sample", "--out", str(out)]
        + ["--shard-size", "64", "--workers", "2", "--settings", "{}"]
    )
    assert status == 0
    return out


@pytest.fixture(scope="module")
def references(sample) -> dict:
    """The CGCNN reference of every real crystal of the sample (not the stretched one), from its CIF."""
    from pymatgen.core import Structure

    kept = set(_table_ids(sample["table"]))
    refs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for crystal_id, text in sample["cifs"].items():
            if crystal_id in kept and crystal_id != STRETCHED_ID and len(refs) < SAMPLE_SIZE:
                refs[crystal_id] = cgcnn_reference(Structure.from_str(text, fmt="cif"))
    return refs


def _table_ids(table: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(table, columns=["id"]).column("id").to_pylist()


# ----------------------------------------------------------------------------------------------------------------
# Exactness


def test_neighbours_and_gaussians_equal_cgcnn(default_graphs, references):
    assert len(references) >= 200
    dataset = GraphDataset(default_graphs, ids=list(references))
    totals = Counter()
    for item in dataset:
        totals += compare_with_reference(item, references[item.id])
    # The sample must exercise the tie rule: shells cut by the 12th slot, with a choice of atoms.
    assert totals["cut_shells_with_choice"] > 50, totals


def test_cgcnn_padding_reproduces_the_original_exactly(sample, references, tmp_path):
    settings = GraphSettings(cgcnn_padding=True, isolated_atoms="keep")
    build_graphs(sample["table"], tmp_path, settings, shard_size=100, dataset="sample", workers=1, log=lambda _: None)
    dataset = GraphDataset(tmp_path, ids=list(references) + [STRETCHED_ID])
    batch = dataset.collate([dataset[k] for k in range(len(dataset))])
    assert bool(batch.nbr_mask.all())
    for item in dataset:
        if item.id != STRETCHED_ID:
            compare_with_reference(item, references[item.id])
    # The stretched crystal: CGCNN pads its lone atom with 12 slots at atom 0, distance radius + 1.
    from pymatgen.core import Structure

    stretched = dataset[dataset.ids.index(STRETCHED_ID)]
    ref_idx, ref_dist, ref_gauss, _ = cgcnn_reference(Structure.from_str(sample["cifs"][STRETCHED_ID], fmt="cif"))
    np.testing.assert_array_equal(np.asarray(stretched.nbr_idx), ref_idx)
    np.testing.assert_array_equal(np.asarray(stretched.nbr_dist), ref_dist.astype(np.float32))
    ours = _cgcnn_gaussians(stretched.nbr_dist)
    np.testing.assert_allclose(ours, ref_gauss, atol=1e-6)


def test_brute_force_periodic_images_agree(sample):
    """An independent check of the neighbour search: explicit images of the cell, no pymatgen."""
    from crystal_transfer.graphs.stage import table_rows

    arrays = table_rows(sample["table"])
    settings = GraphSettings()
    checked = 0
    for row in range(0, len(arrays["ids"]), 8):
        a0, a1 = arrays["atom_ptr"][row], arrays["atom_ptr"][row + 1]
        lattice, frac = arrays["lattice"][row], arrays["frac"][a0:a1]
        graph = crystal_graph(lattice, frac, arrays["numbers"][a0:a1], settings)
        if isinstance(graph, GraphRejection) or graph.radius != settings.radius:
            continue
        heights = 1.0 / np.linalg.norm(np.linalg.inv(lattice), axis=0)  # distances between lattice planes
        reach = np.ceil(settings.radius / heights).astype(int) + 1
        grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1).reshape(-1, 3)
        cart = frac @ lattice
        images = (frac[None, :, :] + grid[:, None, :]).reshape(-1, 3) @ lattice
        distances = np.linalg.norm(cart[:, None, :] - images[None, :, :], axis=-1)
        distances[distances < 1e-8] = np.inf
        nearest = np.sort(distances, axis=1)[:, :12]
        nearest[nearest > settings.radius] = settings.radius + 1
        np.testing.assert_allclose(graph.nbr_dist, nearest, atol=2e-6)
        checked += 1
    assert checked >= 25


def _same_graph(ours, theirs, crystal_id: str) -> None:
    if isinstance(theirs, GraphRejection):
        assert ours == theirs, crystal_id
        return
    assert ours.radius == theirs.radius, crystal_id
    assert ours.nbr_idx.dtype == theirs.nbr_idx.dtype, crystal_id
    np.testing.assert_array_equal(ours.nbr_idx, theirs.nbr_idx, err_msg=crystal_id)
    np.testing.assert_array_equal(ours.nbr_count, theirs.nbr_count, err_msg=crystal_id)
    np.testing.assert_allclose(ours.nbr_dist, theirs.nbr_dist, rtol=0, atol=1e-6, err_msg=crystal_id)


@pytest.mark.parametrize("policy", ["extend", "drop", "keep"])
def test_vesin_neighbour_search_equals_the_pymatgen_path(sample, policy):
    """vesin + CGCNN's rules and pymatgen + NumPy give the same graph (indices in the same tie order, counts, radii,
    distances within 1e-6 Å) for every crystal of the sample, the stretched one included."""
    from crystal_transfer.graphs.stage import table_rows

    arrays = table_rows(sample["table"])
    settings = GraphSettings(isolated_atoms=policy)
    ties = rejected = 0
    for row, crystal_id in enumerate(arrays["ids"]):
        a0, a1 = arrays["atom_ptr"][row], arrays["atom_ptr"][row + 1]
        args = (arrays["lattice"][row], arrays["frac"][a0:a1], arrays["numbers"][a0:a1], settings)
        ours, theirs = crystal_graph(*args), crystal_graph(*args, search="pymatgen")
        _same_graph(ours, theirs, crystal_id)
        if isinstance(ours, GraphRejection):
            rejected += 1
        else:
            ties += int((np.abs(np.diff(ours.nbr_dist, axis=1)) <= TIE_TOLERANCE).sum())
    assert ties > 1000  # the tie rule was exercised, not only distinct distances
    assert rejected == (policy == "drop")  # the stretched crystal


@pytest.mark.parametrize(
    ("radius", "max_num_nbr", "probe_factor"),
    [
        (8.0, 12, None), (8.0, 12, 1.2), (5.0, 12, None), (3.0, 12, None), (6.0, 20, 1.5), (8.0, 40, None),
        (0.9, 12, None),
    ],
)
def test_batched_vesin_search_equals_pymatgen_at_other_radii(sample, monkeypatch, radius, max_num_nbr, probe_factor):
    """neighbour_lists on the whole sample in one call equals pymatgen's search + select_neighbours crystal by
    crystal, and the same call without the first, smaller search radius; also where atoms have fewer than
    max_num_nbr neighbours or none (radius 3 and 0.9 Å), where the k-th neighbour is far (40 neighbours), and with
    a first radius too small for many atoms (probe_factor: their crystals are searched again with the full one)."""
    from crystal_transfer.graphs import neighbours
    from crystal_transfer.graphs.crystal_graph import neighbour_pairs
    from crystal_transfer.graphs.neighbours import neighbour_lists, select_neighbours
    from crystal_transfer.graphs.stage import table_rows

    if probe_factor is not None:
        monkeypatch.setattr(neighbours, "PROBE_FACTOR", probe_factor)
    arrays = table_rows(sample["table"])
    ptr = arrays["atom_ptr"]
    batched = neighbour_lists(arrays["lattice"], ptr, arrays["frac"], arrays["numbers"], radius, max_num_nbr)
    full = neighbour_lists(
        arrays["lattice"], ptr, arrays["frac"], arrays["numbers"], radius, max_num_nbr, probe=False
    )
    for ours, theirs in zip(batched, full, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    nbr_idx, nbr_dist, nbr_count = batched
    for row, crystal_id in enumerate(arrays["ids"]):
        a0, a1 = ptr[row], ptr[row + 1]
        numbers = arrays["numbers"][a0:a1]
        pairs = neighbour_pairs(arrays["lattice"][row], arrays["frac"][a0:a1], numbers, radius)
        centre, neighbour, distance = select_neighbours(*pairs, len(numbers), max_num_nbr)
        count = np.bincount(centre, minlength=len(numbers))
        slot = np.arange(len(centre)) - np.repeat(np.cumsum(count) - count, count)
        expected_idx = np.zeros((len(numbers), max_num_nbr), dtype=np.int64)
        expected_dist = np.full((len(numbers), max_num_nbr), radius + 1.0, dtype=np.float32)
        expected_idx[centre, slot] = neighbour
        expected_dist[centre, slot] = distance
        np.testing.assert_array_equal(nbr_count[a0:a1], count, err_msg=crystal_id)
        np.testing.assert_array_equal(nbr_idx[a0:a1], expected_idx, err_msg=crystal_id)
        np.testing.assert_allclose(nbr_dist[a0:a1], expected_dist, rtol=0, atol=1e-6, err_msg=crystal_id)


def test_vesin_search_on_thin_and_skewed_cells(sample):
    """Real crystals in cells far from their reduced ones: a strongly sheared cell (the same crystal, a unimodular
    change of basis) and a cell squashed to 0.4 Å along c (many images within the radius) give pymatgen's graph."""
    from pymatgen.core import Structure

    settings = GraphSettings(isolated_atoms="keep")
    checked = 0
    for crystal_id in ["mp-2", *sorted(sample["cifs"])[:40:4]]:
        structure = Structure.from_str(sample["cifs"][crystal_id], fmt="cif")
        lattice, frac, numbers = structure.lattice.matrix, structure.frac_coords, np.array(structure.atomic_numbers)
        original = crystal_graph(lattice, frac, numbers, settings)
        shear = np.array([[1, 4, 0], [0, 1, 0], [0, -3, 1]])
        assert round(abs(np.linalg.det(shear))) == 1
        sheared_lattice, sheared_frac = shear @ lattice, frac @ np.linalg.inv(shear)
        squashed = lattice.copy()
        squashed[2] *= 0.4 / np.abs(np.linalg.det(lattice) / np.linalg.norm(np.cross(lattice[0], lattice[1])))
        for cell, coords in ((sheared_lattice, sheared_frac), (squashed, frac)):
            ours, theirs = crystal_graph(cell, coords, numbers, settings), crystal_graph(
                cell, coords, numbers, settings, search="pymatgen"
            )
            _same_graph(ours, theirs, crystal_id)
            checked += 1
        # the sheared cell is the same crystal: the same distances (indices may differ inside a tie shell)
        sheared = crystal_graph(sheared_lattice, sheared_frac, numbers, settings)
        np.testing.assert_allclose(sheared.nbr_dist, original.nbr_dist, rtol=0, atol=1e-5, err_msg=crystal_id)
    assert checked == 22


def test_vesin_and_pymatgen_shards_are_identical(sample, tmp_path):
    """A whole graph folder built with vesin (one call per shard) equals the pymatgen-built one."""
    settings = GraphSettings()
    build_graphs(sample["table"], tmp_path / "vesin", settings, 100, dataset="sample", log=lambda _: None)
    build_graphs(
        sample["table"], tmp_path / "pymatgen", settings, 100, dataset="sample", log=lambda _: None, search="pymatgen"
    )
    ours, pymatgen = (read_json(tmp_path / side / "manifest.json") for side in ("vesin", "pymatgen"))
    assert ours["counts"] == pymatgen["counts"] and ours["extended"] == pymatgen["extended"]
    for entry in ours["shards"]:
        one, two = (tmp_path / side / entry["file"] for side in ("vesin", "pymatgen"))
        first, second = map_arrays(one, read_header(one)), map_arrays(two, read_header(two))
        assert read_header(one)["meta"]["ids"] == read_header(two)["meta"]["ids"]
        for name in first:
            if name == "nbr_dist":
                np.testing.assert_allclose(first[name], second[name], rtol=0, atol=1e-6)
            else:
                np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_vesin_search_keeps_pymatgens_cut_off_below_1_angstrom(sample):
    """Below its min_r of 1 Å pymatgen keeps d <= r exactly (above it, d² < r² + 1e-8): a neighbour 5e-9 Å beyond
    a radius of 0.9 Å is out on both paths."""
    from pymatgen.core import Structure

    structure = Structure.from_str(sample["cifs"]["mp-2"], fmt="cif")  # fcc Pd, one atom per cell
    nearest = min(n.nn_distance for n in structure.get_neighbors(structure[0], 4.0))
    structure.scale_lattice(structure.volume * ((0.9 + 5e-9) / nearest) ** 3)
    args = (structure.lattice.matrix, structure.frac_coords, np.array(structure.atomic_numbers))
    settings = GraphSettings(radius=0.9, isolated_atoms="keep")
    ours, theirs = crystal_graph(*args, settings), crystal_graph(*args, settings, search="pymatgen")
    assert theirs.nbr_count.tolist() == [0] and ours.nbr_count.tolist() == [0]
    settings = GraphSettings(radius=0.9 + 1e-8, isolated_atoms="keep")
    ours, theirs = crystal_graph(*args, settings), crystal_graph(*args, settings, search="pymatgen")
    assert theirs.nbr_count.tolist() == ours.nbr_count.tolist() == [12]
    # above 1 Å: d² < r² + 1e-8, i.e. d < r + 2.5e-9 Å at r = 2 Å: a neighbour 2e-9 Å beyond is in, 3e-9 Å out
    structure.scale_lattice(structure.volume * (2.0 / (0.9 + 5e-9)) ** 3)
    args = (structure.lattice.matrix, structure.frac_coords, np.array(structure.atomic_numbers))
    for beyond, count in ((2e-9, 12), (3e-9, 0)):
        settings = GraphSettings(radius=2.0 - beyond, isolated_atoms="keep")
        ours, theirs = crystal_graph(*args, settings), crystal_graph(*args, settings, search="pymatgen")
        assert theirs.nbr_count.tolist() == ours.nbr_count.tolist() == [count], beyond


def test_vesin_search_names_a_broken_crystal(sample, tmp_path):
    """A singular lattice, a non-finite coordinate or a cell far thinner than the radius is refused with the reason
    (and, in the graphs stage, the crystal's id), not a crash, an exhausted memory or a silent graph."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from crystal_transfer.graphs.crystal_graph import _search_lists
    from crystal_transfer.graphs.errors import NeighbourSearchError
    from crystal_transfer.graphs.stage import build_shard, make_plan

    good = np.eye(3) * 4.0
    flat = np.array([[4.0, 0, 0], [0, 4.0, 0], [4.0, 4.0, 0]])  # three coplanar rows: zero volume
    frac = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.1, 0.2, 0.3]])
    with pytest.raises(NeighbourSearchError, match="singular lattice") as caught:
        _search_lists(np.stack([good, flat]), np.array([0, 2, 3]), frac, np.array([8, 8, 8]), 8.0, 12, TIE_TOLERANCE)
    assert caught.value.crystal == 1 and isinstance(caught.value, GraphStageError)
    thin = good.copy()
    thin[2, 2] = 1e-7  # a cell far thinner than the radius: about 1e10 images
    with pytest.raises(NeighbourSearchError, match="thinner than the radius"):
        _search_lists(thin[None], np.array([0, 2]), frac[:2], np.array([8, 8]), 8.0, 12, TIE_TOLERANCE)
    for search in SEARCHES:  # one crystal: a rejection with the reason, from either search
        refused = crystal_graph(thin, frac[:2], np.array([8, 8]), GraphSettings(), search=search)
        assert isinstance(refused, GraphRejection) and refused.reason == "unsearchable_cell", search
        assert "thinner than the radius" in refused.message
    with pytest.raises(GraphStageError, match="inconsistent crystal arrays"):
        _search_lists(good[None], np.array([0, 3]), frac[:2], np.array([8, 8, 8]), 8.0, 12, TIE_TOLERANCE)
    bad = frac[:2].copy()
    bad[1, 2] = np.nan
    with pytest.raises(NeighbourSearchError, match="non-finite") as caught:
        _search_lists(np.stack([good, good]), np.array([0, 1, 2]), bad, np.array([8, 8]), 8.0, 12, TIE_TOLERANCE)
    assert caught.value.crystal == 1
    # through the stage: each broken crystal is rejected with its id and reason, every other one gets its graph
    table = pq.read_table(sample["table"])
    lattices = table.column("lattice").to_pylist()
    lattices[5] = flat.ravel().tolist()
    lattices[7] = thin.ravel().tolist()
    broken = table.set_column(
        table.schema.get_field_index("lattice"), "lattice", pa.array(lattices, type=table.schema.field("lattice").type)
    )
    path = tmp_path / "broken.parquet"
    pq.write_table(broken, path)
    make_plan(path, "broken", GraphSettings(), 1000, tmp_path / "plan.json")
    ids = table.column("id").to_pylist()
    meta = build_shard(tmp_path / "plan.json", 0)
    assert meta["ids"] == [i for row, i in enumerate(ids) if row not in (5, 7)]
    assert [(r["id"], r["reason"]) for r in meta["rejected"]] == [(ids[k], "unsearchable_cell") for k in (5, 7)]
    assert "singular lattice" in meta["rejected"][0]["message"] and "thinner" in meta["rejected"][1]["message"]


# ----------------------------------------------------------------------------------------------------------------
# Isolated atoms


def test_isolated_atoms_extend_records_the_radius(sample, default_graphs):
    manifest = read_json(default_graphs / "manifest.json")
    assert manifest["extended"] == [{"id": STRETCHED_ID, "radius": 11.0}]
    assert manifest["counts"]["extended"] == 1 and manifest["counts"]["rejected"] == 0
    dataset = GraphDataset(default_graphs, ids=[STRETCHED_ID])
    item = dataset[0]
    # One atom per cell, its 12 nearest images at 10.4 Å: radius 8 -> 9 -> 10 -> 11 Å.
    assert list(item.nbr_count) == [12]
    np.testing.assert_allclose(item.nbr_dist[0], 10.4, atol=1e-4)
    assert dataset.collate([item]).nbr_mask.all()


def test_mask_marks_padded_slots(sample):
    from pymatgen.core import Structure

    from crystal_transfer.graphs.dataset import CrystalItem

    structure = Structure.from_str(sample["cifs"]["mp-2"], fmt="cif")
    args = (structure.lattice.matrix, structure.frac_coords, np.array(structure.atomic_numbers))
    graphs = {
        "partial": crystal_graph(*args, GraphSettings(radius=3.0, max_num_nbr=16)),  # 12 neighbours at 2.8 Å
        "isolated": crystal_graph(*args, GraphSettings(radius=2.0, max_num_nbr=16, isolated_atoms="keep")),
    }
    items = [
        CrystalItem(name, np.array([46], np.uint8), g.nbr_idx, g.nbr_dist, g.nbr_count, np.zeros(0, np.float32))
        for name, g in graphs.items()
    ]
    batch = collate_graphs(items)
    assert batch.nbr_mask.tolist() == [[True] * 12 + [False] * 4, [False] * 16]
    np.testing.assert_array_equal(batch.nbr_dist[0, 12:].numpy(), np.float32(4.0))
    np.testing.assert_array_equal(batch.nbr_dist[1].numpy(), np.float32(3.0))
    assert batch.nbr_idx.tolist() == [[0] * 16, [1] * 16]  # each points at its own crystal's atom 0
    assert collate_graphs(items, cgcnn_padding=True).nbr_mask.all()


def test_isolated_atoms_drop_writes_the_rejection(sample, tmp_path):
    settings = GraphSettings(isolated_atoms="drop")
    manifest = build_graphs(sample["table"], tmp_path, settings, 500, dataset="sample", log=lambda _: None)
    with open(tmp_path / "rejected.csv", newline="") as handle:
        rejected = list(csv.DictReader(handle))
    assert [(r["id"], r["reason"]) for r in rejected] == [(STRETCHED_ID, "isolated_atom")]
    assert "within 8 Å" in rejected[0]["message"]
    assert manifest["counts"]["crystals"] == len(_table_ids(sample["table"])) - 1
    with pytest.warns(UserWarning, match="leaving out 1"):
        dataset = GraphDataset(tmp_path, ids=["mp-2", STRETCHED_ID])
    assert dataset.ids == ["mp-2"] and dataset.skipped == [STRETCHED_ID]
    with pytest.raises(GraphStageError, match="rejected by the graph stage"):
        GraphDataset(tmp_path, ids=[STRETCHED_ID], on_rejected="raise")


def test_extend_stops_at_max_radius(sample):
    from pymatgen.core import Structure

    structure = Structure.from_str(sample["cifs"][STRETCHED_ID], fmt="cif")
    args = (structure.lattice.matrix, structure.frac_coords, np.array(structure.atomic_numbers))
    assert crystal_graph(*args, GraphSettings(max_radius=10.0)).message.startswith("1 atom(s) without a neighbour")
    graph = crystal_graph(*args, GraphSettings(extend_step=0.25))
    assert graph.radius == 10.5 and graph.nbr_count.tolist() == [12]


# ----------------------------------------------------------------------------------------------------------------
# Dataset, collate, splits


def test_dataset_targets_and_split(sample, default_graphs, tmp_path):
    ids = _table_ids(sample["table"])
    split = {"train": ids[:50], "val": ids[50:60], "test": ids[60:90]}
    write_split(split, tmp_path / "split.csv")
    dataset = GraphDataset.from_split(default_graphs, tmp_path / "split.csv", "test", targets=["band_gap", "K_VRH"])
    assert dataset.ids == split["test"]
    for k, crystal_id in enumerate(dataset.ids):
        row = sample["rows"][crystal_id]
        for t, label in enumerate(["band_gap", "K_VRH"]):
            expected = float(row[label]) if row[label] else np.nan
            np.testing.assert_equal(dataset[k].targets[t], np.float32(expected))
    assert np.isnan(np.stack([dataset[k].targets for k in range(len(dataset))])[:, 1]).any()
    with pytest.raises(KeyError, match="no label"):
        GraphDataset(default_graphs, targets=["no_such_label"])
    with pytest.raises(KeyError, match="not in"):
        GraphDataset(default_graphs, ids=["mp-0-unknown"])


def test_collate_builds_global_indices(default_graphs):
    dataset = GraphDataset(default_graphs, targets=["formation_energy_per_atom"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=37, shuffle=True, collate_fn=dataset.collate)
    seen = 0
    for batch in loader:
        sizes = torch.bincount(batch.crystal, minlength=batch.num_crystals)
        starts = torch.cumsum(sizes, 0) - sizes
        assert batch.numbers.dtype == torch.long and batch.nbr_idx.dtype == torch.long
        assert batch.nbr_dist.dtype == torch.float32 and batch.nbr_mask.dtype == torch.bool
        assert batch.targets.shape == (batch.num_crystals, 1)
        owner = batch.crystal[batch.nbr_idx]  # every neighbour slot points into its own crystal
        assert torch.equal(owner, batch.crystal[:, None].expand_as(owner))
        for b, crystal_id in enumerate(batch.ids):
            item = dataset[dataset.ids.index(crystal_id)]
            atoms = slice(int(starts[b]), int(starts[b] + sizes[b]))
            assert torch.equal(batch.nbr_idx[atoms] - starts[b], torch.from_numpy(item.nbr_idx.astype(np.int64)))
            assert torch.equal(batch.numbers[atoms], torch.from_numpy(item.numbers.astype(np.int64)))
            assert torch.equal(batch.nbr_mask[atoms].sum(1), torch.from_numpy(item.nbr_count.astype(np.int64)))
        seen += batch.num_crystals
    assert seen == len(dataset)
    empty_mask = collate_graphs([dataset[0]], cgcnn_padding=True).nbr_mask
    assert bool(empty_mask.all())


# ----------------------------------------------------------------------------------------------------------------
# Corrupted and stale shards


def test_corrupted_shard_names_itself_and_the_rebuild_command(sample, tmp_path):
    build_graphs(sample["table"], tmp_path, GraphSettings(), 64, dataset="sample", log=lambda _: None)
    shard = tmp_path / "shard-00002.cgs"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(GraphStageError) as failure:
        GraphDataset(tmp_path)
    message = str(failure.value)
    assert str(shard) in message and "corrupted" in message and "--shards 2" in message
    command = message.split("rebuild it with: ")[1]
    assert command.startswith("python -m crystal_transfer graphs build")
    # The command in the message repairs it.
    import shlex

    assert main(shlex.split(command)[3:]) == 0
    assert len(GraphDataset(tmp_path)) == len(_table_ids(sample["table"]))


def test_damaged_distances_are_never_blessed_by_the_manifest(sample, tmp_path, capsys):
    """Negative distances written into a built shard: neither ``graphs manifest``, nor the rebuild of another shard,
    nor the training dataset takes the file; each names it (issue #16, class 3)."""
    build_graphs(sample["table"], tmp_path, GraphSettings(), 64, dataset="sample", log=lambda _: None)
    shard = tmp_path / "shard-00001.cgs"
    header = read_header(shard)
    spec = header["arrays"]["nbr_dist"]
    data = bytearray(shard.read_bytes())
    distances = np.frombuffer(data, dtype=spec["dtype"], count=12, offset=spec["offset"]).copy()
    data[spec["offset"] : spec["offset"] + 48] = (-distances).astype(spec["dtype"]).tobytes()
    shard.write_bytes(bytes(data))
    assert main(["graphs", "manifest", "--plan", str(tmp_path / "plan.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(shard) in err and "damaged" in err and "--shards 1" in err
    with pytest.raises(GraphStageError, match="shard-00001.cgs is damaged"):
        build_graphs(sample["table"], tmp_path, GraphSettings(), 64, dataset="sample", shards=[0], log=lambda _: None)
    # the same bytes rewritten with a content hash that matches them: the value checks still refuse them
    write_shard(shard, {name: np.array(a) for name, a in map_arrays(shard, header).items()}, header["meta"])
    with pytest.raises(ShardFormatError, match="not finite, positive and within the radius"):
        check_graph_arrays(map_arrays(shard), 12, str(shard))
    manifest = read_json(tmp_path / "manifest.json")  # the manifest of the intact build, checksum made to match
    manifest["shards"][1]["sha256"] = file_sha256(shard)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GraphStageError, match="shard-00001.cgs cannot be used: .* is damaged: neighbour distances"):
        GraphDataset(tmp_path)[64]


def test_stale_settings_and_table_are_refused(sample, default_graphs, tmp_path):
    from crystal_transfer.models.saved import GraphSettingsMismatch, check_graph_settings

    built = GraphDataset(default_graphs, ids=["mp-2"]).settings.as_dict()
    wanted = {**GraphSettings().as_dict(), "radius": 6.0}
    with pytest.raises(GraphSettingsMismatch, match=r"radius=6.0 but the graphs use radius=8.0; set graphs.radius"):
        check_graph_settings(wanted, built, graphs=default_graphs)
    check_graph_settings(GraphSettings().as_dict(), built)
    # A shard from another build (other settings) swapped in, with the manifest's checksum updated to match.
    other = tmp_path / "other"
    build_graphs(sample["table"], other, GraphSettings(radius=6.0), 64, dataset="sample", log=lambda _: None)
    mixed = tmp_path / "mixed"
    build_graphs(sample["table"], mixed, GraphSettings(), 64, dataset="sample", log=lambda _: None)
    (mixed / "shard-00001.cgs").write_bytes((other / "shard-00001.cgs").read_bytes())
    from crystal_transfer.graphs.stage import file_sha256

    manifest = read_json(mixed / "manifest.json")
    manifest["shards"][1]["sha256"] = file_sha256(mixed / "shard-00001.cgs")
    (mixed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GraphStageError, match=r"shard-00001.cgs cannot be used: it was built with other graph"):
        GraphDataset(mixed)
    # A different table than the one the shards were built from.
    table_copy = tmp_path / "crystals.parquet"
    table_copy.write_bytes(sample["table"].read_bytes() + b"\0")
    with pytest.raises(GraphStageError, match="built from another version"):
        GraphDataset(default_graphs, table=table_copy)


def test_step_commands_match_build_byte_for_byte(sample, default_graphs, tmp_path):
    """plan / shard / manifest (the Snakemake jobs) give the same files as build with two processes."""
    plan = tmp_path / "plan.json"
    base = ["--table", str(sample["table"])]
    assert main(["graphs", "plan", *base, "--dataset", "sample", "--out", str(plan), "--shard-size", "64"]) == 0
    shards = read_json(plan)["shards"]
    for entry in shards:
        assert main(["graphs", "shard", "--plan", str(plan), "--index", str(entry["index"]), *base]) == 0
    assert main(["graphs", "manifest", "--plan", str(plan)]) == 0
    ours, theirs = read_json(tmp_path / "manifest.json"), read_json(default_graphs / "manifest.json")
    assert [s["sha256"] for s in ours["shards"]] == [s["sha256"] for s in theirs["shards"]]
    assert ours["counts"] == theirs["counts"] and len(shards) == 5


def test_manifest_step_rejects_a_foreign_shard(sample, tmp_path, capsys):
    build_graphs(sample["table"], tmp_path / "a", GraphSettings(radius=6.0), 64, dataset="sample", log=lambda _: None)
    build_graphs(sample["table"], tmp_path / "b", GraphSettings(), 64, dataset="sample", log=lambda _: None)
    (tmp_path / "b" / "shard-00000.cgs").write_bytes((tmp_path / "a" / "shard-00000.cgs").read_bytes())
    assert main(["graphs", "manifest", "--plan", str(tmp_path / "b" / "plan.json")]) == 2
    assert "shard-00000.cgs was built with other settings" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Shard format, settings, config


def test_shard_format_round_trip_and_truncation(tmp_path):
    arrays = {
        "a": np.arange(10, dtype=np.int64),
        "b": np.linspace(0, 1, 24, dtype=np.float32).reshape(2, 12),
        "c": np.zeros((0, 12), dtype=np.uint8),
        "d": np.array([7], dtype=np.uint16),
    }
    path = tmp_path / "x.cgs"
    size = write_shard(path, arrays, {"ids": ["x"] * 500})
    assert size == path.stat().st_size
    header = read_header(path)
    assert header["meta"]["ids"] == ["x"] * 500
    assert all(spec["offset"] % 64 == 0 for spec in header["arrays"].values())
    loaded = map_arrays(path)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ShardFormatError, match="truncated"):
        map_arrays(path)
    (tmp_path / "y.cgs").write_bytes(b"PK\x03\x04 not a shard")
    with pytest.raises(ShardFormatError, match="not a graph shard"):
        read_header(tmp_path / "y.cgs")


def test_graph_config_defaults_match_the_schema_and_configs():
    settings, shard_size = graph_config({})
    assert settings == GraphSettings() and shard_size == 2048
    assert settings.as_dict()["radius"] == 8.0 and settings.max_num_nbr == 12 and not settings.cgcnn_padding
    for path in (REPO / "config.yaml", REPO / "configs" / "mp2018.yaml"):
        config_settings, _ = graph_config(load_config(path)["graphs"])
        assert config_settings == GraphSettings()
    with pytest.raises(ConfigError, match="isolated_atoms|not one of"):
        graph_config({"isolated_atoms": "ignore"})
    with pytest.raises(ConfigError, match="Additional properties"):
        graph_config({"radius": 8.0, "gaussian_step": 0.2})


# Cells (lengths a, b, c in Å of an orthogonal cell; cut-off in Å) on both sides of vesin's cell-grid breakdown.
VESIN_GRID_CASES = [
    (1000, 1000, 0.6, 0.5), (600, 600, 2, 0.5), (700, 700, 2, 0.5), (1500, 1500, 5, 0.5), (2000, 2000, 5, 0.5),
    (1000, 1000, 1, 8), (3000, 3000, 5, 8), (5, 5, 1e300, 0.5),
]
_VESIN_CALL = (
    "import sys, numpy as np, vesin; a, b, c, cut = map(float, sys.argv[1:]); lattice = np.diag([a, b, c]); "
    "points = np.random.default_rng(0).random((20, 3)) @ lattice; "
    "vesin.NeighborList(cutoff=cut, full_list=False).compute(points=points, box=lattice, periodic=True, quantities='d')"
)


def test_vesin_grid_predicate_matches_vesin():
    """The cells whose grid vesin cannot build (it dies of SIGFPE) are exactly those ``vesin_grid_fails`` names, on
    both sides of the boundary: each case runs vesin in a process of its own."""
    import subprocess
    import sys

    from crystal_transfer.graphs.neighbours import plane_spacings, vesin_grid_fails

    outcomes = []
    for a, b, c, cutoff in VESIN_GRID_CASES:
        call = subprocess.run([sys.executable, "-c", _VESIN_CALL, str(a), str(b), str(c), str(cutoff)],
                              capture_output=True)
        predicted = bool(vesin_grid_fails(plane_spacings(np.diag([a, b, c]).astype(float)), cutoff)[0])
        outcomes.append((call.returncode != 0, predicted))
    pairs = zip(VESIN_GRID_CASES, outcomes, strict=True)
    mismatches = [case for case, (crashed, predicted) in pairs if crashed != predicted]
    assert not mismatches, mismatches
    assert {crashed for crashed, _ in outcomes} == {True, False}
