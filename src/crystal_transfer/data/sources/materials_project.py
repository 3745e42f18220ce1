"""Source ``materials_project``: structures and labels from the Materials Project, through ``mp_api``.

:func:`fetch_materials_project` asks ``MPRester(api_key, endpoint=...).materials.summary.search`` for whole
batches of reduced formulas or chemical systems at once (never one request per material), with the fields
in :data:`MP_FIELDS`, and caches every batch's documents as a JSON file; a rerun only asks for the batches
not cached yet. The key is read from the ``MP_API_KEY`` environment variable and checked before any work;
it is never written to a file or a log. :class:`MaterialsProjectSource` reads the cached documents.

Labels: formation energy and total energy per atom (eV/atom), band gap (eV), and the Voigt-Reuss-Hill
bulk and shear moduli (GPa) from the ``vrh`` entry of ``bulk_modulus`` / ``shear_modulus``. A document
whose labels are not finite, or whose moduli break Reuss <= VRH <= Voigt or are not positive, is rejected
with the reason.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from crystal_transfer.atomic import write_json
from crystal_transfer.data.labels import unit_of
from crystal_transfer.data.sources.base import RawCrystal, Source, SourceError, sha256_of
from crystal_transfer.data.sources.fetch import (
    FetchError,
    PoliteClient,
    RetryableError,
    RetryPolicy,
    query_digest,
    read_manifest,
    with_retries,
)
from crystal_transfer.data.structures import INCONSISTENT_MODULI, MISSING_STRUCTURE, NON_FINITE_LABEL, Rejection

KEY_ENV = "MP_API_KEY"
DEFAULT_ENDPOINT = "https://api.materialsproject.org/"
MP_FIELDS = [
    "material_id",
    "formula_pretty",
    "structure",
    "formation_energy_per_atom",
    "energy_per_atom",
    "band_gap",
    "bulk_modulus",
    "shear_modulus",
    "database_IDs",
]
# canonical label -> summary field (plain numbers)
SCALAR_LABELS = {
    "formation_energy_per_atom": "formation_energy_per_atom",
    "energy_per_atom": "energy_per_atom",
    "band_gap": "band_gap",
}
# canonical label -> summary field holding {"voigt", "reuss", "vrh"}
MODULUS_LABELS = {"K_VRH": "bulk_modulus", "G_VRH": "shear_modulus"}
HOW_TO_SET_KEY = (
    "get your key from https://materialsproject.org/api (the dashboard of your account) and set it in the "
    f"environment before running: export {KEY_ENV}=<your 32-character key>"
)


def api_key_from_env(environ: dict[str, str] | None = None) -> str:
    """The Materials Project API key from ``MP_API_KEY``; SourceError (saying how to set it) if missing or malformed.

    The message never contains the key itself.
    """
    key = (os.environ if environ is None else environ).get(KEY_ENV, "")
    if not key.strip():
        raise SourceError(f"{KEY_ENV} is not set: the Materials Project needs an API key; {HOW_TO_SET_KEY}")
    if not re.fullmatch(r"[A-Za-z0-9]{32}", key.strip()):
        raise SourceError(
            f"{KEY_ENV} is malformed ({len(key.strip())} characters; a key is 32 letters and digits); {HOW_TO_SET_KEY}"
        )
    return key.strip()


def mp_labels(document: dict[str, Any], tolerance: float) -> dict[str, float | None]:
    """Canonical labels of one summary document; raise :class:`Rejection` for non-finite or inconsistent values."""
    labels: dict[str, float | None] = {}
    for label, field in SCALAR_LABELS.items():
        value = document.get(field)
        if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
            raise Rejection(NON_FINITE_LABEL, f"label {label}={value!r} is not a finite number")
        labels[label] = None if value is None else float(value)
    for label, field in MODULUS_LABELS.items():
        moduli = document.get(field) or {}
        vrh = moduli.get("vrh")
        if vrh is None:
            labels[label] = None
            continue
        values = {kind: moduli.get(kind) for kind in ("reuss", "vrh", "voigt")}
        for kind, value in values.items():
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
                raise Rejection(NON_FINITE_LABEL, f"{field}.{kind}={value!r} is not a finite number")
        reuss, voigt = values["reuss"], values["voigt"]
        if vrh <= 0:
            raise Rejection(INCONSISTENT_MODULI, f"{field}.vrh={vrh:g} GPa is not positive")
        if reuss is not None and reuss > vrh + tolerance or voigt is not None and vrh > voigt + tolerance:
            raise Rejection(
                INCONSISTENT_MODULI,
                f"{field} breaks Reuss <= VRH <= Voigt: reuss={reuss}, vrh={vrh}, voigt={voigt} GPa "
                f"(tolerance {tolerance:g} GPa)",
            )
        labels[label] = float(vrh)
    return labels


def icsd_ids(document: dict[str, Any]) -> set[int]:
    """The ICSD collection codes in a summary document's ``database_IDs`` (e.g. ``icsd-12345`` -> 12345)."""
    found: set[int] = set()
    for value in (document.get("database_IDs") or {}).get("icsd", []) or []:
        match = re.search(r"(\d+)$", str(value))
        if match:
            found.add(int(match.group(1)))
    return found


