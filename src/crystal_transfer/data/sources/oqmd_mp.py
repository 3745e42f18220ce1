"""Source ``oqmd_mp``: OQMD structures labelled with Materials Project properties.

Both services are fetched first (OQMD pages, then MP summary documents for the reduced formulas found in
those pages, in batches). Matching, per OQMD entry:

1. bucket by reduced formula: the MP documents with the same reduced formula are the candidates
   (none: rejected as ``no_match``);
2. confirm with pymatgen's ``StructureMatcher`` (tolerances from the config): candidates that do not fit
   are dropped (none left: ``no_match``);
3. one fit: matched. Several fits: an MP document whose ``database_IDs`` name the OQMD entry's ``icsd_id``
   settles it when it is the only such one; otherwise ``ambiguous_match`` (we do not guess);
4. an MP material already matched by an earlier OQMD entry makes the later one a ``duplicate_crystal``.

A matched crystal keeps the OQMD structure and id (``oqmd-<entry_id>``) and takes the MP labels (plus any
OQMD labels listed in ``oqmd.columns``). :meth:`OqmdMpSource.report` gives the counts per outcome and the
pairs; the dataset builder saves it beside the table.
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

from crystal_transfer.data.labels import unit_of
from crystal_transfer.data.sources.base import RawCrystal, Source
from crystal_transfer.data.sources.materials_project import (
    MODULUS_LABELS,
    SCALAR_LABELS,
    icsd_ids,
    mp_documents,
    mp_labels,
)
from crystal_transfer.data.sources.oqmd import oqmd_pages, oqmd_raw
from crystal_transfer.data.structures import (
    AMBIGUOUS_MATCH,
    DUPLICATE_CRYSTAL,
    NO_MATCH,
    UNPARSABLE,
    Rejection,
    structure_from_oqmd,
)

DEFAULT_MATCH = {"ltol": 0.2, "stol": 0.3, "angle_tol": 5.0, "icsd_hints": True}


def oqmd_reduced_formula(entry: dict[str, Any]) -> str | None:
    """Reduced formula of an OQMD entry from its ``sites`` alone (no structure built), or None if unreadable."""
    from pymatgen.core import Composition

    counts: Counter[str] = Counter()
    for site in entry.get("sites") or []:
        if isinstance(site, str) and "@" in site:
            counts[site.partition("@")[0].strip()] += 1
    if not counts:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Composition(dict(counts)).reduced_formula
    except Exception:  # an unknown element symbol: the entry is rejected later, when its structure is built
        return None


def oqmd_formulas(oqmd_options: dict[str, Any]) -> list[str]:
    """Every reduced formula among the fetched OQMD entries: what to ask the Materials Project for."""
    formulas = {oqmd_reduced_formula(entry) for _, _, _, entry in oqmd_pages(oqmd_options)}
    return sorted(formula for formula in formulas if formula)


class MpCandidate:
    """One Materials Project document as a matching candidate; its structure is built on first use."""

    def __init__(self, document: dict[str, Any], batch: str) -> None:
        self.document = document
        self.id = str(document.get("material_id"))
        self.batch = batch
        self.icsd = icsd_ids(document)
        self.unreadable = False
        self._structure: Any = None
        formula = _reduced_formula(document.get("formula_pretty"))
        if formula is None and self.structure is not None:
            formula = self.structure.composition.reduced_formula
        self.formula = formula

    @property
    def structure(self) -> Any:
        """The pymatgen Structure of the document, or None (and ``unreadable`` set) when it cannot be built."""
        if self._structure is None and not self.unreadable:
            from pymatgen.core import Structure

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._structure = Structure.from_dict(self.document["structure"])
            except Exception:  # missing or malformed structure: this candidate cannot be matched
                self.unreadable = True
        return self._structure


def _reduced_formula(formula: Any) -> str | None:
    from pymatgen.core import Composition

    if not isinstance(formula, str) or not formula:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Composition(formula).reduced_formula
    except Exception:  # not a formula pymatgen can read
        return None


class OqmdMpSource(Source):
    """OQMD crystals matched to Materials Project materials, with the MP labels."""

    type_name = "oqmd_mp"

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self.oqmd: dict[str, Any] = dict(options.get("oqmd") or {})
        self.mp: dict[str, Any] = dict(options.get("materials_project") or {})
        self.match: dict[str, Any] = {**DEFAULT_MATCH, **(options.get("match") or {})}
        # Labels the Materials Project provides come from it; OQMD adds only the others (e.g. delta_e).
        mp_provided = {*SCALAR_LABELS, *MODULUS_LABELS}
        columns = self.oqmd.get("columns") or {"delta_e": "delta_e"}
        self.oqmd_columns: dict[str, str] = {k: v for k, v in columns.items() if k not in mp_provided}
        self.tolerance = float(self.mp.get("moduli_tolerance", 0.01))
        self._report: dict[str, Any] | None = None

    def label_units(self) -> dict[str, str]:
        labels = [*SCALAR_LABELS, *MODULUS_LABELS, *self.oqmd_columns]
        return {label: unit_of(label) for label in labels}

    def _candidates(self) -> dict[str, list[MpCandidate]]:
        """MP documents bucketed by reduced formula (each material once)."""
        buckets: dict[str, list[MpCandidate]] = defaultdict(list)
        seen: set[str] = set()
        for batch, _, document in mp_documents(self.mp, oqmd_formulas(self.oqmd)):
            material_id = str(document.get("material_id"))
            if material_id in seen:
                continue
            seen.add(material_id)
            candidate = MpCandidate(document, batch)
            buckets[candidate.formula or ""].append(candidate)
        return buckets

    def crystals(self) -> Iterator[RawCrystal]:
        from pymatgen.analysis.structure_matcher import StructureMatcher

        matcher = StructureMatcher(
            ltol=float(self.match["ltol"]), stol=float(self.match["stol"]), angle_tol=float(self.match["angle_tol"])
        )
        buckets = self._candidates()
        outcomes: Counter[str] = Counter()
        pairs: list[dict[str, Any]] = []
        claimed: dict[str, str] = {}
        for page, checksum, index, entry in oqmd_pages(self.oqmd):
            raw = oqmd_raw(entry, f"oqmd:{page}#{index}", checksum, self.oqmd_columns)
            if raw.rejection is not None:
                outcomes["no_structure"] += 1
                yield raw
                continue
            outcome, rejection, candidate, via_icsd = self._match_one(entry, raw, buckets, matcher, claimed)
            outcomes[outcome] += 1
            if candidate is not None and rejection is None:
                try:
                    mp = mp_labels(candidate.document, self.tolerance)
                except Rejection as exc:
                    outcomes[outcome] -= 1
                    outcome, rejection = "invalid_mp_labels", exc
                    outcomes[outcome] += 1
                else:
                    claimed[candidate.id] = raw.id
                    raw.labels = {**mp, **raw.labels}
                    raw.source_file = f"{raw.source_file}+mp:{candidate.batch}#{candidate.id}"
                    pairs.append({"oqmd_id": raw.id, "mp_id": candidate.id, "via_icsd_hint": via_icsd})
            raw.rejection = rejection
            yield raw
        matched_ids = {pair["mp_id"] for pair in pairs}
        everyone = [candidate for bucket in buckets.values() for candidate in bucket]
        mp_total = len(everyone)
        mp_unreadable = [candidate.id for candidate in everyone if candidate.unreadable]
        self._report = {
            "source": self.name,
            "outcomes": dict(sorted(outcomes.items())),
            "oqmd_entries": sum(outcomes.values()),
            "matched": len(pairs),
            "matched_via_icsd_hint": sum(pair["via_icsd_hint"] for pair in pairs),
            "mp_documents": mp_total,
            "mp_documents_unreadable": sorted(mp_unreadable),
            "mp_documents_unmatched": mp_total - len(matched_ids) - len(mp_unreadable),
            "matcher": {key: self.match[key] for key in ("ltol", "stol", "angle_tol", "icsd_hints")},
            "pairs": pairs,
        }

    def _match_one(
        self,
        entry: dict[str, Any],
        raw: RawCrystal,
        buckets: dict[str, list[MpCandidate]],
        matcher: Any,
        claimed: dict[str, str],
    ) -> tuple[str, Rejection | None, MpCandidate | None, bool]:
        """(outcome, rejection or None, the matched candidate or None, whether the ICSD hint decided)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = structure_from_oqmd(entry["unit_cell"], entry["sites"])
        except Exception as exc:  # malformed lattice or sites
            return "unparsable", Rejection(UNPARSABLE, f"unparsable oqmd_sites: {exc}"), None, False
        formula = structure.composition.reduced_formula
        candidates = buckets.get(formula, [])
        if not candidates:
            message = f"no Materials Project material with reduced formula {formula}"
            return "no_mp_formula", Rejection(NO_MATCH, message), None, False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits = [c for c in candidates if c.structure is not None and matcher.fit(structure, c.structure)]
        if not fits:
            ids = ", ".join(candidate.id for candidate in candidates[:10])
            message = (
                f"{len(candidates)} Materials Project material(s) with formula {formula} ({ids}), none matches the "
                f"structure (StructureMatcher ltol={self.match['ltol']}, stol={self.match['stol']}, "
                f"angle_tol={self.match['angle_tol']})"
            )
            return "no_structure_match", Rejection(NO_MATCH, message), None, False
        chosen, via_icsd = fits[0], False
        if len(fits) > 1:
            icsd = entry.get("icsd_id")
            hinted = [c for c in fits if self.match["icsd_hints"] and icsd is not None and int(icsd) in c.icsd]
            if len(hinted) != 1:
                ids = ", ".join(candidate.id for candidate in fits)
                hint = f"ICSD {icsd} names {len(hinted)} of them" if icsd is not None else "no ICSD id to decide"
                message = f"{len(fits)} Materials Project materials match the structure ({ids}); {hint}"
                return "ambiguous", Rejection(AMBIGUOUS_MATCH, message), None, False
            chosen, via_icsd = hinted[0], True
        if chosen.id in claimed:
            message = f"matches {chosen.id}, already matched by OQMD entry {claimed[chosen.id]}"
            return "duplicate_mp_material", Rejection(DUPLICATE_CRYSTAL, message), chosen, via_icsd
        return "matched", None, chosen, via_icsd

    def report(self) -> dict[str, Any] | None:
        """The match report of the last :meth:`crystals` pass (counts per outcome, the matched pairs)."""
        return self._report
