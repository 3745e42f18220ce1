"""Universal interatomic potentials as frozen feature sources (issue #17), on real mp2018 crystals: the cached
features equal what CHGNet's ``predict_structure`` and SevenNet's own model call give; crystals either model
cannot handle are rejected with a reason; a missing extra is named; the learning-curve plan refuses what cannot
work."""

from __future__ import annotations

import copy
import csv
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, subprocess_env

from crystal_transfer.errors import InputError

N_CRYSTALS = 56  # real crystals of mp2018, in archive order (mp-1, Cs, is among them: no neighbour within 5 Å)
pytest.importorskip("chgnet", reason="the optional extra .[universal] (chgnet, sevenn) is not installed")
pytest.importorskip("sevenn", reason="the optional extra .[universal] (chgnet, sevenn) is not installed")


def _structure(text: str):
    from pymatgen.core import Structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_str(text, fmt="cif")


@pytest.fixture(scope="module")
def featurised(mp2018_texts: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A table of real crystals plus three made unusable (polonium, americium, a lone atom in a 7 Å cell), a split
    of all of them, and both potentials' caches from the frozen-features stage."""
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.cif import CifWriter

    from crystal_transfer.data.split import write_split
    from crystal_transfer.data.stage import build_dataset
    from crystal_transfer.experiments.frozen_features import run_universal

    root = tmp_path_factory.mktemp("universal")
    folder = root / "cifs"
    folder.mkdir()
    ids = list(mp2018_texts)[:N_CRYSTALS]
    for crystal_id in ids:
        (folder / f"{crystal_id}.cif").write_text(mp2018_texts[crystal_id])
    base = _structure(mp2018_texts[ids[3]])
    for name, element in (("with_po", "Po"), ("with_am", "Am")):
        changed = base.copy()
        changed.replace(0, element)
        CifWriter(changed).write_file(folder / f"{name}.cif")
    CifWriter(Structure(Lattice.cubic(7.0), ["Na"], [[0, 0, 0]])).write_file(folder / "lone.cif")
    extra = ["with_po", "with_am", "lone"]
    with open(root / "labels.csv", "w") as handle:
        handle.write("material_id,band_gap\n" + "".join(f"{i},{k / 10}\n" for k, i in enumerate(ids + extra)))
    spec = {"sources": [{"type": "local", "name": "mine", "path": str(folder), "labels": str(root / "labels.csv"),
                         "id_column": "material_id", "columns": {"band_gap": "band_gap"}}],
            "filters": {"max_z": 118, "max_rejected_fraction": 0.25}}
    build_dataset("mine", spec, root / "data", workers=1, log=lambda _: None)
    table = root / "data" / "crystals.parquet"
    from crystal_transfer.data.table import read_table

    present = set(read_table(table, columns=["id"]).column("id").to_pylist())
    assert set(extra) <= present
    ids = [i for i in ids if i in present]
    everything = ids + extra
    split = {"train": everything[:30], "val": everything[30:40], "test": everything[40:]}
    write_split(split, root / "split.csv")
    caches = {}
    for kind, levels in (("chgnet", [0, 3, 4, "crystal"]), ("sevenn", [0, 1, 5, "crystal"])):
        caches[kind] = run_universal(kind, {"kind": kind, "device": "cpu", "batch_size": 8}, levels, table,
                                     root / "split.csv", root / "cache", log=lambda _: None)
    return {"root": root, "ids": ids, "table": table, "split": root / "split.csv", "caches": caches, "base": base}


def _rows(cache: dict, crystal_id: str) -> np.ndarray:
    index = cache["ids"].index(crystal_id)
    return cache["features"][cache["offsets"][index] : cache["offsets"][index + 1]].numpy()


def test_chgnet_features_equal_chgnet_own_prediction(featurised: dict, mp2018_texts: dict[str, str]) -> None:
    from chgnet.model import CHGNet

    caches = featurised["caches"]["chgnet"]
    ids = featurised["ids"]
    assert all(i in caches[3]["ids"] for i in ids)  # CHGNet takes every real crystal here
    model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
    structures = [_structure(mp2018_texts[i]) for i in ids]
    reference = model.predict_structure(structures, task="e", return_atom_feas=True, return_crystal_feas=True,
                                        batch_size=5)
    for crystal_id, own in zip(ids, reference, strict=True):
        np.testing.assert_allclose(_rows(caches[3], crystal_id), own["atom_fea"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(_rows(caches["crystal"], crystal_id)[0], own["crystal_fea"], atol=1e-5, rtol=0)
    # the crystal vector is the mean of the last level after CHGNet's readout LayerNorm
    norm = model.readout_norm
    import torch

    last = torch.from_numpy(_rows(caches[4], ids[0]))
    np.testing.assert_allclose(norm(last).mean(0).detach().numpy(), _rows(caches["crystal"], ids[0])[0], atol=1e-5)
    assert caches[0]["features"].shape[1] == 64 and caches["crystal"]["provenance"]["kind"] == "chgnet"


def test_sevenn_features_equal_its_own_model_call(featurised: dict, mp2018_texts: dict[str, str]) -> None:
    from pymatgen.io.ase import AseAtomsAdaptor
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.calculator import SevenNetCalculator
    from sevenn.train.dataload import unlabeled_atoms_to_graph

    caches = featurised["caches"]["sevenn"]
    calculator = SevenNetCalculator("7net-0", device="cpu")
    seen: dict[str, np.ndarray] = {}

    def keep(name):
        return lambda _module, _inputs, output: seen.__setitem__(name, output["x"].detach().numpy().copy())

    for name, module in calculator.model._modules.items():
        if name == "onehot_to_feature_x" or name.endswith("_equivariant_gate"):
            module.register_forward_hook(keep(name))
    kept = [i for i in featurised["ids"] if i in caches[5]["ids"]]
    assert len(kept) >= 50
    for crystal_id in kept:
        atoms = AseAtomsAdaptor.get_atoms(_structure(mp2018_texts[crystal_id]))
        data = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, calculator.cutoff))
        calculator.model(data)  # its own call: energy, forces and stress, one crystal at a time
        np.testing.assert_allclose(_rows(caches[0], crystal_id), seen["onehot_to_feature_x"][:, :128], atol=1e-5)
        np.testing.assert_allclose(_rows(caches[1], crystal_id), seen["0_equivariant_gate"][:, :128], atol=1e-5)
        np.testing.assert_allclose(_rows(caches[5], crystal_id), seen["4_equivariant_gate"], atol=1e-5)
        np.testing.assert_allclose(_rows(caches["crystal"], crystal_id)[0], seen["4_equivariant_gate"].mean(0),
                                   atol=1e-5)


def test_crystals_a_model_cannot_handle_are_rejected_with_the_reason(featurised: dict) -> None:
    """Americium (CHGNet knows Z <= 94), polonium (not in MPtrj, the training set of both), a lone atom, and mp-1
    (Cs, nearest neighbour 5.3 Å: alone within SevenNet's 5 Å, not CHGNet's 6 Å): each rejected, never dropped."""
    root = featurised["root"]
    for kind, expected in (
        ("chgnet", {"with_am": "unsupported_element", "with_po": "unsupported_element", "lone": "isolated_atom"}),
        ("sevenn", {"with_am": "unsupported_element", "with_po": "unsupported_element", "lone": "isolated_atom",
                    "mp-1": "isolated_atom"}),
    ):
        with open(root / "cache" / f"{kind}-rejected.csv", newline="") as handle:
            rejected = {row["id"]: row["reason"] for row in csv.DictReader(handle)}
        assert rejected == expected, kind
        for cache in featurised["caches"][kind].values():
            assert {entry["id"] for entry in cache["rejected"]} == set(expected)
            assert len(cache["ids"]) + len(expected) == len(featurised["ids"]) + 3  # every crystal accounted for
            assert not set(cache["ids"]) & set(expected)


def test_a_crystal_the_model_fails_on_is_rejected_even_alone_in_its_batch(featurised: dict,
                                                                          mp2018_texts: dict[str, str]) -> None:
    """A crystal on which CHGNet's own forward pass raises (its graph given an atomic number past the embedding)
    becomes featurisation_failed, alone in its batch or beside a good crystal that is still featurised."""
    import torch

    from crystal_transfer.models.universal import extractor

    model = extractor("chgnet", "cpu")
    good_id, bad_id = featurised["ids"][:2]
    good, bad = (model.prepare(i, _structure(mp2018_texts[i])) for i in (good_id, bad_id))
    bad.atomic_number = torch.full_like(bad.atomic_number, 500)
    for batch_ids, inputs in (([bad_id], [bad]), ([good_id, bad_id], [good, bad])):
        rejected: list[dict[str, str]] = []
        kept = [crystal_id for crystal_id, _ in model._forward_guarded(batch_ids, inputs, rejected)]
        assert kept == batch_ids[:-1]
        assert [(r["id"], r["reason"]) for r in rejected] == [(bad_id, "featurisation_failed")]
        assert rejected[0]["message"]


def test_atomsets_on_universal_features_records_what_was_left_out(featurised: dict) -> None:
    from crystal_transfer.experiments import atomsets

    root = featurised["root"]
    result = atomsets.run("sevenn", root / "cache" / "sevenn-depth5.pt", featurised["table"], featurised["split"],
                          "band_gap", {"epochs": 5, "hidden": 16}, root / "as", seed=0, log=lambda _: None)
    # mp-1 is a training crystal; the three made-up ones are test crystals
    assert result["left_out"] == {"train": 1, "val": 0, "test": 3}
    assert result["n_test"] == len(featurised["ids"]) - 40 and np.isfinite(result["test_mae"])
    assert result["features"]["source"] == "sevenn==0.13.0 (SevenNet-0 (11Jul2024))"


def test_a_missing_extra_is_named_at_once(featurised: dict) -> None:
    """With the package blocked from import (as when it is not installed), the stage and the workflow's config
    check stop with one line naming the extra."""
    command = (
        "import sys; sys.modules['sevenn'] = None\n"
        "from crystal_transfer.cli.main import main\n"
        f"sys.exit(main(['frozen-features', '--universal', '{{\"kind\": \"sevenn\"}}', '--name', 'sevenn', "
        f"'--levels', '5', '--table', r'{featurised['table']}', '--split', r'{featurised['split']}', "
        f"'--out-dir', r'{featurised['root'] / 'blocked'}']))\n"
    )
    run = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, env=subprocess_env(),
                         cwd=REPO)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "error: feature source kind 'sevenn' needs the package sevenn==0.13.0, which is not installed: install the "
        "project's optional extra: pip install -e '.[universal]' (make setup does), or pip install sevenn==0.13.0"
    ]
    assert not (featurised["root"] / "blocked").exists()


