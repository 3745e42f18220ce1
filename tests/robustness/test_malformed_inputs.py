"""Property-based (seeded generator) cases of issue #16: malformed structure files, label files and archives,
built from real mp2018 crystals, through the data stage, the graph stage and ``predict``.

One pytest case per mutation kind; each builds several mutants (different real crystals picked by a seeded
RNG) and runs them through the stage together with sound crystals, in one stage run. When a run breaks the
contract (:mod:`contract`), each mutant is run again alone, and the case's message says which ones break it
and how. ``CRYSTAL_TRANSFER_SHARED_DATA`` (default ``<repo>/../shared/data``) must hold ``mp2018``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from contract import (
    accounting_problems,
    basic_problems,
    call,
    member_id,
    pool,
    prediction_problems,
    read_rejected,
    record,
    run_data,
    shard_problems,
    time_limit,
)
from mutations import (
    ARCHIVE_KINDS,
    CIF_KINDS,
    LABEL_KINDS,
    MP2018,
    POSCAR_KINDS,
    STRUCTURE_KINDS,
    Crystal,
    Mutant,
    archive_cases,
    heavy_crystal,
    label_cases,
    mutants,
    tar_bytes,
)

pytestmark = pytest.mark.skipif(
    not (MP2018 / "structures.tar.gz").is_file(),
    reason=f"real data not found at {MP2018} (set CRYSTAL_TRANSFER_SHARED_DATA to the shared data folder)",
)

SEED = 16
PER_KIND = 10  # mutants per structure kind (each of another real crystal)
CLEAN = 4  # sound crystals beside them in each run


def pick(kind: str, count: int) -> list[Crystal]:
    crystals = pool()
    chosen = np.random.default_rng([SEED, 1, *kind.encode()]).choice(len(crystals), count, replace=False)
    return [crystals[i] for i in chosen]


def write_structures(folder: Path, made: list[Mutant], clean: list[Crystal]) -> list[str]:
    folder.mkdir(parents=True)
    for mutant in made:
        (folder / mutant.filename).write_bytes(mutant.payload)
    for crystal in clean:
        (folder / f"{crystal.id}.cif").write_text(crystal.cif)
    return [m.id for m in made] + [c.id for c in clean]


def write_labels(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("material_id,band_gap\n" + "".join(f"{i},{v}\n" for i, v in rows))
    return path


def data_case(capsys, root: Path, made: list[Mutant], clean: list[Crystal], **filters) -> list[str]:
    """Mutants and sound crystals as one local dataset through the data stage; what breaks the contract."""
    ids = write_structures(root / "structures", made, clean)
    gap = {c.id: c.band_gap for c in clean}
    labels = write_labels(root / "labels.csv", [(i, gap.get(i, "1.25")) for i in ids])
    outcome = run_data(capsys, root / "structures", labels, root / "out", **filters)
    names = [m.id for m in made]
    problems = basic_problems(outcome, names, allow_exit_2=False)
    if outcome.code == 0 and not problems:
        problems = accounting_problems(
            root / "out", Counter(ids), {m.id: m.reasons for m in made if m.must_reject}, [c.id for c in clean],
            min_distance=filters.get("min_distance", 0.5),
        )
    return problems


def diagnose(capsys, root: Path, made: list[Mutant], clean: list[Crystal], **filters) -> list[str]:
    """Each mutant alone with the sound crystals: which ones break the contract, and how."""
    lines = []
    for mutant in made:
        alone = data_case(capsys, root / mutant.id, [mutant], clean, **filters)
        lines.append(f"  {mutant.id} ({mutant.note}): {'; '.join(alone) if alone else 'fine alone'}")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Structure files through the data stage


@pytest.mark.parametrize("kind", sorted(STRUCTURE_KINDS))
def test_data_stage_accounts_for_damaged_structure_files(kind, tmp_path, capsys, request):
    crystals = pick(kind, PER_KIND + CLEAN)
    made, clean = mutants(kind, crystals[:PER_KIND], SEED), crystals[PER_KIND:]
    record(request.config, kind, len(made))
    with time_limit():
        problems = data_case(capsys, tmp_path / "all", made, clean)
        details = diagnose(capsys, tmp_path, made, clean) if problems else []
    assert not problems, f"{kind}: " + "; ".join(problems) + "\n" + "\n".join(details)


# ---------------------------------------------------------------------------------------------------------------
# Label files


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_data_stage_accounts_for_damaged_label_files(kind, tmp_path, capsys, request):
    crystals = pick(kind, 8)
    cases = label_cases(kind, crystals, SEED)
    record(request.config, kind, len(cases))
    ids = write_structures(tmp_path / "structures", [], crystals)
    failures = []
    with time_limit():
        for n, case in enumerate(cases):
            labels = tmp_path / f"labels-{n}.csv"
            labels.write_bytes(case.payload)
            outcome = run_data(capsys, tmp_path / "structures", labels, tmp_path / f"out-{n}")
            problems = basic_problems(outcome, [labels.name], allow_exit_2=case.fatal_ok)
            if outcome.code == 0 and not problems:
                records = Counter(ids)
                if case.extra_records:  # a duplicated id is two records
                    rows = case.payload.decode().splitlines()[1:]
                    records.update(i for i in ids for _ in range(sum(r.startswith(f"{i},") for r in rows) - 1))
                keep = ids if case.all_kept or case.extra_records else [i for i in ids if i not in case.bad_ids]
                if case.fatal_ok and not case.all_kept:
                    keep = []
                problems = accounting_problems(tmp_path / f"out-{n}", records, dict.fromkeys(case.bad_ids,
                                                                                            frozenset()), keep)
                if case.extra_records:
                    reasons = Counter(r["reason"] for r in read_rejected(tmp_path / f"out-{n}" / "rejected.csv"))
                    if reasons["duplicate_id"] != case.extra_records:
                        problems.append(f"{case.extra_records} duplicate rows but rejections {dict(reasons)}")
            if problems:
                failures.append(f"case {n} ({case.note}): " + "; ".join(problems))
    assert not failures, f"{kind}:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------------
# Archives


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_data_stage_accounts_for_damaged_archives(kind, tmp_path, capsys, request):
    crystals = pick(kind, 8)
    cases = archive_cases(kind, crystals, SEED)
    record(request.config, kind, len(cases))
    failures = []
    with time_limit():
        for n, case in enumerate(cases):
            archive = tmp_path / f"structures-{n}.tar.gz"
            data = tar_bytes(case.members)
            if case.truncate_at is not None:
                data = data[: int(len(data) * case.truncate_at)]
            archive.write_bytes(data)
            header_only = "labels header only" in case.note
            labels = write_labels(tmp_path / f"labels-{n}.csv", [] if header_only else
                                  [(c.id, c.band_gap) for c in crystals])
            outcome = run_data(capsys, archive, labels, tmp_path / f"out-{n}")
            fatal_ok = kind in ("archive_truncated", "archive_empty")
            problems = basic_problems(outcome, [archive.name, labels.name], allow_exit_2=fatal_ok)
            if outcome.code == 0 and not problems:
                records = Counter([] if header_only else [c.id for c in crystals])
                records.update(member_id(name) for name in case.bad)
                unsafe = frozenset({"unsafe_path"}) if kind != "archive_non_structure_member" else frozenset()
                keep = [] if fatal_ok else [c.id for c in crystals]
                problems = accounting_problems(
                    tmp_path / f"out-{n}", records, {member_id(b): unsafe for b in case.bad}, keep
                )
            for name in case.bad:
                escaped = (tmp_path / f"out-{n}" / name).resolve()
                if escaped.exists() and tmp_path not in escaped.parents:
                    problems.append(f"member {name} was written outside the output folder: {escaped}")
            if problems:
                failures.append(f"case {n} ({case.note}): " + "; ".join(problems))
    assert not failures, f"{kind}:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------------
# The graph stage after the data stage


GRAPH_KINDS = {
    # thin cells that pass the default min_distance (0.5 Å) reach the graph stage
    "graphs_thin_cell": ("poscar_thin_cell", {}),
    # with the distance check turned off, every thin cell reaches it
    "graphs_thin_cell_no_distance_check": ("poscar_thin_cell", {"min_distance": 0.0}),
}


@pytest.mark.parametrize("kind", sorted(GRAPH_KINDS))
def test_graph_stage_rejects_unusable_crystals_by_id(kind, tmp_path, capsys, request):
    structure_kind, filters = GRAPH_KINDS[kind]
    crystals = pick(kind, 12 + CLEAN)
    made, clean = mutants(structure_kind, crystals[:12], SEED + 1), crystals[12:]
    record(request.config, kind, len(made))
    with time_limit():
        problems = data_case(capsys, tmp_path, made, clean, **filters)
        if not problems:
            table = tmp_path / "out" / "crystals.parquet"
            outcome = call(capsys, ["graphs", "build", "--table", table, "--dataset", "bad", "--out",
                                    tmp_path / "graphs", "--shard-size", "4", "--workers", "1", "--settings", "{}"])
            problems = basic_problems(outcome, [m.id for m in made], allow_exit_2=False)
            if outcome.code == 0 and not problems:
                problems = shard_problems(tmp_path / "graphs", table)
    assert not problems, f"{kind}: " + "; ".join(problems) + "\n" + "\n".join(f"  {m.id}: {m.note}" for m in made)


# ---------------------------------------------------------------------------------------------------------------
# predict on folders and archives of damaged files


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A randomly initialised small CGCNN saved in the project's format (band gap, eV)."""
    import torch

    from crystal_transfer.models.cgcnn import CGCNN
    from crystal_transfer.models.saved import model_graph_settings, save_model
    from crystal_transfer.training.normalizer import Normalizer

    torch.manual_seed(0)
    model = CGCNN(targets=["band_gap"], atom_fea_len=16, n_conv=2, h_fea_len=16)
    folder = tmp_path_factory.mktemp("model") / "model"
    return save_model(folder, model, model_graph_settings(model, 8.0, 12, False),
                      {"band_gap": Normalizer(1.2, 1.5, "identity", "eV")})


