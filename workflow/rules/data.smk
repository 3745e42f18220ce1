# The data stage: sources -> results/data/<dataset>/{crystals.parquet, rejected.csv, summary.json},
# then one split CSV per split plan.


localrules:
    fetch_matminer,
    fetch_oqmd,
    fetch_materials_project,


rule fetch_matminer:
    output:
        f"{RESULTS}/downloads/matminer-{{version}}.tar.gz",
    log:
        f"{RESULTS}/logs/fetch_matminer-{{version}}.log",
    params:
        sha256=lambda wc: next(
            s["sha256"]
            for d in config["datasets"].values()
            for s in d["sources"]
            if s["type"] == "matminer_legacy" and s["version"] == wc.version
        ),
    retries: 2
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer fetch-matminer --out {output} --version {wildcards.version} "
        "--sha256 {params.sha256} > {log} 2>&1"


rule fetch_oqmd:
    output:
        f"{RESULTS}/downloads/{{dataset}}/{{source}}.oqmd.json",
    log:
        f"{RESULTS}/logs/fetch_oqmd-{{dataset}}-{{source}}.log",
    wildcard_constraints:
        dataset=r"[^/.]+",
        source=r"[^/.]+",
    params:
        spec=lambda wc: json.dumps(remote_source_spec(wc.dataset, wc.source), sort_keys=True),
    retries: 3
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer fetch-oqmd --spec {params.spec:q} --out {output} > {log} 2>&1"


rule fetch_materials_project:
    input:
        mp_fetch_inputs,
    output:
        f"{RESULTS}/downloads/{{dataset}}/{{source}}.mp.json",
    log:
        f"{RESULTS}/logs/fetch_materials_project-{{dataset}}-{{source}}.log",
    wildcard_constraints:
        dataset=r"[^/.]+",
        source=r"[^/.]+",
    params:
        spec=lambda wc: json.dumps(remote_source_spec(wc.dataset, wc.source), sort_keys=True),
    retries: 3
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer fetch-mp --spec {params.spec:q} --out {output} > {log} 2>&1"


rule data:
    input:
        dataset_inputs,
    output:
        table=f"{RESULTS}/data/{{dataset}}/crystals.parquet",
        rejected=f"{RESULTS}/data/{{dataset}}/rejected.csv",
        summary=f"{RESULTS}/data/{{dataset}}/summary.json",
    log:
        f"{RESULTS}/logs/data-{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/data-{{dataset}}.tsv"
    params:
        spec=lambda wc: json.dumps(dataset_spec(wc.dataset), sort_keys=True),
        out=lambda wc: f"{RESULTS}/data/{wc.dataset}",
    threads: 2
    conda:
        "../../envs/pipeline.yaml"
    resources:
        mem_mb=4000,
    shell:
        "python -m crystal_transfer data --dataset {wildcards.dataset} --spec {params.spec:q} "
        "--out {params.out} --workers {threads} 2>&1 | tee {log}"


rule split:
    input:
        f"{RESULTS}/data/{{dataset}}/crystals.parquet",
    output:
        f"{RESULTS}/data/{{dataset}}/splits/{{plan}}.csv",
    log:
        f"{RESULTS}/logs/split-{{dataset}}-{{plan}}.log",
    params:
        plan=lambda wc: json.dumps(config["splits"][wc.plan], sort_keys=True),
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer split --table {input} --name {wildcards.plan} "
        "--plan {params.plan:q} --out {output} > {log} 2>&1"
