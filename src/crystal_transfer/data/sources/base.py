"""The source interface: anything that yields raw crystals with labels.

A source reads its input (an archive from the package registry, a local folder or tarball, a REST API)
and yields :class:`RawCrystal` records: structure text in a known format plus raw label values. It does not
parse structures; the dataset builder parses and filters them in parallel, so every source gets the same
checks and the same rejection record. A source that already knows a record is unusable (a label row with
no structure, an unsafe archive member) yields it with ``rejection`` set.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from crystal_transfer.atomic import sha256_file as sha256_of  # noqa: F401  (re-exported for the sources)
from crystal_transfer.data.structures import Rejection
from crystal_transfer.errors import UserError


class SourceError(UserError):
    """A source cannot be read at all (missing file, wrong column map, bad checksum)."""


@dataclass
class RawCrystal:
    """One crystal as a source delivers it, before parsing."""

    id: str
    fmt: str  # one of crystal_transfer.data.structures.FORMATS
    text: str
    labels: dict[str, Any]
    source_file: str  # where the record came from, e.g. "structures.tar.gz:structures/mp-1.cif"
    source_sha256: str  # checksum of the input file named first in source_file
    rejection: Rejection | None = field(default=None)


class Source(ABC):
    """A configured source of crystals. Subclasses register themselves by ``type_name``."""

    type_name: ClassVar[str]
    registry: ClassVar[dict[str, type[Source]]] = {}

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self.name = name
        self.options = options

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Source.registry[cls.type_name] = cls

    @classmethod
    def from_config(cls, spec: dict[str, Any]) -> Source:
        """Build the source named by ``spec['type']`` with the rest of ``spec`` as options."""
        kind = spec["type"]
        if kind not in cls.registry:
            raise SourceError(f"unknown source type '{kind}' (known: {', '.join(sorted(cls.registry))})")
        return cls.registry[kind](spec.get("name", kind), spec)

    @abstractmethod
    def label_units(self) -> dict[str, str]:
        """Canonical label name -> unit, for every label this source provides."""

    @abstractmethod
    def crystals(self) -> Iterator[RawCrystal]:
        """Yield every record of the source, usable or not."""

    def report(self) -> dict[str, Any] | None:
        """A JSON-able account of the last :meth:`crystals` pass that the dataset builder saves beside the
        table as ``<source name>.report.json`` (e.g. how remote records were matched), or None."""
        return None

