"""Seeded generators of bad input built from real mp2018 crystals (issue #16).

Every generator takes a ``numpy.random.Generator`` and real crystals and returns :class:`Mutant` records: the
bytes of one damaged file (CIF, POSCAR) with the id it will carry, what was done to it, and, where keeping it
would be wrong whatever the implementation, the fact that it must be rejected. The same seed always gives the
same mutants: a failure reproduces from its case name.
"""

from __future__ import annotations

import csv
import io
import os
import re
import tarfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CRYSTAL_TRANSFER_SHARED_DATA", REPO.parent / "shared" / "data"))
MP2018 = SHARED / "mp2018"
LABEL = "band_gap"
MAX_SITES = 12  # small crystals keep every stage run well under a second


@dataclass(frozen=True)
class Crystal:
    """A real mp2018 crystal: its id, CIF text (pymatgen-written, P1) and band gap."""

    id: str
    cif: str
    band_gap: str


@dataclass
class Mutant:
    """One damaged structure file. ``must_reject``: no correct stage may keep it (or predict it)."""

    id: str
    suffix: str  # ".cif" or ".vasp"
    payload: bytes
    note: str
    must_reject: bool = False
    reasons: frozenset[str] = field(default_factory=frozenset)  # acceptable reason codes when rejected (empty: any)

    @property
    def filename(self) -> str:
        return f"{self.id}{self.suffix}"


# ---------------------------------------------------------------------------------------------------------------
# The real crystals


_SITE = re.compile(r"^\s+([A-Z][a-z]?)\s+\S+\s+1\s+[-\d.]+\s+[-\d.]+\s+[-\d.]+\s+[\d.]+\s*$", re.M)


def load_pool(size: int, seed: int) -> list[Crystal]:
    """``size`` real crystals of 2..MAX_SITES sites, all elements Z <= 80, with a band gap, chosen by ``seed``."""
    from pymatgen.core.periodic_table import Element

    with open(MP2018 / "labels.csv", newline="") as handle:
        gaps = {row["material_id"]: row[LABEL] for row in csv.DictReader(handle) if row[LABEL].strip()}
    texts: dict[str, str] = {}
    with tarfile.open(MP2018 / "structures.tar.gz") as archive:
        for member in archive:
            if member.isfile():
                texts[Path(member.name).stem] = archive.extractfile(member).read().decode()
    ids = sorted(i for i in texts if i in gaps)
    order = np.random.default_rng(seed).permutation(len(ids))
    chosen: list[Crystal] = []
    for k in order:
        text = texts[ids[k]]
        symbols = _SITE.findall(text)
        if not 2 <= len(symbols) <= MAX_SITES or any(Element(s).Z > 80 for s in set(symbols)):
            continue
        chosen.append(Crystal(ids[k], text, gaps[ids[k]]))
        if len(chosen) == size:
            break
    return chosen


def heavy_crystal(seed: int) -> Crystal:
    """One real crystal holding an element above Z=80 (for predict's max_z), chosen by ``seed``."""
    from pymatgen.core.periodic_table import Element

    with open(MP2018 / "labels.csv", newline="") as handle:
        gaps = {row["material_id"]: row[LABEL] for row in csv.DictReader(handle) if row[LABEL].strip()}
    found = []
    with tarfile.open(MP2018 / "structures.tar.gz") as archive:
        for member in archive:
            if not member.isfile():
                continue
            text = archive.extractfile(member).read().decode()
            symbols = _SITE.findall(text)
            if 2 <= len(symbols) <= MAX_SITES and any(Element(s).Z > 80 for s in set(symbols)):
                found.append(Crystal(Path(member.name).stem, text, gaps.get(Path(member.name).stem, "1.0")))
                if len(found) == 20:
                    break
    return found[int(np.random.default_rng(seed).integers(len(found)))]


def structure_of(crystal: Crystal):
    from pymatgen.core import Structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_str(crystal.cif, fmt="cif")


def poscar_of(crystal: Crystal) -> str:
    """The crystal written by pymatgen as a VASP 5 POSCAR (direct coordinates)."""
    from pymatgen.io.vasp import Poscar

    return Poscar(structure_of(crystal)).get_str()