def predict_mutants(kinds: list[str], per_kind: int, seed: int) -> tuple[list[Mutant], list[Crystal]]:
    crystals = pool()
    rng = np.random.default_rng([seed, 7])
    made: list[Mutant] = []
    for kind in kinds:
        chosen = [crystals[i] for i in rng.choice(len(crystals), per_kind, replace=False)]
        for mutant in mutants(kind, chosen, seed + len(made)):
            mutant.id = f"{kind}-{mutant.id}"
            made.append(mutant)
    clean = [crystals[i] for i in rng.choice(len(crystals), CLEAN, replace=False)]
    return made, clean


def predict_case(capsys, model: Path, source: Path, out: Path, expected: list[str], must_fail: set[str],
                 names: list[str], allow_exit_2: bool = False) -> list[str]:
    outcome = call(capsys, ["predict", "--model", model, "--input", source, "--out", out, "--workers", "1"])
    problems = basic_problems(outcome, names, allow_exit_2=allow_exit_2)
    if outcome.code == 0 and not problems:
        if allow_exit_2:
            problems.append("exit 0 on a damaged archive: the crystals after the damage are dropped silently")
        problems += prediction_problems(out, expected, must_fail)
    return problems


@pytest.mark.parametrize("kind", ["predict_cif_folder", "predict_poscar_folder"])
def test_predict_gives_every_input_crystal_a_row(kind, small_model, tmp_path, capsys, request):
    kinds = sorted(CIF_KINDS) if kind == "predict_cif_folder" else sorted(POSCAR_KINDS)
    made, clean = predict_mutants(kinds, 3 if kind == "predict_cif_folder" else 4, SEED)
    extra = [heavy_crystal(SEED)] if kind == "predict_cif_folder" else []  # Z > 80: predict has no max_z filter
    record(request.config, kind, len(made))
    ids = write_structures(tmp_path / "in", made, clean + extra)
    files = sorted(p for p in (tmp_path / "in").rglob("*") if p.is_file())
    expected = [member_id(p.name) for p in files]
    assert sorted(expected) == sorted(ids)
    must_fail = {m.id for m in made if m.must_reject}
    with time_limit():
        problems = predict_case(capsys, small_model, tmp_path / "in", tmp_path / "out.csv", expected, must_fail,
                                [m.id for m in made])
        details = []
        if problems:  # which mutants break it
            for mutant in made:
                folder = tmp_path / "alone" / mutant.id
                write_structures(folder, [mutant], clean[:1])
                order = [member_id(p.name) for p in sorted(folder.iterdir())]
                alone = predict_case(capsys, small_model, folder, folder.parent / f"{mutant.id}.csv", order,
                                     must_fail & {mutant.id}, [mutant.id])
                if alone:
                    details.append(f"  {mutant.id} ({mutant.note}): " + "; ".join(alone))
    assert not problems, f"{kind}: " + "; ".join(problems) + "\n" + "\n".join(details)


