"""Rules train_stage1 / train_stage1_snapshot / train_fully_supervised / train_stage2: one run of the shared engine."""

from pathlib import Path

import torch

from semiseg.jobs import case_files_in, job
from semiseg.models import deployment_record
from semiseg.training.engine import TrainConfig, train

with job(snakemake.log[0], "train") as log:  # noqa: F821
    torch.set_num_threads(snakemake.threads)  # noqa: F821
    cfg = TrainConfig.from_dict(snakemake.params.train)  # noqa: F821
    # Runtime settings (how, not what, is computed) come from the config, not params,
    # so changing them reruns nothing.
    config = snakemake.config  # noqa: F821
    runtime = {**config["training"], **config["datasets"][snakemake.wildcards.dataset].get("training", {})}  # noqa: F821
    log.info("training %s: %s", cfg.method, cfg)
    inputs = snakemake.input  # noqa: F821
    outputs = snakemake.output  # noqa: F821
    # What `semiseg predict` needs (preprocessing as recorded in the training cases, patch,
    # the data set's stride): written into model.pt, not a param (the stride is an
    # inference setting; changing it must not retrain).
    dataset = snakemake.wildcards.dataset  # noqa: F821
    deployment = deployment_record(
        list(inputs.labelled), cfg.patch_size, config["datasets"][dataset]["stride"], dataset, config["datasets"][dataset]
    )
    train(
        cfg,
        labelled=list(snakemake.input.labelled),  # noqa: F821
        unlabelled=list(snakemake.input.unlabelled),  # noqa: F821
        out_dir=Path(snakemake.output.model).parent,  # noqa: F821
        device=config["device"],
        checkpoint_every=runtime["checkpoint_every"],
        num_workers=runtime["num_workers"],
        # The pseudo-label folder holds one file per unlabelled case.
        pseudo=case_files_in(inputs.pseudo, list(inputs.unlabelled)) if "pseudo" in inputs.keys() else None,
        prototypes=inputs.prototypes if "prototypes" in inputs.keys() else None,
        init_from=inputs.init if "init" in inputs.keys() else None,
        snapshots={snakemake.params.snapshot: outputs.snapshot} if "snapshot" in outputs.keys() else None,  # noqa: F821
        deployment=deployment,
    )
