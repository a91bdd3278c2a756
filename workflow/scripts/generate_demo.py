"""Rule generate_<name>: write the synthetic demo data set in the MSD layout."""

from pathlib import Path

from semiseg.data.synthetic import write_demo_dataset
from semiseg.jobs import job

with job(snakemake.log[0], "generate") as log:  # noqa: F821
    gen = snakemake.params.generate  # noqa: F821
    out_dir = Path(snakemake.output.meta).parent  # noqa: F821
    ids = write_demo_dataset(
        out_dir,
        num_cases=gen["num_cases"],
        seed=gen["seed"],
        prefix=gen["prefix"],
        target_name=snakemake.params.target,  # noqa: F821
        workers=snakemake.threads,  # noqa: F821
    )
    log.info("wrote %d synthetic cases to %s", len(ids), out_dir)
