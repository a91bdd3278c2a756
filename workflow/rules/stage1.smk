# Stage 1: supervised baseline, AUA, AUA + BCL (per data set and split) and the fully
# supervised upper bound (per data set). One engine; methods are config variants.


rule train_stage1:
    input:
        unpack(stage1_inputs),
    output:
        model=f"{RESULTS}/models/{{dataset}}_{{split}}/stage1_{{method}}/model.pt",
        losses=f"{RESULTS}/models/{{dataset}}_{{split}}/stage1_{{method}}/losses.csv",
    log:
        f"{RESULTS}/logs/train/{{dataset}}_{{split}}_stage1_{{method}}.log",
    conda:
        "../../envs/semiseg.yaml"
    threads: 4
    resources:
        gpu=1,
    params:
        train=lambda w: train_params(w.dataset, w.method, w.split),
    script:
        "../scripts/train.py"


rule train_fully_supervised:
    input:
        unpack(fully_supervised_inputs),
    output:
        model=f"{RESULTS}/models/{{dataset}}/fully_supervised/model.pt",
        losses=f"{RESULTS}/models/{{dataset}}/fully_supervised/losses.csv",
    log:
        f"{RESULTS}/logs/train/{{dataset}}_fully_supervised.log",
    conda:
        "../../envs/semiseg.yaml"
    threads: 4
    resources:
        gpu=1,
    params:
        train=lambda w: train_params(w.dataset, "fully_supervised"),
    script:
        "../scripts/train.py"
