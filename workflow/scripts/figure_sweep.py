"""Rule figure_sweep: Dice of the full method against the swept value."""

import pandas as pd

from semiseg.evaluation import SWEEP_COLUMNS
from semiseg.figures import sweep_plot
from semiseg.jobs import job

with job(snakemake.log[0], "figure") as log:  # noqa: F821
    p = snakemake.params  # noqa: F821
    table = pd.read_csv(snakemake.input[0])  # noqa: F821
    sweep_plot(table, SWEEP_COLUMNS[snakemake.wildcards.sweep], snakemake.output[0], size=p.size, dpi=p.dpi)  # noqa: F821
    log.info("%d points", len(table))
