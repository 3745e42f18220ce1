# Helpers shared by the rules: how config sections map to inputs and command-line arguments.


def dataset_spec(dataset):
    """The dataset's config section plus the filters, with the download path of registry archives."""
    spec = json.loads(json.dumps(config["datasets"][dataset]))
    for source in spec["sources"]:
        if source["type"] == "matminer_legacy":
            source["archive"] = f"{RESULTS}/downloads/matminer-{source['version']}.tar.gz"
    spec["filters"] = config["filters"]
    return spec


def dataset_inputs(wildcards):
    """Files the data stage of a dataset reads: downloaded archives and local structures and labels."""
    files = []
    for source in dataset_spec(wildcards.dataset)["sources"]:
        if source["type"] == "matminer_legacy":
            files.append(source["archive"])
        elif source["type"] == "local":
            files += [source["path"], source["labels"]]
    return files


def graph_shards(wildcards):
    """Shard files of a dataset's graphs, as listed by its plan (a checkpoint output)."""
    plan = checkpoints.graph_plan.get(dataset=wildcards.dataset).output[0]
    with open(plan) as handle:
        shards = json.load(handle)["shards"]
    return [f"{RESULTS}/graphs/{wildcards.dataset}/{shard['file']}" for shard in shards]
