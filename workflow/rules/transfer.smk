# Transfer to the target task: one job per (source, frozen depth, seed), plus the from-scratch baseline
# (results/transfer/<split>/scratch/depth0/seed<s>/). With transfer.cache_frozen the atom features after a
# source's frozen layers are computed once per (source, depth) and shared by its seeds.


rule frozen_features:
    input:
        model=f"{RESULTS}/models/{{source}}/model/model.json",
        table=transfer_table,
        graphs=transfer_manifest,
        split=transfer_split_csv,
    output:
        f"{RESULTS}/transfer/{{split}}/cache/{{source}}-depth{{depth}}.pt",
    log:
        f"{RESULTS}/logs/frozen_features-{{split}}-{{source}}-{{depth}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/frozen_features-{{split}}-{{source}}-{{depth}}.tsv"
    wildcard_constraints:
        source=model_names("cgcnn"),
    params:
        target=config["transfer"]["target"],
        source=lambda wc: f"{RESULTS}/models/{wc.source}/model",
        graphs=lambda wc: transfer_graph_dir(),
    resources:
        gpu=1,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer --threads {threads} frozen-features --source {params.source} --depth {wildcards.depth} "
        "--graphs {params.graphs} --table {input.table} --split {input.split} --out {output} > {log} 2>&1"


rule transfer:
    input:
        model=f"{RESULTS}/models/{{source}}/model/model.json",
        table=transfer_table,
        graphs=transfer_manifest,
        split=transfer_split_csv,
        cache=transfer_cache_input,
    output:
        test=f"{RESULTS}/transfer/{{split}}/{{source}}/depth{{depth}}/seed{{seed}}/test.json",
        metrics=f"{RESULTS}/transfer/{{split}}/{{source}}/depth{{depth}}/seed{{seed}}/metrics.csv",
        predictions=f"{RESULTS}/transfer/{{split}}/{{source}}/depth{{depth}}/seed{{seed}}/predictions.csv",
    log:
        f"{RESULTS}/logs/transfer-{{split}}-{{source}}-{{depth}}-{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/transfer-{{split}}-{{source}}-{{depth}}-{{seed}}.tsv"
    wildcard_constraints:
        source=model_names("any"),
        depth=r"[1-9]\d*",
    params:
        target=config["transfer"]["target"],
        source=lambda wc: f"{RESULTS}/models/{wc.source}/model",
        graphs=lambda wc: transfer_graph_dir(),
        out=lambda wc: f"{RESULTS}/transfer/{wc.split}/{wc.source}/depth{wc.depth}/seed{wc.seed}",
        cache=lambda wc, input: f"--cache {input.cache}" if input.cache else "",
        spec=lambda wc: json.dumps(transfer_spec(), sort_keys=True),
    resources:
        gpu=1,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer --threads {threads} transfer --name {wildcards.source} --source {params.source} --mode freeze "
        "--depth {wildcards.depth} --seed {wildcards.seed} --target {params.target} "
        "--graphs {params.graphs} --table {input.table} --split {input.split} {params.cache} "
        "--spec {params.spec:q} --out {params.out} > {log} 2>&1"


rule baseline:
    input:
        table=transfer_table,
        graphs=transfer_manifest,
        split=transfer_split_csv,
    output:
        test=f"{RESULTS}/transfer/{{split}}/scratch/depth0/seed{{seed}}/test.json",
        metrics=f"{RESULTS}/transfer/{{split}}/scratch/depth0/seed{{seed}}/metrics.csv",
        predictions=f"{RESULTS}/transfer/{{split}}/scratch/depth0/seed{{seed}}/predictions.csv",
    log:
        f"{RESULTS}/logs/baseline-{{split}}-{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/baseline-{{split}}-{{seed}}.tsv"
    params:
        target=config["transfer"]["target"],
        graphs=lambda wc: transfer_graph_dir(),
        out=lambda wc: f"{RESULTS}/transfer/{wc.split}/scratch/depth0/seed{wc.seed}",
        spec=lambda wc: json.dumps(transfer_spec(), sort_keys=True),
    resources:
        gpu=1,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer --threads {threads} transfer --name scratch --mode scratch --seed {wildcards.seed} "
        "--target {params.target} --graphs {params.graphs} --table {input.table} "
        "--split {input.split} --spec {params.spec:q} --out {params.out} > {log} 2>&1"
