"""The graph settings: everything that determines a crystal graph, stored in the plan, every shard and the manifest."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from crystal_transfer.graphs.errors import GraphStageError
from crystal_transfer.graphs.neighbours import TIE_TOLERANCE

ISOLATED_POLICIES = ("extend", "drop", "keep")
SEARCHES = ("vesin", "pymatgen")


@dataclass(frozen=True)
class GraphSettings:
    """Everything that determines a crystal graph; stored in the plan, every shard and the manifest.

    Attributes:
        radius: neighbour cut-off in Å (CGCNN: 8).
        max_num_nbr: neighbour slots per atom (CGCNN: 12).
        isolated_atoms: what to do with a crystal where an atom has no neighbour within the radius:
            ``extend`` grows that crystal's radius by ``extend_step`` until every atom has one (up to
            ``max_radius``, else it is dropped), ``drop`` rejects the crystal, ``keep`` leaves the atom with
            padded slots only (the original CGCNN behaviour).
        cgcnn_padding: mark padded slots as real (the original code does not mask them).
        extend_step: radius increment in Å for ``extend``.
        max_radius: largest radius ``extend`` may reach.
        tie_tolerance: distances closer than this are a tie (fixed, recorded for provenance).
    """

    radius: float = 8.0
    max_num_nbr: int = 12
    isolated_atoms: str = "extend"
    cgcnn_padding: bool = False
    extend_step: float = 1.0
    max_radius: float = 16.0
    tie_tolerance: float = TIE_TOLERANCE

    def __post_init__(self) -> None:
        if self.isolated_atoms not in ISOLATED_POLICIES:
            raise GraphStageError(
                f"isolated_atoms must be one of {', '.join(ISOLATED_POLICIES)}, not '{self.isolated_atoms}'"
            )
        if not (self.radius > 0 and self.max_num_nbr > 0 and self.extend_step > 0):
            raise GraphStageError(f"radius, max_num_nbr and extend_step must be positive: {self}")
        if self.max_radius < self.radius:
            raise GraphStageError(f"max_radius ({self.max_radius}) is below radius ({self.radius})")

    def as_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (floats and ints normalised, so equal settings compare equal)."""
        data = asdict(self)
        for key in ("radius", "extend_step", "max_radius", "tie_tolerance"):
            data[key] = float(data[key])
        data["max_num_nbr"] = int(data["max_num_nbr"])
        data["cgcnn_padding"] = bool(data["cgcnn_padding"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSettings:
        """Build settings from a dict (a config's ``graphs`` section; ``shard_size`` is ignored)."""
        known = {key: value for key, value in data.items() if key in cls.__dataclass_fields__}
        unknown = set(data) - set(known) - {"shard_size"}
        if unknown:
            raise GraphStageError(f"unknown graph settings: {', '.join(sorted(unknown))}")
        return cls(**known).normalised()

    def normalised(self) -> GraphSettings:
        """A copy with plain Python types."""
        return GraphSettings(**self.as_dict())


def graph_config(section: dict[str, Any] | None) -> tuple[GraphSettings, int]:
    """Validate a config ``graphs`` section against the schema (defaults filled); return settings and shard size."""
    import jsonschema

    from crystal_transfer.config import ConfigError, _fill_defaults, load_schema

    schema = load_schema()
    subschema = schema["properties"]["graphs"]
    section = json.loads(json.dumps(section or {}))
    _fill_defaults(section, subschema, schema)
    errors = list(jsonschema.Draft202012Validator(subschema).iter_errors(section))
    if errors:
        raise ConfigError("invalid graphs settings: " + "; ".join(sorted(e.message for e in errors)))
    return GraphSettings.from_dict(section), int(section["shard_size"])
