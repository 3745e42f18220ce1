"""Commands of the data side: ``fetch-matminer``, ``fetch-oqmd``, ``fetch-mp``, ``data``, ``split``, ``graphs``.

Argument parsing only: each command calls one stage function (named in its ``func``).
"""

from __future__ import annotations

import argparse

from crystal_transfer.cli.arguments import json_arg
from crystal_transfer.config import ConfigError, load_config


def _cmd_fetch_matminer(args: argparse.Namespace) -> int:
    from crystal_transfer.data.fetch import fetch_matminer

    fetch_matminer(args.out, args.version, args.sha256)
    return 0


def _cmd_fetch_remote(args: argparse.Namespace) -> int:
    from crystal_transfer.config import validate_source_spec
    from crystal_transfer.data import fetch

    fetch.run(validate_source_spec(json_arg(args.spec)), args.part, args.out)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from crystal_transfer.config import validate_dataset_spec
    from crystal_transfer.data import stage
    from crystal_transfer.data.spec import dataset_spec

    if args.spec:
        stage.run(args.dataset or "dataset", validate_dataset_spec(json_arg(args.spec)), args.out, args.workers,
                  batch_records=args.batch_records)
    elif args.config and args.dataset:
        spec = dataset_spec(load_config(args.config), args.dataset)
        stage.run(args.dataset, spec, args.out, args.workers, fetch=True, batch_records=args.batch_records)
    else:
        raise ConfigError("give --config FILE and --dataset NAME (or --spec JSON)")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from crystal_transfer.data import split

    plan = json_arg(args.plan) if args.plan else load_config(args.config)["splits"].get(args.name)
    if plan is None:
        raise ConfigError(f"split plan '{args.name}' is not in {args.config}")
    split.run(args.table, args.name, plan, args.out)
    return 0


def _graph_settings(args: argparse.Namespace):
    """Graph settings and shard size from --settings JSON (a config's graphs section) or --config."""
    from crystal_transfer.graphs.settings import graph_config

    if args.settings:
        section = json_arg(args.settings)
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


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the data-side commands."""
    for add in (_add_fetch, _add_data, _add_split, _add_graphs):
        add(sub)


def _add_fetch(sub: argparse._SubParsersAction) -> None:
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


def _add_data(sub: argparse._SubParsersAction) -> None:
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
            "filters.max_rejected_fraction of the records is rejected.\n\n"
            "Records are parsed and written --batch-records at a time into crystals.parquet.parts/ (removed\n"
            "when the table is written): memory stays flat whatever the dataset's size, and a rerun after a\n"
            "kill reuses the batches already written whose records are unchanged and parses only the rest."
        ),
    )
    data.add_argument("--config", help="pipeline config (YAML), used with --dataset")
    data.add_argument("--dataset", help="name of the dataset in the config")
    data.add_argument(
        "--spec", help="the dataset's config section plus 'filters', as JSON (or @file); the workflow uses this"
    )
    data.add_argument("--out", required=True, help="output folder, e.g. results/data/<dataset>")
    data.add_argument("--workers", type=int, default=0, help="parser processes (0: one per core)")
    data.add_argument("--batch-records", type=int,
                      help="records parsed and written together (default: data.stage.BATCH_RECORDS, 4096)")
    data.set_defaults(func=_cmd_data)


def _add_split(sub: argparse._SubParsersAction) -> None:
    split = sub.add_parser("split", help="write a deterministic train/val/test split of a table")
    split.add_argument("--table", required=True, help="crystals.parquet of the dataset")
    split.add_argument("--name", required=True, help="name of the split plan")
    split.add_argument("--plan", help="the plan as JSON (label, train, val, test, seed)")
    split.add_argument("--config", help="pipeline config holding splits.<name> (instead of --plan)")
    split.add_argument("--out", required=True, help="CSV to write (id,split)")
    split.set_defaults(func=_cmd_split)


def _add_graphs(sub: argparse._SubParsersAction) -> None:
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

