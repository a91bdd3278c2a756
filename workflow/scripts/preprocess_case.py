"""Rule preprocess_case: one raw case -> one HDF5 case file."""

from semiseg.jobs import job
from semiseg.preprocessing import PreprocessingParams, preprocess_case

with job(snakemake.log[0], "preprocess") as log:  # noqa: F821
    settings = snakemake.params.settings  # noqa: F821
    params = PreprocessingParams.from_config(
        settings["preprocessing"], settings["classes"], settings["label_map"]
    )
    summary = preprocess_case(
        case=snakemake.wildcards.case,  # noqa: F821
        image_path=snakemake.input.image,  # noqa: F821
        label_path=snakemake.input.get("label"),  # noqa: F821
        out_path=snakemake.output[0],  # noqa: F821
        params=params,
        dataset=snakemake.wildcards.dataset,  # noqa: F821
    )
    log.info("%s", summary)
