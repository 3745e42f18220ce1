"""Parse structure text into plain arrays and apply the per-crystal filters.

Every failure is a :class:`Rejection` with a stable reason code and a readable message; nothing from deep
inside pymatgen escapes as a traceback.
"""

from __future__ import annotations

import ast
import json
import math
import warnings
from dataclasses import dataclass

import numpy as np

# Reason codes, as they appear in rejected.csv and in the summary counts.
UNPARSABLE = "unparsable"
EMPTY_FILE = "empty_file"
PARTIAL_OCCUPANCY = "partial_occupancy"
ELEMENT_ABOVE_MAX_Z = "element_above_max_z"
NON_FINITE_LABEL = "non_finite_label"
NO_LABELS = "no_labels"
DUPLICATE_ID = "duplicate_id"
DUPLICATE_CRYSTAL = "duplicate_crystal"
MISSING_STRUCTURE = "missing_structure"
MISSING_LABELS = "missing_labels"
MISSING_ID = "missing_id"
UNSAFE_PATH = "unsafe_path"
UNKNOWN_FORMAT = "unknown_format"
UNKNOWN_ELEMENT = "unknown_element"
OVERLAPPING_ATOMS = "overlapping_atoms"
# Remote sources (OQMD, Materials Project) and the matching of the two.
INCONSISTENT_MODULI = "inconsistent_moduli"
NO_MATCH = "no_match"
AMBIGUOUS_MATCH = "ambiguous_match"


class Rejection(Exception):
    """A crystal that is not kept, with the reason code and a message for rejected.csv."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass(frozen=True)
class ParsedCrystal:
    """An ordered crystal as arrays: what the canonical table stores."""

    formula: str
    lattice: np.ndarray  # (3, 3) lattice rows, Å
    numbers: np.ndarray  # (n,) atomic numbers
    frac_coords: np.ndarray  # (n, 3)


# Two atoms (or an atom and its own periodic image) closer than this are one position written twice, not a
# bond: the shortest bond of any real crystal (H2, 0.74 Å) is well above it. ``filters.min_distance`` overrides it.
DEFAULT_MIN_DISTANCE = 0.5

FORMATS = ("cif", "poscar", "pymatgen_dict", "pymatgen_json", "oqmd_sites")


def oqmd_sites_text(unit_cell: object, sites: object) -> str:
    """Structure text of format ``oqmd_sites``: the OQMD REST fields ``unit_cell`` and ``sites`` as JSON."""
    return json.dumps({"unit_cell": unit_cell, "sites": sites})


def structure_from_oqmd(unit_cell: object, sites: object):
    """A pymatgen Structure from OQMD's ``unit_cell`` (3 lattice rows, Å) and ``sites`` ("El @ fx fy fz")."""
    from pymatgen.core import Lattice, Structure

    rows = np.asarray(unit_cell, dtype=np.float64)
    if rows.shape != (3, 3):
        raise ValueError(f"unit_cell has shape {rows.shape}, expected 3 rows of 3 numbers")
    if not isinstance(sites, list) or not sites:
        raise ValueError("sites is empty or not a list")
    species: list[str] = []
    coords: list[list[float]] = []
    for site in sites:
        if not isinstance(site, str) or "@" not in site:
            raise ValueError(f"site {site!r} is not of the form 'El @ fx fy fz'")
        element, _, position = site.partition("@")
        numbers = position.split()
        if len(numbers) < 3 or not element.strip():
            raise ValueError(f"site {site!r} is not of the form 'El @ fx fy fz'")
        species.append(element.strip())
        coords.append([float(x) for x in numbers[:3]])
    return Structure(Lattice(rows), species, coords)


def _load_structure(fmt: str, text: str):
    """Build a pymatgen Structure from text in one of :data:`FORMATS`."""
    from pymatgen.core import Structure

    if fmt == "cif":
        from pymatgen.io.cif import CifParser

        structures = CifParser.from_str(text).parse_structures(primitive=False, on_error="raise")
        if len(structures) != 1:
            raise ValueError(f"CIF holds {len(structures)} structures, expected 1")
        return structures[0]
    if fmt == "poscar":
        from pymatgen.io.vasp import Poscar

        return Poscar.from_str(text, read_velocities=False).structure
    if fmt == "pymatgen_dict":
        return Structure.from_dict(ast.literal_eval(text))
    if fmt == "pymatgen_json":
        return Structure.from_dict(json.loads(text))
    if fmt == "oqmd_sites":
        fields = json.loads(text)
        return structure_from_oqmd(fields["unit_cell"], fields["sites"])
    raise ValueError(f"unknown structure format '{fmt}' (known: {', '.join(FORMATS)})")