# ---------------------------------------------------------------------------------------------------------------
# CIF text


def _site_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if _SITE.match(line)]


def _cif_mutant(crystal: Crystal, k: int, text: str | bytes, note: str, **kw) -> Mutant:
    payload = text.encode() if isinstance(text, str) else text
    return Mutant(f"m{k:02d}-{crystal.id}", ".cif", payload, note, **kw)


def cif_truncated(rng, crystal, k):
    cut = int(rng.integers(1, len(crystal.cif)))
    return _cif_mutant(crystal, k, crystal.cif[:cut], f"truncated at character {cut} of {len(crystal.cif)}")


def cif_deleted_lines(rng, crystal, k):
    lines = crystal.cif.splitlines()
    gone = sorted(rng.choice(len(lines), size=int(rng.integers(1, 4)), replace=False).tolist())
    kept = [line for i, line in enumerate(lines) if i not in gone]
    return _cif_mutant(crystal, k, "\n".join(kept) + "\n", f"deleted lines {gone}")


def cif_duplicated_lines(rng, crystal, k):
    """Header lines (not atom sites) written twice."""
    lines = crystal.cif.splitlines()
    sites = set(_site_lines(lines))
    candidates = [i for i, line in enumerate(lines) if i not in sites and line.strip()]
    twice = set(rng.choice(candidates, size=int(rng.integers(1, 3)), replace=False).tolist())
    out = []
    for i, line in enumerate(lines):
        out += [line, line] if i in twice else [line]
    return _cif_mutant(crystal, k, "\n".join(out) + "\n", f"duplicated header lines {sorted(twice)}")


def _replace_symbol(line: str, symbol: str) -> str:
    parts = line.split()
    parts[0], parts[1] = symbol, f"{symbol}{parts[1][len(parts[0]):]}"
    return "  " + "  ".join(parts)


def cif_dummy_element(rng, crystal, k):
    """A site's symbol replaced by one pymatgen reads as a dummy species (Xx, X0+...)."""
    lines = crystal.cif.splitlines()
    sites = _site_lines(lines)
    at = int(rng.choice(sites))
    symbol = str(rng.choice(["Xx", "X", "Xa", "Xz"]))
    lines[at] = _replace_symbol(lines[at], symbol)
    return _cif_mutant(crystal, k, "\n".join(lines) + "\n", f"site line {at} symbol -> {symbol}", must_reject=True)


def cif_unknown_symbol(rng, crystal, k):
    """A site's symbol replaced by something that is no element (pymatgen may guess from its first letters)."""
    lines = crystal.cif.splitlines()
    sites = _site_lines(lines)
    at = int(rng.choice(sites))
    symbol = str(rng.choice(["Qq", "Zz", "Jj", "Uue", "Qx"]))
    lines[at] = _replace_symbol(lines[at], symbol)
    return _cif_mutant(crystal, k, "\n".join(lines) + "\n", f"site line {at} symbol -> {symbol}", must_reject=True)


def _set_cell(text: str, key: str, value: str) -> str:
    return re.sub(rf"^(_cell_{key}\s+)\S+", lambda m: m.group(1) + value, text, count=1, flags=re.M)


def cif_bad_cell_length(rng, crystal, k):
    axis = str(rng.choice(["a", "b", "c"]))
    value = str(rng.choice(["nan", "inf", "0", "0.0", "1e300", "0.0001", "-5.0", "NaN"]))
    impossible = value not in ("-5.0",)
    text = _set_cell(crystal.cif, f"length_{axis}", value)
    return _cif_mutant(crystal, k, text, f"cell length {axis} = {value}", must_reject=impossible)


def cif_bad_cell_angle(rng, crystal, k):
    axis = str(rng.choice(["alpha", "beta", "gamma"]))
    value = str(rng.choice(["nan", "0", "180", "360", "0.001", "inf", "1e5", "-90"]))
    impossible = value in ("nan", "0", "180", "360", "0.001", "inf")
    text = _set_cell(crystal.cif, f"angle_{axis}", value)
    return _cif_mutant(crystal, k, text, f"cell angle {axis} = {value}", must_reject=impossible)


