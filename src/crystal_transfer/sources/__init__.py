"""Crystal sources. Importing this package registers every source type."""

from crystal_transfer.sources.base import RawCrystal, Source, SourceError
from crystal_transfer.sources.local import LocalSource
from crystal_transfer.sources.matminer_legacy import MatminerLegacySource

__all__ = ["LocalSource", "MatminerLegacySource", "RawCrystal", "Source", "SourceError"]