def test_the_workflow_config_check_names_a_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from crystal_transfer.experiments.curves import check_config
    from crystal_transfer.models.universal import MissingExtra

    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    check_config(config)  # installed here: passes
    monkeypatch.setitem(sys.modules, "chgnet", None)
    with pytest.raises(MissingExtra, match=r"chgnet==0\.4\.2, which is not installed: install the project's "
                                           r"optional extra: pip install -e '\.\[universal\]'"):
        check_config(config)


def test_the_curve_plan_refuses_what_cannot_work() -> None:
    import yaml

    from crystal_transfer.experiments.curves import curve_plan
    from crystal_transfer.experiments.matrix import targets

    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    keys = [curve.key for curve in curve_plan(config)]
    assert keys == ["atomsets-formation_energy-level4", "atomsets-chgnet-level4", "atomsets-chgnet-levelcrystal",
                    "atomsets-sevenn-level5", "finetune-formation_energy", "scratch"]
    cases = [
        (lambda c: c["learning_curves"]["sources"].append("mace"), "names 'mace', which is not a model under pretrain"),
        (lambda c: c["learning_curves"]["sources"].append({"name": "sevenn", "levels": [6]}),
         "sevenn \\(SevenNet-0 \\(11Jul2024\\)\\) has no level 6; its levels are 0, 1, 2, 3, 4, 5, crystal"),
        (lambda c: c["learning_curves"].update(finetune="chgnet"), "'chgnet' is of kind chgnet; fine-tuning needs"),
        (lambda c: c["learning_curves"]["sources"].append("sevenn"), "lists sevenn at level 5 twice"),
    ]
    for change, message in cases:
        broken = copy.deepcopy(config)
        change(broken)
        with pytest.raises(InputError, match=message):
            curve_plan(broken)
    broken = copy.deepcopy(config)
    broken["transfer"]["sources"].append("chgnet")
    with pytest.raises(InputError, match="chgnet \\(CHGNet 0.3.0\\) is a universal potential; it serves frozen "
                                         "features to mode atomsets"):
        targets(broken)


