# Preprocessing, one job per case: clip, resample, crop, normalise -> HDF5.


rule preprocess_case:
    input:
        unpack(raw_inputs),
    output:
        f"{RESULTS}/preprocessed/{{dataset}}/{{case}}.h5",
    log:
        f"{RESULTS}/logs/preprocess/{{dataset}}/{{case}}.log",
    conda:
        "../../envs/semiseg.yaml"
    params:
        settings=preprocessing_params,
    script:
        "../scripts/preprocess_case.py"


rule preprocessing_summary:
    input:
        preprocessed_cases,
    output:
        f"{RESULTS}/preprocessed/{{dataset}}/summary.tsv",
    log:
        f"{RESULTS}/logs/preprocess/{{dataset}}/summary.log",
    conda:
        "../../envs/semiseg.yaml"
    script:
        "../scripts/preprocessing_summary.py"
