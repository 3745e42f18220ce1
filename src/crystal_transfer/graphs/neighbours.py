"""Periodic neighbour lists with CGCNN's selection rules, searched by ``vesin``.

CGCNN (``CIFData``) takes, per atom, every neighbour within the radius over periodic images (pymatgen's
``get_all_neighbors``), sorts them by distance and keeps the first ``max_num_nbr``. This module reproduces that
list with `vesin <https://github.com/Luthaf/vesin>`_'s cell-list search and the rules below on top; pymatgen's
search (``find_points_in_spheres``, graphs.neighbour_pairs) stays the reference the tests compare against.

Inclusion (pymatgen's test): a pair (j, image) of atom i is a candidate when d² < r² + 1e-8 Å², or, below pymatgen's
``min_r`` of 1 Å, when d <= r; the atom itself (d <= 1e-8 Å and the same element) is not. vesin is asked for a
cut-off slightly above that, and the test is applied here to its distances. Images are vesin's shifts S
(r_ij = r_j - r_i + S L), pymatgen's images of the same pair.

Selection (:func:`select_neighbours`): when an atom has more than ``max_num_nbr`` candidates, only those within the
``max_num_nbr``-th smallest distance plus ``PARTITION_MARGIN`` are kept; they are sorted by (distance, j, image);
consecutive distances within ``tie_tolerance`` form one shell, a shell is ordered by (j, image); the first
``max_num_nbr`` are the atom's neighbours.

Search radius: the list only depends on the candidates within the k-th distance plus the margin, so
:func:`neighbour_lists` first searches a smaller radius sized from the crystal's density (``PROBE_FACTOR`` times the
cube root of the volume per atom, about 20 candidates per atom instead of about 300 within 8 Å); an atom's list is
final when it has at least ``max_num_nbr`` candidates and its k-th distance plus the margin lies inside that
radius (every candidate the full search would keep is then found). A crystal with any other atom is searched again
with the full radius. Both ways give the same lists (vesin's distance of a pair does not depend on the cut-off).

Only NumPy and vesin are imported here.
"""

from __future__ import annotations

import math

import numpy as np

TIE_TOLERANCE = 1e-6  # Å: neighbour distances closer than this are one shell
NUMERICAL_TOL = 1e-8  # pymatgen's default: its cut-off test d² < r² + tol (Å²); the atom itself is d <= tol (Å)
PYMATGEN_MIN_R = 1.0  # Å: below this pymatgen keeps d <= r exactly
PARTITION_MARGIN = 1e-3  # Å: candidates kept beyond the k-th distance before the exact tie-aware sort
PROBE_FACTOR = 1.8  # first search radius in units of the cube root of the volume per atom (for 12 neighbours)
VESIN_MAX_CELLS = 1e5  # vesin 0.6's cap on its cell grid (MAX_NUMBER_OF_CELLS in cpu_cell_list.cpp)
MAX_PAIRS = 2e7  # estimated candidate pairs of one crystal above which it is refused (vesin: 36 bytes a pair)
MAX_IMAGES = 1e8  # periodic images of the cell within the search box above which it is refused
CHUNK_ATOMS = 4096  # atoms per selection pass of neighbour_lists


class NeighbourSearchError(ValueError):
    """The neighbour search refused crystal ``crystal`` (its index in the batch); ``what`` says why."""

    def __init__(self, crystal: int, what: str) -> None:
        self.crystal = crystal
        self.what = f"neighbour search failed: {what}"
        super().__init__(f"crystal {crystal} of the batch: {self.what}")


def plane_spacings(lattices: np.ndarray) -> np.ndarray:
    """Distances between the lattice planes of each cell, (N, 3) for (N, 3, 3) lattices (rows a, b, c); zero for a
    singular or non-finite lattice."""
    lattices = np.asarray(lattices, dtype=np.float64).reshape(-1, 3, 3)
    regular = np.isfinite(lattices).all(axis=(1, 2))
    safe = np.where(regular[:, None, None], lattices, np.eye(3))
    regular &= np.abs(np.linalg.det(safe)) > 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inverse = np.linalg.inv(np.where(regular[:, None, None], safe, np.eye(3)))
        spacings = 1.0 / np.linalg.norm(inverse, axis=1)  # column j of the inverse: the reciprocal vector j
    return np.where(regular[:, None], spacings, 0.0)


