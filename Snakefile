# CGCNN transfer learning for crystal properties. Run: snakemake --cores 8 all
# (other configs: --configfile configs/mp2018.yaml; SLURM: --workflow-profile profiles/slurm).
import json
import os
import re

from snakemake.utils import min_version, validate

from crystal_transfer.config import SCHEMA_PATH, read_yaml
from crystal_transfer.experiments import curves as curve_check

min_version("9.0")


# The embedded default, unless the command line names config files (--configfile): those then replace it
# whole, so a config never inherits datasets or models it does not list.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


# Snakemake keeps the last of a key written twice; our reader refuses it, naming the file and line
for _config_file in workflow.overwrite_configfiles or ["config.yaml"]:
    read_yaml(_config_file, "config file")

# the schema that ships inside the package: the workflow and `python -m crystal_transfer` validate alike
validate(config, str(SCHEMA_PATH))
# what the schema cannot check: references between sections, and the packages of the universal potentials
curve_check.check_config(config)

RESULTS = config["results_dir"]


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/graphs.smk"
include: "workflow/rules/pretrain.smk"
# Transfer, learning curves and the report need a `transfer` section; a config without one (e.g. a data-only
# config) stops after the graphs.
if "transfer" in config:

    include: "workflow/rules/transfer.smk"
    include: "workflow/rules/curves.smk"
    include: "workflow/rules/report.smk"
    include: "workflow/rules/best.smk"


rule all:
    input:
        expand(f"{RESULTS}/data/{{dataset}}/crystals.parquet", dataset=config["datasets"]),
        expand(f"{RESULTS}/graphs/{{dataset}}/manifest.json", dataset=config["datasets"]),
        [
            f"{RESULTS}/data/{plan['dataset']}/splits/{name}.csv"
            for name, plan in config["splits"].items()
        ],
        [f"{RESULTS}/report/summary.json"] if "transfer" in config else [],
        [f"{RESULTS}/best/{split}/model_card.json" for split in TARGETS],
    default_target: True
