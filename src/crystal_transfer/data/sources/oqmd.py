"""Source ``oqmd``: structures and labels from the OQMD REST API (``/oqmdapi/formationenergy``).

Fetching and reading are separate steps. :func:`fetch_oqmd` pages through the query with ``limit`` and
``offset`` (``fields=`` and ``filter=`` from the config), stores every page as a JSON file in a cache folder
named by the query's digest, and finally writes a manifest listing the pages. A rerun reads completed pages
from the cache and asks the server only for the rest. :class:`OqmdSource` reads the manifest and the cached
pages; it never touches the network.

Both response shapes the server has used are understood: ``{"data": [...], "links": {"next": ...},
"meta": {"more_data_available": ...}}`` and ``{"results": [...], "next": ..., "count": ...}``. A structure is
``unit_cell`` (three lattice rows, Å) plus ``sites`` (strings ``"El @ fx fy fz"``).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crystal_transfer.atomic import write_json
from crystal_transfer.data.labels import unit_of
from crystal_transfer.data.sources.base import RawCrystal, Source, SourceError, sha256_of
from crystal_transfer.data.sources.fetch import PoliteClient, RetryableError, RetryPolicy, query_digest, read_manifest
from crystal_transfer.data.structures import MISSING_STRUCTURE, Rejection, oqmd_sites_text

DEFAULT_BASE_URL = "http://oqmd.org"
DEFAULT_PATH = "/oqmdapi/formationenergy"
DEFAULT_FIELDS = "entry_id,name,icsd_id,unit_cell,sites,delta_e,band_gap,stability,ntypes,natoms"
DEFAULT_COLUMNS = {"delta_e": "delta_e", "band_gap": "band_gap"}


@dataclass(frozen=True)
class OqmdQuery:
    """What to ask the OQMD for: where, which fields, which filter, the page size and an optional cap."""

    base_url: str = DEFAULT_BASE_URL
    path: str = DEFAULT_PATH
    fields: str = DEFAULT_FIELDS
    filter: str = ""
    limit: int = 500
    max_entries: int = 0  # 0: everything the filter selects

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> OqmdQuery:
        """The query described by an ``oqmd`` config section."""
        return cls(
            base_url=str(options.get("base_url", DEFAULT_BASE_URL)).rstrip("/"),
            path="/" + str(options.get("path", DEFAULT_PATH)).strip("/"),
            fields=str(options.get("fields", DEFAULT_FIELDS)),
            filter=str(options.get("filter", "")),
            limit=int(options.get("limit", 500)),
            max_entries=int(options.get("max_entries", 0)),
        )

    def as_dict(self) -> dict[str, Any]:
        """The query as plain data (recorded in the manifest; its digest names the cache folder)."""
        return {
            "service": "oqmd",
            "base_url": self.base_url,
            "path": self.path,
            "fields": self.fields,
            "filter": self.filter,
            "limit": self.limit,
            "max_entries": self.max_entries,
        }

    def page_url(self, offset: int, limit: int) -> str:
        """URL of the page starting at ``offset``."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if self.fields:
            params["fields"] = self.fields
        if self.filter:
            params["filter"] = self.filter
        return f"{self.base_url}{self.path}?{urllib.parse.urlencode(params)}"


def page_records(document: Any) -> tuple[list[dict[str, Any]], bool]:
    """The entries of one page and whether more pages follow, for either response shape.

    Raises :class:`RetryableError` for a document of neither shape (an error page served as JSON).
    """
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        records = document["data"]
        meta = document.get("meta") or {}
        links = document.get("links") or {}
        if "more_data_available" in meta:
            more = bool(meta["more_data_available"])
        else:
            more = bool(links.get("next"))
        return records, more
    if isinstance(document, dict) and isinstance(document.get("results"), list):
        return document["results"], bool(document.get("next"))
    keys = ", ".join(sorted(document)) if isinstance(document, dict) else type(document).__name__
    raise RetryableError(f"response holds neither 'data' nor 'results' (got {keys})")


def available_count(document: Any) -> int | None:
    """How many entries the server says the query selects (``meta.data_available`` or ``count``), if it says."""
    if not isinstance(document, dict):
        return None
    value = (document.get("meta") or {}).get("data_available", document.get("count"))
    return int(value) if isinstance(value, int | float) else None


def _cache_folder(options: dict[str, Any], query: OqmdQuery) -> Path:
    cache_dir = options.get("cache_dir") or "results/downloads/oqmd"
    return Path(cache_dir) / query_digest(query.as_dict())[:16]


def _page_file(offset: int) -> str:
    return f"offset-{offset:09d}.json"


