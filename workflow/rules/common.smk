import os
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")

# The workflow always runs the package of its own checkout: put src/ first on the
# import path, here (for helpers at parse time) and in PYTHONPATH (for jobs and
# --sdm conda environments).
SRC = os.path.join(workflow.basedir, "src")
sys.path.insert(0, SRC)
# (Set here, not required from the user, hence no envvars: directive.)
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        [SRC] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
)

from semiseg.config import validate_config
from semiseg.datasets import (
    RawDataMissing,
    list_cases,
    list_unlabelled_cases,
    raw_case_paths,
)
from semiseg.errors import ConfigError

try:
    validate_config(
        config, os.path.join(workflow.basedir, "workflow/schemas/config.schema.yaml")
    )
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

DATASETS = config["datasets"]
GENERATED = [name for name, ds in DATASETS.items() if ds.get("generate")]
RESULTS = "results"

STAGE1_METHODS_PATTERN = ("supervised", "aua", "aua_bcl")
STAGE2_METHODS_PATTERN = ("aua_bcl_pl", "full")

SPLIT_SELECTION_KEYS = (
    "labelled_percent",
    "labelled_number",
    "labelled_ids",
    "max_unlabelled",
)


wildcard_constraints:
    dataset="|".join(DATASETS),
    case="[A-Za-z0-9_.-]+",
    split="[A-Za-z0-9]+",
    method="|".join(STAGE1_METHODS_PATTERN),
    method2="|".join(STAGE2_METHODS_PATTERN),
    model="supervised|aua|aua_bcl|aua_bcl_pl|full|fully_supervised",


_CASES = {}
_EXTRA = {}


def cases(dataset):
    """Case IDs of a data set (cached); a clear error if its raw data is missing."""
    if dataset not in _CASES:
        try:
            _CASES[dataset] = list_cases(dataset, DATASETS[dataset])
        except RawDataMissing as exc:
            raise WorkflowError(str(exc)) from None
    return _CASES[dataset]


def extra_unlabelled(dataset):
    """IDs of the data set's extra images without a label (raw.unlabelled_image), cached."""
    if dataset not in _EXTRA:
        try:
            extra = list_unlabelled_cases(dataset, DATASETS[dataset])
        except RawDataMissing as exc:
            raise WorkflowError(str(exc)) from None
        clash = sorted(set(extra) & set(cases(dataset)))
        if clash:
            raise WorkflowError(
                f"data set '{dataset}': extra unlabelled images with the ID of a labelled case: "
                f"{', '.join(clash[:8])}"
            )
        _EXTRA[dataset] = extra
    return _EXTRA[dataset]


def is_extra_unlabelled(dataset, case):
    return DATASETS[dataset]["raw"].get("unlabelled_image") and case in set(
        extra_unlabelled(dataset)
    )


def raw_inputs(wildcards):
    """Raw image (and label) path of one case."""
    image, label = raw_case_paths(
        DATASETS[wildcards.dataset],
        wildcards.case,
        unlabelled=bool(is_extra_unlabelled(wildcards.dataset, wildcards.case)),
    )
    inputs = {"image": str(image)}
    if label is not None:
        inputs["label"] = str(label)
    return inputs


def preprocessing_params(wildcards):
    """Exactly what preprocess_case uses for this case.

    Raw images: the preprocessing block (for an extra unlabelled image, crop_source is its
    unlabelled_crop_source), classes, label map. Community HDF5 files: the format, the voxel
    size, classes and label map (the preprocessing block is not applied to them).
    """
    ds = DATASETS[wildcards.dataset]
    if ds["raw"]["format"] == "community_h5":
        return {
            "format": "community_h5",
            "spacing": ds["raw"]["spacing"],
            "classes": ds["classes"],
            "label_map": ds["label_map"],
        }
    pre = dict(ds["preprocessing"])
    unlabelled_crop = pre.pop("unlabelled_crop_source")
    if pre["label_orientation"] == "header":
        del pre["label_orientation_ratio"]  # used by 'auto' only
    if is_extra_unlabelled(wildcards.dataset, wildcards.case):
        pre["crop_source"] = unlabelled_crop
        for key in ("label_orientation", "label_orientation_ratio"):
            pre.pop(key, None)  # no label to orient
    return {
        "preprocessing": pre,
        "classes": ds["classes"],
        "label_map": ds["label_map"],
    }


def preprocessed_cases(wildcards):
    return expand(
        f"{RESULTS}/preprocessed/{{dataset}}/{{case}}.h5",
        dataset=wildcards.dataset,
        case=cases(wildcards.dataset) + extra_unlabelled(wildcards.dataset),
    )


def split_list_files(wildcards):
    """Published list files a split is taken from (inputs, so edits rerun it)."""
    split = DATASETS[wildcards.dataset]["split"]
    return [split[k] for k in ("test_list", "train_list") if k in split]


