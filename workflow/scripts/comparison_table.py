"""Rule comparison_table: the paper's Tables II-IV layout (methods compared), over seeds.

Expects: input named by each key in ``params.methods`` (keys of ``COMPARISON_ROWS``:
supervised, mt, uamt, bcp, aua_bcl, full, fully_supervised; config ``comparison.methods``),
each the list of that method's per-case metric CSVs in the order of ``params.seeds``;
params ``methods`` (list), ``seeds`` (list), ``counts`` (key -> [labelled, unlabelled]),
``evaluation`` (dict with ``unit``), optionally ``reference`` (default "auto": full, else
aua_bcl, else no p column); output ``csv``, ``md``, ``per_seed``.
"""

from semiseg.evaluation import comparison_table, seed_map
from semiseg.jobs import job

with job(snakemake.log[0], "comparison table") as log:  # noqa: F821
    p = snakemake.params  # noqa: F821
    seeds, methods = list(p.seeds), list(p.methods)
    files = {m: seed_map(seeds, snakemake.input[m], m) for m in methods}  # noqa: F821
    counts = {k: tuple(v) for k, v in p.counts.items()}
    evaluation = dict(p.evaluation)
    out = snakemake.output  # noqa: F821
    table = comparison_table(methods, files, counts, evaluation["unit"], out.csv, out.md, evaluation,
                             reference=p.get("reference", "auto"), out_per_seed=out.per_seed)
    log.info("\n%s", table.to_string(index=False))
