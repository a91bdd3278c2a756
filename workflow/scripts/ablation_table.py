"""Rule ablation_table: the paper's Table V layout as CSV and Markdown, over seeds.

Expects: input named by each ``ABLATION_ROWS`` key (supervised, aua, aua_bcl,
aua_bcl_pl, full, fully_supervised), each the list of that row's per-case metric CSVs in
the order of ``params.seeds``; params ``seeds`` (list), ``counts`` (key -> [labelled,
unlabelled]), ``evaluation`` (dict with ``unit``); output ``csv``, ``md``, ``per_seed``.
"""

from semiseg.evaluation import ABLATION_ROWS, ablation_table, seed_map
from semiseg.jobs import job

with job(snakemake.log[0], "table") as log:  # noqa: F821
    seeds = list(snakemake.params.seeds)  # noqa: F821
    files = {k: seed_map(seeds, snakemake.input[k], k) for k in ABLATION_ROWS}  # noqa: F821
    counts = {k: tuple(v) for k, v in snakemake.params.counts.items()}  # noqa: F821
    evaluation = dict(snakemake.params.evaluation)  # noqa: F821
    out = snakemake.output  # noqa: F821
    table = ablation_table(files, counts, evaluation["unit"], out.csv, out.md, evaluation, reference="full",
                           out_per_seed=out.per_seed)
    log.info("\n%s", table.to_string(index=False))