def cif_duplicated_site(rng, crystal, k):
    """An atom site written twice, exactly or shifted by 0.004 Å: overlapping atoms."""
    lines = crystal.cif.splitlines()
    at = int(rng.choice(_site_lines(lines)))
    parts = lines[at].split()
    exact = bool(rng.integers(2))
    if not exact:
        a = float(re.search(r"_cell_length_a\s+(\S+)", crystal.cif).group(1))
        parts[3] = f"{float(parts[3]) + 0.004 / a:.8f}"
    copy = "  " + "  ".join([parts[0], parts[1] + "d", *parts[2:]])
    lines.insert(at + 1, copy)
    how = "exactly" if exact else "shifted by 0.004 Å along a"
    # an exact copy, pymatgen's CIF reader merges into one site of occupancy 2 and refuses: any reason will do
    reasons = frozenset() if exact else frozenset({"overlapping_atoms"})
    return _cif_mutant(crystal, k, "\n".join(lines) + "\n", f"site line {at} duplicated {how}",
                       must_reject=True, reasons=reasons)


def cif_partial_occupancy(rng, crystal, k):
    lines = crystal.cif.splitlines()
    at = int(rng.choice(_site_lines(lines)))
    parts = lines[at].split()
    occupancy = str(rng.choice(["0.5", "0.25", "0.999"]))
    parts[-1] = occupancy
    lines[at] = "  " + "  ".join(parts)
    return _cif_mutant(crystal, k, "\n".join(lines) + "\n", f"site line {at} occupancy {occupancy}",
                       must_reject=True, reasons=frozenset({"partial_occupancy"}))


def cif_garbage_bytes(rng, crystal, k):
    data = bytearray(crystal.cif.encode())
    style = int(rng.integers(3))
    if style == 0:  # the whole file replaced by random bytes
        data = bytearray(rng.integers(0, 256, size=int(rng.integers(16, 600)), dtype=np.uint8).tobytes())
        return _cif_mutant(crystal, k, bytes(data), "random bytes", must_reject=True)
    if style == 1:  # a burst of non-UTF-8 bytes at a random point
        at = int(rng.integers(len(data)))
        burst = bytes([0xFF, 0xFE, 0x00, 0xC3, 0x28, 0xA0, 0xA1, 0x80])
        data[at:at] = burst
        return _cif_mutant(crystal, k, bytes(data), f"non-UTF-8 burst at byte {at}")
    for at in rng.choice(len(data), size=8, replace=False):  # random bytes overwritten in place
        data[int(at)] = int(rng.integers(128, 256))
    return _cif_mutant(crystal, k, bytes(data), "8 bytes overwritten with high bytes")


def cif_empty(rng, crystal, k):
    payload = [b"", b"   \n", b"\n\n\n", b"\t \r\n"][k % 4]
    return _cif_mutant(crystal, k, payload, f"empty file {payload!r}", must_reject=True)


CIF_KINDS: dict[str, Callable] = {
    "cif_truncated": cif_truncated,
    "cif_deleted_lines": cif_deleted_lines,
    "cif_duplicated_lines": cif_duplicated_lines,
    "cif_dummy_element": cif_dummy_element,
    "cif_unknown_symbol": cif_unknown_symbol,
    "cif_bad_cell_length": cif_bad_cell_length,
    "cif_bad_cell_angle": cif_bad_cell_angle,
    "cif_duplicated_site": cif_duplicated_site,
    "cif_partial_occupancy": cif_partial_occupancy,
    "cif_garbage_bytes": cif_garbage_bytes,
    "cif_empty": cif_empty,
}


# ---------------------------------------------------------------------------------------------------------------
# POSCAR text (pymatgen-written from the real structure; line 0 comment, 1 scale, 2-4 lattice, 5 symbols,
# 6 counts, 7 "direct", 8.. coordinates)


def _poscar_mutant(crystal: Crystal, k: int, lines: list[str], note: str, **kw) -> Mutant:
    return Mutant(f"p{k:02d}-{crystal.id}", ".vasp", ("\n".join(lines) + "\n").encode(), note, **kw)


