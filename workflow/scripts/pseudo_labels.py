"""Rule pseudo_labels: every unlabelled case of one split through the stage-1 model (loaded
once) -> one pseudo-label file per case in the output folder, one log per case."""

import torch

from semiseg.jobs import job
from semiseg.pseudo import write_pseudo_labels

with job(snakemake.log.job, "pseudo") as log:  # noqa: F821
    torch.set_num_threads(snakemake.threads)  # noqa: F821
    config = snakemake.config  # noqa: F821
    summaries = write_pseudo_labels(
        list(snakemake.input.cases),  # noqa: F821
        snakemake.input.model,  # noqa: F821
        snakemake.output[0],  # noqa: F821
        patch_size=snakemake.params.features["patch_size"],  # noqa: F821
        stride=snakemake.params.stride,  # noqa: F821
        weights=snakemake.params.features["weights"],  # noqa: F821
        device=config["device"],
        batch_size=config["between_stages"]["batch_size"],
        label_filter=snakemake.params.label_filter,  # noqa: F821
        log_dir=snakemake.log.cases,  # noqa: F821
    )
    log.info("wrote %d pseudo labels", len(summaries))
