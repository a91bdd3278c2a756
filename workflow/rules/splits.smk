# Splits: test list, labelled and unlabelled training lists per data set and split name.


rule make_split:
    input:
        unpack(split_inputs),
    output:
        test=f"{RESULTS}/splits/{{dataset}}/{{split}}/test.txt",
        labelled=f"{RESULTS}/splits/{{dataset}}/{{split}}/labelled.txt",
        unlabelled=f"{RESULTS}/splits/{{dataset}}/{{split}}/unlabelled.txt",
        summary=f"{RESULTS}/splits/{{dataset}}/{{split}}/split.json",
    log:
        f"{RESULTS}/logs/splits/{{dataset}}_{{split}}.log",
    conda:
        "../../envs/semiseg.yaml"
    params:
        cases=lambda w: cases(w.dataset),
        split=lambda w: DATASETS[w.dataset]["split"],
        selection=split_selection,
        extra_unlabelled=lambda w: extra_unlabelled(w.dataset),
    script:
        "../scripts/make_split.py"