def poscar_counts_mismatch(rng, crystal, k):
    lines = poscar_of(crystal).splitlines()
    counts = [int(c) for c in lines[6].split()]
    style = k % 3
    if style == 0:
        counts[int(rng.integers(len(counts)))] += int(rng.integers(1, 3))
        note = "a count raised above the coordinates given"
    elif style == 1:
        counts.append(1)
        note = "one count more than symbols"
    else:
        counts = counts[:-1] or [0]
        note = "one count fewer than symbols"
    lines[6] = "   ".join(str(c) for c in counts)
    return _poscar_mutant(crystal, k, lines, note)


def poscar_bad_scale(rng, crystal, k):
    lines = poscar_of(crystal).splitlines()
    value = ["0", "0.0", "-0", "-1", "nan", "-1e-9", "1e-12"][k % 7]
    lines[1] = value
    return _poscar_mutant(crystal, k, lines, f"scale line {value}", must_reject=value not in ("-1",))


def poscar_overlapping_atoms(rng, crystal, k):
    """Two atoms at the same position, or 0.004 Å apart (POSCAR allows it)."""
    lines = poscar_of(crystal).splitlines()
    symbols, counts = lines[5].split(), [int(c) for c in lines[6].split()]
    species = int(rng.integers(len(symbols)))
    first = 8 + sum(counts[:species])
    coords = [float(x) for x in lines[first].split()[:3]]
    exact = bool(rng.integers(2))
    if not exact:
        a = np.linalg.norm([float(x) for x in lines[2].split()])
        coords[0] += 0.004 / a
    counts[species] += 1
    lines[6] = "   ".join(str(c) for c in counts)
    lines.insert(first + 1, " ".join(f"{x:.10f}" for x in coords) + f" {symbols[species]}")
    how = "at the same position" if exact else "0.004 Å apart"
    return _poscar_mutant(crystal, k, lines, f"two {symbols[species]} atoms {how}",
                          must_reject=True, reasons=frozenset({"overlapping_atoms"}))


THIN_FACTORS = (0.05, 0.02, 0.1, 0.15)


def poscar_thin_cell(rng, crystal, k):
    """The c vector scaled down (c x 0.05 ...): a cell far thinner than the 8 Å radius."""
    lines = poscar_of(crystal).splitlines()
    factor = THIN_FACTORS[k % len(THIN_FACTORS)]
    axis = 2 + int(rng.integers(3))
    lines[axis] = " ".join(f"{float(x) * factor:.10f}" for x in lines[axis].split())
    return _poscar_mutant(crystal, k, lines, f"lattice vector {axis - 2} scaled by {factor}")


def poscar_dummy_symbol(rng, crystal, k):
    lines = poscar_of(crystal).splitlines()
    symbols = lines[5].split()
    at = int(rng.integers(len(symbols)))
    symbol = str(rng.choice(["Xx", "X", "Xz"]))
    symbols[at] = symbol
    lines[5] = " ".join(symbols)
    lines[0] = " ".join(symbols)  # pymatgen may take the symbols from the comment line too
    return _poscar_mutant(crystal, k, lines, f"symbol {at} -> {symbol}", must_reject=True)


def poscar_missing_lines(rng, crystal, k):
    lines = poscar_of(crystal).splitlines()
    which = [1, 2, 3, 4, 5, 6, 7, len(lines) - 1][k % 8]
    del lines[which]
    return _poscar_mutant(crystal, k, lines, f"line {which} deleted")


POSCAR_KINDS: dict[str, Callable] = {
    "poscar_counts_mismatch": poscar_counts_mismatch,
    "poscar_bad_scale": poscar_bad_scale,
    "poscar_overlapping_atoms": poscar_overlapping_atoms,
    "poscar_thin_cell": poscar_thin_cell,
    "poscar_dummy_symbol": poscar_dummy_symbol,
    "poscar_missing_lines": poscar_missing_lines,
}

STRUCTURE_KINDS = {**CIF_KINDS, **POSCAR_KINDS}


