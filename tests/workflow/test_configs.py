"""The shipped configs, the conda environment and the package's declared dependencies."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from crystal_transfer.config import load_config

SHIPPED = [REPO / "config.yaml", *sorted((REPO / "configs").glob("*.yaml"))]
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "mp_api": "mp-api", "torch": "torch"}
# conda-forge names, where they differ from PyPI's
CONDA = {"torch": "pytorch"}


def _third_party_imports() -> set[str]:
    modules = set()
    for path in (REPO / "src" / "crystal_transfer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "crystal_transfer"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r.strip(), maxsplit=1)[0].lower() for r in requirements if isinstance(r, str)}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    config = load_config(path)
    assert config["results_dir"].startswith("results/"), path


def test_each_shipped_config_writes_a_results_folder_of_its_own() -> None:
    folders = {path.name: load_config(path)["results_dir"] for path in SHIPPED}
    assert len(set(folders.values())) == len(folders), folders
    for a in folders.values():  # no folder inside another
        assert not any(b != a and b.startswith(a.rstrip("/") + "/") for b in folders.values()), folders


def test_pyproject_declares_every_import() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _names(project["dependencies"])
    missing = {m for m in _third_party_imports() if DISTRIBUTIONS.get(m, m).lower() not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def test_conda_environment_parses_and_names_every_import() -> None:
    env = yaml.safe_load((REPO / "envs" / "pipeline.yaml").read_text())
    pip = next((d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d), [])
    assert any("../" in line for line in pip), "the environment installs the project itself"
    declared = _names(env["dependencies"]) | _names(pip)  # conda packages and those only on PyPI
    wanted = {CONDA.get(m, DISTRIBUTIONS.get(m, m)).lower() for m in _third_party_imports()}
    assert not wanted - declared, f"imported but not in envs/pipeline.yaml: {sorted(wanted - declared)}"


def test_transfer_targets_plan_every_run_and_refuse_what_cannot_work() -> None:
    """configs/mp2018.yaml's transfer plan: band gap first (the study: five CGCNN sources frozen at 3 depths, 5
    seeds, with fine-tuning and AtomSets beside), then five targets by all three modes, the universal potentials by
    AtomSets only, and no CGCNN source on a target whose labels it was pretrained on; the single-target
    form still gives one target; and a config naming what cannot work is refused with the key named."""
    import copy

    from crystal_transfer.errors import InputError
    from crystal_transfer.experiments.matrix import all_runs, runs, targets

    config = load_config(REPO / "configs" / "mp2018.yaml")
    planned = targets(config)
    assert [t.split for t in planned] == ["band_gap", "fermi_energy", "total_energy", "bulk_modulus",
                                          "shear_modulus", "experimental_enthalpy"]
    assert planned[0].modes == ("freeze", "finetune", "atomsets") and planned[0].label == "band_gap"
    study = runs(config, planned[0])
    assert len([r for r in study if r.mode == "freeze"]) == 5 * 3 * 5
    assert len(study) == 5 * 3 * 5 + 5 * 5 + 7 * 5 + 5
    trained_on = {"total_energy": "energy_per_atom", "bulk_modulus": "K_VRH", "shear_modulus": "G_VRH"}
    for target in planned[1:]:
        for source in target.sources:
            spec = config["pretrain"][source]
            assert trained_on.get(target.split) not in spec.get("targets", []), (source, target.split)
            assert spec.get("role") not in ("bulk_modulus", "shear_modulus", "combined"), (source, target.split)
    moduli = runs(config, planned[3])
    assert {(r.source, r.mode) for r in moduli if r.source in ("chgnet", "sevenn")} == {
        ("chgnet", "atomsets"), ("sevenn", "atomsets")}
    assert len(moduli) == 2 * (3 + 1 + 1) * 3 + 2 * 3 + 3
    assert planned[5].dataset == "oqmd1505" and planned[5].train == {"layer_lr_decay": 0.5}
    # the moduli are learned on log10 GPa unless a target's transform says otherwise
    assert [t.transform for t in planned] == ["identity"] * 3 + ["log10"] * 2 + ["identity"]
    linear = copy.deepcopy(config)
    linear["transfer"]["targets"][3]["transform"] = "identity"
    assert targets(linear)[3].transform == "identity"
    paths = [r.test_json("R") for r in all_runs(config)]
    assert len(paths) == len(set(paths))
    assert "R/transfer/bulk_modulus/sevenn/atomsets-level5/seed2/test.json" in paths
    assert "R/transfer/bulk_modulus/formation_energy_7042/finetune/seed0/test.json" in paths
    assert "R/transfer/band_gap/chgnet/atomsets-level4/seed4/test.json" in paths

    single = load_config(REPO / "configs" / "paper.yaml")
    assert [(t.split, t.modes) for t in targets(single)] == [("band_gap", ("freeze",))]
    cases = [
        (lambda c: c["transfer"].update(split="band_gap"), "give either split \\(one target\\) or targets"),
        (lambda c: c["transfer"]["targets"].append({"split": "nope"}), "split 'nope' is not a plan under splits"),
        (lambda c: c["transfer"]["targets"].append({"split": "band_gap"}), "split 'band_gap' is listed twice"),
        (lambda c: c["transfer"]["targets"][0].update(sources=["mace"]), "source 'mace' is not a model"),
        (lambda c: c["transfer"]["targets"][1].update(modes=["freeze"]), "sevenn|chgnet .* is a universal potential"),
    ]
    for change, message in cases:
        broken = copy.deepcopy(config)
        change(broken)
        with pytest.raises(InputError, match=message):
            targets(broken)
