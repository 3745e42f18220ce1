"""Seeded cases of issue #16 for damaged files the pipeline wrote or reads besides crystals: graph shard bytes,
config files and training specs, a truncated ``last.pt``.

The graph folder, split and a one-epoch training run are built once, from 12 real mp2018 crystals; every case
damages a copy. A damaged shard must be refused (exit 2, one line naming the file) when the manifest step
checks it, when a training stage loads the graphs, and after another shard was rebuilt: the manifest never
blesses a file it did not build. A truncated ``last.pt`` is set aside and the job starts afresh.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from contract import basic_problems, call, pool, record, run_data, time_limit
from mutations import CONFIG_KINDS, MP2018, SHARD_KINDS, config_cases, damage_shard

pytestmark = pytest.mark.skipif(
    not (MP2018 / "structures.tar.gz").is_file(),
    reason=f"real data not found at {MP2018} (set CRYSTAL_TRANSFER_SHARED_DATA to the shared data folder)",
)

SEED = 16
SHARD_SIZE = 4
TRAIN = {"epochs": 1, "batch_size": 4, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "device": "cpu"}
ARCH = {"atom_fea_len": 8, "n_conv": 1, "h_fea_len": 8, "n_h": 1}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """12 real crystals: structures and labels, the data stage's table, graphs in 3 shards, a 6/3/3 split."""
    capsys = None  # module scope: call() captures the output itself
    crystals = pool()[-12:]
    root = tmp_path_factory.mktemp("base")
    (root / "structures").mkdir()
    for crystal in crystals:
        (root / "structures" / f"{crystal.id}.cif").write_text(crystal.cif)
    labels = root / "labels.csv"
    labels.write_text("material_id,band_gap\n" + "".join(f"{c.id},{c.band_gap}\n" for c in crystals))
    outcome = run_data(capsys, root / "structures", labels, root / "data")
    assert outcome.code == 0, outcome
    table = root / "data" / "crystals.parquet"
    outcome = call(capsys, ["graphs", "build", "--table", table, "--dataset", "base", "--out", root / "graphs",
                            "--shard-size", SHARD_SIZE, "--workers", "1", "--settings", "{}"])
    if outcome.code != 0:
        pytest.fail(f"the sound graphs do not build: {outcome}")
    ids = [c.id for c in crystals]
    parts = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    (root / "split.csv").write_text("id,split\n" + "".join(f"{i},{p}\n" for i, p in zip(ids, parts, strict=True)))
    return {"root": root, "structures": root / "structures", "labels": labels, "table": table,
            "graphs": root / "graphs", "split": root / "split.csv"}


def transfer_argv(base: dict[str, Path], graphs: Path, out: Path, spec: dict | None = None) -> list:
    spec = spec if spec is not None else {"train": TRAIN, "architecture": ARCH}
    return ["transfer", "--name", "scratch", "--mode", "scratch", "--seed", "0", "--target", "band_gap",
            "--graphs", graphs, "--table", base["table"], "--split", base["split"], "--spec", json.dumps(spec),
            "--out", out]


# ---------------------------------------------------------------------------------------------------------------
# Graph shard bytes


def refused(outcome, name: str, step: str) -> list[str]:
    """The step must exit 2 naming the damaged shard ``name``."""
    if outcome.code == 0 and not outcome.exception:
        return [f"{step}: exit 0, the damaged {name} was accepted"]
    return [f"{step}: {p}" for p in basic_problems(outcome, [name])]


@pytest.mark.parametrize("kind", SHARD_KINDS)
def test_damaged_shard_is_refused_by_every_reader(kind, base, tmp_path, capsys, request):
    rng = np.random.default_rng([SEED, *kind.encode()])
    from crystal_transfer.graphs.shards import read_header

    shards = sorted(p.name for p in base["graphs"].glob("shard-*.cgs"))
    cases = 3
    record(request.config, kind, cases)
    failures = []
    with time_limit():
        for n in range(cases):
            graphs = tmp_path / f"graphs-{n}"
            shutil.copytree(base["graphs"], graphs)
            index = n % len(shards)
            name = shards[index]
            path = graphs / name
            damaged, note = damage_shard(kind, path.read_bytes(), read_header(path), rng)
            path.write_bytes(damaged)
            problems = refused(call(capsys, transfer_argv(base, graphs, tmp_path / f"run-{n}")), name, "training load")
            problems += refused(call(capsys, ["graphs", "manifest", "--plan", graphs / "plan.json"]), name,
                                "graphs manifest")
            problems += refused(call(capsys, transfer_argv(base, graphs, tmp_path / f"run-{n}b")), name,
                                "training load after the manifest step")
            other = (index + 1) % len(shards)
            rebuild = call(capsys, ["graphs", "build", "--table", base["table"], "--dataset", "base", "--out", graphs,
                                    "--shard-size", SHARD_SIZE, "--workers", "1", "--settings", "{}",
                                    "--shards", other])
            problems += [f"rebuild of shard {other}: {p}" for p in basic_problems(rebuild, [name])]
            problems += refused(call(capsys, transfer_argv(base, graphs, tmp_path / f"run-{n}c")), name,
                                f"training load after a rebuild of shard {other}")
            if path.read_bytes() != damaged:
                problems.append(f"{name} was rewritten by a rebuild of shard {other} only")
            if problems:
                failures.append(f"case {n} ({name}: {note}):\n    " + "\n    ".join(problems))
    assert not failures, f"{kind}:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------------
