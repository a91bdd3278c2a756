"""Rule case_metrics: Dice, Jaccard, ASD, 95HD of every test case of one model."""

from semiseg.evaluation import case_metrics
from semiseg.jobs import case_files_in, job

with job(snakemake.log[0], "metrics") as log:  # noqa: F821
    cases = list(snakemake.input.cases)  # noqa: F821
    table = case_metrics(
        case_files_in(snakemake.input.pred, cases),  # noqa: F821
        cases,
        unit=snakemake.params.unit,  # noqa: F821
        empty_policy=snakemake.params.empty_policy,  # noqa: F821
        out_path=snakemake.output[0],  # noqa: F821
    )
    log.info("mean Dice %.4f over %d cases", table["dice"].mean(), len(table))
