"""The contract every bad-input case asserts (issue #16), and the stage calls that the cases share.

A stage, called in-process as ``main([...])`` with its output captured, either

- returns 0 and accounts for every input record: kept in the table, or in ``rejected.csv`` with its id and a
  reason code (``read == kept + rejected``); ``predict``: one row per input crystal in input order, a finite
  prediction or an error message; or
- returns 2 with exactly one stderr line starting ``error:`` that names the file or crystal concerned.

Never an uncaught exception, a traceback on stderr, a hang, a silent drop or a non-finite prediction. Damage to
one record (one structure file, one label value) must not stop the run: there only exit 0 is right.
"""

from __future__ import annotations

import contextlib
import csv
import faulthandler
import functools
import io
import json
import math
import os
import pickle
import select
import signal
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from crystal_transfer.cli.main import main

CASE_SECONDS = 60
# generated cases per mutation kind, printed at the end of the session
COUNTS: dict[str, int] = {}


class CaseTimeout(BaseException):  # not an Exception: a stage's "except Exception" must not swallow it
    """A stage did not answer within CASE_SECONDS (a hang)."""


@contextmanager
def time_limit(seconds: int = 2 * CASE_SECONDS):
    def expire(signum, frame):
        raise CaseTimeout(f"no answer within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class CountReport:
    """A pytest plugin (registered by the first case) printing how many generated cases ran."""

    def pytest_terminal_summary(self, terminalreporter):
        if COUNTS:
            terminalreporter.write_line(
                f"robustness (issue #16): {sum(COUNTS.values())} generated cases over {len(COUNTS)} mutation kinds"
            )


def record(config, kind: str, count: int) -> None:
    if not config.pluginmanager.has_plugin("robustness-counts"):
        config.pluginmanager.register(CountReport(), "robustness-counts")
    COUNTS[kind] = count


# ---------------------------------------------------------------------------------------------------------------
# Calling a stage


@dataclass
class Outcome:
    argv: list[str]
    code: int | None
    out: str
    err: str
    exception: str | None  # the traceback of an exception main() let through
    crash: str | None = None  # the process died (a native crash) or hung

    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


def _in_process(argv: list[str]) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    code, exception = None, None
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.simplefilter("ignore")
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code if isinstance(exit_.code, int) else 2
        except BaseException:  # noqa: B036  the case reports it
            exception = traceback.format_exc()
    return Outcome(argv, code, out.getvalue(), err.getvalue(), exception)


def warm_up() -> None:
    """Import what the stages use once, in the test process, so that every forked call starts at once."""
    import pymatgen.core  # noqa: F401
    import pymatgen.io.cif  # noqa: F401
    import pymatgen.io.vasp  # noqa: F401
    import torch  # noqa: F401

    import crystal_transfer.data.stage  # noqa: F401
    import crystal_transfer.experiments.predict  # noqa: F401
    import crystal_transfer.experiments.pretrain  # noqa: F401
    import crystal_transfer.experiments.transfer  # noqa: F401
    import crystal_transfer.graphs.dataset  # noqa: F401
    import crystal_transfer.graphs.stage  # noqa: F401


def call(capsys, argv: list[str], seconds: int = CASE_SECONDS) -> Outcome:
    """``main(argv)`` in a forked copy of this process, its stdout and stderr captured.

    Forked, so that a stage that kills its process (a native crash: SIGFPE, SIGSEGV) or hangs is reported as
    a broken contract instead of ending the test session; the stage's files land on disk as usual. ``capsys``
    (pytest's, or None in module fixtures) only keeps the test's own output clean. An exception main() lets
    through is recorded, not raised; more than ``seconds`` is a hang (the copy is killed)."""
    argv = [str(a) for a in argv]
    if capsys is not None:
        capsys.readouterr()
    warm_up()
    crash_log = tempfile.TemporaryFile()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the copy: run the stage, send the outcome back, leave without any cleanup of pytest's
        try:
            os.close(read_end)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            faulthandler.enable(file=crash_log)
            import torch

            torch.set_num_threads(1)
            payload = pickle.dumps(_in_process(argv))
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
        finally:
            os._exit(0)
    os.close(write_end)
    chunks: list[bytes] = []
    deadline = time.monotonic() + seconds
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([read_end], [], [], remaining)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return Outcome(argv, None, "", "", None, crash=f"no answer within {seconds} s: a hang")
            chunk = os.read(read_end, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
    except BaseException:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise
    finally:
        os.close(read_end)
    if os.WIFSIGNALED(status) or not chunks:
        crash_log.seek(0)
        frames = [line.strip() for line in crash_log.read().decode(errors="replace").splitlines()
                  if line.strip().startswith("File ")]
        how = signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else f"exit {status}"
        where = frames[0] if frames else "?"
        return Outcome(argv, None, "", "", None, crash=f"the process died ({how}) [{where}]")
    return pickle.loads(b"".join(chunks))


def exception_head(text: str) -> str:
    """The exception line and the innermost frame of a traceback."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    frames = [line.strip() for line in lines if line.strip().startswith("File ")]
    return f"{lines[-1]} [{frames[-1] if frames else '?'}]"


def basic_problems(outcome: Outcome, names: Iterable[str], allow_exit_2: bool = True) -> list[str]:
    """What breaks the contract before any output is looked at; ``names``: what an error line may name."""
    names = [str(n) for n in names if n]
    if outcome.crash:
        return [outcome.crash]
    if outcome.exception:
        return [f"uncaught exception: {exception_head(outcome.exception)}"]
    problems = []
    if "Traceback (most recent call last)" in outcome.err:
        problems.append("a traceback on stderr")
    if outcome.code == 2:
        lines = outcome.error_lines()
        others = [line for line in outcome.err.splitlines() if line.strip() and not line.startswith("error:")]
        if not allow_exit_2:
            problems.append(f"exit 2 where one bad record must not stop the run: {lines[:1] or outcome.err[-300:]}")
        elif len(lines) != 1 or others:
            problems.append(f"exit 2 with {len(lines)} 'error:' lines and {len(others)} other lines on stderr: "
                            f"{outcome.err[:300]!r}")
        elif not any(name in lines[0] for name in names):
            problems.append(f"error line names none of {names}: {lines[0][:300]!r}")
    elif outcome.code != 0:
        problems.append(f"exit status {outcome.code}: {outcome.err[-300:]!r}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# The data stage on a local source


def local_spec(structures: Path, labels: Path, **filters) -> dict:
    return {
        "sources": [
            {
                "type": "local",
                "name": "mp",
                "path": str(structures),
                "labels": str(labels),
                "id_column": "material_id",
                "columns": {"band_gap": "band_gap"},
            }
        ],
        "filters": {"max_z": 80, "max_rejected_fraction": 1.0, **filters},
    }


def run_data(capsys, structures: Path, labels: Path, out: Path, **filters) -> Outcome:
    spec = json.dumps(local_spec(structures, labels, **filters))
    return call(capsys, ["data", "--dataset", "bad", "--spec", spec, "--out", out, "--workers", "1"])


def member_id(name: str) -> str:
    path = PurePosixPath(name)
    return path.stem if path.suffix else path.name


def table_ids(table: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(table, columns=["id"]).column("id").to_pylist()


def read_rejected(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def accounting_problems(
    out: Path,
    records: Counter[str],
    must_reject: dict[str, frozenset[str]] | None = None,
    must_keep: Iterable[str] = (),
    min_distance: float = 0.5,
) -> list[str]:
    """After exit 0: every input record (``records``: id -> how many records carry it) is kept or rejected with
    its id and reason; ``must_reject`` ids (-> acceptable reasons, empty: any) are not kept; kept crystals are
    physically possible."""
    must_reject = must_reject or {}
    problems: list[str] = []
    for name in ("crystals.parquet", "rejected.csv", "summary.json"):
        if not (out / name).is_file():
            return [f"exit 0 but no {name} in {out}"]
    summary = json.loads((out / "summary.json").read_text())
    kept = table_ids(out / "crystals.parquet")
    rejected = read_rejected(out / "rejected.csv")
    total = sum(records.values())
    if summary["read"] != summary["kept"] + summary["rejected"]:
        problems.append(f"summary: read {summary['read']} != kept {summary['kept']} + rejected {summary['rejected']}")
    if summary["kept"] != len(kept) or summary["rejected"] != len(rejected):
        problems.append(f"summary counts {summary['kept']}/{summary['rejected']} but files hold {len(kept)}/"
                        f"{len(rejected)}")
    if len(kept) + len(rejected) != total:
        problems.append(f"{total} input records but {len(kept)} kept + {len(rejected)} rejected")
    reasons: dict[str, list[str]] = {}
    for row in rejected:
        if not row.get("id") or not row.get("reason"):
            problems.append(f"rejected row without id or reason: {row}")
        reasons.setdefault(row.get("id", ""), []).append(row.get("reason", ""))
    for crystal_id in records:
        if crystal_id not in kept and crystal_id not in reasons:
            problems.append(f"silent drop: '{crystal_id}' is neither kept nor rejected")
    for crystal_id, allowed in must_reject.items():
        if crystal_id in kept:
            problems.append(f"'{crystal_id}' was kept; it must be rejected" + (f" ({'/'.join(allowed)})" if allowed
                                                                               else ""))
        elif allowed and crystal_id in reasons and not set(reasons[crystal_id]) & allowed:
            problems.append(f"'{crystal_id}' rejected as {reasons[crystal_id]}, expected {'/'.join(sorted(allowed))}")
    for crystal_id in must_keep:
        if crystal_id not in kept:
            problems.append(f"'{crystal_id}' is a sound crystal but was not kept ({reasons.get(crystal_id)})")
    problems += sanity_problems(out / "crystals.parquet", set(records) - set(must_keep), min_distance)
    return problems


def sanity_problems(table: Path, ids: set[str], min_distance: float) -> list[str]:
    """Kept crystals among ``ids`` must be physically possible: finite cell of positive volume, elements 1..80,
    no two atoms (periodic images included) closer than ``min_distance``."""
    import pyarrow.parquet as pq
    from pymatgen.core import Lattice, Structure

    problems = []
    for row in pq.read_table(table, columns=["id", "lattice", "numbers", "frac_coords"]).to_pylist():
        if row["id"] not in ids:
            continue
        lattice = np.reshape(row["lattice"], (3, 3))
        frac = np.reshape(row["frac_coords"], (-1, 3))
        if not (np.isfinite(lattice).all() and np.isfinite(frac).all()) or abs(np.linalg.det(lattice)) < 1e-3:
            problems.append(f"kept '{row['id']}' has a non-finite or flat cell: {lattice.ravel().tolist()}")
            continue
        if not all(1 <= z <= 80 for z in row["numbers"]) or len(row["numbers"]) != len(frac):
            problems.append(f"kept '{row['id']}' has atomic numbers {row['numbers']}")
            continue
        with np.errstate(all="ignore"):
            heights = 1.0 / np.linalg.norm(np.linalg.inv(lattice), axis=1)
        if min_distance > 0 and heights.min() < min_distance / 100:  # a sliver: pymatgen would search for ever
            problems.append(f"kept '{row['id']}' has lattice planes {heights.min():.3g} Å apart")
        elif min_distance > 0:
            try:
                structure = Structure(Lattice(lattice), row["numbers"], frac)
                _, _, _, distances = structure.get_neighbor_list(min_distance)
            except Exception as exc:  # noqa: BLE001  a kept crystal pymatgen cannot even search is not sound
                problems.append(f"kept '{row['id']}' defeats pymatgen's neighbour search: {type(exc).__name__}: {exc}")
                continue
            if len(distances):
                problems.append(f"kept '{row['id']}' has atoms {min(distances):.3g} Å apart (< {min_distance} Å)")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Graph shards


def shard_problems(graph_dir: Path, table: Path) -> list[str]:
    """After ``graphs build`` exit 0: every table row is in a shard or in the graph stage's rejected.csv, and
    every stored distance is finite, non-negative and within the crystal's radius."""
    from crystal_transfer.graphs.shards import map_arrays, read_header

    problems: list[str] = []
    if not (graph_dir / "manifest.json").is_file():
        return [f"exit 0 but no manifest.json in {graph_dir}"]
    manifest = json.loads((graph_dir / "manifest.json").read_text())
    rejected = {row["id"] for row in read_rejected(graph_dir / "rejected.csv")}
    built: set[str] = set()
    for entry in manifest["shards"]:
        path = graph_dir / entry["file"]
        header = read_header(path)
        arrays = map_arrays(path, header)
        ids = header["meta"]["ids"]
        built |= set(ids)
        ptr, dist, count, radius = arrays["atom_ptr"], arrays["nbr_dist"], arrays["nbr_count"], arrays["radius"]
        real = np.arange(dist.shape[1])[None, :] < count[:, None]
        for k, crystal_id in enumerate(ids):
            d = dist[ptr[k] : ptr[k + 1]][real[ptr[k] : ptr[k + 1]]]
            if not np.isfinite(d).all() or (d < 0).any() or (d > radius[k] + 1e-4).any():
                problems.append(f"graph of '{crystal_id}' holds distances {d.min():.3g}..{d.max():.3g} Å")
            elif (d < 1e-3).any():
                problems.append(f"graph of '{crystal_id}' holds an edge of length {d.min():.3g} Å (overlapping atoms)")
    for crystal_id in table_ids(table):
        if crystal_id not in built and crystal_id not in rejected:
            problems.append(f"graph stage dropped '{crystal_id}' silently")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# predict


def prediction_problems(out: Path, expected_ids: list[str], must_fail: set[str]) -> list[str]:
    """After ``predict`` exit 0: one row per input crystal, in input order; each a finite prediction with no
    error, or no prediction and an error message; ``must_fail`` ids get an error."""
    if not out.is_file():
        return [f"exit 0 but no {out}"]
    with open(out, newline="") as handle:
        rows = list(csv.reader(handle))
    rows = rows[1:]  # the header: id, one column per target, error
    problems = []
    ids = [row[0] for row in rows]
    if sorted(ids) != sorted(expected_ids):
        missing = sorted(set(expected_ids) - set(ids))
        problems.append(f"{len(rows)} rows for {len(expected_ids)} inputs; missing {missing[:6]}")
    elif ids != expected_ids:
        first = next(k for k, (a, b) in enumerate(zip(ids, expected_ids, strict=True)) if a != b)
        problems.append(f"rows not in input order: row {first} is '{ids[first]}', input {first} is "
                        f"'{expected_ids[first]}'")
    for row in rows:
        values, error = row[1:-1], row[-1]
        if error:
            if any(v.strip() for v in values):
                problems.append(f"'{row[0]}' has both a prediction {values} and an error {error!r}")
            continue
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            problems.append(f"'{row[0]}' has neither a prediction nor an error: {values}")
            continue
        if not all(math.isfinite(v) for v in numbers):
            problems.append(f"non-finite prediction for '{row[0]}': {values}")
        if row[0] in must_fail:
            problems.append(f"'{row[0]}' was predicted ({values}); it cannot be (must carry an error)")
    return problems


@functools.lru_cache(maxsize=1)
def pool(seed: int = 16, size: int = 64):
    from mutations import load_pool

    return load_pool(size, seed)
