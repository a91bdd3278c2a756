"""Rule predict: every test case through one model (loaded once) -> per case an HDF5 file
(preprocessed grid) and a NIfTI file (raw geometry) in the output folder, one log per case."""

import torch

from semiseg.evaluation import predict_cases
from semiseg.jobs import job

with job(snakemake.log.job, "predict") as log:  # noqa: F821
    torch.set_num_threads(snakemake.threads)  # noqa: F821
    p = snakemake.params  # noqa: F821
    summaries = predict_cases(
        snakemake.input.model,  # noqa: F821
        list(snakemake.input.cases),  # noqa: F821
        snakemake.output[0],  # noqa: F821
        patch_size=p.patch_size,
        stride=p.stride,
        weights=p.weights,
        weighting=p.weighting,
        amp=p.amp,
        device=snakemake.config["device"],  # noqa: F821
        batch_size=snakemake.config["evaluation"]["batch_size"],  # noqa: F821
        log_dir=snakemake.log.cases,  # noqa: F821
    )
    log.info("predicted %d cases", len(summaries))