# Config files and training specs


BARE_KEY = re.compile(r"^error: '?[\w.]+'?$")


def named_problems(outcome, words: list[str]) -> list[str]:
    """Exit 2, one 'error:' line containing every word of ``words``, not a bare key."""
    if outcome.code == 0 and not outcome.exception:
        return ["exit 0: the invalid input was accepted"]
    problems = basic_problems(outcome, words[:1])
    if not problems:
        line = outcome.error_lines()[0]
        missing = [w for w in words if w not in line]
        if missing:
            problems.append(f"error line does not name {missing}: {line[:300]!r}")
        if BARE_KEY.match(line.strip()):
            problems.append(f"error line is a bare key: {line!r}")
    return problems


SPEC_CASES = [  # training specs given on the command line (JSON), each missing a required key
    (["pretrain", "--name", "fe", "--spec", "{}"], ["kind"]),
    (["pretrain", "--name", "fe", "--spec", '{"kind": "published"}'], ["checkpoint"]),
    (["pretrain", "--name", "fe", "--spec", '{"kind": "train", "dataset": "base"}'], ["targets"]),
]


@pytest.mark.parametrize("kind", CONFIG_KINDS)
def test_invalid_config_is_refused_in_one_line(kind, base, tmp_path, capsys, request):
    cases = config_cases(kind, base["structures"], base["labels"])
    specs = SPEC_CASES if kind == "config_missing_key" else []
    record(request.config, kind, len(cases) + len(specs))
    failures = []
    with time_limit():
        for n, case in enumerate(cases):
            config = tmp_path / f"config-{n}.yaml"
            config.write_text(case.text)
            outcome = call(capsys, ["data", "--config", config, "--dataset", "bad", "--out", tmp_path / f"out-{n}"])
            words = ([config.name] if kind == "config_yaml_syntax" else []) + case.must_name
            problems = named_problems(outcome, words)
            if problems:
                failures.append(f"case {n} ({case.note}): " + "; ".join(problems))
        for n, (argv, words) in enumerate(specs):
            extra = ["--table", base["table"], "--graphs", base["graphs"]] if "train" in argv[-1] else []
            outcome = call(capsys, [*argv, *extra, "--out", tmp_path / f"spec-{n}"])
            problems = named_problems(outcome, words)
            if problems:
                failures.append(f"spec {argv[-1]}: " + "; ".join(problems))
        if kind == "config_unknown_key":  # a misspelt section of the transfer spec (both sections are optional)
            spec = {"architecture": ARCH, "trian": {"epochs": 1}}
            outcome = call(capsys, transfer_argv(base, base["graphs"], tmp_path / "misspelt", spec=spec))
            problems = named_problems(outcome, ["trian"])
            if problems:
                failures.append("transfer spec with 'trian': " + "; ".join(problems))
    assert not failures, f"{kind}:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------------