def test_predict_on_an_archive_of_damaged_members(small_model, tmp_path, capsys, request):
    made, clean = predict_mutants(["cif_dummy_element", "cif_duplicated_site", "poscar_thin_cell",
                                   "cif_garbage_bytes"], 2, SEED + 3)
    members = [(f"structures/{c.id}.cif", c.cif.encode()) for c in clean]
    members += [(f"structures/{m.filename}", m.payload) for m in made]
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(members))
    members = [members[i] for i in order]
    unsafe = ["../escape.cif", "structures/link.cif", "structures/README.txt"]
    members.insert(2, (unsafe[0], clean[0].cif.encode()))
    members.insert(5, (unsafe[1], None))
    members.insert(7, (unsafe[2], b"notes\n"))
    record(request.config, "predict_archive", len(made) + len(unsafe) + 1)
    expected = [member_id(name) for name, _ in members]
    must_fail = {m.id for m in made if m.must_reject} | {member_id(n) for n in unsafe}
    data = tar_bytes(members, link_target="../../etc/passwd")
    (tmp_path / "in.tar.gz").write_bytes(data)
    cut = int(len(data) * float(rng.uniform(0.3, 0.9)))
    (tmp_path / "cut.tar.gz").write_bytes(data[:cut])
    with time_limit():
        problems = predict_case(capsys, small_model, tmp_path / "in.tar.gz", tmp_path / "out.csv", expected,
                                must_fail, [m.id for m in made])
        problems += [f"truncated archive ({cut} of {len(data)} bytes): {p}" for p in predict_case(
            capsys, small_model, tmp_path / "cut.tar.gz", tmp_path / "cut.csv", expected, must_fail,
            ["cut.tar.gz"], allow_exit_2=True)]
    assert not problems, "predict_archive: " + "; ".join(problems)


def test_mutants_are_deterministic():
    """The same seed gives the same mutants byte for byte (a failing case reproduces from its name)."""
    crystals = pool()[:3]
    for kind in STRUCTURE_KINDS:
        first = [(m.id, m.payload) for m in mutants(kind, crystals, SEED)]
        assert first == [(m.id, m.payload) for m in mutants(kind, crystals, SEED)], kind
    assert json.dumps([c.id for c in pool()]) == json.dumps([c.id for c in pool.__wrapped__()])