def mutants(kind: str, crystals: list[Crystal], seed: int) -> list[Mutant]:
    """One mutant of ``kind`` per crystal, seeded by ``seed`` and the kind's name."""
    rng = np.random.default_rng([seed, *kind.encode()])
    make = STRUCTURE_KINDS[kind]
    return [make(rng, crystal, k) for k, crystal in enumerate(crystals)]


# ---------------------------------------------------------------------------------------------------------------
# Labels CSV


@dataclass
class LabelCase:
    """A labels CSV (bytes) for crystals whose structures are written unchanged.

    ``bad_ids``: ids whose label row is unusable and that must be rejected; ``fatal_ok``: the file as a whole may
    be refused (exit 2 naming it); ``all_kept``: nothing is wrong with the content, every crystal must be kept.
    """

    payload: bytes
    note: str
    bad_ids: set[str] = field(default_factory=set)
    fatal_ok: bool = False
    all_kept: bool = False
    extra_records: int = 0  # label rows beyond one per crystal (duplicates)


def _csv_bytes(header: list[str], rows: list[list[str]], encoding: str = "utf-8") -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode(encoding)


def label_cases(kind: str, crystals: list[Crystal], seed: int) -> list[LabelCase]:
    """Several labels CSVs of ``kind`` for ``crystals`` (ids and band gaps), seeded."""
    # long: one branch per label mutation, each building its own few files
    rng = np.random.default_rng([seed, *kind.encode()])
    header = ["material_id", LABEL, "note"]
    base = [[c.id, c.band_gap, "ok"] for c in crystals]
    n = len(crystals)
    cases: list[LabelCase] = []

    def some(count: int) -> list[int]:
        return sorted(rng.choice(n, size=count, replace=False).tolist())

    if kind in ("labels_non_numeric", "labels_inf_nan", "labels_empty_values"):
        values = {
            "labels_non_numeric": ["abc", "1,5", "--", "1.2.3", "0x10", "eV", "1e", "TRUE"],
            "labels_inf_nan": ["inf", "-inf", "nan", "NaN", "1e999", "-1e999", "Infinity", "+nan"],
            "labels_empty_values": ["", " ", "\t", "  "],
        }[kind]
        for _ in range(3):
            rows = [list(r) for r in base]
            bad = some(3)
            for i in bad:
                rows[i][1] = str(rng.choice(values))
            cases.append(LabelCase(_csv_bytes(header, rows), f"values {[rows[i][1] for i in bad]}",
                                   bad_ids={crystals[i].id for i in bad}))
    elif kind == "labels_bom":
        for encoding in ("utf-8-sig", "utf-16"):
            payload = _csv_bytes(header, base, encoding)
            cases.append(LabelCase(payload, f"encoded {encoding}", all_kept=encoding == "utf-8-sig",
                                   fatal_ok=encoding != "utf-8-sig"))
    elif kind == "labels_latin1":
        for _ in range(2):
            rows = [list(r) for r in base]
            for i in some(2):
                rows[i][2] = str(rng.choice(["Müller", "façade", "Å-phase", "naïve"]))
            cases.append(LabelCase(_csv_bytes(header, rows, "latin-1"), "notes in latin-1", fatal_ok=True))
    elif kind == "labels_missing_id_column":
        for renamed in (["mat_id", LABEL, "note"], [LABEL, "note"], ["", LABEL, "note"]):
            rows = [r[-len(renamed):] for r in base]
            cases.append(LabelCase(_csv_bytes(renamed, rows), f"header {renamed}", fatal_ok=True))
    elif kind == "labels_duplicate_ids":
        for _ in range(3):
            rows = [list(r) for r in base]
            twice = some(2)
            for i in twice:
                rows.insert(int(rng.integers(len(rows) + 1)), [crystals[i].id, f"{rng.uniform(0, 5):.3f}", "again"])
            cases.append(LabelCase(_csv_bytes(header, rows), f"ids {[crystals[i].id for i in twice]} twice",
                                   extra_records=len(twice)))
    else:
        raise KeyError(kind)
    return cases


LABEL_KINDS = (
    "labels_non_numeric",
    "labels_inf_nan",
    "labels_empty_values",
    "labels_bom",
    "labels_latin1",
    "labels_missing_id_column",
    "labels_duplicate_ids",
)


