# The graphs stage: results/data/<dataset>/crystals.parquet -> results/graphs/<dataset>/
# {plan.json, shard-NNNNN.cgs, manifest.json, rejected.csv}. The plan is a checkpoint: the number of
# shards follows from the table's row count and graphs.shard_size; each shard is one job.


checkpoint graph_plan:
    input:
        f"{RESULTS}/data/{{dataset}}/crystals.parquet",
    output:
        f"{RESULTS}/graphs/{{dataset}}/plan.json",
    log:
        f"{RESULTS}/logs/graph_plan-{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/graph_plan-{{dataset}}.tsv"
    params:
        settings=json.dumps(config["graphs"], sort_keys=True),
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer graphs plan --table {input} --dataset {wildcards.dataset} "
        "--settings {params.settings:q} --out {output} > {log} 2>&1"


rule graph_shard:
    input:
        table=f"{RESULTS}/data/{{dataset}}/crystals.parquet",
        plan=f"{RESULTS}/graphs/{{dataset}}/plan.json",
    output:
        f"{RESULTS}/graphs/{{dataset}}/shard-{{index}}.cgs",
    log:
        f"{RESULTS}/logs/graph_shard-{{dataset}}-{{index}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/graph_shard-{{dataset}}-{{index}}.tsv"
    wildcard_constraints:
        index=r"\d{5}",
    conda:
        "../../envs/pipeline.yaml"
    resources:
        mem_mb=1000,
    shell:
        "python -m crystal_transfer graphs shard --plan {input.plan} --table {input.table} "
        "--index {wildcards.index} --out {output} > {log} 2>&1"


rule graph_manifest:
    input:
        plan=f"{RESULTS}/graphs/{{dataset}}/plan.json",
        shards=graph_shards,
    output:
        manifest=f"{RESULTS}/graphs/{{dataset}}/manifest.json",
        rejected=f"{RESULTS}/graphs/{{dataset}}/rejected.csv",
    log:
        f"{RESULTS}/logs/graph_manifest-{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/graph_manifest-{{dataset}}.tsv"
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer graphs manifest --plan {input.plan} --out {output.manifest} > {log} 2>&1"
