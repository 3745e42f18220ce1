# Helpers shared by the rules: how config sections map to inputs and command-line arguments.


from crystal_transfer.data import spec as data_spec
from crystal_transfer.experiments import curves as curve_spec
from crystal_transfer.experiments import matrix as transfer_plan


def dataset_spec(dataset):
    """The dataset's config section plus the filters, with the download paths of archives and remote data."""
    return data_spec.dataset_spec(config, dataset)


def remote_source_spec(dataset, source_name):
    """The config entry of a dataset's remote source, with its cache folders and manifests."""
    return data_spec.remote_source(dataset_spec(dataset), source_name)


def mp_fetch_inputs(wildcards):
    """The MP fetch of an oqmd_mp source asks for the formulas of its fetched OQMD entries."""
    source = remote_source_spec(wildcards.dataset, wildcards.source)
    return [source["oqmd"]["manifest"]] if source["type"] == "oqmd_mp" else []


def dataset_inputs(wildcards):
    """Files the data stage of a dataset reads: downloaded archives and local structures and labels."""
    return data_spec.input_files(dataset_spec(wildcards.dataset))


def graph_shards(wildcards):
    """Shard files of a dataset's graphs, as listed by its plan (a checkpoint output)."""
    plan = checkpoints.graph_plan.get(dataset=wildcards.dataset).output[0]
    with open(plan) as handle:
        shards = json.load(handle)["shards"]
    return [f"{RESULTS}/graphs/{wildcards.dataset}/{shard['file']}" for shard in shards]


def model_names(kind):
    """A wildcard pattern matching the pretrained models of a kind ('published', 'train', 'cgcnn' (either of
    those) or 'any', the universal potentials included)."""
    kinds = curve_spec.CGCNN_KINDS if kind == "cgcnn" else {kind}
    names = [n for n, m in config["pretrain"].items() if kind == "any" or m["kind"] in kinds]
    return "|".join(re.escape(n) for n in names) or "(?!)"


def merged_train(overrides):
    """The train section with a model's or the transfer section's overrides applied."""
    return {**config["train"], **overrides}


def pretrain_spec(model):
    """What a pretraining job depends on: the model's section, the architecture and the train settings."""
    spec = dict(config["pretrain"][model])
    spec["train"] = merged_train(spec.get("train", {}))
    spec["architecture"] = config["architecture"]
    return spec


# split plan -> its transfer target (the first is the study's); empty without a transfer section
TARGETS = {target.split: target for target in transfer_plan.targets(config)}


wildcard_constraints:
    split="|".join(re.escape(name) for name in config["splits"]) or "(?!)",
    dataset="|".join(re.escape(name) for name in config["datasets"]) or "(?!)",


def study_split():
    return next(iter(TARGETS))


def transfer_spec(split):
    """Train settings and architecture of a target's CGCNN transfer runs and its baseline."""
    return {"train": merged_train(TARGETS[split].train), "architecture": config["architecture"]}


def target_label(wildcards):
    return TARGETS[wildcards.split].label


def target_transform(wildcards):
    return TARGETS[wildcards.split].transform


def split_dataset(split):
    return config["splits"][split]["dataset"]


def transfer_graph_dir(split):
    return f"{RESULTS}/graphs/{split_dataset(split)}"


def transfer_table(wildcards):
    return f"{RESULTS}/data/{split_dataset(wildcards.split)}/crystals.parquet"


def transfer_manifest(wildcards):
    return f"{transfer_graph_dir(wildcards.split)}/manifest.json"


def transfer_split_csv(wildcards):
    return f"{RESULTS}/data/{split_dataset(wildcards.split)}/splits/{wildcards.split}.csv"


def feature_cache(split, source, level):
    """A source's frozen features at a level, shared by every target (and curve) on the split's dataset."""
    return f"{RESULTS}/transfer/cache/{split_dataset(split)}/{source}-depth{level}.pt"


def dataset_table(wildcards):
    return f"{RESULTS}/data/{wildcards.dataset}/crystals.parquet"


def dataset_split_csvs(wildcards):
    """The split CSVs of every target on a dataset: its feature caches hold the crystals of them all."""
    splits = [split for split in TARGETS if split_dataset(split) == wildcards.dataset]
    return [f"{RESULTS}/data/{wildcards.dataset}/splits/{split}.csv" for split in splits]


def transfer_cache_input(wildcards):
    if not config["transfer"]["cache_frozen"]:
        return []
    return feature_cache(wildcards.split, wildcards.source, wildcards.depth)


def transfer_results():
    """test.json of every transfer run and baseline of every target."""
    return [run.test_json(RESULTS) for run in transfer_plan.all_runs(config)]


