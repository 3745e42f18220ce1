"""Checks of a workflow run on a real SLURM cluster (called by run_slurm_test.sh; no sacct needed).

Evidence read:
- the plugin's ``sbatch call:`` lines in Snakemake's verbose log (what was asked for),
- ``scontrol show job -o`` of every submitted job, kept by slurmctld for MinJobAge (what SLURM recorded),
- the job logs and results of the SLURM run against a local run of the same config.

Usage: python check_slurm_run.py PROFILE SNAKEMAKE_LOG SCONTROL_DUMP SLURM_RESULTS LOCAL_RESULTS [REQUEUED]
"""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
import sys
from pathlib import Path

import yaml

# Rules that must never reach sbatch: downloads (localrules in the workflow).
LOCAL_RULES = {"fetch_matminer", "pretrain_published", "fetch_oqmd", "fetch_materials_project"}
# Resources the profile declares, as sbatch options of plugin 2.8.
# Float32 noise allowed between the SLURM and the local run (see same_number).
RELATIVE_TOLERANCE = 1e-4
RULE_COMMENT = re.compile(r"^rule_(?P<rule>[a-z_]+?)(?:_wildcards_(?P<wildcards>.*))?$")


def expected_resources(profile: dict, rule: str) -> dict[str, str]:
    """The sbatch options a rule's jobs must carry: default-resources overridden by set-resources."""
    resources = {**profile["default-resources"], **profile.get("set-resources", {}).get(rule, {})}
    expected = {
        "partition": str(resources["slurm_partition"]),
        "account": str(resources["slurm_account"]),
        "runtime": str(resources["runtime"]),
        "mem": str(resources["mem_mb"]),
    }
    if resources.get("gpu"):
        model = resources.get("gpu_model")
        expected["gpus"] = f"{model}:{resources['gpu']}" if model else str(resources["gpu"])
    return expected


def parse_sbatch(call: str) -> tuple[str, dict[str, str]]:
    """(rule, options) of one ``sbatch ...`` command line written by the plugin."""
    words = shlex.split(call.split(" --wrap=", 1)[0])
    options: dict[str, str] = {}
    flags = {"-p": "partition", "-A": "account", "-t": "runtime", "--mem": "mem", "--comment": "comment"}
    for index, word in enumerate(words):
        if word in flags:
            options[flags[word]] = words[index + 1]
        elif word.startswith("--gpus="):
            options["gpus"] = word.split("=", 1)[1]
        elif word.startswith("--gres="):
            options["gres"] = word.split("=", 1)[1]
    match = RULE_COMMENT.match(options.get("comment", ""))
    if not match:
        raise AssertionError(f"sbatch call without a rule comment: {call}")
    return match["rule"], options


def parse_scontrol(dump: str) -> dict[str, dict[str, str]]:
    """``scontrol show job -o`` records keyed by job id (one line a job, Key=Value fields)."""
    jobs = {}
    for line in dump.splitlines():
        fields = dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", line))
        if "JobId" in fields:
            jobs[fields["JobId"]] = fields
    return jobs


def check_submissions(profile: dict, log: str, scontrol: dict[str, dict[str, str]]) -> list[str]:
    """Every job went through sbatch with the profile's resources, and SLURM recorded the same."""
    calls = re.findall(r"sbatch call: (sbatch .*)", log)
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log))
    assert calls, "no 'sbatch call:' lines in the Snakemake log (was --verbose given?)"
    assert len(calls) == len(submitted), f"{len(calls)} sbatch calls but {len(submitted)} submissions"
    report = []
    per_rule: dict[str, int] = {}
    for call in calls:
        rule, options = parse_sbatch(call)
        assert rule not in LOCAL_RULES, f"local rule {rule} was submitted to SLURM: {call}"
        expected = expected_resources(profile, rule)
        got = {key: options.get(key) for key in expected}
        assert got == expected, f"rule {rule}: sbatch asked for {got}, the profile declares {expected}"
        assert "gres" not in options, f"rule {rule}: GPUs requested twice (--gres and --gpus): {call}"
        if profile.get("slurm-requeue"):
            assert " --requeue " in f"{call} ", f"rule {rule}: submitted without --requeue: {call}"
        if "gpus" not in expected:
            assert "gpus" not in options, f"rule {rule} is not a GPU rule but asked for {options['gpus']}"
        per_rule[rule] = per_rule.get(rule, 0) + 1
    for rule, count in sorted(per_rule.items()):
        expected = expected_resources(profile, rule)
        report.append(f"{rule}: {count} job(s), " + ", ".join(f"{k}={v}" for k, v in expected.items()))
    expected_rules = {"data", "graph_plan", "graph_shard", "graph_manifest", "split", "pretrain_train",
                      "frozen_features", "transfer", "baseline", "report"}
    assert expected_rules <= set(per_rule), f"rules never submitted: {sorted(expected_rules - set(per_rule))}"

    for slurm_id in submitted.values():
        job = scontrol.get(slurm_id)
        assert job, f"slurmctld has no record of job {slurm_id} (MinJobAge too short?)"
        assert job["JobState"] == "COMPLETED", f"job {slurm_id} ended {job['JobState']}"
        rule = RULE_COMMENT.match(job["Comment"])["rule"]
        expected = expected_resources(profile, rule)
        assert job["Partition"] == expected["partition"], f"job {slurm_id}: partition {job['Partition']}"
        assert job["Account"] == expected["account"], f"job {slurm_id}: account {job['Account']}"
        assert f"mem={expected['mem']}M" in job["TRES"], f"job {slurm_id}: TRES {job['TRES']}"
        minutes = int(expected["runtime"])
        assert job["TimeLimit"] == f"{minutes // 60:02d}:{minutes % 60:02d}:00", f"job {slurm_id}: {job['TimeLimit']}"
        gpus = job.get("TresPerJob", "")
        if "gpus" in expected:
            assert gpus == f"gres:gpu:{expected['gpus']}", f"job {slurm_id} ({rule}): TresPerJob {gpus!r}"
        else:
            assert "gpu" not in gpus, f"job {slurm_id} ({rule}) asked for a GPU: {gpus}"
    report.append(f"{len(submitted)} SLURM jobs, all COMPLETED with the declared partition/account/mem/time/GPUs")
    return report


