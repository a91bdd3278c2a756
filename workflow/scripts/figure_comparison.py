"""Rule figure_comparison: Dice per compared method over seeds and test cases.

Expects: input named by each key in ``params.methods`` (as rule comparison_table), each
the list of that method's per-case metric CSVs in the order of ``params.seeds``; params
``methods``, ``seeds``, ``size`` (inches), ``dpi``; output: the PNG. Methods are drawn in
the comparison table's row order.
"""

from semiseg.evaluation import COMPARISON_ROWS, seed_map
from semiseg.figures import comparison_figure
from semiseg.jobs import job

with job(snakemake.log[0], "figure") as log:  # noqa: F821
    p = snakemake.params  # noqa: F821
    seeds = list(p.seeds)
    unknown = [m for m in p.methods if m not in COMPARISON_ROWS]
    if unknown:
        raise ValueError(f"comparison figure: unknown methods {unknown}; expected keys of {list(COMPARISON_ROWS)}")
    methods = [m for m in COMPARISON_ROWS if m in set(p.methods)]
    files = {m: seed_map(seeds, snakemake.input[m], m) for m in methods}  # noqa: F821
    w = snakemake.wildcards  # noqa: F821
    title = f"{w.dataset}, split {w.split}" if hasattr(w, "dataset") and hasattr(w, "split") else None
    names = comparison_figure(files, COMPARISON_ROWS, snakemake.output[0], size=p.size, dpi=p.dpi, title=title)  # noqa: F821
    log.info("%d methods x %d seeds: %s", len(names), len(seeds), ", ".join(names))
