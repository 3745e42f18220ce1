"""The fetch stages: the matminer source archive from the package registry, and remote sources' pages.

``fetch-matminer`` runs :func:`fetch_matminer`; ``fetch-oqmd`` and ``fetch-mp`` run :func:`run`. The data
stage, when given a config instead of a spec, calls :func:`fetch_missing` to fetch what is not on disk yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crystal_transfer.config import ConfigError
from crystal_transfer.data.spec import REMOTE_PARTS


def fetch_matminer(out: str | Path, version: str, sha256: str, log=print) -> Path:
    """Download the matminer source archive (never installed) to ``out`` and check its sha256."""
    from crystal_transfer.data.sources.matminer_legacy import fetch_archive

    out = Path(out)
    path = fetch_archive(out.parent, version=version, sha256=sha256)
    if path != out:
        path.replace(out)
    log(f"matminer {version} source archive ready: {out} (sha256 verified)")
    return out


def fetch_remote(source: dict[str, Any], parts: tuple[str, ...] = ("oqmd", "mp"), log=print) -> None:
    """Fetch what a remote source needs (OQMD pages, then MP documents), skipping parts already fetched.

    The Materials Project key is checked before anything is fetched.
    """
    from crystal_transfer.data.sources.materials_project import (
        api_key_from_env,
        fetch_materials_project,
        mp_manifest_is_current,
    )
    from crystal_transfer.data.sources.oqmd import fetch_oqmd, oqmd_manifest_is_current
    from crystal_transfer.data.sources.oqmd_mp import oqmd_formulas

    kinds = [suffix for _, suffix, _ in REMOTE_PARTS.get(source["type"], []) if suffix in parts]
    if "mp" in kinds and not Path(source["materials_project"]["manifest"]).is_file():
        api_key_from_env()  # fails before any request when the key is missing or malformed
    if "oqmd" in kinds and not oqmd_manifest_is_current(source["oqmd"]):
        fetch_oqmd(source["oqmd"], source["oqmd"]["manifest"], log=log)
    if "mp" in kinds:
        formulas = oqmd_formulas(source["oqmd"]) if source["type"] == "oqmd_mp" else []
        if not mp_manifest_is_current(source["materials_project"], formulas):
            manifest = source["materials_project"]["manifest"]
            fetch_materials_project(source["materials_project"], manifest, formulas=formulas, log=log)


def run(source: dict[str, Any], part: str, out: str | Path, log=print) -> None:
    """The ``fetch-oqmd`` / ``fetch-mp`` stage: fetch one part of a remote source and write its manifest."""
    if source["type"] not in REMOTE_PARTS:
        raise ConfigError(f"source type '{source['type']}' is not a remote source ({', '.join(REMOTE_PARTS)})")
    sections = {suffix: section for section, suffix, _ in REMOTE_PARTS[source["type"]]}
    if part not in sections:
        raise ConfigError(f"source '{source['name']}' of type {source['type']} has no '{part}' part")
    source[sections[part]]["manifest"] = str(out)
    if Path(out).is_file():
        Path(out).unlink()  # asked explicitly: refresh the manifest (cached pages are still reused)
    fetch_remote(source, parts=(part,), log=log)


def fetch_missing(spec: dict[str, Any], log=print) -> None:
    """Fetch every download of a dataset spec that is not on disk yet (the key is checked first)."""
    from crystal_transfer.data.sources.matminer_legacy import fetch_archive

    remote = [source for source in spec["sources"] if source["type"] in REMOTE_PARTS]
    manifests = [Path(source["materials_project"]["manifest"]) for source in remote if "materials_project" in source]
    if not all(manifest.is_file() for manifest in manifests):
        from crystal_transfer.data.sources.materials_project import api_key_from_env

        api_key_from_env()  # before any work
    for source in spec["sources"]:
        if source["type"] == "matminer_legacy" and not Path(source["archive"]).is_file():
            fetch_archive(Path(source["archive"]).parent, source["version"], source["sha256"])
    for source in remote:
        fetch_remote(source, log=log)
