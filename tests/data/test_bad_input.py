"""Issue #16, one test per class of bad input, each on real mp2018 crystals: a record that cannot be used is
rejected with its id and reason and the run goes on; a file that cannot be read stops the stage with one line
naming it; never a traceback."""

from __future__ import annotations

import csv
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from crystal_transfer.cli.main import main as cli_main
from crystal_transfer.data.stage import DataStageError, build_dataset

FILTERS = {"max_z": 80, "max_rejected_fraction": 1.0}
GOOD_COUNT = 6  # the first crystals of mp2018, in archive order


def _structure(text: str):
    from pymatgen.core import Structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_str(text, fmt="cif")


def _poscar(structure) -> str:
    from pymatgen.io.vasp import Poscar

    return Poscar(structure).get_str()


def _good_ids(texts: dict[str, str]) -> list[str]:
    return list(texts)[:GOOD_COUNT]


def _labels(path: Path, ids: list[str], prefix: bytes = b"", encoding: str = "utf-8") -> Path:
    text = "material_id,band_gap\n" + "".join(f"{crystal_id},{1.0 + k / 10}\n" for k, crystal_id in enumerate(ids))
    path.write_bytes(prefix + text.encode(encoding))
    return path


def _spec(folder: Path, labels: Path) -> dict:
    source = {"type": "local", "name": "mine", "path": str(folder), "labels": str(labels),
              "id_column": "material_id", "columns": {"band_gap": "band_gap"}}
    return {"sources": [source], "filters": FILTERS}


def _rejected(out: Path) -> dict[str, tuple[str, str]]:
    with open(out / "rejected.csv", newline="") as handle:
        return {row["id"]: (row["reason"], row["message"]) for row in csv.DictReader(handle)}


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture()
def mutated(tmp_path: Path, mp2018_texts: dict[str, str]) -> dict:
    """Real crystals as POSCAR files, plus mutated copies: a dummy species, two atoms on one position, two atoms
    0.004 Å apart, and a cell far thinner than the graphs' radius (but without overlapping atoms)."""
    ids = _good_ids(mp2018_texts)
    folder = tmp_path / "in"
    folder.mkdir()
    structures = {crystal_id: _structure(mp2018_texts[crystal_id]) for crystal_id in ids}
    for crystal_id, structure in structures.items():
        (folder / f"{crystal_id}.vasp").write_text(_poscar(structure))
    base = structures[ids[2]]
    symbol = base[0].specie.symbol
    lines = _poscar(base).splitlines()
    lines[5] = lines[5].replace(symbol, "Xx", 1)  # the species line of a POSCAR
    (folder / "dummy.vasp").write_text("\n".join(lines) + "\n")
    on_top = base.copy()
    on_top.append(base[0].specie, base[0].frac_coords)  # POSCAR allows it; pymatgen's default check is off here
    (folder / "on_top.vasp").write_text(_poscar(on_top))
    close = base.copy()
    close.append(base[0].specie, base[0].coords + [0.004, 0, 0], coords_are_cartesian=True)
    (folder / "close.vasp").write_text(_poscar(close))
    from pymatgen.core import Lattice, Structure

    one = structures[ids[0]]  # its atoms in a cell 0.01 Å high, whose lattice vectors are all long
    thin = Structure(Lattice([[100, 0, 0], [0, 100, 0], [50.3, 50.7, 0.01]]), one.species, one.frac_coords)
    (folder / "thin.vasp").write_text(_poscar(thin))
    extra = ["dummy", "on_top", "close", "thin"]
    labels = _labels(tmp_path / "labels.csv", ids + extra)
    return {"folder": folder, "labels": labels, "ids": ids, "symbol": symbol, "root": tmp_path}


def test_unusable_crystals_are_rejected_and_the_run_goes_on(mutated: dict, capsys) -> None:
    """Classes 1 and 2: a dummy species (pymatgen's ``Xx``) and atoms on top of each other are rejected with their
    ids by the data stage; a cell far thinner than the radius is rejected by the graphs stage; every other crystal
    goes through both stages."""
    root = mutated["root"]
    spec = _spec(mutated["folder"], mutated["labels"])
    assert cli_main(["data", "--spec", json.dumps(spec), "--dataset", "mine", "--out", str(root / "data"),
                     "--workers", "1"]) == 0
    rejected = _rejected(root / "data")
    assert rejected["dummy"][0] == "unknown_element" and "Xx" in rejected["dummy"][1]
    assert rejected["on_top"][0] == "overlapping_atoms" and "closer than min_distance=0.5" in rejected["on_top"][1]
    assert rejected["close"][0] == "overlapping_atoms" and "0.004 Å apart" in rejected["close"][1]
    summary = json.loads((root / "data" / "summary.json").read_text())
    assert summary["kept"] == len(mutated["ids"]) + 1 and summary["read"] == summary["kept"] + summary["rejected"]
    table = root / "data" / "crystals.parquet"
    assert cli_main(["graphs", "build", "--table", str(table), "--dataset", "mine", "--out", str(root / "graphs"),
                     "--settings", "{}"]) == 0
    with open(root / "graphs" / "rejected.csv", newline="") as handle:
        graph_rejected = list(csv.DictReader(handle))
    assert [(r["id"], r["reason"]) for r in graph_rejected] == [("thin", "unsearchable_cell")]
    assert "thinner than the radius" in graph_rejected[0]["message"]
    manifest = json.loads((root / "graphs" / "manifest.json").read_text())
    assert manifest["counts"]["crystals"] == len(mutated["ids"])
    # the check's threshold is configurable: 0.003 Å keeps the crystal whose atoms are 0.004 Å apart
    relaxed = {**spec, "filters": {**FILTERS, "min_distance": 0.003}}
    build_dataset("mine", relaxed, root / "relaxed", workers=1, log=lambda _: None)
    relaxed_rejected = _rejected(root / "relaxed")
    assert "close" not in relaxed_rejected and relaxed_rejected["on_top"][0] == "overlapping_atoms"


