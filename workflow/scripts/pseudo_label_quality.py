"""Rule pseudo_label_quality: Dice, precision, recall and volume ratio of each pseudo label against
the ground truth, and their means."""

from semiseg.jobs import case_files_in, job
from semiseg.pseudo import pseudo_label_quality

with job(snakemake.log[0], "pseudo_quality") as log:  # noqa: F821
    cases = list(snakemake.input.cases)  # noqa: F821
    table = pseudo_label_quality(case_files_in(snakemake.input.pseudo, cases), cases, snakemake.output[0])  # noqa: F821
    mean = table.iloc[-1]
    log.info("pseudo labels, means: Dice %s, precision %s, recall %s, volume ratio %s",
             mean["dice"], mean["precision"], mean["recall"], mean["volume_ratio"])
