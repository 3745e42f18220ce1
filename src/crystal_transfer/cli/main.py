"""Command line: ``python -m crystal_transfer <stage> ...``. Each Snakemake rule calls one of these.

Errors the user can act on (:class:`crystal_transfer.errors.UserError`: bad config, unreadable or missing
input, too many rejections, settings that do not fit together) end the command with a one-line message and
exit status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from crystal_transfer.cli import data, experiments
from crystal_transfer.config import load_schema
from crystal_transfer.errors import UserError


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
    data.add_commands(sub)
    experiments.add_commands(sub)

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
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