def _batches(values: list[str], size: int) -> list[list[str]]:
    return [values[start : start + size] for start in range(0, len(values), size)]


def _is_transient(message: str) -> bool:
    return bool(re.search(r"status code (429|5\d\d)|timed out|Timeout|Connection|Max retries", message))


def mp_query(options: dict[str, Any], formulas: list[str] | None = None) -> dict[str, Any]:
    """What a ``materials_project`` config section (plus extra ``formulas``) asks for, as plain data."""
    endpoint = str(options.get("endpoint") or DEFAULT_ENDPOINT)
    return {
        "endpoint": endpoint if endpoint.endswith("/") else endpoint + "/",
        "fields": MP_FIELDS,
        "formula": sorted(set(options.get("formulas") or []) | set(formulas or [])),
        "chemsys": sorted(set(options.get("chemsys") or [])),
        "batch_size": int(options.get("batch_size", 100)),
        "chunk_size": int(options.get("chunk_size", 1000)),
    }


def mp_manifest_is_current(options: dict[str, Any], formulas: list[str] | None = None) -> bool:
    """True when the manifest in ``options`` exists, is complete and was fetched for this very query."""
    path = options.get("manifest")
    if not path or not Path(path).is_file():
        return False
    manifest = json.loads(Path(path).read_text())
    return bool(manifest.get("complete")) and manifest.get("query_sha256") == query_digest(mp_query(options, formulas))


