"""One crystal's graph: per atom, up to ``max_num_nbr`` neighbours within ``radius`` (indices and distances).

Neighbour selection reproduces CGCNN (``CIFData``): all neighbours within the radius (periodic images
included, as pymatgen's ``get_all_neighbors``), sorted by distance, the first ``max_num_nbr`` kept. The search
runs in ``vesin`` with CGCNN's rules on top (:mod:`crystal_transfer.graphs.neighbours`, one call per shard);
``search="pymatgen"`` takes pymatgen's ``find_points_in_spheres`` (the routine behind ``get_all_neighbors``) plus
the same NumPy selection instead, the reference the tests compare with (the same graphs on every test crystal).
Ties are broken deterministically: distances within ``TIE_TOLERANCE`` of
each other form one shell, ordered by neighbour index, then by periodic image. CGCNN keeps pymatgen's
output order inside a tie, which differs between pymatgen versions.

Padding: an atom with fewer neighbours than ``max_num_nbr`` gets padded slots that point at the crystal's
atom 0 at distance ``radius + 1`` (CGCNN's values). They are masked out unless ``cgcnn_padding`` asks for
the original behaviour (padded slots used as real ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crystal_transfer.graphs import neighbours
from crystal_transfer.graphs.errors import GraphStageError, NeighbourSearchError
from crystal_transfer.graphs.neighbours import NUMERICAL_TOL, PARTITION_MARGIN, select_neighbours
from crystal_transfer.graphs.settings import SEARCHES, GraphSettings

# Reason codes of the graph stage's rejected.csv (and of predict's error column).
ISOLATED_ATOM = "isolated_atom"
UNSEARCHABLE_CELL = "unsearchable_cell"  # the neighbour search refuses it: non-finite, singular or far too thin


@dataclass(frozen=True)
class GraphRejection:
    """A crystal that gets no graph, with its reason code and a message for rejected.csv."""

    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass
class CrystalGraph:
    """The graph of one crystal.

    Attributes:
        nbr_idx: (n, M) neighbour atom index within the crystal (padded slots: 0).
        nbr_dist: (n, M) float32 distances in Å (padded slots: radius + 1).
        nbr_count: (n,) number of real neighbour slots of each atom (the rest is padding).
        radius: the radius used (larger than the setting if the crystal was extended).
    """

    nbr_idx: np.ndarray
    nbr_dist: np.ndarray
    nbr_count: np.ndarray
    radius: float


def neighbour_pairs(
    lattice: np.ndarray, frac_coords: np.ndarray, numbers: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every (centre, neighbour) pair within ``radius`` over periodic images, as pymatgen's get_all_neighbors.

    Returns ``(centre, neighbour, image (E, 3) float, distance)``; the atom itself (distance below
    pymatgen's 1e-8 Å tolerance, same element) is excluded, exactly as ``get_all_neighbors`` does.
    """
    from pymatgen.optimization.neighbors import find_points_in_spheres

    lattice = np.ascontiguousarray(lattice, dtype=np.float64).reshape(3, 3)
    cart = np.ascontiguousarray(np.asarray(frac_coords, dtype=np.float64).reshape(-1, 3) @ lattice)
    centre, neighbour, image, distance = find_points_in_spheres(
        cart, cart, r=float(radius), pbc=np.ones(3, dtype=np.int64), lattice=lattice, tol=NUMERICAL_TOL
    )
    numbers = np.asarray(numbers)
    itself = (distance <= NUMERICAL_TOL) & (numbers[centre] == numbers[neighbour])
    if itself.any():
        keep = ~itself
        centre, neighbour, image, distance = centre[keep], neighbour[keep], image[keep], distance[keep]
    return centre, neighbour, image, distance


def _index_dtype(num_atoms: int) -> type:
    """The smallest integer type that holds atom indices of a crystal (or shard) with ``num_atoms`` atoms."""
    return np.uint8 if num_atoms <= 256 else np.uint16 if num_atoms <= 65536 else np.int32


