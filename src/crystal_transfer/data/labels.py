"""The property labels the pipeline knows, with their units.

Canonical tables name labels by these keys; a local source maps its CSV columns onto them. A label that
is not listed here needs its unit given in the source's ``units`` map.
"""

from __future__ import annotations

from crystal_transfer.errors import InputError

KNOWN_UNITS: dict[str, str] = {
    "formation_energy_per_atom": "eV/atom",
    "energy_per_atom": "eV/atom",
    "band_gap": "eV",
    "K_VRH": "GPa",
    "G_VRH": "GPa",
    "efermi": "eV",
    "delta_e": "eV/atom",
    "refractive_index": "",  # dimensionless
}


def unit_of(label: str, extra_units: dict[str, str] | None = None) -> str:
    """Return the unit of ``label``; raise ValueError naming the label when none is known."""
    if extra_units and label in extra_units:
        return extra_units[label]
    if label in KNOWN_UNITS:
        return KNOWN_UNITS[label]
    raise InputError(
        f"label '{label}' has no known unit: add it to the source's 'units' map "
        f"(known labels: {', '.join(sorted(KNOWN_UNITS))})"
    )


# How a label can be learned (the normaliser standardises the transformed value), and the labels learned on a
# log scale unless the config says otherwise (CGCNN trained the moduli on log10 GPa).
TRANSFORMS = ("identity", "log10")
LOG10_LABELS = frozenset({"K_VRH", "G_VRH"})


def transform_of(label: str) -> str:
    """The normaliser transform of a label: ``log10`` for elastic moduli, else ``identity``."""
    return "log10" if label in LOG10_LABELS else "identity"
