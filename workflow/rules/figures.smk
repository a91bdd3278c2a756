# Figures (matplotlib), collected by `snakemake --report`: a Fig. 3-style qualitative
# panel, training curves and pseudo-label quality per data set and split, and a plot per
# sweep table. Each figure's options are params of its rule only.


rule figure_qualitative:
    input:
        unpack(qualitative_inputs),
    output:
        report(
            f"{RESULTS}/figures/{{dataset}}_{{split}}/qualitative.png",
            caption="../report/qualitative.rst",
            category="Figures",
            subcategory="{dataset} {split}",
        ),
    log:
        f"{RESULTS}/logs/figures/{{dataset}}_{{split}}_qualitative.log",
    conda:
        "../../envs/semiseg.yaml"
    params:
        models=list(ABLATION),
        case=qualitative_case,
        slice=lambda w: figure_options("qualitative")["slice"].get(w.dataset),
        colours=figure_options("qualitative")["colours"],
        size=figure_options("qualitative")["size"],
        dpi=figure_options("qualitative")["dpi"],
    script:
        "../scripts/figure_qualitative.py"


rule figure_training_curves:
    input:
        curves_inputs,
    output:
        report(
            f"{RESULTS}/figures/{{dataset}}_{{split}}/training_curves.png",
            caption="../report/training_curves.rst",
            category="Figures",
            subcategory="{dataset} {split}",
        ),
    log:
        f"{RESULTS}/logs/figures/{{dataset}}_{{split}}_training_curves.log",
    conda:
        "../../envs/semiseg.yaml"
    params:
        models=list(ABLATION),
        smoothing=figure_options("training_curves")["smoothing"],
        size=figure_options("training_curves")["size"],
        dpi=figure_options("training_curves")["dpi"],
    script:
        "../scripts/figure_training_curves.py"


rule figure_comparison_curves:
    input:
        comparison_curves_inputs,
    output:
        report(
            f"{RESULTS}/figures/{{dataset}}_{{split}}/comparison_curves.png",
            caption="../report/comparison_curves.rst",
            category="Figures",
            subcategory="{dataset} {split}",
        ),
    log:
        f"{RESULTS}/logs/figures/{{dataset}}_{{split}}_comparison_curves.log",
    conda:
        "../../envs/semiseg.yaml"
    params:
        models=lambda w: comparison_methods(),
        rows="comparison",
        smoothing=figure_options("training_curves")["smoothing"],
        size=figure_options("training_curves")["size"],
        dpi=figure_options("training_curves")["dpi"],
    script:
        "../scripts/figure_training_curves.py"


rule figure_pseudo_quality:
    input:
        pseudo_quality_figure_input,
    output:
        report(
            f"{RESULTS}/figures/{{dataset}}_{{split}}/pseudo_quality.png",
            caption="../report/pseudo_quality.rst",
            category="Figures",
            subcategory="{dataset} {split}",
        ),
    log:
        f"{RESULTS}/logs/figures/{{dataset}}_{{split}}_pseudo_quality.log",
    conda:
        "../../envs/semiseg.yaml"
    params:
        size=figure_options("pseudo_quality")["size"],
        dpi=figure_options("pseudo_quality")["dpi"],
    script:
        "../scripts/figure_pseudo_quality.py"


rule figure_sweep:
    input:
        f"{RESULTS}/tables/{{dataset}}_{{split}}_{{sweep}}.csv",
    output:
        report(
            f"{RESULTS}/figures/{{dataset}}_{{split}}_{{sweep}}.png",
            caption="../report/sweep.rst",
            category="Sweeps",
            subcategory="{dataset} {split}",
        ),
    log:
        f"{RESULTS}/logs/figures/{{dataset}}_{{split}}_{{sweep}}.log",
    wildcard_constraints:
        sweep="|".join(SWEEPS),
    conda:
        "../../envs/semiseg.yaml"
    params:
        size=figure_options("sweeps")["size"],
        dpi=figure_options("sweeps")["dpi"],
    script:
        "../scripts/figure_sweep.py"


rule figure_comparison:
    input:
        unpack(comparison_inputs),
    output:
        report(
            f"{RESULTS}/figures/{{dataset}}_{{split}}/comparison.png",
            caption="../report/comparison.rst",
            category="Figures",
            subcategory="{dataset} {split}",
        ),
    log:
        f"{RESULTS}/logs/figures/{{dataset}}_{{split}}_comparison.log",
    conda:
        "../../envs/semiseg.yaml"
    params:
        methods=lambda w: comparison_methods(),
        seeds=lambda w: seeds(w.dataset),
        size=figure_options("comparison")["size"],
        dpi=figure_options("comparison")["dpi"],
    script:
        "../scripts/figure_comparison.py"