def split_inputs(wildcards):
    inputs = {"lists": split_list_files(wildcards)}
    if wildcards.dataset in GENERATED:
        inputs["raw"] = f"{RESULTS}/raw/{wildcards.dataset}/dataset.json"
    return inputs


def split_selection(wildcards):
    """The labelled-selection settings of one split (not its training weights)."""
    chosen = DATASETS[wildcards.dataset]["splits"][wildcards.split]
    return {k: v for k, v in chosen.items() if k in SPLIT_SELECTION_KEYS}


def data_targets(dataset):
    """Preprocessing summary and every split of a data set."""
    return [f"{RESULTS}/preprocessed/{dataset}/summary.tsv"] + expand(
        f"{RESULTS}/splits/{dataset}/{{split}}/split.json",
        split=list(DATASETS[dataset]["splits"]),
    )


def model_targets(dataset, split):
    """Every model of one data set and split (stage 1, upper bound, stage 2) and the pseudo-label quality."""
    prefix = f"{RESULTS}/models/{dataset}_{split}"
    return (
        [f"{prefix}/stage1_{m}/model.pt" for m in STAGE1_METHODS_PATTERN]
        + [f"{RESULTS}/models/{dataset}/fully_supervised/model.pt"]
        + [f"{prefix}/stage2_{m}/model.pt" for m in STAGE2_METHODS_PATTERN]
        + [f"{RESULTS}/pseudo/{dataset}_{split}/quality.csv"]
    )


def default_targets():
    """Every generated (demo) data set: its data stages, and every model and the ablation
    table of its first split."""
    targets = []
    for name in GENERATED:
        first = next(iter(DATASETS[name]["splits"]))
        targets += data_targets(name) + model_targets(name, first)
        targets += [
            f"{RESULTS}/tables/{name}_{first}.csv",
            f"{RESULTS}/tables/{name}_{first}.md",
        ]
    return targets


# ---- training ---------------------------------------------------------------------

# Hyperparameters each method uses (its rule's params hold exactly these).
TRAIN_COMMON = (
    "iterations",
    "lr",
    "lr_step",
    "lr_gamma",
    "momentum",
    "weight_decay",
    "labelled_batch",
    "base_filters",
    "dropout",
    "seed",
    "amp",
    "augmentation",
)
MEAN_TEACHER = (
    "unlabelled_batch",
    "ema_decay",
    "teacher_noise_sd",
    "teacher_noise_clip",
    "consistency_max",
    "consistency_rampup",
    "samples",
    "rank",
)
METHOD_KEYS = {
    "supervised": TRAIN_COMMON,
    "fully_supervised": TRAIN_COMMON + ("unlabelled_batch",),
    "aua": TRAIN_COMMON + MEAN_TEACHER,
    "aua_bcl": TRAIN_COMMON
    + MEAN_TEACHER
    + ("bcl_max_samples", "bcl_temperature", "projection_channels"),
    "aua_bcl_pl": TRAIN_COMMON + ("unlabelled_batch", "stage2_init"),
    "full": TRAIN_COMMON
    + (
        "unlabelled_batch",
        "stage2_init",
        "pcl_tau",
        "pcl_normalise",
        "prototype_update",
    ),
}


def training_settings(dataset):
    """The top-level training block with the data set's overrides."""
    return {**config["training"], **DATASETS[dataset].get("training", {})}


def train_params(dataset, method, split=None):
    """Exactly the hyperparameters one training run uses."""
    merged = training_settings(dataset)
    params = {k: merged[k] for k in METHOD_KEYS[method]}
    params.update(
        method=method,
        patch_size=DATASETS[dataset]["patch_size"],
        num_classes=len(DATASETS[dataset]["classes"]),
    )
    if method == "aua_bcl":
        params["lambda_c"] = DATASETS[dataset]["splits"][split]["lambda_c"]
    if method == "full":
        params["lambda_r"] = DATASETS[dataset]["splits"][split]["lambda_r"]
    return params


_SPLITS = {}


def split_of(dataset, split):
    """The split lists, computed at parse time exactly as make_split writes them."""
    from semiseg.splits import split_from_config

    key = (dataset, split)
    if key not in _SPLITS:
        selection = {
            k: v
            for k, v in DATASETS[dataset]["splits"][split].items()
            if k in SPLIT_SELECTION_KEYS
        }
        _SPLITS[key] = split_from_config(
            cases(dataset),
            DATASETS[dataset]["split"],
            selection,
            extra_unlabelled=extra_unlabelled(dataset),
        )
    return _SPLITS[key]


def case_files(dataset, ids):
    return [f"{RESULTS}/preprocessed/{dataset}/{c}.h5" for c in ids]


