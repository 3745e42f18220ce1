# Learning curves over training sizes on the transfer split's test set (results/curves/<split>/<mode>/n<N>/
# seed<s>/): AtomSets on the source's cached features, fine-tuning the source, and training from scratch.


rule curve_atomsets:
    input:
        cache=lambda wc: f"{RESULTS}/transfer/{wc.split}/cache/{config['learning_curves']['source']}-depth{config['learning_curves']['atomsets']['level']}.pt",
        table=transfer_table,
        split=transfer_split_csv,
    output:
        test=f"{RESULTS}/curves/{{split}}/atomsets/n{{size}}/seed{{seed}}/test.json",
    log:
        f"{RESULTS}/logs/curve-atomsets-{{split}}-{{size}}-{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/curve-atomsets-{{split}}-{{size}}-{{seed}}.tsv"
    params:
        target=config["transfer"]["target"],
        spec=lambda wc: json.dumps(atomsets_spec(), sort_keys=True),
        out=lambda wc: f"{RESULTS}/curves/{wc.split}/atomsets/n{wc.size}/seed{wc.seed}",
        source=lambda wc: config["learning_curves"]["source"],
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer --threads {threads} atomsets --name {params.source} --cache {input.cache} --table {input.table} "
        "--split {input.split} --target {params.target} --train-size {wildcards.size} "
        "--seed {wildcards.seed} --spec {params.spec:q} --out {params.out} > {log} 2>&1"


rule curve_train:
    input:
        model=lambda wc: f"{RESULTS}/models/{config['learning_curves']['source']}/model/model.json",
        table=transfer_table,
        graphs=transfer_manifest,
        split=transfer_split_csv,
    output:
        test=f"{RESULTS}/curves/{{split}}/{{mode}}/n{{size}}/seed{{seed}}/test.json",
    log:
        f"{RESULTS}/logs/curve-{{mode}}-{{split}}-{{size}}-{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/curve-{{mode}}-{{split}}-{{size}}-{{seed}}.tsv"
    wildcard_constraints:
        mode="finetune|scratch",
    params:
        target=config["transfer"]["target"],
        source=lambda wc: f"{RESULTS}/models/{config['learning_curves']['source']}/model",
        name=lambda wc: config["learning_curves"]["source"] if wc.mode == "finetune" else "scratch",
        graphs=lambda wc: transfer_graph_dir(),
        out=lambda wc: f"{RESULTS}/curves/{wc.split}/{wc.mode}/n{wc.size}/seed{wc.seed}",
        spec=lambda wc: json.dumps(transfer_spec(), sort_keys=True),
    resources:
        gpu=1,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer --threads {threads} transfer --name {params.name} --source {params.source} --mode {wildcards.mode} "
        "--seed {wildcards.seed} --target {params.target} --train-size {wildcards.size} "
        "--graphs {params.graphs} --table {input.table} --split {input.split} --spec {params.spec:q} "
        "--out {params.out} > {log} 2>&1"