# ---------------------------------------------------------------------------------------------------------------
# Archives


@dataclass
class ArchiveCase:
    """A .tar.gz of structures. ``members``: (name, payload or None for a symlink); ``bad``: member names that
    must be rejected; ``truncate_at``: cut the compressed file after this many bytes (None: whole)."""

    members: list[tuple[str, bytes | None]]
    note: str
    bad: set[str] = field(default_factory=set)
    truncate_at: float | None = None


def tar_bytes(members: list[tuple[str, bytes | None]], link_target: str = "/etc/passwd") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.SYMTYPE
                info.linkname = link_target
                archive.addfile(info)
            else:
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def archive_cases(kind: str, crystals: list[Crystal], seed: int) -> list[ArchiveCase]:
    rng = np.random.default_rng([seed, *kind.encode()])
    good = [(f"structures/{c.id}.cif", c.cif.encode()) for c in crystals]
    cases: list[ArchiveCase] = []
    if kind == "archive_truncated":
        for _ in range(4):
            cases.append(ArchiveCase(good, "truncated", truncate_at=float(rng.uniform(0.05, 0.98))))
    elif kind == "archive_dotdot_member":
        for name in ("../{id}.cif", "structures/../../{id}.cif", "/tmp/{id}.cif", "structures/a/../../../{id}.cif"):
            members = list(good)
            victim = crystals[int(rng.integers(len(crystals)))]
            bad = name.format(id=f"evil-{victim.id}")
            members.insert(int(rng.integers(len(members) + 1)), (bad, victim.cif.encode()))
            cases.append(ArchiveCase(members, f"member {bad}", bad={bad}))
    elif kind == "archive_symlink_member":
        for _ in range(3):
            members = list(good)
            bad = f"structures/link-{int(rng.integers(1000))}.cif"
            members.insert(int(rng.integers(len(members) + 1)), (bad, None))
            cases.append(ArchiveCase(members, f"symlink member {bad}", bad={bad}))
    elif kind == "archive_non_structure_member":
        for name in ("README.txt", "structures/notes.md", "structures/mp-x.json", "structures/.hidden"):
            members = list(good)
            members.insert(int(rng.integers(len(members) + 1)), (name, b"not a structure\n"))
            cases.append(ArchiveCase(members, f"member {name}", bad={name}))
    elif kind == "archive_empty":
        cases.append(ArchiveCase([], "no members"))
        cases.append(ArchiveCase([], "no members, labels header only"))
    else:
        raise KeyError(kind)
    return cases


ARCHIVE_KINDS = (
    "archive_truncated",
    "archive_dotdot_member",
    "archive_symlink_member",
    "archive_non_structure_member",
    "archive_empty",
)


# ---------------------------------------------------------------------------------------------------------------
# Graph shard bytes


def damage_shard(kind: str, data: bytes, header: dict, rng: np.random.Generator) -> tuple[bytes, str]:
    """``data`` (a shard file) damaged as ``kind`` says."""
    data = bytearray(data)
    if kind == "shard_flipped_distances":
        spec = header["arrays"]["nbr_dist"]
        count = int(np.prod(spec["shape"]))
        style = int(rng.integers(3))
        at = spec["offset"] + 4 * int(rng.integers(count))
        if style == 0:
            data[at : at + 4] = np.float32(-1.5).tobytes()
            return bytes(data), f"a distance set to -1.5 at byte {at}"
        if style == 1:
            data[at : at + 4] = np.float32(np.nan).tobytes()
            return bytes(data), f"a distance set to NaN at byte {at}"
        data[at + 3] ^= 0x40  # the exponent's high bit: a distance ~1e38 times larger (or smaller)
        return bytes(data), f"exponent bit flipped at byte {at + 3}"
    if kind == "shard_truncated":
        cut = int(rng.integers(16, len(data) - 1))
        return bytes(data[:cut]), f"truncated at byte {cut} of {len(data)}"
    if kind == "shard_garbage_header":
        style = int(rng.integers(3))
        if style == 0:
            data[:8] = b"GARBAGE!"
            return bytes(data), "magic overwritten"
        if style == 1:
            data[8:16] = (2**62).to_bytes(8, "little")
            return bytes(data), "header length 2**62"
        at = 16 + int(rng.integers(2, 40))
        data[at : at + 6] = b"\xff\x00{]\x81\""
        return bytes(data), f"header JSON overwritten at byte {at}"
    raise KeyError(kind)


