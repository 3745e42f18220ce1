"""What the data stage of one dataset reads: its config section with the paths of its downloads filled in.

The command line and the Snakemake rules both call :func:`dataset_spec`, so a dataset's archive, remote-fetch
manifests and caches are at the same paths whoever runs the stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crystal_transfer.config import ConfigError

# remote source type -> the services it reads: (config section, manifest suffix, default cache folder)
REMOTE_PARTS: dict[str, list[tuple[str, str, str]]] = {
    "oqmd": [("oqmd", "oqmd", "oqmd")],
    "materials_project": [("materials_project", "mp", "materials_project")],
    "oqmd_mp": [("oqmd", "oqmd", "oqmd"), ("materials_project", "mp", "materials_project")],
}


def source_name(source: dict[str, Any]) -> str:
    """A source's name in paths and records: its ``name``, else its type."""
    return source.get("name", source["type"])


def set_download_paths(source: dict[str, Any], downloads: str | Path, dataset: str) -> None:
    """Fill in (in place) where a source's downloads live under ``downloads``.

    A matminer archive: ``<downloads>/matminer-<version>.tar.gz``; a remote source's fetch manifests:
    ``<downloads>/<dataset>/<source name>.{oqmd,mp}.json``; its caches: ``<downloads>/oqmd`` and
    ``<downloads>/materials_project`` unless the config names a ``cache_dir``.
    """
    downloads = str(downloads)
    if source["type"] == "matminer_legacy":
        source["archive"] = f"{downloads}/matminer-{source['version']}.tar.gz"
    for section, suffix, cache in REMOTE_PARTS.get(source["type"], []):
        part = source.setdefault(section, {})
        part["cache_dir"] = part.get("cache_dir") or f"{downloads}/{cache}"
        part["manifest"] = f"{downloads}/{dataset}/{source_name(source)}.{suffix}.json"


def dataset_spec(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The part of a validated config that the data stage of dataset ``name`` depends on (a copy)."""
    if name not in config["datasets"]:
        raise ConfigError(f"dataset '{name}' is not in the config (datasets: {', '.join(config['datasets'])})")
    spec = json.loads(json.dumps(config["datasets"][name]))
    downloads = Path(config["results_dir"]) / "downloads"
    for source in spec["sources"]:
        set_download_paths(source, downloads, name)
    spec["filters"] = config["filters"]
    return spec


def remote_source(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """The remote source called ``name`` of a dataset spec."""
    for source in spec["sources"]:
        if source_name(source) == name and source["type"] in REMOTE_PARTS:
            return source
    raise ConfigError(f"the dataset has no remote source named '{name}'")


def input_files(spec: dict[str, Any]) -> list[str]:
    """Files the data stage reads: downloaded archives, local structures and labels, fetch manifests."""
    files = []
    for source in spec["sources"]:
        if source["type"] == "matminer_legacy":
            files.append(source["archive"])
        elif source["type"] == "local":
            files += [source["path"], source["labels"]]
        for section, _, _ in REMOTE_PARTS.get(source["type"], []):
            files.append(source[section]["manifest"])
    return files
