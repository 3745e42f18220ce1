"""Published numbers of the study we reproduce (Deng, Park & Sy), for side-by-side reporting.

Test MAE of band gap (eV) after transfer with the embedding and the first 1 / 2 / 3 conv layers frozen.
"""

from __future__ import annotations

from typing import Any

BASELINE_MAE = 0.812

# Table 2: source role -> {frozen depth: published test MAE (eV)}.
TABLE2: dict[str, dict[int, float]] = {
    "formation_energy": {1: 0.797, 2: 0.765, 3: 0.865},
    "bulk_modulus": {1: 0.776, 2: 0.897, 3: 0.956},
    "shear_modulus": {1: 0.846, 2: 0.993, 3: 0.988},
    "combined": {1: 0.820, 2: 0.850, 3: 0.870},
}

# Table 3: both sources pretrained on 7,042 crystals.
TABLE3: dict[str, dict[int, float]] = {
    "combined": {1: 0.820, 2: 0.850, 3: 0.870},
    "formation_energy": {1: 1.022, 2: 1.142, 3: 1.437},
}
TABLE3_PRETRAIN_SIZE = 7042

ROLE_NAMES: dict[str, str] = {
    "formation_energy": "Formation energy",
    "bulk_modulus": "Bulk modulus",
    "shear_modulus": "Shear modulus",
    "combined": "Combined",
}


def source_label(name: str, entry: dict[str, Any]) -> str:
    """How the report names pretrained model ``name`` (its ``pretrain`` config entry).

    The entry's ``label`` if it has one; else its study role (with "(ours)" when trained here, not published);
    else its name.
    """
    if entry.get("label"):
        return entry["label"]
    role = entry.get("role")
    if not role:
        return name
    return ROLE_NAMES[role] + (" (ours)" if entry["kind"] == "train" else "")