SHARD_KINDS = ("shard_flipped_distances", "shard_truncated", "shard_garbage_header")


# ---------------------------------------------------------------------------------------------------------------
# Config files


@dataclass
class ConfigCase:
    """A config file's text and the words its one-line error must contain (the file, the key)."""

    text: str
    note: str
    must_name: list[str]


def config_text(structures: Path, labels: Path, **overrides: str) -> str:
    """A valid pipeline config (YAML) with one local dataset ``bad``; ``overrides`` replace named lines."""
    lines = {
        "results_dir": "results_dir: results",
        "filters": "filters:\n  max_z: 80\n  max_rejected_fraction: 1.0",
        "graphs": "graphs:\n  radius: 8.0\n  max_num_nbr: 12",
        "datasets": (
            "datasets:\n  bad:\n    sources:\n      - type: local\n        name: mp\n"
            f"        path: {structures}\n        labels: {labels}\n        id_column: material_id\n"
            f"        columns: {{{LABEL}: {LABEL}}}"
        ),
        "splits": (
            f"splits:\n  gap:\n    dataset: bad\n    label: {LABEL}\n    train: 4\n    val: 2\n    test: 2\n"
            "    seed: 0"
        ),
    }
    lines.update(overrides)
    return "\n".join(value for value in lines.values() if value) + "\n"


def config_cases(kind: str, structures: Path, labels: Path) -> list[ConfigCase]:
    good = config_text(structures, labels)
    if kind == "config_yaml_syntax":
        return [
            ConfigCase(good.replace("max_z: 80", "max_z: [80"), "unclosed bracket", ["line"]),
            ConfigCase(good.replace("  max_z: 80", "\tmax_z: 80"), "tab indentation", ["line"]),
            ConfigCase(good.replace("radius: 8.0", 'radius: "8.0'), "unclosed quote", ["line"]),
            ConfigCase(good.replace("  max_num_nbr: 12", " max_num_nbr: 12"), "bad indentation", ["line"]),
            ConfigCase(good + "datasets: {}\n", "duplicate top-level key", ["datasets"]),
        ]
    if kind == "config_wrong_type":
        return [
            ConfigCase(good.replace("max_z: 80", "max_z: eighty"), "max_z a string", ["max_z"]),
            ConfigCase(good.replace("max_rejected_fraction: 1.0", "max_rejected_fraction: [1]"),
                       "fraction a list", ["max_rejected_fraction"]),
            ConfigCase(good.replace("radius: 8.0", "radius: 8 A"), "radius with a unit", ["radius"]),
            ConfigCase(good.replace("train: 4", "train: four"), "split size a string", ["train"]),
            ConfigCase(config_text(structures, labels, filters="filters: 80"), "filters a number", ["filters"]),
        ]
    if kind == "config_unknown_key":
        return [
            ConfigCase(good.replace("max_z: 80", "max_zz: 80"), "max_zz", ["max_zz"]),
            ConfigCase(good + "datset: {}\n", "top-level datset", ["datset"]),
            ConfigCase(good.replace("id_column:", "id_colum:"), "source id_colum", ["id_colum"]),
            ConfigCase(good.replace("radius: 8.0", "radius: 8.0\n  radious: 6.0"), "graphs radious", ["radious"]),
        ]
    if kind == "config_missing_key":
        return [
            ConfigCase(config_text(structures, labels, splits=""), "no splits", ["splits"]),
            ConfigCase(good.replace(f"        path: {structures}\n", ""), "source without path", ["path"]),
            ConfigCase(good.replace("      - type: local\n        name: mp", "      - name: mp"),
                       "source without type", ["type"]),
            ConfigCase(good.replace("    label: band_gap\n", ""), "split without label", ["label"]),
        ]
    raise KeyError(kind)


CONFIG_KINDS = ("config_yaml_syntax", "config_wrong_type", "config_unknown_key", "config_missing_key")
