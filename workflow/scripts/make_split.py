"""Rule make_split: test, labelled and unlabelled lists of one data set and split."""

from semiseg.jobs import job
from semiseg.splits import split_from_config, write_split

with job(snakemake.log[0], "split") as log:  # noqa: F821
    split = split_from_config(
        snakemake.params.cases,  # noqa: F821
        snakemake.params.split,  # noqa: F821
        snakemake.params.selection,  # noqa: F821
        extra_unlabelled=snakemake.params.extra_unlabelled,  # noqa: F821
    )
    write_split(
        split,
        snakemake.output.summary.rsplit("/", 1)[0],  # noqa: F821
        extra={"dataset": snakemake.wildcards.dataset, "split": snakemake.wildcards.split},  # noqa: F821
    )
    log.info("%s", split.statement)
