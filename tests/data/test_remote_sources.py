"""Remote sources against real HTTP servers on 127.0.0.1 serving real records (OQMD 1505, MP 2018).

The OQMD stand-in serves the oqmd1505 POSCARs as ``unit_cell`` + ``sites`` with their delta_e and band gap;
the Materials Project stand-in serves mp2018 CIFs and labels through ``/heartbeat`` and
``/materials/summary/``, the requests mp-api's ``MPRester`` makes. Faults are injected by the servers.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import REPO, shared
from remote_servers import HANG_SECONDS, MpServer, OqmdServer

from crystal_transfer.cli.main import main as cli_main
from crystal_transfer.config import validate_config
from crystal_transfer.data.sources import Source, SourceError
from crystal_transfer.data.sources.fetch import FetchError, RetryPolicy, parse_retry_after, query_digest
from crystal_transfer.data.sources.materials_project import (
    api_key_from_env,
    fetch_materials_project,
    mp_labels,
    mp_query,
)
from crystal_transfer.data.sources.oqmd import OqmdQuery, fetch_oqmd
from crystal_transfer.data.sources.oqmd_mp import OqmdMpSource, oqmd_formulas
from crystal_transfer.data.stage import build_dataset
from crystal_transfer.data.structures import AMBIGUOUS_MATCH, INCONSISTENT_MODULI, NON_FINITE_LABEL, Rejection

OQMD_COUNT = 160  # entries served by the OQMD stand-in (the first of oqmd1505)
PAGE = 40
API_KEY = "LocalStubKey0123456789abcdefGHIJ"  # 32 letters and digits: well-formed, valid only for the stub
FAST = {"timeout": 0.4, "retries": 4, "backoff": 0.01, "backoff_max": 0.05, "jitter": 0.5, "min_interval": 0.0}
FILTERS = {"max_z": 80, "max_rejected_fraction": 1.0}
quiet = lambda _: None  # noqa: E731


# --- real records ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oqmd_records() -> list[dict[str, Any]]:
    """The first OQMD_COUNT oqmd1505 crystals as OQMD REST entries (unit_cell rows, 'El @ fx fy fz' sites)."""
    import warnings

    from pymatgen.io.vasp import Poscar

    with open(shared("oqmd1505", "labels.csv"), newline="") as handle:
        labels = {row["id"]: row for row in csv.DictReader(handle)}
    records = []
    with tarfile.open(shared("oqmd1505", "structures.tar.gz")) as archive:
        for member in archive:
            if not member.isfile():
                continue
            crystal_id = Path(member.name).stem
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Poscar.from_str(archive.extractfile(member).read().decode()).structure
            row = labels[crystal_id]
            records.append(
                {
                    "entry_id": int(crystal_id),
                    "name": structure.composition.reduced_formula,
                    "icsd_id": None,
                    "unit_cell": [[round(x, 6) for x in row_] for row_ in structure.lattice.matrix.tolist()],
                    "sites": [
                        f"{site.specie} @ {x:.6f} {y:.6f} {z:.6f}"
                        for site in structure
                        for x, y, z in [site.frac_coords]
                    ],
                    "delta_e": float(row["delta_e"]),
                    "band_gap": float(row["band_gap"]) if row["band_gap"] else None,
                    "ntypes": len(structure.composition.elements),
                    "natoms": len(structure),
                    "stability": None,
                }
            )
            if len(records) == OQMD_COUNT:
                break
    return records


@pytest.fixture(scope="module")
def mp_rows() -> dict[str, dict[str, str]]:
    with open(shared("mp2018", "labels.csv"), newline="") as handle:
        return {row["material_id"]: row for row in csv.DictReader(handle)}


def _number(text: str) -> float | None:
    return float(text) if text else None


@pytest.fixture(scope="module")
def mp_documents(oqmd_records: list[dict[str, Any]], mp_rows: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """mp2018 crystals as MP summary documents: every one whose reduced formula an OQMD entry has, and 12 more."""
    import warnings

    from pymatgen.core import Composition
    from pymatgen.io.cif import CifParser

    wanted = {record["name"] for record in oqmd_records}
    formula_sum = re.compile(r"_chemical_formula_sum\s+'?([^'\n]+)")
    texts: dict[str, tuple[str, str]] = {}
    others = 0
    with tarfile.open(shared("mp2018", "structures.tar.gz")) as archive:
        for member in archive:
            if not member.isfile():
                continue
            text = archive.extractfile(member).read().decode()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reduced = Composition(formula_sum.search(text).group(1)).reduced_formula
            if reduced in wanted or others < 12:
                others += reduced not in wanted
                texts[Path(member.name).stem] = (reduced, text)
    documents = []
    for material_id, (reduced, text) in texts.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = CifParser.from_str(text).parse_structures(primitive=False)[0]
        row = mp_rows[material_id]
        k, g = _number(row["K_VRH"]), _number(row["G_VRH"])
        documents.append(
            {
                "material_id": material_id,
                "formula_pretty": reduced,
                "chemsys": "-".join(sorted(el.symbol for el in structure.composition.elements)),
                "structure": structure.as_dict(),
                "formation_energy_per_atom": _number(row["formation_energy_per_atom"]),
                "energy_per_atom": _number(row["energy_per_atom"]),
                "band_gap": _number(row["band_gap"]),
                "bulk_modulus": None if k is None else {"vrh": k},
                "shear_modulus": None if g is None else {"vrh": g},
                "database_IDs": {},
            }
        )
    return documents


@pytest.fixture()
def oqmd_server(oqmd_records: list[dict[str, Any]]) -> Iterator[OqmdServer]:
    server = OqmdServer(oqmd_records)
    yield server
    server.close()


@pytest.fixture()
def mp_server(mp_documents: list[dict[str, Any]]) -> Iterator[MpServer]:
    server = MpServer(mp_documents, API_KEY)
    yield server
    server.close()


def oqmd_options(server: OqmdServer, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    options = {"base_url": server.url, "limit": PAGE, "cache_dir": str(tmp_path / "cache" / "oqmd"), "http": FAST}
    options["manifest"] = str(tmp_path / "downloads" / "oqmd.json")
    return {**options, **extra}


def mp_options(server: MpServer, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    options = {
        "endpoint": server.url,
        "cache_dir": str(tmp_path / "cache" / "mp"),
        "manifest": str(tmp_path / "downloads" / "mp.json"),
        "http": FAST,
    }
    return {**options, **extra}


def validated(source: dict[str, Any]) -> dict[str, Any]:
    """A source entry with the schema's defaults filled in, as the data stage sees it."""
    return validate_config({"datasets": {"d": {"sources": [source]}}, "splits": {}})["datasets"]["d"]["sources"][0]


