"""Rule figure_training_curves: every loss term per method."""

import pandas as pd

from semiseg.evaluation import ABLATION_ROWS
from semiseg.figures import training_curves
from semiseg.jobs import job

with job(snakemake.log[0], "figure") as log:  # noqa: F821
    p = snakemake.params  # noqa: F821
    histories = {ABLATION_ROWS[m]: pd.read_csv(f) for m, f in zip(p.models, snakemake.input)}  # noqa: F821
    terms = training_curves(histories, snakemake.output[0], smoothing=p.smoothing, size=p.size, dpi=p.dpi)  # noqa: F821
    log.info("loss terms drawn: %s", ", ".join(terms))