def vesin_grid_fails(spacings: np.ndarray, cutoffs: np.ndarray | float) -> np.ndarray:
    """Whether vesin's cell grid breaks down for cells with these plane ``spacings`` (N, 3) and ``cutoffs``.

    vesin 0.6 sizes its grid as ``max(trunc(spacing / cutoff), 1)`` cells a direction; above ``VESIN_MAX_CELLS``
    cells it shrinks the grid keeping the ratios and truncating. For a long, flat cell a direction then truncates
    to 0 cells (an integer division by zero: SIGFPE kills the process) or the counts overflow. This repeats that
    arithmetic so such a cell is refused before vesin sees it; tests check it against vesin on both sides.
    """
    spacings = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
    cutoffs = np.broadcast_to(np.asarray(cutoffs, dtype=np.float64), (len(spacings),))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        n = np.clip(np.trunc(spacings / cutoffs[:, None]), 1.0, np.inf)
        total = n.prod(axis=1)
        x_y, y_z = n[:, 0] / n[:, 1], n[:, 1] / n[:, 2]
        z = np.trunc(np.cbrt(VESIN_MAX_CELLS / (x_y * y_z * y_z)))
        y = np.trunc(y_z * z)
        shrunk = np.stack([np.trunc(x_y * y), y, z], axis=1)
        grid = np.where((total > VESIN_MAX_CELLS)[:, None], shrunk, n)
        return ~(np.isfinite(grid).all(axis=1) & (grid >= 1).all(axis=1) & (grid.prod(axis=1) <= 2 * VESIN_MAX_CELLS))


def refusals(lattices: np.ndarray, atom_ptr: np.ndarray, frac: np.ndarray, radii: np.ndarray) -> dict[int, str]:
    """Crystals that cannot be searched, by index, with the reason: non-finite values, a singular lattice, a cell
    far thinner than the radius (those limits keep vesin from looping over, and allocating, billions of images)."""
    lattices = np.asarray(lattices, dtype=np.float64).reshape(-1, 3, 3)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(lattices),))
    sizes = np.diff(atom_ptr)
    finite_frac = np.ones(len(lattices), dtype=bool)
    bad_rows = np.flatnonzero(~np.isfinite(frac).all(axis=1))
    finite_frac[np.searchsorted(atom_ptr, bad_rows, side="right") - 1] = False
    finite_lattice = np.isfinite(lattices).all(axis=(1, 2))
    good_radius = np.isfinite(radii) & (radii > 0)
    safe = np.where(finite_lattice[:, None, None], lattices, np.eye(3))
    volumes = np.abs(np.linalg.det(safe))
    regular = finite_lattice & (volumes > 0)
    heights = plane_spacings(lattices)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cutoffs = np.where(radii < PYMATGEN_MIN_R, radii, np.sqrt(radii * radii + NUMERICAL_TOL)) * (1.0 + 1e-9)
        images = np.prod(2.0 * np.ceil(cutoffs[:, None] / heights) + 1.0, axis=1)
        pairs = sizes * sizes * (4.0 / 3.0 * np.pi * cutoffs**3) / volumes
    thin = ~((images <= MAX_IMAGES) & (pairs <= MAX_PAIRS))
    grid = vesin_grid_fails(heights, cutoffs)
    reasons: dict[int, str] = {}
    for c in np.flatnonzero(~(finite_lattice & finite_frac & good_radius & regular) | thin | grid):
        c = int(c)
        if not finite_lattice[c]:
            reasons[c] = "non-finite lattice"
        elif not finite_frac[c]:
            reasons[c] = "non-finite fractional coordinates"
        elif not good_radius[c]:
            reasons[c] = f"the radius must be a positive number, not {radii[c]}"
        elif not regular[c]:
            reasons[c] = "singular lattice (zero volume)"
        elif not thin[c]:
            reasons[c] = (
                f"a cell too long and flat for vesin's cell grid (lattice planes {heights[c].min():.3g} to "
                f"{heights[c].max():.3g} Å apart, radius {radii[c]:g} Å)"
            )
        else:
            reasons[c] = (
                f"a cell far thinner than the radius ({images[c]:.3g} periodic images to search within {radii[c]:g} Å, "
                f"about {pairs[c]:.3g} pairs; limits {MAX_IMAGES:.0e} and {MAX_PAIRS:.0e})"
            )
    return reasons


