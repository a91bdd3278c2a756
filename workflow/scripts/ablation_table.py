"""Rule ablation_table: the paper's Table V layout as CSV and Markdown."""

from semiseg.evaluation import ABLATION_ROWS, ablation_table
from semiseg.jobs import job

with job(snakemake.log[0], "table") as log:  # noqa: F821
    files = {k: snakemake.input[k] for k in ABLATION_ROWS}  # noqa: F821
    counts = {k: tuple(v) for k, v in snakemake.params.counts.items()}  # noqa: F821
    evaluation = dict(snakemake.params.evaluation)  # noqa: F821
    table = ablation_table(files, counts, evaluation["unit"], snakemake.output.csv, snakemake.output.md, evaluation)  # noqa: F821
    log.info("\n%s", table.to_string(index=False))