# A truncated last.pt


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory) -> Path:
    """A finished one-epoch training run (holds last.pt, best.pt, model/)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    outcome = call(None, transfer_argv(base, base["graphs"], out))
    if outcome.code != 0 or not (out / "last.pt").is_file():
        pytest.fail(f"the sound training run fails: {outcome}")
    return out


def test_truncated_checkpoint_is_set_aside_and_the_job_starts_afresh(base, trained, tmp_path, capsys, request):
    import torch

    rng = np.random.default_rng([SEED, 11])
    record(request.config, "checkpoint_truncated_last_pt", 3)
    failures = []
    with time_limit():
        for n, fraction in enumerate([0.0, float(rng.uniform(0.05, 0.5)), float(rng.uniform(0.5, 0.99))]):
            out = tmp_path / f"run-{n}"
            shutil.copytree(trained, out)
            whole = (out / "last.pt").read_bytes()
            damaged = whole[: int(len(whole) * fraction)]
            (out / "last.pt").write_bytes(damaged)
            (out / "test.json").unlink()
            outcome = call(capsys, transfer_argv(base, base["graphs"], out))
            problems = basic_problems(outcome, ["last.pt"], allow_exit_2=False)
            if not problems:
                kept_aside = [p for p in out.rglob("*") if p.is_file() and p.name != "last.pt"
                              and p.read_bytes() == damaged]
                if not kept_aside:
                    problems.append("the damaged last.pt was not kept aside")
                if "last.pt" not in outcome.out + outcome.err:
                    problems.append("nothing said about the damaged last.pt")
                if not (out / "test.json").is_file():
                    problems.append("the job did not finish (no test.json)")
                try:
                    torch.load(out / "last.pt", weights_only=True)
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"last.pt is still unreadable after the rerun: {exc}")
                again = call(capsys, transfer_argv(base, base["graphs"], out))
                problems += [f"second rerun: {p}" for p in basic_problems(again, ["last.pt"], allow_exit_2=False)]
            if problems:
                failures.append(f"case {n} (cut at {fraction:.0%} of {len(whole)} bytes): " + "; ".join(problems))
    assert not failures, "checkpoint_truncated_last_pt:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------------
# A damaged saved model, graphs of another radius, a target that is not a label


def _set_card(model: Path, edit) -> None:
    card = json.loads((model / "model.json").read_text())
    edit(card)
    (model / "model.json").write_text(json.dumps(card))


def _update_sha(card: dict, model: Path) -> None:
    from crystal_transfer.atomic import sha256_file

    card["weights_sha256"] = sha256_file(model / "weights.pt")


def test_damaged_saved_model_is_refused_in_one_line(base, trained, tmp_path, capsys, request):
    import datetime

    import torch

    rng = np.random.default_rng([SEED, 12])
    cases = ["weights truncated (checksum updated)", "weights hold a pickled object (checksum updated)",
             "weights byte flipped (checksum not updated)", "model.json not JSON", "model.json without architecture",
             "model.json with an unknown init argument"]
    record(request.config, "model_damaged", len(cases))
    failures = []
    with time_limit():
        for n, note in enumerate(cases):
            model = tmp_path / f"model-{n}"
            shutil.copytree(trained / "model", model)
            weights = model / "weights.pt"
            if n == 0:
                data = weights.read_bytes()
                weights.write_bytes(data[: int(len(data) * rng.uniform(0.1, 0.9))])
                _set_card(model, lambda card, model=model: _update_sha(card, model))
            elif n == 1:
                torch.save({"embedding.weight": datetime.datetime(2018, 1, 1)}, weights)
                _set_card(model, lambda card, model=model: _update_sha(card, model))
            elif n == 2:
                data = bytearray(weights.read_bytes())
                data[int(rng.integers(len(data)))] ^= 0x01
                weights.write_bytes(bytes(data))
            elif n == 3:
                (model / "model.json").write_bytes(b"{\"format\": \"crystal_transfer.models.saved\", \xff")
            elif n == 4:
                _set_card(model, lambda card: card.pop("architecture"))
            else:
                _set_card(model, lambda card: card["architecture"]["init_args"].update(n_convolutions=3))
            outcome = call(capsys, ["predict", "--model", model, "--input", base["structures"], "--out",
                                    tmp_path / f"out-{n}.csv"])
            problems = refused(outcome, model.name, "predict")
            if "weights_only=False" in outcome.err.replace(" ", "") or "weights_only` set to `False" in outcome.err:
                problems.append("the message suggests loading with weights_only=False")
            if problems:
                failures.append(f"case {n} ({note}): " + "; ".join(problems))
    assert not failures, "model_damaged:\n" + "\n".join(failures)


@pytest.mark.parametrize("radius", [6.0, 5.0])
def test_graphs_of_another_radius_train_or_are_refused_before_training(radius, base, tmp_path, capsys, request):
    record(request.config, "settings_graph_radius", 2)
    with time_limit():
        graphs = tmp_path / "graphs"
        settings = json.dumps({"radius": radius})
        built = call(capsys, ["graphs", "build", "--table", base["table"], "--dataset", "base", "--out", graphs,
                              "--shard-size", SHARD_SIZE, "--workers", "1", "--settings", settings])
        assert built.code == 0, built
        outcome = call(capsys, transfer_argv(base, graphs, tmp_path / "run"))
    problems = basic_problems(outcome, ["radius"])
    if outcome.code == 0 and not problems:
        card = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
        if card["graph_settings"]["radius"] != radius:
            problems.append(f"saved model records radius {card['graph_settings']['radius']}, graphs use {radius}")
    elif outcome.code == 2 and (tmp_path / "run" / "metrics.csv").exists():
        problems.append("refused only after training (metrics.csv written)")
    assert not problems, f"settings_graph_radius {radius}: " + "; ".join(problems)


def test_target_that_is_not_a_label_is_refused_in_one_line(base, tmp_path, capsys, request):
    targets = ["no_such_label", "formula", "band_gap (eV)"]
    record(request.config, "training_bad_target", len(targets))
    failures = []
    with time_limit():
        for target in targets:
            argv = transfer_argv(base, base["graphs"], tmp_path / target)
            argv[argv.index("--target") + 1] = target
            problems = named_problems(call(capsys, argv), [target])
            if problems:
                failures.append(f"--target {target}: " + "; ".join(problems))
    assert not failures, "training_bad_target:\n" + "\n".join(failures)
