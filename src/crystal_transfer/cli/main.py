"""Command line: ``python -m crystal_transfer <stage> ...``. Each Snakemake rule calls one of these.

Errors the user can act on (bad config, unreadable input, too many rejections) end the command with a
one-line message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from crystal_transfer.config import ConfigError, load_config, load_schema

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError,)


def _user_errors() -> tuple[type[Exception], ...]:
    from crystal_transfer.data.sources import SourceError
    from crystal_transfer.data.split import SplitError
    from crystal_transfer.data.table import DataStageError
    from crystal_transfer.graphs.shards import ShardFormatError
    from crystal_transfer.graphs.stage import GraphStageError
    from crystal_transfer.models.saved import GraphSettingsMismatch

    return USER_ERRORS + (
        DataStageError,
        GraphStageError,
        ShardFormatError,
        SourceError,
        SplitError,
        FileNotFoundError,
        GraphSettingsMismatch,
        ValueError,
        KeyError,
    )


def dataset_spec(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The part of a validated config that the data stage of dataset ``name`` depends on."""
    if name not in config["datasets"]:
        raise ConfigError(f"dataset '{name}' is not in the config (datasets: {', '.join(config['datasets'])})")
    spec = json.loads(json.dumps(config["datasets"][name]))
    downloads = Path(config["results_dir"]) / "downloads"
    for source in spec["sources"]:
        if source["type"] == "matminer_legacy":
            source.setdefault("archive", str(downloads / f"matminer-{source['version']}.tar.gz"))
        set_remote_paths(source, str(downloads), name)
    spec["filters"] = config["filters"]
    return spec


# source type -> the remote services it reads (config section, manifest suffix, default cache folder)
REMOTE_PARTS: dict[str, list[tuple[str, str, str]]] = {
    "oqmd": [("oqmd", "oqmd", "oqmd")],
    "materials_project": [("materials_project", "mp", "materials_project")],
    "oqmd_mp": [("oqmd", "oqmd", "oqmd"), ("materials_project", "mp", "materials_project")],
}


def set_remote_paths(source: dict[str, Any], downloads: str, dataset: str) -> None:
    """Fill in a remote source's cache folders and fetch manifests under ``downloads`` (in place).

    Manifests: ``<downloads>/<dataset>/<source name>.{oqmd,mp}.json``; caches: ``<downloads>/oqmd`` and
    ``<downloads>/materials_project`` unless the config names a ``cache_dir``.
    """
    for section, suffix, cache in REMOTE_PARTS.get(source["type"], []):
        part = source.setdefault(section, {})
        if not part.get("cache_dir"):
            part["cache_dir"] = f"{downloads}/{cache}"
        if not part.get("manifest"):
            part["manifest"] = f"{downloads}/{dataset}/{source.get('name', source['type'])}.{suffix}.json"


def _validate_spec(spec: dict[str, Any]) -> dict[str, Any]:
    from crystal_transfer.config import validate_config

    filters = spec.pop("filters", {})
    config = validate_config({"datasets": {"spec": spec}, "splits": {}, "filters": filters})
    checked = config["datasets"]["spec"]
    checked["filters"] = config["filters"]
    return checked


def _cmd_fetch_matminer(args: argparse.Namespace) -> int:
    from crystal_transfer.data.sources.matminer_legacy import fetch_archive

    out = Path(args.out)
    path = fetch_archive(out.parent, version=args.version, sha256=args.sha256)
    if path != out:
        path.replace(out)
    print(f"matminer {args.version} source archive ready: {out} (sha256 verified)")
    return 0


def _validate_source(spec: dict[str, Any]) -> dict[str, Any]:
    from crystal_transfer.config import validate_config

    config = validate_config({"datasets": {"spec": {"sources": [spec]}}, "splits": {}})
    return config["datasets"]["spec"]["sources"][0]


def _read_spec(text: str) -> dict[str, Any]:
    return json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)


