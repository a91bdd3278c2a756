"""Rule sweep_table: the full method over a swept setting (paper, Tables VII and VIII), over seeds.

Expects: input a flat list, row-major: for each swept value (``params.rows["values"]``
order) its per-case metric CSVs in the order of ``params.seeds``; params ``seeds``
(list), ``rows`` ({"values": [...], "counts": [[labelled, unlabelled], ...],
"reference": the split's own value or None; "reference" may be left out: no p column}),
``evaluation`` (dict with ``unit``); wildcard ``sweep``; output ``csv``, ``md``, ``per_seed``.
"""

from semiseg.evaluation import seed_map, sweep_table
from semiseg.jobs import job

with job(snakemake.log[0], "sweep table") as log:  # noqa: F821
    rows = snakemake.params.rows  # noqa: F821
    seeds = list(snakemake.params.seeds)  # noqa: F821
    evaluation = dict(snakemake.params.evaluation)  # noqa: F821
    files = list(snakemake.input)  # noqa: F821
    values = list(rows["values"])
    if len(files) != len(values) * len(seeds):
        raise ValueError(f"sweep table: {len(files)} metric files for {len(values)} values x {len(seeds)} seeds")
    per_row = [seed_map(seeds, files[i * len(seeds):(i + 1) * len(seeds)], f"value {v}") for i, v in enumerate(values)]
    out = snakemake.output  # noqa: F821
    table = sweep_table(
        snakemake.wildcards.sweep,  # noqa: F821
        values,
        per_row,
        [tuple(c) for c in rows["counts"]],
        evaluation["unit"],
        out.csv,
        out.md,
        evaluation,
        reference=rows.get("reference"),
        out_per_seed=out.per_seed,
    )
    log.info("\n%s", table.to_string(index=False))
