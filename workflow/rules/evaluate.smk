# Evaluation: sliding-window predictions of the test cases (one job per model and case),
# per-case metrics per model, the ablation table (paper, Table V) and the sweep tables
# (Tables VII and VIII: the full method over lambda_c or the number of unlabelled cases).


rule predict_case:
    input:
        unpack(predict_inputs),
    output:
        h5=f"{RESULTS}/predictions/{{dataset}}_{{split}}/{{model}}/{{case}}.h5",
        nifti=f"{RESULTS}/predictions/{{dataset}}_{{split}}/{{model}}/{{case}}.nii.gz",
    log:
        f"{RESULTS}/logs/predict/{{dataset}}_{{split}}/{{model}}/{{case}}.log",
    conda:
        "../../envs/semiseg.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        patch_size=lambda w: DATASETS[w.dataset]["patch_size"],
        stride=lambda w: DATASETS[w.dataset]["stride"],
        weights=config["evaluation"]["weights"],
        weighting=config["evaluation"]["weighting"],
        amp=config["evaluation"]["amp"],
    script:
        "../scripts/predict_case.py"


rule case_metrics:
    input:
        unpack(metrics_inputs),
    output:
        f"{RESULTS}/metrics/{{dataset}}_{{split}}/{{model}}.csv",
    log:
        f"{RESULTS}/logs/metrics/{{dataset}}_{{split}}/{{model}}.log",
    conda:
        "../../envs/semiseg.yaml"
    params:
        unit=evaluation_settings()["unit"],
        empty_policy=evaluation_settings()["empty_policy"],
    script:
        "../scripts/case_metrics.py"


rule ablation_table:
    input:
        unpack(table_inputs),
    output:
        csv=f"{RESULTS}/tables/{{dataset}}_{{split}}.csv",
        md=f"{RESULTS}/tables/{{dataset}}_{{split}}.md",
    log:
        f"{RESULTS}/logs/tables/{{dataset}}_{{split}}.log",
    conda:
        "../../envs/semiseg.yaml"
    params:
        counts=scan_counts,
        evaluation=evaluation_settings(),
    script:
        "../scripts/ablation_table.py"


rule sweep_table:
    input:
        sweep_inputs,
    output:
        csv=f"{RESULTS}/tables/{{dataset}}_{{split}}_{{sweep}}.csv",
        md=f"{RESULTS}/tables/{{dataset}}_{{split}}_{{sweep}}.md",
    log:
        f"{RESULTS}/logs/tables/{{dataset}}_{{split}}_{{sweep}}.log",
    wildcard_constraints:
        sweep="|".join(SWEEPS),
    conda:
        "../../envs/semiseg.yaml"
    params:
        rows=sweep_params,
        evaluation=evaluation_settings(),
    script:
        "../scripts/sweep_table.py"