def target_results_of(wildcards):
    """test.json of every run of one target (its split plan): the candidates of its best model."""
    return [run.test_json(RESULTS) for run in transfer_plan.runs(config, TARGETS[wildcards.split])]


def set_model_spec(section):
    """Set-model settings of an atomsets section (the level is the cache's, not a training setting)."""
    return {k: v for k, v in section.get("atomsets", {}).items() if k != "level"}


def report_spec():
    """What the report stage reads: the study target's runs (Tables 2 and 3, Figure 5), every target's runs with
    their sources' labels (the transfer matrix and the per-target tables), the curves."""
    study = TARGETS[study_split()]
    cgcnn = [name for name in study.sources if config["pretrain"][name]["kind"] in curve_spec.CGCNN_KINDS]
    freeze = [run for run in transfer_plan.runs(config, study) if run.mode in ("freeze", "scratch")]
    spec = {
        "results": [run.test_json(RESULTS) for run in freeze],
        "sources": [{"name": name, "label": curve_spec.model_label(name, config["pretrain"][name]),
                     "role": config["pretrain"][name].get("role")} for name in cgcnn],
        "depths": list(study.depths),
        "figure_depth": 2 if 2 in study.depths else study.depths[0],
        "table3": None,
        "figure6": None,
        "curves": curves_of_report(),
        "target_label": study.label.replace("_", " "),
        "targets": [
            {"split": target.split, "label": target.label, "modes": list(target.modes),
             "depths": list(target.depths),
             "sources": [{"name": name, "label": curve_spec.model_label(name, config["pretrain"][name])}
                         for name in target.sources],
             "results": [run.test_json(RESULTS) for run in transfer_plan.runs(config, target)]}
            for target in TARGETS.values()
        ],
    }
    table3 = config["report"].get("table3")
    if table3:
        sizes = {name: config["pretrain"][name].get("subsample") or "all" for name in table3.values()}
        spec["table3"] = {**table3, "sizes": sizes}
    figure6 = config["report"].get("figure6")
    if figure6:
        spec["figure6"] = {key: f"{RESULTS}/models/{name}" for key, name in figure6.items()}
    return spec


def figure6_inputs():
    figure6 = config["report"].get("figure6") or {}
    return [f"{RESULTS}/models/{name}/metrics.csv" for name in figure6.values()]


def report_table3_outputs():
    if not config["report"].get("table3"):
        return []
    table = f"{RESULTS}/report/table3.csv"
    return [report(table, caption="../report/table3.rst", category="Tables"), f"{RESULTS}/report/table3.md"]


def report_target_outputs():
    """Each target's table in the form of Table 2, every mode as a column."""
    outputs = []
    for split in TARGETS:
        table = f"{RESULTS}/report/targets/{split}.csv"
        outputs += [report(table, caption="../report/target_table.rst", category="Tables",
                           subcategory="Transfer by target"), f"{RESULTS}/report/targets/{split}.md"]
    return outputs


def report_figure6_outputs():
    if not config["report"].get("figure6"):
        return []
    return report(f"{RESULTS}/report/fig6_attention.png", caption="../report/fig6.rst", category="Figures")


def universal_levels():
    """Universal potential -> the feature levels the learning curves and the transfer runs read of it."""
    return curve_spec.universal_levels(config)


def finetuned(wildcards):
    """The CGCNN model a finetune-<name> curve starts from: the one its wildcard names."""
    return wildcards.curve.removeprefix("finetune-")


def curve_points(curve):
    curves = config["learning_curves"]
    split = study_split()
    return [
        f"{RESULTS}/curves/{split}/{curve.key}/n{size}/seed{seed}/test.json"
        for size in curves["train_sizes"]
        for seed in curves["seeds"]
    ]


def curve_results():
    """test.json of every learning-curve point named by the config (none without a learning_curves section)."""
    return [path for curve in curve_spec.curve_plan(config) for path in curve_points(curve)]


def curves_of_report():
    """The report's view of the curves: key, mode, legend label and result files of each."""
    return [
        {"key": c.key, "mode": c.mode, "source": c.source, "level": c.level, "label": c.label,
         "results": curve_points(c)}
        for c in curve_spec.curve_plan(config)
    ]


def report_curves_outputs():
    if not config.get("learning_curves"):
        return []
    figure = report(f"{RESULTS}/report/learning_curves.png", caption="../report/curves.rst", category="Figures")
    table = report(f"{RESULTS}/report/learning_curves.csv", caption="../report/curves_table.rst", category="Tables")
    return [figure, table, f"{RESULTS}/report/learning_curves.md"]
