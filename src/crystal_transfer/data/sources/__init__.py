"""Crystal sources. Importing this package registers every source type."""

from crystal_transfer.data.sources.base import RawCrystal, Source, SourceError
from crystal_transfer.data.sources.local import LocalSource
from crystal_transfer.data.sources.materials_project import MaterialsProjectSource
from crystal_transfer.data.sources.matminer_legacy import MatminerLegacySource
from crystal_transfer.data.sources.oqmd import OqmdSource
from crystal_transfer.data.sources.oqmd_mp import OqmdMpSource

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