def stage1_inputs(wildcards):
    s = split_of(wildcards.dataset, wildcards.split)
    return {
        "split": f"{RESULTS}/splits/{wildcards.dataset}/{wildcards.split}/split.json",
        "labelled": case_files(wildcards.dataset, s.labelled),
        "unlabelled": case_files(wildcards.dataset, s.unlabelled),
    }


def fully_supervised_inputs(wildcards):
    """Every training case with a label (those of the data set's first split: the same for
    all splits; extra unlabelled images excluded)."""
    first = next(iter(DATASETS[wildcards.dataset]["splits"]))
    s = split_of(wildcards.dataset, first)
    return {
        "split": f"{RESULTS}/splits/{wildcards.dataset}/{first}/split.json",
        "labelled": case_files(wildcards.dataset, s.train),
        "unlabelled": [],
    }


# ---- between the stages and stage 2 ----------------------------------------------

STAGE1_MODEL = f"{RESULTS}/models/{{dataset}}_{{split}}/stage1_aua_bcl/model.pt"


def pseudo_files(dataset, split):
    return [
        f"{RESULTS}/pseudo/{dataset}_{split}/{c}.h5"
        for c in split_of(dataset, split).unlabelled
    ]


def pseudo_quality_inputs(wildcards):
    s = split_of(wildcards.dataset, wildcards.split)
    return {
        "pseudo": pseudo_files(wildcards.dataset, wildcards.split),
        "cases": case_files(wildcards.dataset, s.unlabelled),
    }


def prototype_inputs(wildcards):
    s = split_of(wildcards.dataset, wildcards.split)
    return {
        "model": STAGE1_MODEL.format(dataset=wildcards.dataset, split=wildcards.split),
        "labelled": case_files(wildcards.dataset, s.labelled),
        "unlabelled": case_files(wildcards.dataset, s.unlabelled),
        "pseudo": pseudo_files(wildcards.dataset, wildcards.split),
    }


def stage2_inputs(wildcards):
    s = split_of(wildcards.dataset, wildcards.split)
    inputs = {
        "split": f"{RESULTS}/splits/{wildcards.dataset}/{wildcards.split}/split.json",
        "labelled": case_files(wildcards.dataset, s.labelled),
        "unlabelled": case_files(wildcards.dataset, s.unlabelled),
        "pseudo": pseudo_files(wildcards.dataset, wildcards.split),
    }
    if wildcards.method2 == "full":
        inputs["prototypes"] = (
            f"{RESULTS}/prototypes/{wildcards.dataset}_{wildcards.split}/prototypes.npz"
        )
    if training_settings(wildcards.dataset)["stage2_init"] == "stage1":
        inputs["init"] = STAGE1_MODEL.format(
            dataset=wildcards.dataset, split=wildcards.split
        )
    return inputs


def feature_params(wildcards):
    """What the stage-1 features / predictions used between the stages depend on."""
    return {
        "weights": config["between_stages"]["weights"],
        "patch_size": DATASETS[wildcards.dataset]["patch_size"],
    }


# ---- evaluation -------------------------------------------------------------------

ABLATION = (
    "supervised",
    "aua",
    "aua_bcl",
    "aua_bcl_pl",
    "full",
    "fully_supervised",
)


def model_file(dataset, split, model):
    """The model file of one row of the ablation table."""
    if model == "fully_supervised":
        return f"{RESULTS}/models/{dataset}/fully_supervised/model.pt"
    stage = "stage2" if model in STAGE2_METHODS_PATTERN else "stage1"
    return f"{RESULTS}/models/{dataset}_{split}/{stage}_{model}/model.pt"


def predict_inputs(wildcards):
    return {
        "model": model_file(wildcards.dataset, wildcards.split, wildcards.model),
        "case": f"{RESULTS}/preprocessed/{wildcards.dataset}/{wildcards.case}.h5",
    }


def metrics_inputs(wildcards):
    test = split_of(wildcards.dataset, wildcards.split).test
    prefix = (
        f"{RESULTS}/predictions/{wildcards.dataset}_{wildcards.split}/{wildcards.model}"
    )
    return {
        "pred": [f"{prefix}/{c}.h5" for c in test],
        "cases": case_files(wildcards.dataset, test),
    }


def table_inputs(wildcards):
    return {
        m: f"{RESULTS}/metrics/{wildcards.dataset}_{wildcards.split}/{m}.csv"
        for m in ABLATION
    }


def scan_counts(wildcards):
    """(labelled, unlabelled) scans each row uses."""
    s = split_of(wildcards.dataset, wildcards.split)
    first = next(iter(DATASETS[wildcards.dataset]["splits"]))
    f = split_of(wildcards.dataset, first)
    n_l, n_u = len(s.labelled), len(s.unlabelled)
    counts = {m: [n_l, n_u] for m in ABLATION}
    counts["supervised"] = [n_l, 0]
    counts["fully_supervised"] = [len(f.labelled) + len(f.unlabelled), 0]
    return counts