def fetch_oqmd(options: dict[str, Any], manifest: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fetch every page of the query in ``options`` (an ``oqmd`` config section) and write the manifest.

    Pages already in the cache are not requested again. Returns the manifest.
    """
    query = OqmdQuery.from_options(options)
    policy = RetryPolicy.from_options(options.get("http"))
    client = PoliteClient(policy, log=log)
    folder = _cache_folder(options, query)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "query.json", query.as_dict())
    pages: list[dict[str, Any]] = []
    offset = 0
    cached = 0
    server_total: int | None = None
    while query.max_entries <= 0 or offset < query.max_entries:
        limit = query.limit if query.max_entries <= 0 else min(query.limit, query.max_entries - offset)
        path = folder / _page_file(offset)
        if path.is_file():
            document = json.loads(path.read_text())
            cached += 1
        else:
            document = client.get_json(query.page_url(offset, limit), validate=page_records)
            write_json(path, document)
        records, more = page_records(document)
        if offset == 0:
            server_total = available_count(document)
            if server_total is not None:
                log(f"OQMD: the server reports {server_total} entries for this query")
        pages.append({"file": path.name, "offset": offset, "entries": len(records), "sha256": sha256_of(path)})
        if not records:
            break
        offset += len(records)
        if not more:
            break
    result = {
        "query": query.as_dict(),
        "query_sha256": query_digest(query.as_dict()),
        "cache": str(folder),
        "pages": pages,
        "entries": sum(page["entries"] for page in pages),
        "server_total": server_total,
        "pages_from_cache": cached,
        "requests": client.requests,
        "complete": True,
    }
    write_json(manifest, result)
    log(
        f"OQMD: {result['entries']} entries in {len(pages)} pages ({cached} from the cache, "
        f"{client.requests} requests) -> {manifest}"
    )
    return result


def oqmd_manifest_is_current(options: dict[str, Any]) -> bool:
    """True when the manifest in ``options`` exists, is complete and was fetched for this very query."""
    path = options.get("manifest")
    if not path or not Path(path).is_file():
        return False
    manifest = json.loads(Path(path).read_text())
    digest = query_digest(OqmdQuery.from_options(options).as_dict())
    return bool(manifest.get("complete")) and manifest.get("query_sha256") == digest


def oqmd_pages(options: dict[str, Any]) -> Iterator[tuple[str, str, int, dict[str, Any]]]:
    """Yield (page file, its sha256, index in page, entry) for every cached entry of a fetched query."""
    manifest = read_manifest(options, "oqmd")
    query = OqmdQuery.from_options(options)
    if manifest["query_sha256"] != query_digest(query.as_dict()):
        raise SourceError(
            f"OQMD manifest {options['manifest']} was fetched for another query ({manifest['query']}); "
            f"the config now asks for {query.as_dict()}: rerun the fetch"
        )
    folder = Path(manifest["cache"])
    for page in manifest["pages"]:
        path = folder / page["file"]
        if not path.is_file() or sha256_of(path) != page["sha256"]:
            raise SourceError(f"cached OQMD page {path} is missing or changed since the fetch; rerun the fetch")
        records, _ = page_records(json.loads(path.read_text()))
        for index, entry in enumerate(records):
            yield path.name, page["sha256"], index, entry


def oqmd_id(entry: dict[str, Any]) -> str:
    """The crystal id of an OQMD entry: ``oqmd-<entry_id>`` (or its formation-energy id when that is all)."""
    for key in ("entry_id", "id", "formationenergy_id"):
        if entry.get(key) is not None:
            return f"oqmd-{entry[key]}"
    return "oqmd-unknown"


def oqmd_raw(entry: dict[str, Any], where: str, checksum: str, columns: dict[str, str]) -> RawCrystal:
    """One OQMD entry as a RawCrystal (rejected as missing_structure without unit_cell and sites)."""
    labels = {label: entry.get(field) for label, field in columns.items()}
    crystal_id = oqmd_id(entry)
    if not entry.get("unit_cell") or not entry.get("sites"):
        return RawCrystal(
            id=crystal_id,
            fmt="",
            text="",
            labels=labels,
            source_file=where,
            source_sha256=checksum,
            rejection=Rejection(MISSING_STRUCTURE, "OQMD entry has no unit_cell or sites (are they in 'fields'?)"),
        )
    return RawCrystal(
        id=crystal_id,
        fmt="oqmd_sites",
        text=oqmd_sites_text(entry["unit_cell"], entry["sites"]),
        labels=labels,
        source_file=where,
        source_sha256=checksum,
    )


class OqmdSource(Source):
    """OQMD structures with OQMD labels, read from the pages a fetch cached."""

    type_name = "oqmd"

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self.oqmd: dict[str, Any] = dict(options.get("oqmd") or {})
        self.columns: dict[str, str] = dict(self.oqmd.get("columns") or DEFAULT_COLUMNS)
        for label in self.columns:
            unit_of(label)

    def label_units(self) -> dict[str, str]:
        return {label: unit_of(label) for label in self.columns}

    def crystals(self) -> Iterator[RawCrystal]:
        for page, checksum, index, entry in oqmd_pages(self.oqmd):
            yield oqmd_raw(entry, f"oqmd:{page}#{index}", checksum, self.columns)