def same_number(a: str | float, b: str | float) -> bool:
    """Equal, or equal within float32 noise: pretrain_train runs on 2 threads, whose reductions are not
    bit-reproducible between any two runs (local ones included), and the transfers from its models inherit
    differences of ~1e-6; single-threaded jobs (published sources, baseline) come out bit-identical."""
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-9)
    except ValueError:
        return False


def check_results(slurm: Path, local: Path) -> list[str]:
    """Report tables and every run's test MAE equal those of the local run (see same_number)."""
    tables = sorted(p.name for p in (local / "report").glob("*.csv"))
    assert tables, f"no report tables under {local / 'report'}"
    for name in tables:
        ours = list(csv.reader((slurm / "report" / name).read_text().splitlines()))
        theirs = list(csv.reader((local / "report" / name).read_text().splitlines()))
        assert len(ours) == len(theirs), f"report/{name}: {len(ours)} rows, the local run has {len(theirs)}"
        for row, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert len(a) == len(b) and all(map(same_number, a, b)), f"report/{name} row {row}: {a} != {b}"
    runs = sorted((local / "transfer").glob("*/*/depth*/seed*/test.json"))
    identical = 0
    for path in runs:
        relative = path.relative_to(local)
        ours, theirs = json.loads((slurm / relative).read_text()), json.loads(path.read_text())
        assert same_number(ours["test_mae"], theirs["test_mae"]), (
            f"{relative}: {ours['test_mae']} != {theirs['test_mae']}")
        identical += ours["test_mae"] == theirs["test_mae"]
    return [f"report tables {', '.join(tables)} and {len(runs)} test MAEs equal the local run's "
            f"({identical} bit-identical, the rest within a relative {RELATIVE_TOLERANCE:g})"]


def check_requeue(requeued: Path, scontrol: dict[str, dict[str, str]], slurm: Path) -> list[str]:
    """The job requeued mid-training restarted once and resumed from its checkpoint."""
    slurm_id, rule, out_dir, log_file = requeued.read_text().split()
    job = scontrol[slurm_id]
    assert int(job["Restarts"]) >= 1, f"job {slurm_id} shows Restarts={job['Restarts']}"
    log = Path(log_file).read_text()
    resumed = re.search(r"resuming from (\S+): epoch (\d+) of (\d+) done", log)
    assert resumed, f"{log_file} shows no resume from a checkpoint:\n{log}"
    assert Path(resumed[1]).parent == Path(out_dir), f"resumed from {resumed[1]}, not from {out_dir}"
    assert int(resumed[2]) >= 1, "resumed with no epoch done"
    assert (Path(out_dir) / "test.json").is_file()
    return [f"{rule} job {slurm_id} requeued mid-training, Restarts={job['Restarts']}, "
            f"resumed at epoch {resumed[2]} of {resumed[3]} from {resumed[1]}"]


def main(argv: list[str]) -> int:
    profile_path, log_path, dump_path, slurm_results, local_results = argv[:5]
    profile = yaml.safe_load(Path(profile_path).read_text())
    scontrol = parse_scontrol(Path(dump_path).read_text())
    lines = check_submissions(profile, Path(log_path).read_text(), scontrol)
    lines += check_results(Path(slurm_results), Path(local_results))
    if len(argv) > 5:
        lines += check_requeue(Path(argv[5]), scontrol, Path(slurm_results))
    print("\n".join(f"ok: {line}" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
