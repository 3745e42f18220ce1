"""The project's cache folder, where registry downloads and compiled kernels are kept between runs."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "CRYSTAL_TRANSFER_CACHE"


def cache_dir(*parts: str) -> Path:
    """``$CRYSTAL_TRANSFER_CACHE`` (when set and not empty), else ``~/.cache/crystal_transfer``; ``parts`` appended."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "crystal_transfer"
    return Path(root).joinpath(*parts)
