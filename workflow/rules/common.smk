# Helpers shared by the rules: how config sections map to inputs and command-line arguments.


from crystal_transfer.data import spec as data_spec
from crystal_transfer.experiments import curves as curve_spec
from crystal_transfer.report.study import source_label


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


def transfer_spec():
    """Train settings and architecture of transfer runs and the baseline."""
    return {"train": merged_train(config["transfer"].get("train", {})), "architecture": config["architecture"]}


def transfer_dataset():
    return config["splits"][config["transfer"]["split"]]["dataset"]


def transfer_graph_dir():
    return f"{RESULTS}/graphs/{transfer_dataset()}"


def transfer_table(wildcards):
    return f"{RESULTS}/data/{transfer_dataset()}/crystals.parquet"


def transfer_manifest(wildcards):
    return f"{transfer_graph_dir()}/manifest.json"


def transfer_split_csv(wildcards):
    return f"{RESULTS}/data/{transfer_dataset()}/splits/{wildcards.split}.csv"


def transfer_cache_input(wildcards):
    if not config["transfer"]["cache_frozen"]:
        return []
    return f"{RESULTS}/transfer/{wildcards.split}/cache/{wildcards.source}-depth{wildcards.depth}.pt"


def transfer_results():
    """test.json of every transfer run and baseline named by the config."""
    t = config["transfer"]
    base = f"{RESULTS}/transfer/{t['split']}"
    runs = [
        f"{base}/{source}/depth{depth}/seed{seed}/test.json"
        for source in t["sources"]
        for depth in t["depths"]
        for seed in t["seeds"]
    ]
    return runs + [f"{base}/scratch/depth0/seed{seed}/test.json" for seed in t["seeds"]]


def report_spec(results):
    """What the report stage reads: the result files, the sources with their labels and study roles."""
    sources = []
    for name in config["transfer"]["sources"]:
        entry = config["pretrain"][name]
        sources.append({"name": name, "label": source_label(name, entry), "role": entry.get("role")})
    depths = config["transfer"]["depths"]
    spec = {
        "results": list(results),
        "sources": sources,
        "depths": depths,
        "figure_depth": 2 if 2 in depths else depths[0],
        "target_unit": "eV",
        "table3": None,
        "figure6": None,
        "curves": curves_of_report(),
        "target_label": config["transfer"]["target"].replace("_", " "),
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


def report_figure6_outputs():
    if not config["report"].get("figure6"):
        return []
    return report(f"{RESULTS}/report/fig6_attention.png", caption="../report/fig6.rst", category="Figures")


def atomsets_spec():
    """Set-model settings of the AtomSets curves (the level is the cache's, not a training setting)."""
    return {k: v for k, v in config["learning_curves"].get("atomsets", {}).items() if k != "level"}


def universal_levels():
    """Universal potential -> the feature levels the learning curves read of it."""
    return curve_spec.universal_levels(config)


def finetuned(wildcards):
    """The CGCNN model a finetune-<name> curve starts from: the one its wildcard names."""
    return wildcards.curve.removeprefix("finetune-")


def curve_points(curve):
    curves = config["learning_curves"]
    split = config["transfer"]["split"]
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
