"""Rule figure_qualitative: Fig. 3-style panel of one test slice, one panel per method."""

import h5py

from semiseg.evaluation import ABLATION_ROWS
from semiseg.figures import qualitative_panel
from semiseg.io.h5 import read_case
from semiseg.jobs import case_files_in, job

with job(snakemake.log[0], "figure") as log:  # noqa: F821
    p = snakemake.params  # noqa: F821
    image, reference, _ = read_case(snakemake.input.case)  # noqa: F821
    if reference is None:
        raise ValueError(f"case {p.case}: {snakemake.input.case} has no label to compare with")  # noqa: F821
    preds = {}
    # One prediction folder per model; the panel's case file in each.
    paths = [case_files_in(folder, [snakemake.input.case])[0] for folder in snakemake.input.pred]  # noqa: F821
    for model, path in zip(p.models, paths):
        with h5py.File(path, "r") as f:
            preds[ABLATION_ROWS[model]] = f["label"][...]
    z = qualitative_panel(
        image, reference, preds, snakemake.output[0],  # noqa: F821
        slice_index=p.slice, colours=p.colours, size=p.size, dpi=p.dpi,
        title=f"{snakemake.wildcards.dataset} {snakemake.wildcards.split}: test case {p.case}, axial slice {{z}}",  # noqa: F821
    )
    log.info("case %s, axial slice %d", p.case, z)
