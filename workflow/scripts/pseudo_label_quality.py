"""Rule pseudo_label_quality: Dice of each pseudo label against the ground truth, and the mean."""

from semiseg.jobs import job
from semiseg.pseudo import pseudo_label_quality

with job(snakemake.log[0], "pseudo_quality") as log:  # noqa: F821
    table = pseudo_label_quality(snakemake.input.pseudo, snakemake.input.cases, snakemake.output[0])  # noqa: F821
    log.info("mean pseudo-label Dice: %s", table["dice"].iloc[-1])
