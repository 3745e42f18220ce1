"""Crystal sources. Importing this package registers every source type."""

from crystal_transfer.sources.base import RawCrystal, Source, SourceError
from crystal_transfer.sources.local import LocalSource
from crystal_transfer.sources.materials_project import MaterialsProjectSource
from crystal_transfer.sources.matminer_legacy import MatminerLegacySource
from crystal_transfer.sources.oqmd import OqmdSource
from crystal_transfer.sources.oqmd_mp import OqmdMpSource

__all__ = [
    "LocalSource",
    "MaterialsProjectSource",
    "MatminerLegacySource",
    "OqmdMpSource",
    "OqmdSource",
    "RawCrystal",
    "Source",
    "SourceError",
]
