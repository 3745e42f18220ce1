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
    from crystal_transfer.data.sources import SourceError
    from crystal_transfer.data.sources.matminer_legacy import fetch_archive

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


@pytest.fixture(scope="session")
def matminer_graphs(matminer_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The embedded dataset's table, graphs and a small band-gap split (120 / 60 / 60), built once."""
    from crystal_transfer.data.split import make_split, write_split
    from crystal_transfer.data.stage import build_dataset
    from crystal_transfer.graphs.settings import GraphSettings
    from crystal_transfer.graphs.stage import build_graphs

    root = tmp_path_factory.mktemp("matminer")
    spec = {
        "sources": [{"type": "matminer_legacy", "archive": str(matminer_archive)}],
        "filters": {"max_z": 80, "max_rejected_fraction": 0.25},
    }
    build_dataset("matminer", spec, root / "data", workers=2, log=lambda _: None)
    table = root / "data" / "crystals.parquet"
    build_graphs(
        table, root / "graphs", GraphSettings(), shard_size=2048, dataset="matminer", workers=2, log=lambda _: None
    )
    split = make_split(table, "band_gap", {"label": "band_gap", "train": 120, "val": 60, "test": 60, "seed": 0})
    write_split(split, root / "band_gap.csv")
    return {"table": table, "graphs": root / "graphs", "split": root / "band_gap.csv", "root": root}


def subprocess_env() -> dict[str, str]:
    """The environment for commands the tests start: this interpreter's bin first on PATH (the workflow's rules
    call ``python -m crystal_transfer``), and this checkout's sources importable."""
    import sys

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO / 'src'}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO / "src")
    return env
