"""Rule sweep_table: the full method over a swept setting (paper, Tables VII and VIII)."""

from semiseg.evaluation import sweep_table
from semiseg.jobs import job

with job(snakemake.log[0], "sweep table") as log:  # noqa: F821
    rows = snakemake.params.rows  # noqa: F821
    evaluation = dict(snakemake.params.evaluation)  # noqa: F821
    table = sweep_table(
        snakemake.wildcards.sweep,  # noqa: F821
        rows["values"],
        list(snakemake.input),  # noqa: F821
        [tuple(c) for c in rows["counts"]],
        evaluation["unit"],
        snakemake.output.csv,  # noqa: F821
        snakemake.output.md,  # noqa: F821
        evaluation,
    )
    log.info("\n%s", table.to_string(index=False))
