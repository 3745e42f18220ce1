"""The data stage: sources on real data, every filter on hand-made bad input, splits, config errors."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, shared, subprocess_env

from crystal_transfer.cli.main import main as cli_main
from crystal_transfer.config import ConfigError, validate_config
from crystal_transfer.data.sources import SourceError
from crystal_transfer.data.split import SplitError, make_split, read_split, write_split
from crystal_transfer.data.stage import DataStageError, build_dataset
from crystal_transfer.data.table import table_units

FILTERS = {"max_z": 80, "max_rejected_fraction": 1.0}


def local_spec(path: Path, labels: Path, columns: dict[str, str] | None = None, name: str = "local") -> dict:
    return {
        "type": "local",
        "name": name,
        "path": str(path),
        "labels": str(labels),
        "id_column": "material_id",
        "columns": columns or {"band_gap": "band_gap"},
    }


def write_labels(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("material_id,band_gap\n" + "".join(f"{i},{v}\n" for i, v in rows))
    return path


def rejected_rows(out: Path) -> dict[str, tuple[str, str]]:
    with open(out / "rejected.csv", newline="") as handle:
        return {row["id"]: (row["reason"], row["message"]) for row in csv.DictReader(handle)}


# --- sources on real data -------------------------------------------------------------------------------


def test_matminer_legacy_source_joins_the_three_tables(matminer_archive: Path, tmp_path: Path) -> None:
    spec = {
        "sources": [{"type": "matminer_legacy", "name": "matminer", "archive": str(matminer_archive)}],
        "filters": {"max_z": 80, "max_rejected_fraction": 0.25},
    }
    summary = build_dataset("matminer", spec, tmp_path, workers=2, log=lambda _: None)
    # 3,938 + 1,181 + 1,056 rows; ids shared between tables become one crystal.
    assert summary["read"] == 5698
    assert summary["rejected_by_reason"] == {"element_above_max_z": 540}
    assert summary["kept"] == 5158
    assert summary["labels"] == {"formation_energy_per_atom": 3444, "K_VRH": 1174, "G_VRH": 1174, "band_gap": 998,
                                 "refractive_index": 998}
    table = pq.read_table(tmp_path / "crystals.parquet").to_pandas().set_index("id")
    # dielectric_constant.csv row 0: mp-441, Rb2Te, band gap 1.88 eV, 3 sites.
    assert table.loc["mp-441", "formula"] == "Rb2Te"
    assert table.loc["mp-441", "band_gap"] == pytest.approx(1.88)
    assert table.loc["mp-441", "num_sites"] == 3
    # A crystal in more than one table carries the labels of each.
    both = table[table["band_gap"].notna() & table["K_VRH"].notna()]
    assert len(both) > 0
    assert table_units(tmp_path / "crystals.parquet")["K_VRH"] == "GPa"
    assert len(table.loc["mp-441", "frac_coords"]) == 3 * 3 and len(table.loc["mp-441", "lattice"]) == 9


def test_matminer_archive_with_wrong_checksum_is_refused(matminer_archive: Path, tmp_path: Path) -> None:
    spec = {
        "sources": [{"type": "matminer_legacy", "archive": str(matminer_archive), "sha256": "0" * 64}],
        "filters": FILTERS,
    }
    with pytest.raises(SourceError, match=r"has sha256 3faf9e8.*, expected 0000"):
        build_dataset("matminer", spec, tmp_path, log=lambda _: None)


def test_local_source_reads_oqmd_poscar_tarball(tmp_path: Path) -> None:
    structures = shared("oqmd1505", "structures.tar.gz")
    labels = shared("oqmd1505", "labels.csv")
    spec = {
        "sources": [
            {
                "type": "local",
                "name": "oqmd",
                "path": str(structures),
                "labels": str(labels),
                "id_column": "id",
                "columns": {"delta_e": "delta_e", "band_gap": "band_gap"},
            }
        ],
        "filters": {"max_z": 80, "max_rejected_fraction": 0.25},
    }
    summary = build_dataset("oqmd", spec, tmp_path, workers=2, log=lambda _: None)
    assert summary["read"] == 1505
    assert summary["kept"] + summary["rejected"] == 1505
    assert summary["labels"]["band_gap"] < summary["labels"]["delta_e"]  # 15 band gaps are empty, kept as null
    table = pq.read_table(tmp_path / "crystals.parquet").to_pandas().set_index("id")
    assert table.loc["2", "formula"] == "SrSe"
    assert table.loc["2", "band_gap"] == pytest.approx(2.414)
    assert table.loc["2", "source_file"] == "structures.tar.gz:structures/2.vasp"


def test_local_source_reads_mp2018_cif_folder(tmp_path: Path, mp2018_texts: dict[str, str]) -> None:
    folder = tmp_path / "cifs"
    folder.mkdir()
    ids = list(mp2018_texts)[:150]
    for crystal_id in ids:
        (folder / f"{crystal_id}.cif").write_text(mp2018_texts[crystal_id])
    with open(shared("mp2018", "labels.csv"), newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["material_id"] in set(ids)]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spec = {"sources": [local_spec(folder, labels, {"band_gap": "band_gap", "K_VRH": "K_VRH"})], "filters": FILTERS}
    summary = build_dataset("mp", spec, tmp_path / "out", log=lambda _: None)
    heavy = summary["rejected_by_reason"].get("element_above_max_z", 0)
    assert summary["kept"] + heavy == 150 and summary["rejected"] == heavy
    table = pq.read_table(tmp_path / "out" / "crystals.parquet").to_pandas().set_index("id")
    expected = {row["material_id"]: row for row in rows}
    for crystal_id, row in table.iterrows():
        assert row["band_gap"] == pytest.approx(float(expected[crystal_id]["band_gap"]))
        k_vrh = expected[crystal_id]["K_VRH"]
        assert (np.isnan(row["K_VRH"]) and k_vrh == "") or row["K_VRH"] == pytest.approx(float(k_vrh))


# --- filters on hand-made bad input ---------------------------------------------------------------------


def heavy_cif(texts: dict[str, str], symbol: str) -> tuple[str, str]:
    """The first real mp2018 crystal (of those the fixture read) that holds ``symbol``."""
    for crystal_id, text in texts.items():
        if re.search(rf"^\s+{symbol}\s+{symbol}\d+\s", text, flags=re.M):
            return crystal_id, text
    pytest.skip(f"no crystal with {symbol} among the mp2018 crystals read")


def test_every_filter_records_its_reason(tmp_path: Path, mp2018_texts: dict[str, str]) -> None:
    good = mp2018_texts["mp-1"]  # Cs, one site
    pb_id, pb_text = heavy_cif(mp2018_texts, "Pb")
    folder = tmp_path / "in"
    folder.mkdir()
    files = {
        "good.cif": good,
        "garbage.cif": "this is not a CIF file at all\n",
        "empty.cif": "",
        "lead.cif": pb_text,
        "partial.cif": good.replace(
            "Cs  Cs0  1  0.00000000  0.00000000  0.00000000  1", "Cs  Cs0  1  0.00000000  0.00000000  0.00000000  0.5"
        ),
        "nan_label.cif": good,
        "text_label.cif": good,
        "unlabelled.cif": good,
        "no_values.cif": good,
        "notes.txt": "a stray file",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    labels = write_labels(
        tmp_path / "labels.csv",
        [
            ("good", "1.5"),
            ("garbage", "1"),
            ("empty", "1"),
            ("lead", "2"),
            ("partial", "1"),
            ("nan_label", "nan"),
            ("text_label", "big"),
            ("no_values", ""),
            ("good", "2.5"),
            ("ghost", "1"),
        ],
    )
    summary = build_dataset(
        "bad",
        {"sources": [local_spec(folder, labels)], "filters": FILTERS},
        tmp_path / "out",
        workers=1,
        log=lambda _: None,
    )
    rejected = rejected_rows(tmp_path / "out")
    assert rejected["garbage"][0] == "unparsable" and rejected["garbage"][1].startswith("unparsable cif: ")
    assert rejected["empty"] == ("empty_file", "empty structure file")
    assert rejected["lead"] == ("element_above_max_z", "contains Pb (Z=82), above max_z=80")
    assert rejected["partial"] == ("partial_occupancy", "partial occupancy at site 0 (Cs:0.5)")
    assert rejected["nan_label"] == ("non_finite_label", "label band_gap=nan is not finite")
    assert rejected["text_label"] == ("non_finite_label", "label band_gap='big' is not a number")
    assert rejected["no_values"] == ("no_labels", "no label has a value")
    assert rejected["unlabelled"] == ("missing_labels", "no row for id 'unlabelled' in labels.csv")
    assert rejected["ghost"] == ("missing_structure", "no structure file for id 'ghost'")
    assert rejected["notes"] == ("unknown_format", "'notes.txt' is not a CIF or POSCAR file")
    with open(tmp_path / "out" / "rejected.csv", newline="") as handle:
        dup = [row for row in csv.DictReader(handle) if row["reason"] == "duplicate_id"]
    assert [(r["id"], r["message"]) for r in dup] == [("good", "duplicate id 'good' in labels CSV (line 10)")]
    assert summary["kept"] == 1 and summary["read"] == 12
    assert sum(summary["rejected_by_reason"].values()) == 11
    assert pb_id  # a real crystal was used


def test_bismuth_is_dropped_and_max_z_is_configurable(tmp_path: Path, mp2018_texts: dict[str, str]) -> None:
    bi_id, bi_text = heavy_cif(mp2018_texts, "Bi")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / f"{bi_id}.cif").write_text(bi_text)
    labels = write_labels(tmp_path / "labels.csv", [(bi_id, "0.3")])
    spec = {"sources": [local_spec(folder, labels)], "filters": FILTERS}
    with pytest.raises(DataStageError, match="no crystal kept: all 1 records were rejected"):
        build_dataset(
            "bi",
            {"sources": spec["sources"], "filters": {"max_z": 80, "max_rejected_fraction": 0.5}},
            tmp_path / "a",
            log=lambda _: None,
        )
    summary = build_dataset(
        "bi",
        {"sources": spec["sources"], "filters": {"max_z": 83, "max_rejected_fraction": 0}},
        tmp_path / "b",
        log=lambda _: None,
    )
    assert summary["kept"] == 1


def test_tarball_with_path_traversal_member_is_rejected(tmp_path: Path, mp2018_texts: dict[str, str]) -> None:
    archive_path = tmp_path / "evil.tar.gz"
    with tarfile.open(archive_path, "w:gz") as archive:
        for name, text in [
            ("structures/mp-1.cif", mp2018_texts["mp-1"]),
            ("../../etc/mp-2.cif", mp2018_texts["mp-2"]),
            ("/abs/mp-3.cif", mp2018_texts["mp-1"]),
        ]:
            payload = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    labels = write_labels(tmp_path / "labels.csv", [("mp-1", "0"), ("mp-2", "0"), ("mp-3", "0")])
    build_dataset(
        "evil",
        {"sources": [local_spec(archive_path, labels)], "filters": FILTERS},
        tmp_path / "out",
        log=lambda _: None,
    )
    rejected = rejected_rows(tmp_path / "out")
    assert rejected["mp-2"] == (
        "unsafe_path",
        "unsafe archive member '../../etc/mp-2.cif' (absolute, '..' or not a regular file)",
    )
    assert rejected["mp-3"][0] == "unsafe_path"
    assert not (tmp_path / "etc").exists()
    table = pq.read_table(tmp_path / "out" / "crystals.parquet")
    assert table.column("id").to_pylist() == ["mp-1"]


def test_wrong_column_map_names_the_column(tmp_path: Path, mp2018_texts: dict[str, str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "mp-1.cif").write_text(mp2018_texts["mp-1"])
    labels = write_labels(tmp_path / "labels.csv", [("mp-1", "0")])
    spec = {"sources": [local_spec(folder, labels, {"band_gap": "gap_ev"})], "filters": FILTERS}
    with pytest.raises(SourceError) as info:
        build_dataset("x", spec, tmp_path / "out", log=lambda _: None)
    assert str(info.value) == (
        f"source 'local': labels CSV {labels} has no column 'gap_ev' (mapped to label 'band_gap', config key "
        f"'columns'); its columns are: material_id, band_gap"
    )
    spec["sources"][0]["columns"] = {"band_gap": "band_gap"}
    spec["sources"][0]["id_column"] = "mpid"
    with pytest.raises(SourceError, match="has no column 'mpid' \\(the id column, config key 'id_column'\\)"):
        build_dataset("x", spec, tmp_path / "out", log=lambda _: None)


def test_same_crystal_from_two_sources_keeps_the_first(tmp_path: Path, mp2018_texts: dict[str, str]) -> None:
    ids = ["mp-1", "mp-2", "mp-8"]
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    for crystal_id in ids:
        (first / f"{crystal_id}.cif").write_text(mp2018_texts[crystal_id])
    (second / "other-1.cif").write_text(mp2018_texts["mp-1"])  # same crystal, another database's id
    (second / "other-9.cif").write_text(mp2018_texts["mp-11"])
    labels_a = write_labels(tmp_path / "a.csv", [(i, "0.1") for i in ids])
    labels_b = write_labels(tmp_path / "b.csv", [("other-1", "0.2"), ("other-9", "0.3")])
    spec = {
        "sources": [local_spec(first, labels_a, name="first"), local_spec(second, labels_b, name="second")],
        "filters": FILTERS,
    }
    summary = build_dataset("two", spec, tmp_path / "out", log=lambda _: None)
    rejected = rejected_rows(tmp_path / "out")
    assert rejected == {
        "other-1": (
            "duplicate_crystal",
            "same crystal as 'mp-1' from source 'first' (kept that one: its source is listed first)",
        )
    }
    assert summary["per_source"] == {"first": {"read": 3, "kept": 3}, "second": {"read": 2, "kept": 1}}


def test_too_many_rejections_fail_with_the_reasons(tmp_path: Path, mp2018_texts: dict[str, str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "mp-1.cif").write_text(mp2018_texts["mp-1"])
    for index in range(3):
        (folder / f"bad{index}.cif").write_text("garbage")
    labels = write_labels(tmp_path / "labels.csv", [("mp-1", "0")] + [(f"bad{i}", "0") for i in range(3)])
    spec = {"sources": [local_spec(folder, labels)], "filters": {"max_z": 80, "max_rejected_fraction": 0.5}}
    with pytest.raises(DataStageError) as info:
        build_dataset("bad", spec, tmp_path / "out", log=lambda _: None)
    message = str(info.value)
    assert (
        "rejected 3 of 4 records (75.0%), more than max_rejected_fraction=0.5 allows; reasons: unparsable 3" in message
    )
    assert not (tmp_path / "out" / "crystals.parquet").exists()
    assert (tmp_path / "out" / "failed-rejected.csv").read_text().count(",unparsable,") == 3


# --- splits -------------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_checked(matminer_archive: Path, tmp_path: Path) -> None:
    spec = {
        "sources": [{"type": "matminer_legacy", "archive": str(matminer_archive)}],
        "filters": {"max_z": 80, "max_rejected_fraction": 0.25},
    }
    build_dataset("m", spec, tmp_path, log=lambda _: None)
    table = tmp_path / "crystals.parquet"
    plan = {"label": "band_gap", "train": 400, "val": 200, "test": 300, "seed": 0}
    first, again = make_split(table, "bg", plan), make_split(table, "bg", plan)
    assert first == again
    assert [len(first[p]) for p in ("train", "val", "test")] == [400, 200, 300]
    assert len(set(first["train"]) | set(first["val"]) | set(first["test"])) == 900
    assert make_split(table, "bg", {**plan, "seed": 1})["train"] != first["train"]
    write_split(first, tmp_path / "bg.csv")
    assert read_split(tmp_path / "bg.csv") == first
    fractions = make_split(
        table, "fe", {"label": "formation_energy_per_atom", "train": 0.8, "val": 0.1, "test": 0.1, "seed": 0}
    )
    assert len(fractions["train"]) == int(0.8 * 3444)
    with pytest.raises(SplitError, match="asks for 3000 crystals with label 'band_gap' .* but the table has 998"):
        make_split(table, "bg", {**plan, "train": 1000, "val": 1000, "test": 1000})


# --- config and command line ----------------------------------------------------------------------------


def test_unknown_config_keys_are_named() -> None:
    config = {"datasets": {"d": {"sources": [{"type": "matminer_legacy", "colour": "red"}]}}, "splits": {}}
    with pytest.raises(ConfigError, match=r"unknown key 'colour' in datasets\.d\.sources\[0\]"):
        validate_config(config)
    with pytest.raises(ConfigError, match=r"unknown key 'filtres' in <top level>"):
        validate_config({"datasets": {}, "splits": {}, "filtres": {}})


def test_defaults_are_filled_from_the_schema() -> None:
    config = validate_config(
        {
            "datasets": {"d": {"sources": [{"type": "matminer_legacy"}]}},
            "splits": {"s": {"dataset": "d", "label": "band_gap", "train": 1, "val": 1, "test": 1}},
        }
    )
    assert config["filters"] == {"max_z": 80, "min_distance": 0.5, "max_rejected_fraction": 0.25}
    assert config["datasets"]["d"]["sources"][0]["version"] == "0.3.9"
    assert config["splits"]["s"]["seed"] == 0


def test_every_schema_key_is_documented() -> None:
    from crystal_transfer.config import load_schema

    def walk(node, path):
        if isinstance(node, dict):
            for key, sub in node.get("properties", {}).items():
                assert "description" in sub, f"{path}.{key} has no description"
                assert "type" in sub or "const" in sub or "enum" in sub or "$ref" in sub, f"{path}.{key} has no type"
                walk(sub, f"{path}.{key}")
            for key in ("additionalProperties", "items", "then"):
                walk(node.get(key), f"{path}.{key}")
            for branch in node.get("allOf", []):
                walk(branch, path)
        return None

    schema = load_schema()
    walk(schema, "config")
    for name, definition in schema["$defs"].items():
        walk(definition, name)


def test_cli_reports_user_errors_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"datasets": {}, "splits": {}, "speed": "fast"}))
    assert cli_main(["data", "--config", str(bad), "--dataset", "x", "--out", str(tmp_path)]) == 2
    assert "unknown key 'speed'" in capsys.readouterr().err


def test_data_help_explains_the_stage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "crystal_transfer", "data", "--help"], capture_output=True, text=True, check=True
    )
    assert "rejected.csv" in result.stdout and "max_rejected_fraction" in result.stdout


def _snakemake(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=REPO, capture_output=True, text=True, env=subprocess_env()
    )


def test_snakemake_dry_run_of_the_default_config(tmp_path: Path) -> None:
    result = _snakemake("-n", "all", "--cores", "1", "--config", f"results_dir={tmp_path}")
    assert result.returncode == 0, result.stderr + result.stdout


def test_snakemake_lint_is_clean() -> None:
    result = _snakemake("--lint")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Lints for" not in output, output
