"""Rule preprocessing_summary: one row per preprocessed case of a data set."""

from semiseg.jobs import job
from semiseg.preprocessing.summary import summarise_cases

with job(snakemake.log[0], "summary") as log:  # noqa: F821
    table = summarise_cases(snakemake.input, snakemake.output[0])  # noqa: F821
    log.info("summarised %d cases", len(table))
