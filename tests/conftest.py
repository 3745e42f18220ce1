"""Shared fixtures: where the real data lives, and the registry archive fetched once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CRYSTAL_TRANSFER_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared(*parts: str) -> Path:
    """Path of a file under the shared real-data folder, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} is absent (set CRYSTAL_TRANSFER_SHARED_DATA to the shared/data folder)")
    return path


@pytest.fixture(scope="session")
def matminer_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The matminer 0.3.9 source archive from the package registry, downloaded once per test session."""
    from crystal_transfer.sources import SourceError
    from crystal_transfer.sources.matminer_legacy import fetch_archive

    cache = Path(os.environ.get("CRYSTAL_TRANSFER_CACHE", tmp_path_factory.mktemp("registry")))
    try:
        return fetch_archive(cache)
    except SourceError as exc:
        pytest.skip(f"package registry unreachable: {exc}")


@pytest.fixture(scope="session")
def mp2018_texts() -> dict[str, str]:
    """The first 2,000 CIF texts of mp2018 (archive order), and the first holding Bi, keyed by material id."""
    import re
    import tarfile

    texts: dict[str, str] = {}
    bismuth = re.compile(r"^\s+Bi\s+Bi\d+\s", flags=re.M)
    with tarfile.open(shared("mp2018", "structures.tar.gz")) as archive:
        for member in archive:
            if not member.isfile():
                continue
            text = archive.extractfile(member).read().decode()
            if len(texts) < 2000:
                texts[Path(member.name).stem] = text
            elif bismuth.search(text):
                texts[Path(member.name).stem] = text
                break
    return texts
