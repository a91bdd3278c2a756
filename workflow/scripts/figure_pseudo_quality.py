"""Rule figure_pseudo_quality: Dice of each pseudo label against its withheld label."""

import pandas as pd

from semiseg.figures import pseudo_quality_plot
from semiseg.jobs import job

with job(snakemake.log[0], "figure") as log:  # noqa: F821
    p = snakemake.params  # noqa: F821
    quality = pd.read_csv(snakemake.input[0])  # noqa: F821
    drawn = pseudo_quality_plot(quality, snakemake.output[0], size=p.size, dpi=p.dpi)  # noqa: F821
    log.info("%d cases, mean Dice %.4f", len(drawn), drawn["dice"].mean())
