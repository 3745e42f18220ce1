"""Is a faster CIF parser worth adopting for the data stage? pymatgen's CifParser (what the data stage uses) against
gemmi's small-molecule CIF reader on every mp2018 CIF: the time of each and whether they give the same crystal.

    pip install gemmi==0.7.5      # not a dependency of the project: only this measurement uses it
    PYTHONPATH=src python benchmarks/parsers.py [--limit N]

The same crystal: the same number of sites, the same atomic numbers in order, lattices within 1e-6 Å (gemmi's cell
parameters turned into a matrix the way pymatgen does, ``Lattice.from_parameters``) and fractional coordinates
within 1e-6 (modulo 1). Times are the parse alone, interleaved per crystal in one process.
"""

from __future__ import annotations

import argparse
import tarfile
import time
import warnings

import numpy as np
from inputs import mp2018_cifs


def with_gemmi(text: str):
    import gemmi
    from pymatgen.core import Lattice

    structure = gemmi.make_small_structure_from_block(gemmi.cif.read_string(text).sole_block())
    cell = structure.cell
    lattice = Lattice.from_parameters(cell.a, cell.b, cell.c, cell.alpha, cell.beta, cell.gamma).matrix
    numbers = np.array([site.element.atomic_number for site in structure.sites])
    frac = np.array([[site.fract.x, site.fract.y, site.fract.z] for site in structure.sites])
    return lattice, numbers, frac


def with_pymatgen(text: str):
    from crystal_transfer.data.structures import _load_structure

    structure = _load_structure("cif", text)
    return structure.lattice.matrix, np.array([site.specie.Z for site in structure]), structure.frac_coords


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=0, help="the first N CIFs only (default: all)")
    args = parser.parse_args()
    try:
        import gemmi  # noqa: F401
    except ImportError:
        raise SystemExit("gemmi is not installed: pip install gemmi==0.7.5") from None
    texts = []
    with tarfile.open(mp2018_cifs()) as archive:
        for member in archive:
            if member.isfile():
                texts.append(archive.extractfile(member).read().decode())
                if args.limit and len(texts) == args.limit:
                    break
    times = {"pymatgen": 0.0, "gemmi": 0.0}
    same = differ = failed = 0
    examples = []
    largest = {"sites": 0, "lattice": 0.0, "fractional": 0.0}  # over the crystals that differ
    warnings.simplefilter("ignore")
    with_pymatgen(texts[0]), with_gemmi(texts[0])  # imports before the clock starts
    for text in texts:
        results = {}
        for name, parse in (("pymatgen", with_pymatgen), ("gemmi", with_gemmi)):
            started = time.perf_counter()
            try:
                results[name] = parse(text)
            except Exception as exc:  # a parser's failure is a finding, counted
                results[name] = exc
            times[name] += time.perf_counter() - started
        ours, theirs = results["pymatgen"], results["gemmi"]
        if isinstance(ours, Exception) or isinstance(theirs, Exception):
            failed += 1
            continue
        delta = (ours[2] - theirs[2] + 0.5) % 1.0 - 0.5
        if (len(ours[1]) == len(theirs[1]) and (ours[1] == theirs[1]).all()
                and np.abs(ours[0] - theirs[0]).max() <= 1e-6 and np.abs(delta).max() <= 1e-6):
            same += 1
        else:
            differ += 1
            if len(ours[1]) != len(theirs[1]) or (ours[1] != theirs[1]).any():
                largest["sites"] += 1
            else:
                largest["lattice"] = max(largest["lattice"], float(np.abs(ours[0] - theirs[0]).max()))
                largest["fractional"] = max(largest["fractional"], float(np.abs(delta).max()))
            if len(examples) < 3:
                examples.append(text.splitlines()[1])
    count = len(texts)
    print(f"{count} CIFs: the same crystal {same}, different {differ}, a parser failed {failed}"
          + (f" (e.g. {', '.join(examples)})" if examples else ""))
    if differ:
        print(f"of those that differ: {largest['sites']} in their sites or species; the rest by at most "
              f"{largest['lattice']:.2g} Å in the lattice and {largest['fractional']:.2g} in a fractional coordinate")
    for name, seconds in times.items():
        print(f"{name:<9} {seconds:8.1f} s  {1000 * seconds / count:6.3f} ms a CIF")
    print(f"parsers: gemmi {times['pymatgen'] / times['gemmi']:.1f}x faster than pymatgen's CifParser, "
          f"{same}/{count} the same crystal")


if __name__ == "__main__":
    main()
