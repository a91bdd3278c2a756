# Between the stages: pseudo labels (one job per split and seed: the stage-1 model loaded
# once for every unlabelled case, one file and one log per case), their quality where
# ground truth exists, and the prototype statistics; each computed once and shared by
# both stage-2 variants.


rule pseudo_labels:
    input:
        unpack(pseudo_inputs),
    output:
        directory(f"{RESULTS}/pseudo/{{dataset}}_{{split}}/seed{{seed}}/labels"),
    log:
        job=f"{RESULTS}/logs/pseudo/{{dataset}}_{{split}}/seed{{seed}}.log",
        cases=directory(
            f"{RESULTS}/logs/pseudo/{{dataset}}_{{split}}/seed{{seed}}/labels"
        ),
    priority: 1  # on the path to stage 2 (Plan.train_priority)
    conda:
        "../../envs/semiseg.yaml"
    threads: train_threads
    resources:
        gpu=1,
    params:
        features=feature_params,
        stride=lambda w: DATASETS[w.dataset]["stride"],
        label_filter=config["between_stages"]["pseudo_label_filter"],
    script:
        "../scripts/pseudo_labels.py"


rule pseudo_label_quality:
    input:
        unpack(pseudo_quality_inputs),
    output:
        f"{RESULTS}/pseudo/{{dataset}}_{{split}}/seed{{seed}}/quality.csv",
    log:
        f"{RESULTS}/logs/pseudo/{{dataset}}_{{split}}/seed{{seed}}/quality.log",
    conda:
        "../../envs/semiseg.yaml"
    script:
        "../scripts/pseudo_label_quality.py"


rule prototypes:
    input:
        unpack(prototype_inputs),
    output:
        f"{RESULTS}/prototypes/{{dataset}}_{{split}}/seed{{seed}}/prototypes.npz",
    log:
        f"{RESULTS}/logs/prototypes/{{dataset}}_{{split}}/seed{{seed}}.log",
    priority: 1  # on the path to stage 2 (Plan.train_priority)
    conda:
        "../../envs/semiseg.yaml"
    threads: train_threads
    resources:
        gpu=1,
    params:
        features=feature_params,
        layer=config["between_stages"]["feature_layer"],
        normalise=lambda w: training_settings(w.dataset)["pcl_normalise"],
    script:
        "../scripts/prototypes.py"
