"""The SLURM profile: a dry run on a machine without SLURM (always), and a real single-node cluster
(tests/slurm/run_slurm_test.sh) when running as root on Debian and allowed by CRYSTAL_TRANSFER_SLURM_TEST=1
or CI=true."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
SLURM_TOOLS = ("sbatch", "squeue", "sacct", "scontrol", "sinfo", "srun")
GPU_RULES = {"pretrain_train", "frozen_features", "transfer", "transfer_finetune", "baseline", "curve_train",
             "universal_features_chgnet", "universal_features_sevenn"}
# one rule per universal potential a config names (workflow/rules/curves.smk); the profile sets the shipped ones
UNIVERSAL_RULE = 'f"universal_features_{_name}"'


def test_profile_requests_gpus_one_way_and_names_existing_rules() -> None:
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm"
    assert profile["slurm-status-command"] == "squeue"
    assert profile["slurm-requeue"] is True
    assert {"runtime", "mem_mb", "slurm_partition", "slurm_account"} <= set(profile["default-resources"])
    rules_text = "".join(path.read_text() for path in (REPO / "workflow" / "rules").glob("*.smk"))
    for rule, resources in profile["set-resources"].items():
        universal = rule.startswith("universal_features_") and UNIVERSAL_RULE in rules_text
        known = f"rule {rule}:" in rules_text or universal
        assert known, f"set-resources names an unknown rule {rule}"
        assert {"mem_mb", "runtime"} <= set(resources), rule
        assert "gres" not in resources and "gres" not in str(resources.get("slurm_extra", "")), rule
        assert bool(resources.get("gpu")) == (rule in GPU_RULES), rule
    assert set(profile["set-resources"]) >= {"data", "graph_shard"} | GPU_RULES


def test_profile_dry_run_without_slurm(tmp_path: Path) -> None:
    """`snakemake --workflow-profile profiles/slurm -n all` on a PATH without any SLURM command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    which = shutil.which("which")  # the executor plugin runs `which sacct` when it loads
    if which:
        (bin_dir / "which").symlink_to(which)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent)])
    assert not [tool for tool in SLURM_TOOLS if shutil.which(tool, path=path)]
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM")}
    env["PATH"] = path
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--workflow-profile", "profiles/slurm", "-n", "all",
         "--config", f"results_dir={tmp_path / 'results'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "This was a dry-run" in output
    for rule in ("data", "pretrain_train", "transfer", "baseline", "report"):
        assert f"rule {rule}:" in output, f"{rule} missing from the dry run"


def real_cluster_skip_reason() -> str | None:
    """Why the real-cluster test cannot or may not run here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (installs slurmctld, slurmd, slurm-client, munge and starts them)"
    if not Path("/etc/debian_version").is_file() or shutil.which("apt-get") is None:
        return "needs Debian with apt-get"
    if os.environ.get("CRYSTAL_TRANSFER_SLURM_TEST") != "1" and os.environ.get("CI") != "true":
        return "a real SLURM cluster on this machine: set CRYSTAL_TRANSFER_SLURM_TEST=1 (or CI=true) to run it"
    return None


@pytest.mark.slow
def test_real_slurm_cluster(tmp_path: Path) -> None:
    """The tiny config through the profile on a one-node cluster: resources, requeue/resume, results."""
    reason = real_cluster_skip_reason()
    if reason:
        pytest.skip(reason)
    bin_dir = Path(sys.executable).parent
    snakemake = bin_dir / "snakemake"
    env = dict(os.environ, PYTHON=sys.executable, SNAKEMAKE=str(snakemake) if snakemake.exists() else "snakemake")
    result = subprocess.run(
        ["bash", str(REPO / "tests" / "slurm" / "run_slurm_test.sh"), str(tmp_path / "slurm")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-12000:]
    assert "PASS" in output
