# The best transferred model of each target (issue #19): the (source, mode, depth) of lowest mean validation MAE
# over seeds among every run of the target, as the seed ensemble under results/best/<split>/, with its model card,
# test predictions (ensemble mean and std), parity plot and calibration figure.


rule select:
    input:
        target_results_of,
    output:
        card=f"{RESULTS}/best/{{split}}/model_card.json",
        parity=report(
            f"{RESULTS}/best/{{split}}/parity.png",
            caption="../report/best_parity.rst",
            category="Best model per target",
            subcategory="{split}",
        ),
        calibration=report(
            f"{RESULTS}/best/{{split}}/calibration.png",
            caption="../report/calibration.rst",
            category="Best model per target",
            subcategory="{split}",
        ),
        predictions=f"{RESULTS}/best/{{split}}/test_predictions.csv",
    log:
        f"{RESULTS}/logs/select-{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/select-{{split}}.tsv"
    params:
        label=lambda wc: TARGETS[wc.split].label.replace("_", " "),
        out=lambda wc, output: os.path.dirname(output.card),
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer select --name {wildcards.split} --label {params.label:q} --results {input} "
        "--out {params.out} > {log} 2>&1"