def test_no_real_crystal_of_mp2018_is_closer_than_the_default(mp2018_texts: dict[str, str]) -> None:
    """The default min_distance (0.5 Å) rejects nothing real: the closest atoms of the first 2,000 mp2018 crystals
    (all 33,189: 0.746 Å, an O-H bond of mp-720082) are well above it."""
    from crystal_transfer.data.structures import DEFAULT_MIN_DISTANCE, closest_pair

    closest = (np.inf, "")
    for crystal_id, text in mp2018_texts.items():
        structure = _structure(text)
        pair = closest_pair(structure.lattice.matrix, structure.frac_coords, 0.9)
        closest = min(closest, (pair[2], crystal_id)) if pair else closest
    assert closest[0] > DEFAULT_MIN_DISTANCE + 0.2, closest


def test_empty_input_says_there_was_nothing(tmp_path: Path, capsys) -> None:
    """Class 6: no records at all is its own message, not "rejected 0 of 0 records (100.0%)"."""
    folder = tmp_path / "empty"
    folder.mkdir()
    labels = _labels(tmp_path / "labels.csv", [])
    with pytest.raises(DataStageError, match="yielded no records at all") as caught:
        build_dataset("mine", _spec(folder, labels), tmp_path / "out", workers=1, log=lambda _: None)
    assert "0 of 0" not in str(caught.value)


def test_labels_with_a_byte_order_mark_or_not_utf8(mutated: dict, capsys) -> None:
    """Class 5: a labels CSV that starts with a byte-order mark reads as any other; one that is not UTF-8 stops the
    stage with one line naming the file and the line."""
    root, ids = mutated["root"], mutated["ids"]
    bom = _labels(root / "bom.csv", ids, prefix=b"\xef\xbb\xbf")
    summary = build_dataset("mine", _spec(mutated["folder"], bom), root / "bom", workers=1, log=lambda _: None)
    assert summary["kept"] >= len(ids)
    latin = _labels(root / "latin.csv", ids + ["é"], encoding="latin-1")
    status = cli_main(["data", "--spec", json.dumps(_spec(mutated["folder"], latin)), "--out", str(root / "latin")])
    assert status == 2
    err = _one_line(capsys)
    assert str(latin) in err and "not UTF-8" in err and f"line {len(ids) + 2}" in err


def test_truncated_archive_names_itself(tmp_path: Path, mp2018_texts: dict[str, str], capsys) -> None:
    """Class 5: a .tar.gz cut short stops the data stage with one line naming the archive, never a traceback."""
    ids = list(mp2018_texts)[:200]
    archive = tmp_path / "structures.tar.gz"
    folder = tmp_path / "cifs"
    folder.mkdir()
    for crystal_id in ids:
        (folder / f"{crystal_id}.cif").write_text(mp2018_texts[crystal_id])
    with tarfile.open(archive, "w:gz") as handle:
        handle.add(folder, arcname="structures")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    labels = _labels(tmp_path / "labels.csv", ids)
    assert cli_main(["data", "--spec", json.dumps(_spec(archive, labels)), "--out", str(tmp_path / "out")]) == 2
    err = _one_line(capsys)
    assert str(archive) in err and "damaged or truncated" in err
    assert not (tmp_path / "out" / "crystals.parquet").exists()


def test_config_that_is_not_yaml(tmp_path: Path, capsys) -> None:
    """Class 5: a YAML syntax error in a config is one line with the file, line and column."""
    config = tmp_path / "mine.yaml"
    config.write_text("results_dir: results/mine\ndatasets:\n  mine: {sources: [1, 2}\n")
    assert cli_main(["data", "--config", str(config), "--dataset", "mine", "--out", str(tmp_path / "out")]) == 2
    err = _one_line(capsys)
    assert str(config) in err and "not valid YAML at line 3" in err
    config.write_bytes(b"results_dir: r\xe9sultats\n")
    assert cli_main(["data", "--config", str(config), "--dataset", "mine", "--out", str(tmp_path / "out")]) == 2
    assert "is not UTF-8" in _one_line(capsys)


def test_a_label_that_is_not_a_column_is_named(mutated: dict, capsys) -> None:
    """Class 5: a target or split label the table lacks is named with the labels it has (not a pyarrow schema)."""
    root = mutated["root"]
    build_dataset("mine", _spec(mutated["folder"], mutated["labels"]), root / "data", workers=1, log=lambda _: None)
    table = root / "data" / "crystals.parquet"
    plan = {"label": "band_gapp", "train": 2, "val": 1, "test": 1}
    assert cli_main(["split", "--table", str(table), "--name", "x", "--plan", json.dumps(plan),
                     "--out", str(root / "split.csv")]) == 2
    err = _one_line(capsys)
    assert "band_gapp" in err and "band_gap" in err and "lattice" not in err
    from crystal_transfer.data.table import read_table
    from crystal_transfer.errors import MissingError

    with pytest.raises(MissingError, match=r"has no column 'band_gapp'; its labels are: band_gap$"):
        read_table(table, columns=["id", "band_gapp"])
    assert np.isfinite(read_table(table, columns=["band_gap"]).column("band_gap").to_numpy()).all()
