# Evaluation: sliding-window predictions of the test cases (one job per model and seed: the
# model loaded once for every test case, one file pair and one log per case), per-case
# metrics per model and seed, and the tables over the seeds: the ablation
# table (paper, Table V), the sweep tables (Tables VII and VIII: the full method over
# lambda_c or the number of unlabelled cases) and the comparison with the baselines (Tables
# II-IV). Each table has a per-seed CSV next to it.


rule predict:
    input:
        unpack(predict_inputs),
    output:
        directory(f"{RESULTS}/predictions/{{dataset}}_{{split}}/seed{{seed}}/{{model}}"),
    log:
        job=f"{RESULTS}/logs/predict/{{dataset}}_{{split}}/seed{{seed}}/{{model}}.log",
        cases=directory(
            f"{RESULTS}/logs/predict/{{dataset}}_{{split}}/seed{{seed}}/{{model}}"
        ),
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
        "../scripts/predict.py"


rule case_metrics:
    input:
        unpack(metrics_inputs),
    output:
        f"{RESULTS}/metrics/{{dataset}}_{{split}}/seed{{seed}}/{{model}}.csv",
    log:
        f"{RESULTS}/logs/metrics/{{dataset}}_{{split}}/seed{{seed}}/{{model}}.log",
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
        csv=report(
            f"{RESULTS}/tables/{{dataset}}_{{split}}.csv",
            caption="../report/ablation_table.rst",
            category="Tables",
            subcategory="{dataset} {split}",
        ),
        md=f"{RESULTS}/tables/{{dataset}}_{{split}}.md",
        per_seed=f"{RESULTS}/tables/{{dataset}}_{{split}}_per_seed.csv",
    log:
        f"{RESULTS}/logs/tables/{{dataset}}_{{split}}.log",
    conda:
        "../../envs/semiseg.yaml"
    params:
        seeds=lambda w: seeds(w.dataset),
        counts=scan_counts,
        evaluation=evaluation_settings(),
    script:
        "../scripts/ablation_table.py"


rule sweep_table:
    input:
        sweep_inputs,
    output:
        csv=report(
            f"{RESULTS}/tables/{{dataset}}_{{split}}_{{sweep}}.csv",
            caption="../report/sweep_table.rst",
            category="Sweeps",
            subcategory="{dataset} {split}",
        ),
        md=f"{RESULTS}/tables/{{dataset}}_{{split}}_{{sweep}}.md",
        per_seed=f"{RESULTS}/tables/{{dataset}}_{{split}}_{{sweep}}_per_seed.csv",
    log:
        f"{RESULTS}/logs/tables/{{dataset}}_{{split}}_{{sweep}}.log",
    wildcard_constraints:
        sweep="|".join(SWEEPS),
    conda:
        "../../envs/semiseg.yaml"
    params:
        seeds=lambda w: seeds(w.dataset),
        rows=sweep_params,
        evaluation=evaluation_settings(),
    script:
        "../scripts/sweep_table.py"


rule comparison_table:
    input:
        unpack(comparison_inputs),
    output:
        csv=report(
            f"{RESULTS}/tables/{{dataset}}_{{split}}_comparison.csv",
            caption="../report/comparison_table.rst",
            category="Tables",
            subcategory="{dataset} {split}",
        ),
        md=f"{RESULTS}/tables/{{dataset}}_{{split}}_comparison.md",
        per_seed=f"{RESULTS}/tables/{{dataset}}_{{split}}_comparison_per_seed.csv",
    log:
        f"{RESULTS}/logs/tables/{{dataset}}_{{split}}_comparison.log",
    conda:
        "../../envs/semiseg.yaml"
    params:
        methods=lambda w: comparison_methods(),
        seeds=lambda w: seeds(w.dataset),
        counts=comparison_counts,
        evaluation=evaluation_settings(),
    script:
        "../scripts/comparison_table.py"
