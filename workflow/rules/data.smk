# Raw data sets written by the workflow itself: the synthetic demo (MSD layout).


for _name in GENERATED:

    rule:
        name:
            f"generate_{_name}"
        output:
            images=expand(
                f"{RESULTS}/raw/{_name}/imagesTr/{{case}}.nii.gz", case=cases(_name)
            ),
            labels=expand(
                f"{RESULTS}/raw/{_name}/labelsTr/{{case}}.nii.gz", case=cases(_name)
            ),
            meta=f"{RESULTS}/raw/{_name}/dataset.json",
        log:
            f"{RESULTS}/logs/generate/{_name}.log",
        conda:
            "../../envs/semiseg.yaml"
        threads: 2
        params:
            generate=DATASETS[_name]["generate"],
            target=DATASETS[_name]["classes"][1],
        script:
            "../scripts/generate_demo.py"
