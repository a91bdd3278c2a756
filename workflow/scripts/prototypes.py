"""Rule prototypes: per-class statistics of stage-1 features (Eq. 13) as one file."""

import torch

from semiseg.jobs import case_files_in, job
from semiseg.pseudo import estimate_prototypes, file_sha256

with job(snakemake.log[0], "prototypes") as log:  # noqa: F821
    torch.set_num_threads(snakemake.threads)  # noqa: F821
    stats = estimate_prototypes(
        snakemake.input.model,  # noqa: F821
        snakemake.input.labelled,  # noqa: F821
        snakemake.input.unlabelled,  # noqa: F821
        case_files_in(snakemake.input.pseudo, list(snakemake.input.unlabelled)),  # noqa: F821
        patch_size=snakemake.params.features["patch_size"],  # noqa: F821
        weights=snakemake.params.features["weights"],  # noqa: F821
        normalise=snakemake.params.normalise,  # noqa: F821
        layer=snakemake.params.layer,  # noqa: F821
        device=snakemake.config["device"],  # noqa: F821
    )
    stats.save(snakemake.output[0], model_sha256=file_sha256(snakemake.input.model))  # noqa: F821
    log.info("prototype counts per class: %s", stats.count.tolist())
