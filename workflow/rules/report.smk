# The report: Tables 2 and 3, loss curves (Figure 5), attention vs gated (Figure 6), a parity plot, the transfer
# matrix over every target and each target's table (targets/<split>.{csv,md}) under results/report/; `snakemake --report results/<config>/report.html` gathers them into one HTML page.


rule report:
    input:
        results=transfer_results(),
        figure6=figure6_inputs(),
        curves=curve_results(),
    output:
        table2=report(f"{RESULTS}/report/table2.csv", caption="../report/table2.rst", category="Tables"),
        table2_md=f"{RESULTS}/report/table2.md",
        table3=report_table3_outputs(),
        fig5=report(
            f"{RESULTS}/report/fig5_loss_curves.png", caption="../report/fig5.rst", category="Figures"
        ),
        fig6=report_figure6_outputs(),
        curves=report_curves_outputs(),
        parity=report(f"{RESULTS}/report/parity_best.png", caption="../report/parity.rst", category="Figures"),
        matrix=report(
            f"{RESULTS}/report/transfer_matrix.png", caption="../report/matrix.rst", category="Figures"
        ),
        matrix_csv=report(
            f"{RESULTS}/report/transfer_matrix.csv", caption="../report/matrix_table.rst", category="Tables"
        ),
        matrix_md=f"{RESULTS}/report/transfer_matrix.md",
        targets=report_target_outputs(),
        summary=f"{RESULTS}/report/summary.json",
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    params:
        spec=lambda wc: json.dumps(report_spec(), sort_keys=True),
        out=lambda wc, output: os.path.dirname(output.summary),
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m crystal_transfer report --spec {params.spec:q} --out {params.out} > {log} 2>&1"
