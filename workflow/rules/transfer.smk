# Transfer to each target (a split plan; crystal_transfer.experiments.matrix): one job per (source, mode, depth,
# seed) under results/transfer/<split>/<source>/{depth<k>,finetune,atomsets-level<L>}/seed<s>/, plus the
# from-scratch baseline (scratch/depth0/seed<s>/). A source's frozen features at a depth are computed once per
# dataset (results/transfer/cache/<dataset>/), for the crystals of every target on it, and shared by all runs.


rule frozen_features:
    input:
        model=f"{RESULTS}/models/{{source}}/model/model.json",
        table=dataset_table,
        graphs=f"{RESULTS}/graphs/{{dataset}}/manifest.json",
        splits=dataset_split_csvs,
    output:
        f"{RESULTS}/transfer/cache/{{dataset}}/{{source}}-depth{{depth}}.pt",
    log:
        f"{RESULTS}/logs/frozen_features-{{dataset}}-{{source}}-{{depth}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/frozen_features-{{dataset}}-{{source}}-{{depth}}.tsv"
    wildcard_constraints:
        source=model_names("cgcnn"),
    params:
        source=lambda wc: f"{RESULTS}/models/{wc.source}/model",
        graphs=lambda wc: f"{RESULTS}/graphs/{wc.dataset}",
    resources:
        gpu=1,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer --threads {threads} frozen-features --source {params.source} --depth {wildcards.depth} "
        "--graphs {params.graphs} --table {input.table} --split {input.splits} --out {output} > {log} 2>&1"


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
        source=model_names("cgcnn"),
        depth=r"[1-9]\d*",
    params:
        target=target_label,
        transform=target_transform,
        source=lambda wc: f"{RESULTS}/models/{wc.source}/model",
        graphs=lambda wc: transfer_graph_dir(wc.split),
        out=lambda wc, output: os.path.dirname(output.test),
        cache=lambda wc, input: f"--cache {input.cache}" if input.cache else "",
        spec=lambda wc: json.dumps(transfer_spec(wc.split), sort_keys=True),
    resources:
        gpu=1,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer --threads {threads} transfer --name {wildcards.source} --source {params.source} --mode freeze "
        "--depth {wildcards.depth} --seed {wildcards.seed} --target {params.target} --transform {params.transform} "
        "--graphs {params.graphs} --table {input.table} --split {input.split} {params.cache} "
        "--spec {params.spec:q} --out {params.out} > {log} 2>&1"


rule transfer_finetune:
    input:
        model=f"{RESULTS}/models/{{source}}/model/model.json",
        table=transfer_table,
        graphs=transfer_manifest,
        split=transfer_split_csv,
    output:
        test=f"{RESULTS}/transfer/{{split}}/{{source}}/finetune/seed{{seed}}/test.json",
        metrics=f"{RESULTS}/transfer/{{split}}/{{source}}/finetune/seed{{seed}}/metrics.csv",
        predictions=f"{RESULTS}/transfer/{{split}}/{{source}}/finetune/seed{{seed}}/predictions.csv",
    log:
        f"{RESULTS}/logs/transfer_finetune-{{split}}-{{source}}-{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/transfer_finetune-{{split}}-{{source}}-{{seed}}.tsv"
    wildcard_constraints:
        source=model_names("cgcnn"),
    params:
        target=target_label,
        transform=target_transform,
        source=lambda wc: f"{RESULTS}/models/{wc.source}/model",
        graphs=lambda wc: transfer_graph_dir(wc.split),
        out=lambda wc, output: os.path.dirname(output.test),
        spec=lambda wc: json.dumps(transfer_spec(wc.split), sort_keys=True),
    resources:
        gpu=1,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer --threads {threads} transfer --name {wildcards.source} --source {params.source} "
        "--mode finetune --seed {wildcards.seed} --target {params.target} --transform {params.transform} --graphs {params.graphs} "
        "--table {input.table} --split {input.split} --spec {params.spec:q} --out {params.out} > {log} 2>&1"


rule transfer_atomsets:
    input:
        cache=lambda wc: feature_cache(wc.split, wc.source, wc.level),
        table=transfer_table,
        split=transfer_split_csv,
    output:
        test=f"{RESULTS}/transfer/{{split}}/{{source}}/atomsets-level{{level}}/seed{{seed}}/test.json",
    log:
        f"{RESULTS}/logs/transfer_atomsets-{{split}}-{{source}}-{{level}}-{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/transfer_atomsets-{{split}}-{{source}}-{{level}}-{{seed}}.tsv"
    wildcard_constraints:
        source=model_names("any"),
        level=r"\d+|crystal",
    params:
        target=target_label,
        transform=target_transform,
        spec=lambda wc: json.dumps(set_model_spec(config["transfer"]), sort_keys=True),
        out=lambda wc, output: os.path.dirname(output.test),
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer --threads {threads} atomsets --name {wildcards.source} --cache {input.cache} "
        "--table {input.table} --split {input.split} --target {params.target} --transform {params.transform} --seed {wildcards.seed} "
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
        target=target_label,
        transform=target_transform,
        graphs=lambda wc: transfer_graph_dir(wc.split),
        out=lambda wc, output: os.path.dirname(output.test),
        spec=lambda wc: json.dumps(transfer_spec(wc.split), sort_keys=True),
    resources:
        gpu=1,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer --threads {threads} transfer --name scratch --mode scratch --seed {wildcards.seed} "
        "--target {params.target} --transform {params.transform} --graphs {params.graphs} --table {input.table} "
        "--split {input.split} --spec {params.spec:q} --out {params.out} > {log} 2>&1"
