"""Rule preprocess_case: one raw case -> one HDF5 case file.

Raw images (NIfTI, NRRD, MHA, DICOM series) are preprocessed; the community's preprocessed
HDF5 files (``raw.format: community_h5``) are converted unchanged, or resampled to
``raw.resample_to`` when that is set.
"""

from semiseg.jobs import job
from semiseg.preprocessing import (
    PreprocessingParams,
    convert_community_case,
    preprocess_case,
)

with job(snakemake.log[0], "preprocess") as log:  # noqa: F821
    settings = snakemake.params.settings  # noqa: F821
    case = snakemake.wildcards.case  # noqa: F821
    if settings.get("format") == "community_h5":
        summary = convert_community_case(
            case=case,
            path=snakemake.input.image,  # noqa: F821
            out_path=snakemake.output[0],  # noqa: F821
            spacing=settings["spacing"],
            classes=settings["classes"],
            label_map=None if settings["label_map"] is None else {int(k): int(v) for k, v in settings["label_map"].items()},
            dataset=snakemake.wildcards.dataset,  # noqa: F821
            resample_to=settings.get("resample_to"),
        )
    else:
        params = PreprocessingParams.from_config(
            settings["preprocessing"], settings["classes"], settings["label_map"]
        )
        summary = preprocess_case(
            case=case,
            image_path=snakemake.input.image,  # noqa: F821
            label_path=snakemake.input.get("label"),  # noqa: F821
            out_path=snakemake.output[0],  # noqa: F821
            params=params,
            dataset=snakemake.wildcards.dataset,  # noqa: F821
        )
    log.info("%s", summary)