def _cutoff(radius: float, tol: float = NUMERICAL_TOL) -> float:
    """vesin's cut-off: slightly above pymatgen's, so that its candidates include every pair pymatgen keeps."""
    reach = radius if radius < PYMATGEN_MIN_R else math.sqrt(radius * radius + tol)
    return reach * (1.0 + 1e-9) + 1e-12


def _vesin_pairs(search, lattice: np.ndarray, frac_coords: np.ndarray, cutoff: float) -> tuple[np.ndarray, ...]:
    """vesin's raw pairs ``(i, j, S, d)`` of one crystal with d < ``cutoff`` (``search``: a vesin.NeighborList)."""
    cart = np.ascontiguousarray(frac_coords @ lattice)
    search.cutoff = float(cutoff)
    return search.compute(points=cart, box=np.ascontiguousarray(lattice), periodic=True, quantities="ijSd")


def _filtered_pairs(
    raw: dict[int, tuple[np.ndarray, ...]],
    full: dict[int, bool],
    atom_ptr: np.ndarray,
    numbers: np.ndarray,
    radii: np.ndarray,
    numerical_tol: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """vesin's pairs of crystals ``raw`` (index -> pairs) joined, with pymatgen's test on those searched with the
    full radius and without the atom itself; centres are counted from the first of them, neighbours per crystal."""
    crystals = list(raw)
    lo = atom_ptr[crystals[0]]
    lengths = np.array([len(raw[c][3]) for c in crystals])
    offsets = np.repeat(atom_ptr[crystals] - lo, lengths)
    centre = np.concatenate([raw[c][0] for c in crystals]).astype(np.int64) + offsets
    neighbour = np.concatenate([raw[c][1] for c in crystals]).astype(np.int64)
    image = np.concatenate([raw[c][2] for c in crystals])
    distance = np.concatenate([raw[c][3] for c in crystals])
    # pymatgen's test where the full radius was searched (a first, smaller radius's pairs are all inside it)
    r = np.repeat(np.array([radii[c] if full[c] else np.inf for c in crystals]), lengths)
    keep = np.where(r < PYMATGEN_MIN_R, distance <= r, distance * distance < r * r + numerical_tol)
    coincident = distance <= numerical_tol  # the same element there is the atom itself
    if coincident.any():
        local = numbers[lo : atom_ptr[crystals[-1] + 1]]
        keep &= ~(coincident & (local[centre] == local[neighbour + offsets]))
    if not keep.all():
        centre, neighbour, image, distance = centre[keep], neighbour[keep], image[keep], distance[keep]
    return centre, neighbour, image, distance


def candidate_pairs(
    lattice: np.ndarray,
    frac_coords: np.ndarray,
    numbers: np.ndarray,
    radius: float,
    search_radius: float | None = None,
    numerical_tol: float = NUMERICAL_TOL,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every (centre, neighbour, image) pair of one crystal within ``radius`` by pymatgen's test, from vesin.

    ``search_radius`` (below ``radius``): only the pairs closer than it (vesin's cut-off), for a first pass.
    Returns ``(centre int64, neighbour int64, image (E, 3) int32, distance float64)``; the atom itself is excluded
    as pymatgen's get_all_neighbors does. Call :func:`refusals` first (this function does not check its input).
    """
    import vesin

    lattice = np.asarray(lattice, dtype=np.float64).reshape(3, 3)
    frac_coords = np.asarray(frac_coords, dtype=np.float64).reshape(-1, 3)
    full = search_radius is None or search_radius >= radius
    search = vesin.NeighborList(cutoff=1.0, full_list=True, n_threads=1)
    raw = _vesin_pairs(search, lattice, frac_coords, _cutoff(radius, numerical_tol) if full else search_radius)
    ptr = np.array([0, len(frac_coords)])
    return _filtered_pairs({0: raw}, {0: full}, ptr, np.asarray(numbers), np.array([radius]), numerical_tol)


def _kth_distance(centre: np.ndarray, distance: np.ndarray, num_atoms: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per centre: the number of pairs and the k-th smallest distance (inf where there are fewer than k)."""
    counts = np.bincount(centre, minlength=num_atoms)
    if len(distance) == 0 or counts.max() < k:
        return counts, np.full(num_atoms, np.inf)
    order = np.argsort(centre, kind="stable")
    starts = np.zeros(num_atoms, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    sorted_centre = centre[order]
    slot = np.arange(len(centre)) - starts[sorted_centre]
    dense = np.full((num_atoms, int(counts.max())), np.inf)
    dense[sorted_centre, slot] = distance[order]
    return counts, np.partition(dense, k - 1, axis=1)[:, k - 1]


def _tie_ordered_first(
    centre: np.ndarray,
    neighbour: np.ndarray,
    image: np.ndarray,
    distance: np.ndarray,
    max_num_nbr: int,
    tie_tolerance: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort by (centre, distance), group distances into tie shells, order shells by (j, image), take the first
    ``max_num_nbr`` per centre. (Equal distances fall into one shell in any order, so the first sort needs no
    other key.)"""
    order = np.lexsort((distance, centre))
    centre, neighbour, image, distance = centre[order], neighbour[order], image[order], distance[order]
    new_shell = np.ones(len(distance), dtype=bool)
    new_shell[1:] = (centre[1:] != centre[:-1]) | (np.diff(distance) > tie_tolerance)
    shell = np.cumsum(new_shell)
    order = np.lexsort((image[:, 2], image[:, 1], image[:, 0], neighbour, shell))
    centre, neighbour, distance = centre[order], neighbour[order], distance[order]
    first = np.ones(len(centre), dtype=bool)
    first[1:] = centre[1:] != centre[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(centre)), 0))
    keep = np.arange(len(centre)) - group_start < max_num_nbr
    return centre[keep], neighbour[keep], distance[keep]


def select_neighbours(
    centre: np.ndarray,
    neighbour: np.ndarray,
    image: np.ndarray,
    distance: np.ndarray,
    num_atoms: int,
    max_num_nbr: int,
    tie_tolerance: float = TIE_TOLERANCE,
    margin: float = PARTITION_MARGIN,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per centre, the ``max_num_nbr`` nearest pairs in tie-aware order; returns ``(centre, neighbour, distance)``.

    Pairs are sorted by distance; distances within ``tie_tolerance`` of the previous one join its shell, and a
    shell is ordered by neighbour index, then image. The selected pairs come out grouped by centre (ascending)
    and in that order. Centres with more than ``max_num_nbr`` pairs first keep only those within their
    ``max_num_nbr``-th smallest distance plus ``margin``.
    """
    if len(distance) == 0:
        return centre, neighbour, distance
    counts, kth = _kth_distance(centre, distance, num_atoms, max_num_nbr)
    if counts.max() > max_num_nbr:
        keep = distance <= kth[centre] + margin
        centre, neighbour, image, distance = centre[keep], neighbour[keep], image[keep], distance[keep]
    return _tie_ordered_first(centre, neighbour, image, distance, max_num_nbr, tie_tolerance)


def neighbour_lists(
    lattices: np.ndarray,
    atom_ptr: np.ndarray,
    frac: np.ndarray,
    numbers: np.ndarray,
    radii: np.ndarray | float,
    max_num_nbr: int,
    tie_tolerance: float = TIE_TOLERANCE,
    numerical_tol: float = NUMERICAL_TOL,
    margin: float = PARTITION_MARGIN,
    probe: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour lists of several crystals: ``(nbr_idx int64 (N, M), nbr_dist float32 (N, M), nbr_count int64 (N,))``.

    Crystal ``c`` is atoms ``atom_ptr[c]:atom_ptr[c + 1]`` of ``frac`` and ``numbers``, with lattice ``lattices[c]``
    (rows a, b, c) and radius ``radii[c]`` (or one radius for all); neighbour indices are local to the crystal.
    Padded slots point at atom 0 at distance ``radius + 1`` (CGCNN's values). ``probe=False`` searches the full
    radius at once (the same lists). Raises :class:`NeighbourSearchError` naming the first crystal refused.
    """
    # long: the batched search, its re-search of crystals the small first radius missed, and the selection share arrays
    lattices = np.asarray(lattices, dtype=np.float64).reshape(-1, 3, 3)
    atom_ptr = np.asarray(atom_ptr, dtype=np.int64)
    atom_ptr = atom_ptr - atom_ptr[0]
    frac = np.asarray(frac, dtype=np.float64).reshape(-1, 3)
    numbers = np.asarray(numbers)
    n_crystals = len(lattices)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (n_crystals,))
    atoms = int(atom_ptr[-1])
    if len(frac) != atoms or len(numbers) != atoms or len(atom_ptr) != n_crystals + 1:
        raise ValueError(
            f"inconsistent crystal arrays: {len(frac)} coordinate rows and {len(numbers)} atomic numbers for {atoms} "
            f"atoms; {n_crystals} lattices and {len(radii)} radii for {len(atom_ptr) - 1} crystals"
        )
    m = max_num_nbr
    nbr_idx = np.zeros((atoms, m), dtype=np.int64)
    nbr_dist = np.repeat((radii + 1.0).astype(np.float32), np.diff(atom_ptr))[:, None].repeat(m, axis=1)
    nbr_count = np.zeros(atoms, dtype=np.int64)

    import vesin

    vesin_search = vesin.NeighborList(cutoff=1.0, full_list=True, n_threads=1)  # n_threads: the stage has processes
    cutoffs = np.array([_cutoff(r, numerical_tol) for r in radii])
    volumes = np.abs(np.linalg.det(lattices))
    sizes = np.diff(atom_ptr)
    with np.errstate(divide="ignore", invalid="ignore"):
        first_radius = PROBE_FACTOR * np.cbrt(volumes / sizes * (max_num_nbr / 12)) if probe else radii
    probed = first_radius < 0.9 * radii  # no first pass when it would search nearly the whole radius
    probed &= ~vesin_grid_fails(plane_spacings(lattices), np.where(probed, first_radius, radii))

    def search(c: int, full: bool) -> tuple[np.ndarray, ...]:
        a0, a1 = atom_ptr[c], atom_ptr[c + 1]
        try:
            return _vesin_pairs(vesin_search, lattices[c], frac[a0:a1], cutoffs[c] if full else first_radius[c])
        except RuntimeError as error:  # vesin's own refusals
            raise NeighbourSearchError(c, f"vesin: {error}") from None

    start = 0
    while start < n_crystals:
        stop = start + 1
        while stop < n_crystals and atom_ptr[stop + 1] - atom_ptr[start] <= CHUNK_ATOMS:
            stop += 1
        lo, hi = atom_ptr[start], atom_ptr[stop]
        refused = refusals(lattices[start:stop], atom_ptr[start : stop + 1] - lo, frac[lo:hi], radii[start:stop])
        if refused:
            first = min(refused)
            raise NeighbourSearchError(start + first, refused[first])
        crystals = [c for c in range(start, stop) if sizes[c]]
        if not crystals:
            start = stop
            continue
        full = {c: not probed[c] for c in crystals}
        raw = {c: search(c, full[c]) for c in crystals}
        centre, neighbour, image, distance = _filtered_pairs(raw, full, atom_ptr, numbers, radii, numerical_tol)
        counts, kth = _kth_distance(centre, distance, hi - lo, m)
        # an atom's first-pass list is final when its k-th distance plus the margin lies inside the first radius
        owner = np.repeat(np.arange(start, stop), sizes[start:stop])
        unfinished = probed[owner] & ~(kth + margin < first_radius[owner] * (1 - 1e-9))
        if unfinished.any():
            for c in np.unique(owner[unfinished]).tolist():
                full[c], raw[c] = True, search(c, True)
            centre, neighbour, image, distance = _filtered_pairs(raw, full, atom_ptr, numbers, radii, numerical_tol)
            counts, kth = _kth_distance(centre, distance, hi - lo, m)
        if counts.max(initial=0) > m:
            keep = distance <= kth[centre] + margin
            centre, neighbour, image, distance = centre[keep], neighbour[keep], image[keep], distance[keep]
        centre, neighbour, distance = _tie_ordered_first(centre, neighbour, image, distance, m, tie_tolerance)
        count = np.bincount(centre, minlength=hi - lo)
        slot = np.arange(len(centre)) - np.repeat(np.cumsum(count) - count, count)
        nbr_idx[lo + centre, slot] = neighbour
        nbr_dist[lo + centre, slot] = distance
        nbr_count[lo:hi] = count
        start = stop
    return nbr_idx, nbr_dist, nbr_count