def fetch_remote(source: dict[str, Any], parts: tuple[str, ...] = ("oqmd", "mp"), log=print) -> None:
    """Fetch what a remote source needs (OQMD pages, then MP documents), skipping parts already fetched.

    The Materials Project key is checked before anything is fetched.
    """
    from crystal_transfer.data.sources.materials_project import (
        api_key_from_env,
        fetch_materials_project,
        mp_manifest_is_current,
    )
    from crystal_transfer.data.sources.oqmd import fetch_oqmd, oqmd_manifest_is_current
    from crystal_transfer.data.sources.oqmd_mp import oqmd_formulas

    kinds = [suffix for _, suffix, _ in REMOTE_PARTS.get(source["type"], []) if suffix in parts]
    if "mp" in kinds and not Path(source["materials_project"]["manifest"]).is_file():
        api_key_from_env()  # fails before any request when the key is missing or malformed
    if "oqmd" in kinds and not oqmd_manifest_is_current(source["oqmd"]):
        fetch_oqmd(source["oqmd"], source["oqmd"]["manifest"], log=log)
    if "mp" in kinds:
        formulas = oqmd_formulas(source["oqmd"]) if source["type"] == "oqmd_mp" else []
        if not mp_manifest_is_current(source["materials_project"], formulas):
            manifest = source["materials_project"]["manifest"]
            fetch_materials_project(source["materials_project"], manifest, formulas=formulas, log=log)


def _cmd_fetch_remote(args: argparse.Namespace) -> int:
    source = _validate_source(_read_spec(args.spec))
    if source["type"] not in REMOTE_PARTS:
        raise ConfigError(f"source type '{source['type']}' is not a remote source ({', '.join(REMOTE_PARTS)})")
    part = args.part
    sections = {suffix: section for section, suffix, _ in REMOTE_PARTS[source["type"]]}
    if part not in sections:
        raise ConfigError(f"source '{source['name']}' of type {source['type']} has no '{part}' part")
    options = source[sections[part]]
    options["manifest"] = args.out
    if Path(args.out).is_file():
        Path(args.out).unlink()  # asked explicitly: refresh the manifest (cached pages are still reused)
    fetch_remote(source, parts=(part,))
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from crystal_transfer.data.sources.matminer_legacy import fetch_archive
    from crystal_transfer.data.table import build_dataset

    if args.spec:
        text = Path(args.spec[1:]).read_text() if args.spec.startswith("@") else args.spec
        spec = _validate_spec(json.loads(text))
        name = args.dataset or "dataset"
    else:
        if not (args.config and args.dataset):
            raise ConfigError("give --config FILE and --dataset NAME (or --spec JSON)")
        spec = dataset_spec(load_config(args.config), args.dataset)
        name = args.dataset
        remote = [source for source in spec["sources"] if source["type"] in REMOTE_PARTS]
        if any(
            not Path(source["materials_project"]["manifest"]).is_file()
            for source in remote
            if "materials_project" in source
        ):
            from crystal_transfer.data.sources.materials_project import api_key_from_env

            api_key_from_env()  # before any work
        for source in spec["sources"]:
            if source["type"] == "matminer_legacy" and not Path(source["archive"]).is_file():
                fetch_archive(Path(source["archive"]).parent, source["version"], source["sha256"])
        for source in remote:
            fetch_remote(source)
    build_dataset(name, spec, args.out, workers=args.workers)
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from crystal_transfer.data.split import make_split, write_split

    plan = json.loads(args.plan) if args.plan else load_config(args.config)["splits"].get(args.name)
    if plan is None:
        raise ConfigError(f"split plan '{args.name}' is not in {args.config}")
    plan.setdefault("seed", 0)
    split = make_split(args.table, args.name, plan)
    write_split(split, args.out)
    sizes = " / ".join(f"{len(split[p])} {p}" for p in ("train", "val", "test"))
    print(f"split '{args.name}' on label {plan['label']}: {sizes} -> {args.out}")
    return 0


def _graph_settings(args: argparse.Namespace):
    """Graph settings and shard size from --settings JSON (a config's graphs section) or --config."""
    from crystal_transfer.graphs.stage import graph_config

    if args.settings:
        text = Path(args.settings[1:]).read_text() if args.settings.startswith("@") else args.settings
        section = json.loads(text)
    elif args.config:
        section = load_config(args.config)["graphs"]
    else:
        section = {}
    if getattr(args, "shard_size", None):
        section["shard_size"] = args.shard_size
    return graph_config(section)


