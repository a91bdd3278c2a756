# Stage 1: supervised baseline, AUA, AUA + BCL (per data set and split) and the fully
# supervised upper bound (per data set). One engine; methods are config variants.


rule train_stage1:
    input:
        unpack(stage1_inputs),
    output:
        model=f"{RESULTS}/models/{{dataset}}_{{split}}/seed{{seed}}/stage1_{{method}}/model.pt",
        losses=f"{RESULTS}/models/{{dataset}}_{{split}}/seed{{seed}}/stage1_{{method}}/losses.csv",
    log:
        f"{RESULTS}/logs/train/{{dataset}}_{{split}}/seed{{seed}}/stage1_{{method}}.log",
    wildcard_constraints:
        method=TRAIN_STAGE1_METHODS,
    priority: train_priority
    conda:
        "../../envs/semiseg.yaml"
    threads: train_threads
    resources:
        gpu=1,
    params:
        train=train_params,
    script:
        "../scripts/train.py"


if STAGE1_SNAPSHOT is not None:

    # between_stages.stage1_iteration is set: the AUA + BCL run also writes its model at
    # that iteration (model_iter<n>.pt), which the pseudo labels and prototypes come from.
    rule train_stage1_snapshot:
        input:
            unpack(stage1_inputs),
        output:
            model=f"{RESULTS}/models/{{dataset}}_{{split}}/seed{{seed}}/stage1_{{method}}/model.pt",
            losses=f"{RESULTS}/models/{{dataset}}_{{split}}/seed{{seed}}/stage1_{{method}}/losses.csv",
            snapshot=f"{RESULTS}/models/{{dataset}}_{{split}}/seed{{seed}}/stage1_{{method}}/{STAGE1_SNAPSHOT}",
        log:
            f"{RESULTS}/logs/train/{{dataset}}_{{split}}/seed{{seed}}/stage1_{{method}}.log",
        wildcard_constraints:
            method="aua_bcl",
        priority: 1  # the AUA + BCL run: on the path to stage 2 (Plan.train_priority)
        conda:
            "../../envs/semiseg.yaml"
        threads: train_threads
        resources:
            gpu=1,
        params:
            train=train_params,
            snapshot=stage1_snapshot_iteration,
        script:
            "../scripts/train.py"


rule train_fully_supervised:
    input:
        unpack(fully_supervised_inputs),
    output:
        model=f"{RESULTS}/models/{{dataset}}/seed{{seed}}/fully_supervised/model.pt",
        losses=f"{RESULTS}/models/{{dataset}}/seed{{seed}}/fully_supervised/losses.csv",
    log:
        f"{RESULTS}/logs/train/{{dataset}}/seed{{seed}}/fully_supervised.log",
    conda:
        "../../envs/semiseg.yaml"
    threads: train_threads
    resources:
        gpu=1,
    params:
        train=lambda w: train_params(w, "fully_supervised"),
    script:
        "../scripts/train.py"