def fetch_materials_project(
    options: dict[str, Any],
    manifest: str | Path,
    formulas: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fetch summary documents for the formulas and chemical systems in ``options`` (plus ``formulas``).

    ``options`` is a ``materials_project`` config section. Each batch of ``batch_size`` formulas (or chemical
    systems) is one ``summary.search`` call, cached as a JSON file; cached batches are not requested again.
    Writes and returns the manifest. The API key is checked first, before anything else happens.
    """
    key = api_key_from_env()
    query = mp_query(options, formulas)
    endpoint, batch_size, chunk_size = query["endpoint"], query["batch_size"], query["chunk_size"]
    policy = RetryPolicy.from_options(options.get("http"))
    wanted = {"formula": query["formula"], "chemsys": query["chemsys"]}
    cache_dir = Path(options.get("cache_dir") or "results/downloads/materials_project")
    jobs: list[tuple[str, list[str], Path]] = []
    for criterion, values in wanted.items():
        for batch in _batches(values, batch_size):
            batch_query = {"endpoint": endpoint, "fields": MP_FIELDS, criterion: batch, "chunk_size": chunk_size}
            jobs.append((criterion, batch, cache_dir / f"{criterion}-{query_digest(batch_query)[:20]}.json"))
    missing = [job for job in jobs if not job[2].is_file()]
    if missing:
        _probe_heartbeat(endpoint, policy, log)
        rester = _summary_rester(key, endpoint, policy, log)
        for number, (criterion, batch, path) in enumerate(missing, start=1):
            if number > 1:
                time.sleep(policy.min_interval)  # a polite request rate between batches

            def search(criterion: str = criterion, batch: list[str] = batch) -> list[dict[str, Any]]:
                return _search(rester, key, criterion, batch, chunk_size)

            what = f"Materials Project summary search, batch {number}/{len(missing)} ({len(batch)} {criterion} values)"
            documents = with_retries(search, policy, what, log)
            write_json(path, {"criterion": criterion, "values": batch, "documents": documents})
    batches = [
        {"file": str(path), "criterion": criterion, "values": len(batch), "sha256": sha256_of(path)}
        for criterion, batch, path in jobs
    ]
    result = {
        "endpoint": endpoint,
        "fields": MP_FIELDS,
        "query_sha256": query_digest(query),
        "batches": batches,
        "documents": sum(len(json.loads(Path(b["file"]).read_text())["documents"]) for b in batches),
        "batches_from_cache": len(jobs) - len(missing),
        "complete": True,
    }
    write_json(manifest, result)
    log(
        f"Materials Project: {result['documents']} documents in {len(batches)} batches "
        f"({result['batches_from_cache']} from the cache) -> {manifest}"
    )
    return result


def _probe_heartbeat(endpoint: str, policy: RetryPolicy, log: Callable[[str], None]) -> None:
    """GET <endpoint>heartbeat with our timeouts and retries first: MPRester's own heartbeat has no timeout."""

    def check(document: Any) -> None:
        if not isinstance(document, dict) or "db_version" not in document:
            raise RetryableError(f"unexpected heartbeat answer: {str(document)[:200]}")

    heartbeat = PoliteClient(policy, log=log).get_json(f"{endpoint}heartbeat", validate=check)
    log(f"Materials Project at {endpoint}: database version {heartbeat['db_version']}")


def _summary_rester(key: str, endpoint: str, policy: RetryPolicy, log: Callable[[str], None]) -> Any:
    """``MPRester(key, endpoint=...).materials.summary`` (construction calls /heartbeat), with retries."""
    import warnings

    from mp_api.client import MPRester

    def connect() -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rester = MPRester(key, endpoint=endpoint, use_document_model=False, mute_progress_bars=True)
        except Exception as exc:  # requests' ConnectionError, JSON errors on a bad heartbeat, MPRestError
            message = f"{type(exc).__name__}: {exc}".replace(key, "<MP_API_KEY>")
            if _is_transient(message) or "heartbeat" in message.lower():
                raise RetryableError(f"connecting to {endpoint}: {message}") from None
            raise FetchError(f"connecting to the Materials Project at {endpoint}: {message}") from None
        summary = rester.materials.summary
        # mp-api hands out sub-resters wrapped in a LazyImport; the rester itself holds the request timeout.
        (getattr(summary, "_obj", None) or summary).timeout = policy.timeout
        return summary

    return with_retries(connect, policy, f"Materials Project heartbeat at {endpoint}", log)


def _search(summary: Any, key: str, criterion: str, batch: list[str], chunk_size: int) -> list[dict[str, Any]]:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            documents = summary.search(**{criterion: batch}, fields=MP_FIELDS, chunk_size=chunk_size, deprecated=False)
    except Exception as exc:  # mp_api wraps HTTP failures in MPRestError; requests may raise its own
        message = f"{type(exc).__name__}: {' '.join(str(exc).split())}".replace(key, "<MP_API_KEY>")
        if _is_transient(message):
            raise RetryableError(message[:500]) from None
        raise FetchError(f"Materials Project summary search failed: {message[:500]}") from None
    return [dict(document) for document in documents]


def mp_documents(
    options: dict[str, Any], formulas: list[str] | None = None
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield (batch file name, its sha256, document) for every cached document of a finished fetch.

    The manifest must have been fetched for the query of ``options`` plus ``formulas``; SourceError if not.
    """
    manifest = read_manifest(options, "mp")
    if manifest.get("query_sha256") != query_digest(mp_query(options, formulas)):
        raise SourceError(
            f"Materials Project manifest {options['manifest']} was fetched for another query (endpoint, formulas "
            "or chemical systems, batching); rerun the fetch"
        )
    for batch in manifest["batches"]:
        path = Path(batch["file"])
        if not path.is_file() or sha256_of(path) != batch["sha256"]:
            raise SourceError(f"cached Materials Project batch {path} is missing or changed; rerun the fetch")
        for document in json.loads(path.read_text())["documents"]:
            yield path.name, batch["sha256"], document


class MaterialsProjectSource(Source):
    """Materials Project structures and labels for configured formulas or chemical systems."""

    type_name = "materials_project"

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self.mp: dict[str, Any] = dict(options.get("materials_project") or {})
        self.tolerance = float(self.mp.get("moduli_tolerance", 0.01))

    def label_units(self) -> dict[str, str]:
        return {label: unit_of(label) for label in [*SCALAR_LABELS, *MODULUS_LABELS]}

    def crystals(self) -> Iterator[RawCrystal]:
        seen: set[str] = set()
        for batch, checksum, document in mp_documents(self.mp):
            crystal_id = str(document.get("material_id"))
            if crystal_id in seen:  # found by a formula batch and a chemical-system batch: the same document
                continue
            seen.add(crystal_id)
            where = f"mp:{batch}#{crystal_id}"
            rejection = None
            labels: dict[str, Any] = {}
            try:
                labels = mp_labels(document, self.tolerance)
            except Rejection as exc:
                rejection = exc
            structure = document.get("structure")
            if rejection is None and not structure:
                rejection = Rejection(MISSING_STRUCTURE, "summary document has no structure")
            yield RawCrystal(
                id=crystal_id,
                fmt="pymatgen_json",
                text=json.dumps(structure) if structure else "",
                labels=labels,
                source_file=where,
                source_sha256=checksum,
                rejection=rejection,
            )