def _cmd_graphs(args: argparse.Namespace) -> int:
    from crystal_transfer.graphs import stage as graphs

    if args.action == "plan":
        settings, shard_size = _graph_settings(args)
        plan = graphs.make_plan(args.table, args.dataset, settings, shard_size, args.out)
        print(
            f"graph plan of '{args.dataset}': {plan['table_rows']} crystals "
            f"in {len(plan['shards'])} shards -> {args.out}"
        )
    elif args.action == "shard":
        meta = graphs.build_shard(args.plan, args.index, table=args.table, out=args.out)
        print(
            f"shard {args.index}: {len(meta['ids'])} crystals, {len(meta['rejected'])} rejected, "
            f"{len(meta['extended'])} with extended radius"
        )
    elif args.action == "manifest":
        manifest = graphs.write_manifest(args.plan, args.out)
        counts = manifest["counts"]
        print(
            f"manifest of '{manifest['dataset']}': {counts['crystals']} crystals, {counts['atoms']} atoms, "
            f"{len(manifest['shards'])} shards, {counts['bytes'] / 1e6:.1f} MB, {counts['rejected']} rejected, "
            f"{counts['extended']} extended"
        )
    else:
        settings, shard_size = _graph_settings(args)
        shards = [int(i) for i in args.shards.split(",")] if args.shards else None
        graphs.build_graphs(
            args.table, args.out, settings, shard_size, dataset=args.dataset, workers=args.workers, shards=shards
        )
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(load_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crystal_transfer",
        description="Stages of the CGCNN transfer-learning pipeline. Snakemake runs them; each also runs alone.",
    )
    parser.add_argument(
        "--threads", type=int, default=0,
        help="CPU threads for torch (the workflow passes each job's share; 0: torch's default, all cores)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")

    fetch = sub.add_parser("fetch-matminer", help="download the matminer source archive (no install) and verify it")
    fetch.add_argument("--out", required=True, help="where to put matminer-<version>.tar.gz")
    fetch.add_argument("--version", default="0.3.9")
    fetch.add_argument("--sha256", default="3faf9e83464f3d48f68a759bf476ad24da4c8c3e950c8f340cb917d3bb906400")
    fetch.set_defaults(func=_cmd_fetch_matminer)

    for part, service in (("oqmd", "the OQMD REST API"), ("mp", "the Materials Project (needs MP_API_KEY)")):
        fetch_part = sub.add_parser(
            f"fetch-{part}",
            help=f"fetch a remote source's data from {service}, resuming from the cache",
            description=(
                f"Fetch what a remote source (oqmd, materials_project, oqmd_mp) needs from {service}. Every page "
                "or batch is cached on disk; a rerun after an interruption fetches only what is missing. Writes "
                "a manifest listing the cached files, which the data stage reads (offline)."
            ),
        )
        fetch_part.add_argument("--spec", required=True, help="the source's config entry as JSON (or @file)")
        fetch_part.add_argument("--out", required=True, help="manifest to write")
        fetch_part.set_defaults(func=_cmd_fetch_remote, part=part)

    data = sub.add_parser(
        "data",
        help="build a dataset's canonical crystal table",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "The data stage. Reads every source of a dataset (matminer_legacy: MP tables from the matminer\n"
            "0.3.9 source archive; local: a folder or tarball of CIF/POSCAR files plus a labels CSV; oqmd,\n"
            "materials_project, oqmd_mp: pages fetched from the OQMD / Materials Project, fetched first when\n"
            "run with --config; MP needs MP_API_KEY), parses\n"
            "each structure once, and drops, with a recorded reason: unparsable or empty files, partial\n"
            "occupancies, elements above filters.max_z (default 80), non-finite labels, crystals with no\n"
            "label, duplicate ids, label rows without a structure and structures without a label row, unsafe\n"
            "archive member names, and the same crystal from two sources (the source listed first is kept).\n\n"
            "Writes to --out: crystals.parquet (id, source, formula, lattice, atomic numbers, fractional\n"
            "coordinates, one column per label with its unit, provenance), rejected.csv (id, source, file,\n"
            "reason, message) and summary.json (counts per reason). Fails, naming the reasons, when more than\n"
            "filters.max_rejected_fraction of the records is rejected."
        ),
    )
    data.add_argument("--config", help="pipeline config (YAML), used with --dataset")
    data.add_argument("--dataset", help="name of the dataset in the config")
    data.add_argument(
        "--spec", help="the dataset's config section plus 'filters', as JSON (or @file); the workflow uses this"
    )
    data.add_argument("--out", required=True, help="output folder, e.g. results/data/<dataset>")
    data.add_argument("--workers", type=int, default=0, help="parser processes (0: one per core)")
    data.set_defaults(func=_cmd_data)

    split = sub.add_parser("split", help="write a deterministic train/val/test split of a table")
    split.add_argument("--table", required=True, help="crystals.parquet of the dataset")
    split.add_argument("--name", required=True, help="name of the split plan")
    split.add_argument("--plan", help="the plan as JSON (label, train, val, test, seed)")
    split.add_argument("--config", help="pipeline config holding splits.<name> (instead of --plan)")
    split.add_argument("--out", required=True, help="CSV to write (id,split)")
    split.set_defaults(func=_cmd_split)

    graphs = sub.add_parser(
        "graphs",
        help="turn a canonical table into crystal-graph shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "The graphs stage. Per crystal: atomic numbers and, per atom, the max_num_nbr nearest neighbours\n"
            "within radius (indices and distances, CGCNN's selection; ties broken by neighbour index, then\n"
            "image). Steps: 'plan' (row ranges of the shards), 'shard' (one shard; a Snakemake job each),\n"
            "'manifest' (checks the shards, writes manifest.json with a sha256 per shard, and rejected.csv);\n"
            "'build' does all three, in parallel spawned processes."
        ),
    )
    steps = graphs.add_subparsers(dest="action", required=True, metavar="<step>")

    def settings_options(step: argparse.ArgumentParser) -> None:
        step.add_argument("--settings", help="the config's graphs section as JSON (or @file); defaults filled in")
        step.add_argument("--config", help="pipeline config holding the graphs section (instead of --settings)")
        step.add_argument("--shard-size", type=int, help="override graphs.shard_size")

    plan = steps.add_parser("plan", help="write plan.json: table identity, settings, shard row ranges")
    plan.add_argument("--table", required=True, help="the dataset's crystals.parquet")
    plan.add_argument("--dataset", required=True, help="dataset name (recorded)")
    plan.add_argument("--out", required=True, help="plan.json to write")
    settings_options(plan)

    shard = steps.add_parser("shard", help="build one shard of a plan")
    shard.add_argument("--plan", required=True, help="plan.json")
    shard.add_argument("--index", required=True, type=int, help="shard index")
    shard.add_argument("--table", help="the table (default: the plan's); must match the plan's sha256")
    shard.add_argument("--out", help="shard file (default: beside the plan)")

    manifest = steps.add_parser("manifest", help="check the shards of a plan; write manifest.json and rejected.csv")
    manifest.add_argument("--plan", required=True, help="plan.json")
    manifest.add_argument(
        "--out", help="manifest.json to write (default: beside the plan); rejected.csv goes beside it"
    )

    build = steps.add_parser("build", help="plan, build the shards in parallel, write the manifest")
    build.add_argument("--table", required=True, help="the dataset's crystals.parquet")
    build.add_argument("--dataset", required=True, help="dataset name (recorded)")
    build.add_argument("--out", required=True, help="output folder, e.g. results/graphs/<dataset>")
    build.add_argument("--workers", type=int, default=2, help="processes (spawned)")
    build.add_argument("--shards", help="comma-separated shard indices to (re)build; default: all")
    settings_options(build)
    graphs.set_defaults(func=_cmd_graphs)

    from crystal_transfer.cli.train import add_commands

    add_commands(sub)

    schema = sub.add_parser("schema", help="print the config schema (every key, its type, default and meaning)")
    schema.set_defaults(func=_cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        # several jobs side by side must not each start one thread per core (OpenMP oversubscription)
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
