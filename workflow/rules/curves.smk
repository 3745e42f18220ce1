# Learning curves over training sizes on the study target's test set (results/curves/<split>/<curve>/n<N>/
# seed<s>/, curves from crystal_transfer.experiments.curves): AtomSets on each source's cached features
# (atomsets-<source>-level<L>), fine-tuning a CGCNN model (finetune-<source>) and training from scratch.
# A universal potential's features (CHGNet, SevenNet) come from one job per potential and dataset that writes
# every level the curves and the transfer runs read, beside the CGCNN trunks' caches.


for _name, _levels in universal_levels().items():

    rule:
        name:
            f"universal_features_{_name}"
        input:
            table=dataset_table,
            splits=dataset_split_csvs,
        output:
            [f"{RESULTS}/transfer/cache/{{dataset}}/{_name}-depth{level}.pt" for level in _levels],
            rejected=f"{RESULTS}/transfer/cache/{{dataset}}/{_name}-rejected.csv",
        log:
            f"{RESULTS}/logs/universal_features-{{dataset}}-{_name}.log",
        benchmark:
            f"{RESULTS}/benchmarks/universal_features-{{dataset}}-{_name}.tsv"
        params:
            name=_name,
            spec=json.dumps(config["pretrain"][_name], sort_keys=True),
            levels=" ".join(str(level) for level in _levels),
            out_dir=lambda wc, output: os.path.dirname(output.rejected),
        threads: 2
        resources:
            gpu=1,
            mem_mb=8000,  # SevenNet on the mp2018 band-gap split (3,000 crystals) peaks at 2.9 GB
        conda:
            "../../envs/pipeline.yaml"
        shell:
            "python -m crystal_transfer --threads {threads} frozen-features --universal {params.spec:q} "
            "--name {params.name} --levels {params.levels} --table {input.table} --split {input.splits} "
            "--out-dir {params.out_dir} > {log} 2>&1"


rule curve_atomsets:
    input:
        cache=lambda wc: feature_cache(wc.split, wc.source, wc.level),
        table=transfer_table,
        split=transfer_split_csv,
    output:
        test=f"{RESULTS}/curves/{{split}}/atomsets-{{source}}-level{{level}}/n{{size}}/seed{{seed}}/test.json",
    log:
        f"{RESULTS}/logs/curve-atomsets-{{split}}-{{source}}-{{level}}-{{size}}-{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/curve-atomsets-{{split}}-{{source}}-{{level}}-{{size}}-{{seed}}.tsv"
    wildcard_constraints:
        source=model_names("any"),
        level=r"\d+|crystal",
    params:
        target=target_label,
        transform=target_transform,
        spec=lambda wc: json.dumps(set_model_spec(config["learning_curves"]), sort_keys=True),
        out=lambda wc, output: os.path.dirname(output.test),
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer --threads {threads} atomsets --name {wildcards.source} --cache {input.cache} "
        "--table {input.table} --split {input.split} --target {params.target} --transform {params.transform} --train-size {wildcards.size} "
        "--seed {wildcards.seed} --spec {params.spec:q} --out {params.out} > {log} 2>&1"


rule curve_train:
    input:
        model=lambda wc: [] if wc.curve == "scratch" else f"{RESULTS}/models/{finetuned(wc)}/model/model.json",
        table=transfer_table,
        graphs=transfer_manifest,
        split=transfer_split_csv,
    output:
        test=f"{RESULTS}/curves/{{split}}/{{curve}}/n{{size}}/seed{{seed}}/test.json",
    log:
        f"{RESULTS}/logs/curve-{{curve}}-{{split}}-{{size}}-{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/curve-{{curve}}-{{split}}-{{size}}-{{seed}}.tsv"
    wildcard_constraints:
        curve=f"scratch|finetune-(?:{model_names('cgcnn')})",
    params:
        target=target_label,
        transform=target_transform,
        mode=lambda wc: "scratch" if wc.curve == "scratch" else "finetune",
        source=lambda wc: "none" if wc.curve == "scratch" else f"{RESULTS}/models/{finetuned(wc)}/model",
        name=lambda wc: "scratch" if wc.curve == "scratch" else finetuned(wc),
        graphs=lambda wc: transfer_graph_dir(wc.split),
        out=lambda wc, output: os.path.dirname(output.test),
        spec=lambda wc: json.dumps(transfer_spec(wc.split), sort_keys=True),
    resources:
        gpu=1,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer --threads {threads} transfer --name {params.name} --source {params.source} "
        "--mode {params.mode} --seed {wildcards.seed} --target {params.target} --transform {params.transform} --train-size {wildcards.size} "
        "--graphs {params.graphs} --table {input.table} --split {input.split} --spec {params.spec:q} "
        "--out {params.out} > {log} 2>&1"