def _first_line(message: str, limit: int = 200) -> str:
    line = " ".join(str(message).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def parse_crystal(
    fmt: str, text: str, max_z: int, min_distance: float = DEFAULT_MIN_DISTANCE
) -> ParsedCrystal:
    """Parse ``text`` and check it; raise :class:`Rejection` for anything the pipeline cannot use.

    Checks, in order: empty input, parse errors, partial occupancy, symbols that are not elements (pymatgen
    reads ``Xx`` as a dummy species), elements with Z above ``max_z``, a degenerate lattice or non-finite
    coordinates, and two atoms closer than ``min_distance`` Å (one of them may be a periodic image).
    """
    if not text or not text.strip():
        raise Rejection(EMPTY_FILE, "empty structure file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns about electronegativities and rounding, not errors
        try:
            return _checked(fmt, text, max_z, min_distance)
        except Rejection:
            raise
        except Exception as exc:  # a check that pymatgen's objects break in a new way still rejects one record
            raise Rejection(UNPARSABLE, f"unparsable {fmt}: {_first_line(exc) or type(exc).__name__}") from None


def _checked(fmt: str, text: str, max_z: int, min_distance: float) -> ParsedCrystal:
    from pymatgen.core.periodic_table import Element

    try:
        structure = _load_structure(fmt, text)
    except Exception as exc:  # pymatgen raises many types; all mean "cannot read this crystal"
        raise Rejection(UNPARSABLE, f"unparsable {fmt}: {_first_line(exc) or type(exc).__name__}") from None
    if len(structure) == 0:
        raise Rejection(UNPARSABLE, f"unparsable {fmt}: no atomic sites")
    if not structure.is_ordered:
        for index, site in enumerate(structure):
            if not site.is_ordered:
                occupancy = ", ".join(f"{sp}:{occ:g}" for sp, occ in site.species.items())
                raise Rejection(PARTIAL_OCCUPANCY, f"partial occupancy at site {index} ({occupancy})")
    for index, site in enumerate(structure):
        element = getattr(site.specie, "element", site.specie)  # an oxidation-state Species has its element
        if not isinstance(element, Element):
            raise Rejection(
                UNKNOWN_ELEMENT, f"site {index} holds '{site.specie}', which is not a chemical element"
            )
    numbers = np.array([site.specie.Z for site in structure], dtype=np.int16)
    lattice = np.asarray(structure.lattice.matrix, dtype=np.float64)
    frac = np.asarray(structure.frac_coords, dtype=np.float64)
    check_arrays(fmt, lattice, frac, numbers, max_z, min_distance)
    return ParsedCrystal(
        formula=structure.composition.reduced_formula, lattice=lattice, numbers=numbers, frac_coords=frac
    )


def check_arrays(
    fmt: str, lattice: np.ndarray, frac: np.ndarray, numbers: np.ndarray, max_z: int, min_distance: float
) -> None:
    """The checks on a crystal's arrays (shared with ``predict`` on a table): elements above ``max_z``, a degenerate
    lattice or non-finite coordinates, and two atoms closer than ``min_distance``; raises :class:`Rejection`."""
    from pymatgen.core.periodic_table import Element

    heavy = sorted({int(z) for z in numbers if z > max_z})
    if heavy:
        names = ", ".join(f"{Element.from_Z(z).symbol} (Z={z})" for z in heavy)
        raise Rejection(ELEMENT_ABOVE_MAX_Z, f"contains {names}, above max_z={max_z}")
    volume = abs(float(np.linalg.det(lattice))) if np.isfinite(lattice).all() else 0.0
    if not (np.isfinite(lattice).all() and np.isfinite(frac).all()) or not volume > 1e-3:
        raise Rejection(UNPARSABLE, f"unparsable {fmt}: degenerate lattice or non-finite coordinates")
    closest = closest_pair(lattice, frac, min_distance)
    if closest is not None:
        i, j, distance = closest
        symbol_i, symbol_j = Element.from_Z(int(numbers[i])).symbol, Element.from_Z(int(numbers[j])).symbol
        what = f"atoms {i} ({symbol_i}) and {j} ({symbol_j})" if i != j else f"atom {i} ({symbol_i}) and its own image"
        raise Rejection(
            OVERLAPPING_ATOMS, f"{what} are {distance:.3g} Å apart, closer than min_distance={min_distance:g} Å"
        )


def closest_pair(lattice: np.ndarray, frac: np.ndarray, cutoff: float) -> tuple[int, int, float] | None:
    """The closest two atoms (periodic images included) when closer than ``cutoff`` Å, else None."""
    if cutoff <= 0:
        return None
    import vesin

    from crystal_transfer.graphs.neighbours import plane_spacings, vesin_grid_fails

    heights = plane_spacings(lattice)
    if (cutoff / heights).max() > 1e3 or vesin_grid_fails(heights, cutoff)[0]:  # a sliver, or vesin's grid breaks
        raise Rejection(
            UNPARSABLE,
            f"degenerate lattice: lattice planes {heights.min():.3g} to {heights.max():.3g} Å apart",
        )
    cart = np.ascontiguousarray(frac @ lattice)
    i, j, d = vesin.NeighborList(cutoff=float(cutoff), full_list=False).compute(
        points=cart, box=lattice, periodic=True, quantities="ijd"
    )
    if len(d) == 0:
        return None
    k = int(np.argmin(d))
    return int(i[k]), int(j[k]), float(d[k])


def parse_label(name: str, value: object) -> float | None:
    """Return a finite float, None for a missing value, or raise :class:`Rejection` for anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        stripped = value.strip()
        if stripped == "":
            return None
        try:
            number = float(stripped)
        except ValueError:
            raise Rejection(NON_FINITE_LABEL, f"label {name}={stripped!r} is not a number") from None
    else:
        number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise Rejection(NON_FINITE_LABEL, f"label {name}={number} is not finite")
    return number