def _search_lists(
    lattices: np.ndarray,
    atom_ptr: np.ndarray,
    frac: np.ndarray,
    numbers: np.ndarray,
    radii: np.ndarray | float,
    max_num_nbr: int,
    tie_tolerance: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`crystal_transfer.graphs.neighbours.neighbour_lists` (vesin) with the graphs stage's errors."""
    try:
        return neighbours.neighbour_lists(
            lattices, atom_ptr, frac, numbers, radii, max_num_nbr, tie_tolerance, NUMERICAL_TOL, PARTITION_MARGIN
        )
    except neighbours.NeighbourSearchError as error:
        raise NeighbourSearchError(error.crystal, error.what.removeprefix("neighbour search failed: ")) from None
    except ValueError as error:
        raise GraphStageError(str(error)) from None


def crystal_graph(
    lattice: np.ndarray,
    frac_coords: np.ndarray,
    numbers: np.ndarray,
    settings: GraphSettings,
    search: str = "vesin",
) -> CrystalGraph | GraphRejection:
    """The graph of one crystal, or a :class:`GraphRejection` when the neighbour search refuses the cell or an
    isolated atom makes the policy drop it.

    ``search="pymatgen"`` takes pymatgen's search instead of vesin's (the reference the tests compare with).
    """
    # long: both searches share the isolated-atom policy's loop over growing radii
    if search not in SEARCHES:
        raise GraphStageError(f"search must be one of {', '.join(SEARCHES)}, not '{search}'")
    numbers = np.asarray(numbers)
    num_atoms = len(numbers)
    m = settings.max_num_nbr
    radius = settings.radius
    while True:
        if search == "vesin":
            try:
                lists = _search_lists(
                    np.asarray(lattice).reshape(1, 3, 3), np.array([0, num_atoms]), frac_coords, numbers, radius, m,
                    settings.tie_tolerance,
                )
            except NeighbourSearchError as error:
                return GraphRejection(UNSEARCHABLE_CELL, error.what)
            counts = lists[2]
        else:
            frac_rows = np.asarray(frac_coords, dtype=np.float64).reshape(-1, 3)
            cell = np.asarray(lattice, dtype=np.float64).reshape(1, 3, 3)
            refused = neighbours.refusals(cell, np.array([0, num_atoms]), frac_rows, radius)
            if refused:
                return GraphRejection(UNSEARCHABLE_CELL, f"neighbour search failed: {refused[0]}")
            centre, neighbour, image, distance = neighbour_pairs(lattice, frac_coords, numbers, radius)
            counts = np.bincount(centre, minlength=num_atoms)
        isolated = np.flatnonzero(counts == 0)
        if len(isolated) == 0 or settings.isolated_atoms == "keep":
            break
        if settings.isolated_atoms == "drop" or radius + settings.extend_step > settings.max_radius + 1e-9:
            first = int(isolated[0])
            reach = f"{radius:g} Å" + (
                f" (extended up to max_radius {settings.max_radius:g} Å)" if settings.isolated_atoms == "extend" else ""
            )
            return GraphRejection(
                ISOLATED_ATOM,
                f"{len(isolated)} atom(s) without a neighbour within {reach}, e.g. atom {first} (Z={numbers[first]})",
            )
        radius = radius + settings.extend_step
    if search == "vesin":
        nbr_idx, nbr_dist, nbr_count = lists
        return CrystalGraph(nbr_idx.astype(_index_dtype(num_atoms)), nbr_dist, nbr_count.astype(np.uint8), radius)
    centre, neighbour, distance = select_neighbours(
        centre, neighbour, image, distance, num_atoms, m, settings.tie_tolerance, PARTITION_MARGIN
    )
    nbr_count = np.bincount(centre, minlength=num_atoms)
    slot = np.arange(len(centre)) - np.repeat(np.cumsum(nbr_count) - nbr_count, nbr_count)
    nbr_idx = np.zeros((num_atoms, m), dtype=_index_dtype(num_atoms))
    nbr_dist = np.full((num_atoms, m), radius + 1.0, dtype=np.float32)
    nbr_idx[centre, slot] = neighbour
    nbr_dist[centre, slot] = distance
    return CrystalGraph(nbr_idx=nbr_idx, nbr_dist=nbr_dist, nbr_count=nbr_count.astype(np.uint8), radius=radius)
