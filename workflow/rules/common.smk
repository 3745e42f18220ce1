# Helpers shared by the rules: how config sections map to inputs and command-line arguments.


# remote source type -> its parts: (config section, manifest suffix, default cache folder)
REMOTE_PARTS = {
    "oqmd": [("oqmd", "oqmd", "oqmd")],
    "materials_project": [("materials_project", "mp", "materials_project")],
    "oqmd_mp": [
        ("oqmd", "oqmd", "oqmd"),
        ("materials_project", "mp", "materials_project"),
    ],
}


def dataset_spec(dataset):
    """The dataset's config section plus the filters, with the download paths of archives and remote data."""
    spec = json.loads(json.dumps(config["datasets"][dataset]))
    for source in spec["sources"]:
        if source["type"] == "matminer_legacy":
            source["archive"] = f"{RESULTS}/downloads/matminer-{source['version']}.tar.gz"
        name = source.get("name", source["type"])
        for section, suffix, cache in REMOTE_PARTS.get(source["type"], []):
            part = source.setdefault(section, {})
            part["cache_dir"] = part.get("cache_dir") or f"{RESULTS}/downloads/{cache}"
            part["manifest"] = f"{RESULTS}/downloads/{dataset}/{name}.{suffix}.json"
    spec["filters"] = config["filters"]
    return spec


def remote_source_spec(dataset, source_name):
    """The config entry of a dataset's remote source, with its cache folders and manifests."""
    for source in dataset_spec(dataset)["sources"]:
        if source.get("name", source["type"]) == source_name and source["type"] in REMOTE_PARTS:
            return source
    raise ValueError(f"dataset '{dataset}' has no remote source named '{source_name}'")


def mp_fetch_inputs(wildcards):
    """The MP fetch of an oqmd_mp source asks for the formulas of its fetched OQMD entries."""
    source = remote_source_spec(wildcards.dataset, wildcards.source)
    return [source["oqmd"]["manifest"]] if source["type"] == "oqmd_mp" else []


def dataset_inputs(wildcards):
    """Files the data stage of a dataset reads: downloaded archives and local structures and labels."""
    files = []
    for source in dataset_spec(wildcards.dataset)["sources"]:
        if source["type"] == "matminer_legacy":
            files.append(source["archive"])
        elif source["type"] == "local":
            files += [source["path"], source["labels"]]
        for section, _, _ in REMOTE_PARTS.get(source["type"], []):
            files.append(source[section]["manifest"])
    return files
