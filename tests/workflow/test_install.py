"""A non-editable install (``pip install .``) works on its own: the schema, the atom features and the kernels'
sources ship inside the package, so the commands run from a folder outside the checkout."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
from conftest import REPO, shared


def _copy_checkout(dest: Path) -> Path:
    """The tracked files of the checkout (a build writes into its source tree; keep ours clean)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding a wheel build of the project; its dependencies are this one's.

    The dependencies come from this interpreter's site-packages through a ``.pth`` line (the project's own
    editable entry there is a ``.pth`` file too, which Python does not follow from an added path).
    """
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the checkout's files")
    pytest.importorskip("setuptools", reason="the wheel is built without isolation, with this environment's setuptools")
    root = tmp_path_factory.mktemp("install")
    checkout = _copy_checkout(root / "checkout")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(checkout)],
        check=True, env=env, cwd=root,
    )
    shutil.rmtree(checkout)  # nothing may read the sources from there
    return python


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_installed_package_is_imported_from_the_environment(installed: Path, tmp_path: Path) -> None:
    result = _run(installed, "-c", "import crystal_transfer; print(crystal_transfer.__file__)", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(installed.parent.parent) in result.stdout and str(REPO) not in result.stdout


def test_installed_schema_command_prints_the_schema(installed: Path, tmp_path: Path) -> None:
    result = _run(installed, "-m", "crystal_transfer", "schema", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert {"datasets", "graphs", "pretrain", "results_dir"} <= set(schema["properties"])


def test_installed_data_stage_builds_a_table_of_real_crystals(installed: Path, tmp_path: Path) -> None:
    archive = shared("mp2018", "structures.tar.gz")
    labels = shared("mp2018", "labels.csv")
    members, ids = [], []
    with tarfile.open(archive) as source, tarfile.open(tmp_path / "few.tar.gz", "w:gz") as few:
        for member in source:
            if member.isfile() and member.name.endswith(".cif"):
                few.addfile(member, source.extractfile(member))
                members.append(member.name)
                ids.append(Path(member.name).stem)
                if len(ids) == 5:
                    break
    with open(labels, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["material_id"] in ids]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["material_id", "band_gap"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    (tmp_path / "labels.csv").write_text(buffer.getvalue())
    spec = {
        "sources": [{
            "type": "local", "name": "few", "path": str(tmp_path / "few.tar.gz"),
            "labels": str(tmp_path / "labels.csv"), "id_column": "material_id", "columns": {"band_gap": "band_gap"},
        }],
        "filters": {"max_z": 80, "max_rejected_fraction": 0.5},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = _run(
        installed, "-m", "crystal_transfer", "data", "--dataset", "few", "--spec", "@spec.json", "--out", "out",
        "--workers", "1", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["read"] == 5 and summary["kept"] + summary["rejected"] == 5
    # the model's element features (package data) load from the installed package
    code = "from crystal_transfer.models.cgcnn import CGCNN; print(CGCNN(targets=['band_gap']).atom_table.shape)"
    check = _run(installed, "-c", code, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
