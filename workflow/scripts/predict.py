"""Rule predict_case: one test case through one model -> HDF5 (preprocessed grid) + NIfTI (raw geometry)."""

import torch

from semiseg.evaluation import predict_case
from semiseg.jobs import job

with job(snakemake.log[0], "predict") as log:  # noqa: F821
    torch.set_num_threads(snakemake.threads)  # noqa: F821
    p = snakemake.params  # noqa: F821
    summary = predict_case(
        snakemake.input.model,  # noqa: F821
        snakemake.input.case,  # noqa: F821
        snakemake.output.h5,  # noqa: F821
        snakemake.output.nifti,  # noqa: F821
        patch_size=p.patch_size,
        stride=p.stride,
        weights=p.weights,
        weighting=p.weighting,
        amp=p.amp,
        device=snakemake.config["device"],  # noqa: F821
        batch_size=snakemake.config["evaluation"]["batch_size"],  # noqa: F821
    )
    log.info("%s", summary)
