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
