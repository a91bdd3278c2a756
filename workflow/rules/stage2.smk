# Stage 2: a fresh V-Net on labelled crops (ground truth) and unlabelled crops (stored
# pseudo labels); `aua_bcl_pl` (lambda_r = 0) and `full` (+ PCL) share the artifacts.


rule train_stage2:
    input:
        unpack(stage2_inputs),
    output:
        model=f"{RESULTS}/models/{{dataset}}_{{split}}/seed{{seed}}/stage2_{{method2}}/model.pt",
        losses=f"{RESULTS}/models/{{dataset}}_{{split}}/seed{{seed}}/stage2_{{method2}}/losses.csv",
    log:
        f"{RESULTS}/logs/train/{{dataset}}_{{split}}/seed{{seed}}/stage2_{{method2}}.log",
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
