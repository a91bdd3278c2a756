"""Rules figure_training_curves and figure_comparison_curves: every loss term per method.

Expects: one ``losses.csv`` per name in ``params.models``, in that order; params ``models``,
``rows`` (optional: ``ablation``, the default, or ``comparison``: which table's row names
label the runs), ``smoothing``, ``size`` (inches), ``dpi``; output: the PNG.
"""

import pandas as pd

from semiseg.evaluation import ABLATION_ROWS, COMPARISON_ROWS
from semiseg.figures import training_curves
from semiseg.jobs import job

with job(snakemake.log[0], "figure") as log:  # noqa: F821
    p = snakemake.params  # noqa: F821
    names = {"ablation": ABLATION_ROWS, "comparison": COMPARISON_ROWS}[getattr(p, "rows", "ablation")]
    histories = {names[m]: pd.read_csv(f) for m, f in zip(p.models, snakemake.input)}  # noqa: F821
    terms = training_curves(histories, snakemake.output[0], smoothing=p.smoothing, size=p.size, dpi=p.dpi)  # noqa: F821
    log.info("loss terms drawn: %s", ", ".join(terms))