def table(out: Path) -> Any:
    return pq.read_table(out / "crystals.parquet").to_pandas().set_index("id")


def all_text_under(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


# --- OQMD ------------------------------------------------------------------------------------------------


def test_oqmd_pages_are_fetched_cached_and_become_the_canonical_table(
    oqmd_server: OqmdServer, oqmd_records: list[dict[str, Any]], tmp_path: Path
) -> None:
    source = validated({"type": "oqmd", "name": "oqmd", "oqmd": oqmd_options(oqmd_server, tmp_path)})
    manifest = fetch_oqmd(source["oqmd"], source["oqmd"]["manifest"], log=quiet)
    assert manifest["entries"] == manifest["server_total"] == OQMD_COUNT
    assert oqmd_server.offsets() == [0, 40, 80, 120]
    first = oqmd_server.requests_to(OqmdServer.PATH)[0].query
    assert first["limit"] == str(PAGE) and "unit_cell" in first["fields"] and "sites" in first["fields"]

    summary = build_dataset("oqmd", {"sources": [source], "filters": FILTERS}, tmp_path / "out", log=quiet)
    assert summary["read"] == OQMD_COUNT and summary["kept"] + summary["rejected"] == OQMD_COUNT
    rows = table(tmp_path / "out")
    by_id = {f"oqmd-{r['entry_id']}": r for r in oqmd_records}
    assert rows.loc["oqmd-2", "formula"] == "SrSe"  # oqmd1505 id 2: SrSe, delta_e -1.999, gap 2.414
    assert rows.loc["oqmd-2", "delta_e"] == pytest.approx(-1.99908630827)
    assert rows.loc["oqmd-2", "band_gap"] == pytest.approx(2.414)
    for crystal_id in rows.index[:20]:
        assert rows.loc[crystal_id, "formula"] == by_id[crystal_id]["name"]
        assert rows.loc[crystal_id, "num_sites"] == by_id[crystal_id]["natoms"]
    assert rows.loc["oqmd-2", "source_file"].startswith("oqmd:offset-000000000.json#")

    # A second fetch is served from the cache: no request at all.
    before = len(oqmd_server.log)
    again = fetch_oqmd(source["oqmd"], source["oqmd"]["manifest"], log=quiet)
    assert len(oqmd_server.log) == before and again["pages_from_cache"] == 4

    # filter= goes to the server verbatim; a new query gets its own cache folder.
    narrow = validated({"type": "oqmd", "oqmd": oqmd_options(oqmd_server, tmp_path, filter="ntypes<=2 AND natoms<8")})
    narrow["oqmd"]["manifest"] = str(tmp_path / "downloads" / "narrow.json")
    result = fetch_oqmd(narrow["oqmd"], narrow["oqmd"]["manifest"], log=quiet)
    expected = sum(r["ntypes"] <= 2 and r["natoms"] < 8 for r in oqmd_records)
    assert 0 < result["entries"] == expected < OQMD_COUNT
    assert oqmd_server.log[-1].query["filter"] == "ntypes<=2 AND natoms<8"


def test_oqmd_results_next_count_shape_gives_the_same_entries(
    oqmd_records: list[dict[str, Any]], tmp_path: Path
) -> None:
    server = OqmdServer(oqmd_records, shape="results")
    try:
        options = validated({"type": "oqmd", "oqmd": oqmd_options(server, tmp_path, max_entries=100)})["oqmd"]
        manifest = fetch_oqmd(options, options["manifest"], log=quiet)
    finally:
        server.close()
    assert manifest["entries"] == 100 and manifest["server_total"] == OQMD_COUNT  # 'count' of the results shape
    assert server.offsets() == [0, 40, 80]
    assert [entry.query["limit"] for entry in server.requests_to(OqmdServer.PATH)] == ["40", "40", "20"]
    page = json.loads((Path(manifest["cache"]) / "offset-000000040.json").read_text())
    assert [r["entry_id"] for r in page["results"]] == [r["entry_id"] for r in oqmd_records[40:80]]


def test_oqmd_fetch_survives_502_429_hang_and_truncated_json(oqmd_server: OqmdServer, tmp_path: Path) -> None:
    oqmd_server.faults.scripted[0] = ["502", "502", "502"]
    oqmd_server.faults.scripted[40] = ["429:1"]
    oqmd_server.faults.scripted[80] = ["hang", "truncated"]
    oqmd_server.faults.scripted[120] = ["cut"]
    options = oqmd_options(oqmd_server, tmp_path)
    logged: list[str] = []
    started = time.monotonic()
    manifest = fetch_oqmd(options, options["manifest"], log=logged.append)
    assert manifest["entries"] == OQMD_COUNT
    assert oqmd_server.offsets() == [0, 0, 0, 0, 40, 40, 80, 80, 80, 120, 120]
    faults = [entry.fault for entry in oqmd_server.requests_to(OqmdServer.PATH)]
    assert faults == ["502", "502", "502", None, "429:1", None, "hang", "truncated", None, "cut", None]
    at_40 = [entry.started for entry in oqmd_server.requests_to(OqmdServer.PATH) if entry.query["offset"] == "40"]
    assert at_40[1] - at_40[0] >= 0.95  # Retry-After: 1 honoured although the backoff is 0.01 s
    assert time.monotonic() - started < 1.0 + HANG_SECONDS + 3.0
    text = "\n".join(logged)
    assert "HTTP 502" in text and "HTTP 429" in text and "timed out" in text
    assert "truncated JSON" in text and "IncompleteRead" in text
    for page in Path(manifest["cache"]).glob("offset-*.json"):
        json.loads(page.read_text())  # only whole pages are cached


def test_interrupted_oqmd_fetch_resumes_without_refetching_completed_pages(
    oqmd_server: OqmdServer, tmp_path: Path
) -> None:
    options = oqmd_options(oqmd_server, tmp_path, http={**FAST, "retries": 2})
    oqmd_server.faults.broken.add(80)
    with pytest.raises(FetchError, match=r"giving up after 3 attempts.*HTTP 502"):
        fetch_oqmd(options, options["manifest"], log=quiet)
    assert oqmd_server.offsets() == [0, 40, 80, 80, 80]
    assert not Path(options["manifest"]).exists()
    with pytest.raises(SourceError, match="not fetched yet"):
        list(validated_source("oqmd", options).crystals())

    oqmd_server.faults.broken.clear()  # the outage is over; rerun
    first_run = len(oqmd_server.log)
    manifest = fetch_oqmd(options, options["manifest"], log=quiet)
    assert [int(e.query["offset"]) for e in oqmd_server.log[first_run:]] == [80, 120]
    assert manifest["pages_from_cache"] == 2 and manifest["entries"] == OQMD_COUNT
    assert len(list(validated_source("oqmd", options).crystals())) == OQMD_COUNT


def validated_source(kind: str, options: dict[str, Any]) -> Any:
    return Source.from_config(validated({"type": kind, kind: options}))


def test_oqmd_manifest_of_another_query_is_refused(oqmd_server: OqmdServer, tmp_path: Path) -> None:
    options = oqmd_options(oqmd_server, tmp_path, max_entries=40)
    fetch_oqmd(options, options["manifest"], log=quiet)
    with pytest.raises(SourceError, match="fetched for another query"):
        list(validated_source("oqmd", {**options, "filter": "ntypes<=2"}).crystals())


def test_backoff_grows_exponentially_with_bounded_jitter_and_honours_retry_after() -> None:
    import random

    policy = RetryPolicy(backoff=0.5, backoff_max=3.0, jitter=0.5, max_retry_after=10.0)
    rng = random.Random(0)
    for attempt, base in enumerate([0.5, 1.0, 2.0, 3.0, 3.0]):
        delays = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert base <= min(delays) and max(delays) <= base * 1.5
        assert max(delays) - min(delays) > 0.1 * base  # jitter spreads the retries
    assert policy.delay(0, retry_after=7.0, rng=rng) >= 7.0
    assert policy.delay(0, retry_after=500.0, rng=rng) == 10.0  # capped
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# --- Materials Project -----------------------------------------------------------------------------------


def test_missing_or_malformed_key_stops_before_any_request(
    mp_server: MpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    options = mp_options(mp_server, tmp_path, formulas=["NaCl"])
    monkeypatch.delenv("MP_API_KEY", raising=False)
    with pytest.raises(SourceError, match=r"MP_API_KEY is not set.*export MP_API_KEY="):
        fetch_materials_project(options, options["manifest"], log=quiet)
    malformed = "not-a-key-" + API_KEY[:10]
    monkeypatch.setenv("MP_API_KEY", malformed)
    with pytest.raises(SourceError, match=r"MP_API_KEY is malformed") as caught:
        fetch_materials_project(options, options["manifest"], log=quiet)
    assert malformed not in str(caught.value)
    spec = json.dumps({"type": "materials_project", "materials_project": options})
    assert cli_main(["fetch-mp", "--spec", spec, "--out", options["manifest"]]) == 2
    err = capsys.readouterr().err
    assert "MP_API_KEY is malformed" in err and "export MP_API_KEY" in err and malformed not in err
    assert "Traceback" not in err
    assert mp_server.log == []  # not even the heartbeat
    assert not (tmp_path / "cache").exists()

    # The data stage run alone on an OQMD+MP config stops before its first OQMD request, too.
    oqmd_part = {"base_url": "http://127.0.0.1:9", "cache_dir": str(tmp_path / "cache" / "oqmd")}
    config = {
        "results_dir": str(tmp_path / "results"),
        "datasets": {"remote": {"sources": [{"type": "oqmd_mp", "oqmd": oqmd_part, "materials_project": options}]}},
        "splits": {},
    }
    (tmp_path / "remote.yaml").write_text(json.dumps(config))
    monkeypatch.delenv("MP_API_KEY")
    args = ["data", "--config", str(tmp_path / "remote.yaml"), "--dataset", "remote", "--out", str(tmp_path / "o")]
    assert cli_main(args) == 2
    assert "MP_API_KEY is not set" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()

    # A well-formed key the service refuses: the search fails with the status, not with the key.
    wrong = "W" * 32
    monkeypatch.setenv("MP_API_KEY", wrong)
    with pytest.raises(FetchError, match="403") as refused:
        fetch_materials_project(options, options["manifest"], log=quiet)
    assert wrong not in str(refused.value)
    assert {e.headers.get("x-api-key") for e in mp_server.requests_to(MpServer.SUMMARY)} == {wrong}
    assert api_key_from_env({"MP_API_KEY": API_KEY}) == API_KEY


def test_mp_labels_are_fetched_in_batches_through_mp_api(
    mp_server: MpServer,
    mp_documents: list[dict[str, Any]],
    mp_rows: dict[str, dict[str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MP_API_KEY", API_KEY)
    formulas = sorted({d["formula_pretty"] for d in mp_documents})[:30]
    chemsys = next(d["chemsys"] for d in mp_documents if d["formula_pretty"] not in formulas)
    expected = [d for d in mp_documents if d["formula_pretty"] in formulas or d["chemsys"] == chemsys]
    options = mp_options(mp_server, tmp_path, formulas=formulas, chemsys=[chemsys], batch_size=10, chunk_size=5)
    mp_server.faults.scripted["summary"] = ["502"] * 5 + ["429:1"]  # beyond mp-api's own 3 retries
    mp_server.faults.scripted["/heartbeat"] = ["502", "hang"]
    manifest = fetch_materials_project(options, options["manifest"], log=quiet)
    assert manifest["documents"] >= len(expected)  # a document found by formula and by chemsys is listed twice
    summary = mp_server.requests_to(MpServer.SUMMARY)
    served = [e for e in summary if e.status == 200]
    batches = {e.query["formula"] for e in served if "formula" in e.query}
    assert len(batches) == 3 and all(len(b.split(",")) == 10 for b in batches)  # never one request per material
    assert {e.query["chemsys"] for e in served if "chemsys" in e.query} == {chemsys}
    assert sum(int(e.query.get("_skip", 0)) == 0 for e in served) == 4  # first page of each batch
    assert [e.fault for e in mp_server.requests_to("/heartbeat")][:2] == ["502", "hang"]
    assert all(set(e.query["_fields"].split(",")) >= {"structure", "bulk_modulus", "database_IDs"} for e in served)
    assert all(e.headers["x-api-key"] == API_KEY for e in summary)
    assert [e.status for e in summary[:7]] == [502] * 5 + [429, 200]
    assert len(mp_server.requests_to("/heartbeat")) >= 1

    before = len(mp_server.log)
    assert fetch_materials_project(options, options["manifest"], log=quiet)["batches_from_cache"] == 4
    assert len(mp_server.log) == before  # everything cached: not even MPRester's heartbeat

    source = validated({"type": "materials_project", "name": "mp", "materials_project": options})
    stale = validated({"type": "materials_project", "materials_project": {**options, "formulas": formulas[:5]}})
    with pytest.raises(SourceError, match="fetched for another query"):
        list(Source.from_config(stale).crystals())
    out = tmp_path / "out"
    summary_json = build_dataset("mp", {"sources": [source], "filters": FILTERS}, out, log=quiet)
    assert summary_json["read"] == len(expected)
    rows = table(out)
    for material_id in rows.index:
        row = mp_rows[material_id]
        assert rows.loc[material_id, "band_gap"] == pytest.approx(float(row["band_gap"]))
        assert rows.loc[material_id, "formation_energy_per_atom"] == pytest.approx(
            float(row["formation_energy_per_atom"])
        )
        if row["K_VRH"]:
            assert rows.loc[material_id, "K_VRH"] == pytest.approx(float(row["K_VRH"]))
        else:
            assert math.isnan(rows.loc[material_id, "K_VRH"])
    assert API_KEY not in all_text_under(tmp_path)


def test_mp_labels_are_validated() -> None:
    good = {"band_gap": 1.2, "bulk_modulus": {"voigt": 110.0, "reuss": 90.0, "vrh": 100.0}}
    assert mp_labels(good, 0.01)["K_VRH"] == 100.0 and mp_labels(good, 0.01)["G_VRH"] is None
    cases = [
        ({"bulk_modulus": {"voigt": 95.0, "reuss": 90.0, "vrh": 100.0}}, INCONSISTENT_MODULI, "Reuss <= VRH <= Voigt"),
        ({"shear_modulus": {"voigt": 50.0, "reuss": 60.0, "vrh": 55.0}}, INCONSISTENT_MODULI, "reuss=60.0"),
        ({"shear_modulus": {"vrh": -3.0}}, INCONSISTENT_MODULI, "not positive"),
        ({"band_gap": float("nan")}, NON_FINITE_LABEL, "band_gap"),
        ({"bulk_modulus": {"voigt": float("inf"), "vrh": 10.0}}, NON_FINITE_LABEL, "voigt"),
    ]
    for document, reason, text in cases:
        with pytest.raises(Rejection) as caught:
            mp_labels(document, 0.01)
        assert caught.value.reason == reason and text in caught.value.message
    assert mp_labels({"bulk_modulus": {"voigt": 99.995, "reuss": 90.0, "vrh": 100.0}}, 0.01)["K_VRH"] == 100.0


# --- OQMD + MP -------------------------------------------------------------------------------------------


def test_oqmd_entries_are_matched_to_mp_labels(
    oqmd_server: OqmdServer,
    mp_server: MpServer,
    oqmd_records: list[dict[str, Any]],
    mp_documents: list[dict[str, Any]],
    mp_rows: dict[str, dict[str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MP_API_KEY", API_KEY)
    source = validated(
        {
            "type": "oqmd_mp",
            "name": "oqmd_mp",
            "oqmd": oqmd_options(oqmd_server, tmp_path),
            "materials_project": mp_options(mp_server, tmp_path, batch_size=50),
        }
    )
    fetch_oqmd(source["oqmd"], source["oqmd"]["manifest"], log=quiet)
    formulas = oqmd_formulas(source["oqmd"])
    assert formulas == sorted({r["name"] for r in oqmd_records})
    fetch_materials_project(source["materials_project"], source["materials_project"]["manifest"], formulas, quiet)
    first_pages = [e for e in mp_server.requests_to(MpServer.SUMMARY) if int(e.query.get("_skip", 0)) == 0]
    assert len(first_pages) == math.ceil(len(formulas) / 50)

    out = tmp_path / "out"
    summary = build_dataset("oqmd_mp", {"sources": [source], "filters": FILTERS}, out, log=quiet)
    report = json.loads((out / "oqmd_mp.report.json").read_text())
    assert sum(report["outcomes"].values()) == report["oqmd_entries"] == OQMD_COUNT == summary["read"]
    served = {d["formula_pretty"] for d in mp_documents}
    assert report["outcomes"].get("no_mp_formula", 0) == sum(r["name"] not in served for r in oqmd_records)
    assert report["matched"] == report["outcomes"]["matched"] == len(report["pairs"]) > 40
    assert report["mp_documents"] == sum(d["formula_pretty"] in set(formulas) for d in mp_documents)

    rows = table(out)
    deltas = {f"oqmd-{r['entry_id']}": r["delta_e"] for r in oqmd_records}
    for pair in report["pairs"]:
        if pair["oqmd_id"] not in rows.index:
            continue  # dropped by a dataset filter (e.g. an element above max_z)
        mp = mp_rows[pair["mp_id"]]
        assert rows.loc[pair["oqmd_id"], "band_gap"] == pytest.approx(float(mp["band_gap"]))
        assert rows.loc[pair["oqmd_id"], "delta_e"] == pytest.approx(deltas[pair["oqmd_id"]])
        assert pair["mp_id"] in rows.loc[pair["oqmd_id"], "source_file"]
    with open(out / "rejected.csv", newline="") as handle:
        reasons = {row["reason"] for row in csv.DictReader(handle)}
    assert "no_match" in reasons


def _write_fetched(
    tmp_path: Path, entries: list[dict[str, Any]], documents: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cache files and manifests as fetch_oqmd / fetch_materials_project write them, for hand-made records."""
    from crystal_transfer.data.sources.base import sha256_of

    oqmd = {"cache_dir": str(tmp_path / "o"), "manifest": str(tmp_path / "o.json"), "max_entries": len(entries)}
    query = OqmdQuery.from_options(oqmd).as_dict()
    folder = tmp_path / "o" / "page"
    folder.mkdir(parents=True)
    page = folder / "offset-000000000.json"
    page.write_text(json.dumps({"data": entries, "meta": {"more_data_available": False}}))
    pages = [{"file": page.name, "offset": 0, "entries": len(entries), "sha256": sha256_of(page)}]
    Path(oqmd["manifest"]).write_text(
        json.dumps(
            {
                "query": query,
                "query_sha256": query_digest(query),
                "cache": str(folder),
                "pages": pages,
                "complete": True,
            }
        )
    )
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"criterion": "formula", "values": [], "documents": documents}))
    mp = {"manifest": str(tmp_path / "mp.json")}
    formulas = sorted({entry["name"] for entry in entries})
    manifest = {
        "query_sha256": query_digest(mp_query(mp, formulas)),
        "batches": [{"file": str(batch), "sha256": sha256_of(batch)}],
        "complete": True,
    }
    Path(mp["manifest"]).write_text(json.dumps(manifest))
    return oqmd, mp


def test_several_fitting_mp_materials_are_ambiguous_unless_one_icsd_id_decides(
    oqmd_records: list[dict[str, Any]], mp_documents: list[dict[str, Any]], tmp_path: Path
) -> None:
    from crystal_transfer.data.structures import structure_from_oqmd

    entry = next(r for r in oqmd_records if r["name"] == "SrSe")
    as_mp = structure_from_oqmd(entry["unit_cell"], entry["sites"]).as_dict()
    twin = {"formula_pretty": "SrSe", "structure": as_mp, "band_gap": 2.0, "formation_energy_per_atom": -1.9}
    documents = [
        {**twin, "material_id": "mp-a", "database_IDs": {"icsd": ["icsd-111"]}},
        {**twin, "material_id": "mp-b", "database_IDs": {"icsd": ["icsd-222", "icsd-333"]}, "band_gap": 2.5},
    ]
    entries = [
        {**entry, "entry_id": 1, "icsd_id": 333},  # the hint names mp-b
        {**entry, "entry_id": 2, "icsd_id": None},  # nothing to decide: ambiguous
        {**entry, "entry_id": 3, "icsd_id": 999},  # a hint naming neither: ambiguous
        {**entry, "entry_id": 4, "icsd_id": 222},  # mp-b again: a duplicate of entry 1
    ]
    oqmd, mp = _write_fetched(tmp_path, entries, documents)
    source = OqmdMpSource("m", {"oqmd": oqmd, "materials_project": mp})
    crystals = {raw.id: raw for raw in source.crystals()}
    assert crystals["oqmd-1"].rejection is None and crystals["oqmd-1"].labels["band_gap"] == 2.5
    assert crystals["oqmd-2"].rejection.reason == AMBIGUOUS_MATCH
    assert "mp-a, mp-b" in crystals["oqmd-2"].rejection.message
    assert crystals["oqmd-3"].rejection.reason == AMBIGUOUS_MATCH
    assert crystals["oqmd-4"].rejection.reason == "duplicate_crystal"
    report = source.report()
    assert report["outcomes"] == {"ambiguous": 2, "duplicate_mp_material": 1, "matched": 1}
    assert report["pairs"] == [{"oqmd_id": "oqmd-1", "mp_id": "mp-b", "via_icsd_hint": True}]
    # Without hints the first entry is ambiguous too.
    plain = OqmdMpSource("m", {"oqmd": oqmd, "materials_project": mp, "match": {"icsd_hints": False}})
    assert next(iter(plain.crystals())).rejection.reason == AMBIGUOUS_MATCH


# --- the workflow ----------------------------------------------------------------------------------------


def test_snakemake_fetches_both_services_then_builds_the_table(
    oqmd_server: OqmdServer, mp_server: MpServer, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    config = {
        "results_dir": str(results),
        "filters": {"max_z": 80, "max_rejected_fraction": 0.9},
        "datasets": {
            "remote": {
                "sources": [
                    {
                        "type": "oqmd_mp",
                        "name": "oqmd_mp",
                        "oqmd": {"base_url": oqmd_server.url, "limit": PAGE, "max_entries": 80, "http": FAST},
                        "materials_project": {"endpoint": mp_server.url, "batch_size": 40, "http": FAST},
                    }
                ]
            }
        },
        "splits": {},
    }
    path = tmp_path / "remote.yaml"
    path.write_text(json.dumps(config))
    env = {
        **os.environ,
        "MP_API_KEY": API_KEY,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO / "src"),
    }
    # Page 40 fails more often than one fetch job retries (FAST: 5 attempts): the first job fails, and
    # Snakemake's `retries:` reruns it, which takes page 0 from the cache.
    oqmd_server.faults.scripted[40] = ["502"] * 6
    target = f"{results}/data/remote/crystals.parquet"
    command = [sys.executable, "-m", "snakemake", target, "--cores", "2", "--configfile", str(path)]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    for rule in ("fetch_oqmd", "fetch_materials_project", "data"):
        assert f"rule {rule}:" in output or f"localrule {rule}:" in output, output
    assert (results / "downloads" / "remote" / "oqmd_mp.oqmd.json").is_file()
    assert (results / "downloads" / "remote" / "oqmd_mp.mp.json").is_file()
    assert any((results / "downloads" / "oqmd").rglob("offset-000000040.json"))
    report = json.loads((results / "data" / "remote" / "oqmd_mp.report.json").read_text())
    assert report["oqmd_entries"] == 80 and report["matched"] > 0
    assert oqmd_server.offsets() == [0] + [40] * 7
    assert "Error in rule fetch_oqmd" in output  # the first attempt failed; the retry resumed
    assert API_KEY not in output and API_KEY not in all_text_under(results)


def test_paper_config_is_valid_and_lints_clean() -> None:
    import yaml

    config = validate_config(yaml.safe_load((REPO / "configs" / "paper.yaml").read_text()))
    types = {source["type"] for dataset in config["datasets"].values() for source in dataset["sources"]}
    assert "oqmd_mp" in types
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", "--configfile", "configs/paper.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "Lints for" not in run.stdout + run.stderr, run.stdout + run.stderr


def test_paper_config_runs_end_to_end_against_the_local_services(
    oqmd_server: OqmdServer, mp_server: MpServer, tmp_path: Path
) -> None:
    """configs/paper.yaml, pointed at the local stand-ins and cut to toy sizes, through tables and figures."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    results = tmp_path / "results"
    config["results_dir"] = str(results)
    source = config["datasets"]["oqmd_mp"]["sources"][0]
    source["oqmd"].update({"base_url": oqmd_server.url, "limit": PAGE, "max_entries": 0, "http": FAST,
                           "filter": ""})
    source["materials_project"].update({"endpoint": mp_server.url, "batch_size": 40, "http": FAST})
    config["splits"] = {"band_gap": {"dataset": "oqmd_mp", "label": "band_gap", "train": 0.5, "val": 0.25,
                                     "test": 0.25, "seed": 0}}
    for model in config["pretrain"].values():
        if model["kind"] == "train":
            model["subsample"] = 0
    config["train"]["epochs"] = 2
    config["transfer"].update({"depths": [1, 2], "seeds": [0, 1],
                               "sources": ["formation_energy", "combined", "formation_energy_7042"]})
    config["learning_curves"].update({"train_sizes": [10, 20], "seeds": [0]})
    config["learning_curves"]["atomsets"]["epochs"] = 20
    path = tmp_path / "paper-local.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "MP_API_KEY": API_KEY,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "snakemake", "all", "--cores", "2", "--configfile", str(path)]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    report = results / "report"
    for name in ("table2.csv", "table2.md", "table3.csv", "fig5_loss_curves.png", "fig6_attention.png",
                 "learning_curves.png", "parity_best.png"):
        assert (report / name).is_file(), name
    table2 = pd.read_csv(report / "table2.csv")
    assert len(table2) == 4 and table2["mae_1"].notna().all()
    assert API_KEY not in output and API_KEY not in all_text_under(results)