def test_a_checkpoint_whose_bytes_differ_is_refused(tmp_path: Path) -> None:
    """The pinned sha256 guards the files the libraries unpickle: a copy of the package with one byte of its
    checkpoint changed is refused before anything loads it."""
    import shutil

    import sevenn

    from crystal_transfer.models import universal

    copy_root = tmp_path / "site"
    shutil.copytree(Path(sevenn.__file__).parent, copy_root / "sevenn")
    target = copy_root / "sevenn" / universal.SOURCES["sevenn"].checkpoint
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    command = (
        f"import sys; sys.path.insert(0, r'{copy_root}')\n"
        "from crystal_transfer.models import universal\n"
        "try:\n    universal.checkpoint('sevenn')\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, env=subprocess_env())
    assert run.stdout.startswith("InputError ") and "differs from the pinned" in run.stdout, run.stdout + run.stderr


def test_exported_universal_features_are_the_caches_rows(featurised: dict) -> None:
    """Issue #19 item 4: ``features --model chgnet`` on the table gives, per crystal, the mean of the cache's atom
    rows at that level (and at ``crystal`` CHGNet's own crystal vector); the crystals CHGNet refuses (polonium,
    the lone atom) keep their row with the reason and null features."""
    import pandas as pd

    out = featurised["root"] / "export"
    for level in (3, "crystal"):
        result = subprocess.run(
            [sys.executable, "-m", "crystal_transfer", "features", "--model", "chgnet", "--level", str(level),
             "--input", str(featurised["table"]), "--out", str(out / f"chgnet-{level}.parquet")],
            capture_output=True, text=True, cwd=REPO, env=subprocess_env())
        assert result.returncode == 0, result.stderr
        rows = pd.read_parquet(out / f"chgnet-{level}.parquet").set_index("id")
        cache = featurised["caches"]["chgnet"][level]
        assert rows.loc["with_po", "error"].startswith("unsupported_element:")
        assert rows.loc["lone", "error"].startswith("isolated_atom:") and rows.loc["lone"].iloc[2:].isna().all()
        for crystal_id in featurised["ids"]:
            np.testing.assert_allclose(rows.loc[crystal_id].iloc[2:].to_numpy(dtype=float),
                                       _rows(cache, crystal_id).mean(0), atol=1e-5, rtol=0)
