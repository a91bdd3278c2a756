import os
import re
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")

# The workflow always runs the package of its own checkout: put src/ first on the
# import path, here (for helpers at parse time) and in PYTHONPATH (for jobs and
# --sdm conda environments). The checkout is found from this file, not from the main
# Snakefile, so another Snakefile may include this workflow (tests/slurm/Snakefile).
CHECKOUT = os.path.abspath(os.path.join(workflow.current_basedir, "..", ".."))
SRC = os.path.join(CHECKOUT, "src")
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
from semiseg.jobs import (
    between_stages_model,
    check_stage1_iteration,
    stage1_snapshot_name,
)

try:
    validate_config(
        config, os.path.join(CHECKOUT, "workflow/schemas/config.schema.yaml")
    )
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

DATASETS = config["datasets"]
GENERATED = [name for name, ds in DATASETS.items() if ds.get("generate")]
RESULTS = "results"

STAGE1_METHODS_PATTERN = ("supervised", "aua", "aua_bcl")

# between_stages.stage1_iteration: when set, the AUA + BCL run (whose model makes the pseudo
# labels and prototypes) also writes its model at that iteration, so it is trained by the
# rule train_stage1_snapshot (an extra output) and train_stage1 trains the other methods.
STAGE1_ITERATION = config["between_stages"]["stage1_iteration"]
STAGE1_SNAPSHOT = (
    None if STAGE1_ITERATION is None else stage1_snapshot_name(STAGE1_ITERATION)
)
TRAIN_STAGE1_METHODS = "|".join(
    m for m in STAGE1_METHODS_PATTERN if STAGE1_SNAPSHOT is None or m != "aua_bcl"
)
STAGE2_METHODS_PATTERN = ("aua_bcl_pl", "full")

# A split name is a configured split (`5pct`) or a sweep variant of one: `5pct-lc0.05`
# (lambda_c = 0.05; the paper's Table VII) or `5pct-u12` (the first 12 unlabelled cases
# only; Table VIII). Variants go through the same rules as their base split.
SPLIT_PATTERN = r"[A-Za-z0-9]+(-lc[0-9]+(\.[0-9]+)?|-u[0-9]+)?"
SWEEPS = ("lambda_c", "unlabelled")

SPLIT_SELECTION_KEYS = (
    "labelled_percent",
    "labelled_number",
    "labelled_ids",
    "max_unlabelled",
)


wildcard_constraints:
    dataset="|".join(DATASETS),
    case="[A-Za-z0-9_.-]+",
    split=SPLIT_PATTERN,
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


# Evaluation protocols (the method notes, "Evaluation conventions of the field").
PROTOCOLS = {
    "paper": {"unit": "voxel", "empty_policy": "zero"},
    "clean": {"unit": "mm", "empty_policy": "worst"},
}


def evaluation_settings():
    """The effective evaluation settings (protocol, its unit and empty policy unless set
    explicitly, weights, window weighting); written under every table."""
    ev = config["evaluation"]
    preset = PROTOCOLS[ev["protocol"]]
    settings = {
        "protocol": ev["protocol"],
        "test_crop": (
            ev["test_crop_source"]
            if ev["protocol"] == "clean"
            else "the data set's crop_source"
        ),
        "unit": ev["unit"] or preset["unit"],
        "empty_policy": ev["empty_policy"] or preset["empty_policy"],
        "weights": ev["weights"],
        "weighting": ev["weighting"],
    }
    return settings


def test_cases(dataset):
    """The test cases of a data set (the same for all its splits)."""
    return split_of(dataset, next(iter(DATASETS[dataset]["splits"]))).test


def preprocessing_params(wildcards):
    """Exactly what preprocess_case uses for this case.

    Raw images: the preprocessing block (for an extra unlabelled image, crop_source is its
    unlabelled_crop_source; under the clean protocol a test case is cropped without its
    label), classes, label map. Community HDF5 files: the format, the voxel size, classes
    and label map (the preprocessing block is not applied to them), and raw.resample_to
    when set.
    """
    ds = DATASETS[wildcards.dataset]
    ev = config["evaluation"]
    if ds["raw"]["format"] == "community_h5":
        if ev["protocol"] == "clean":
            raise WorkflowError(
                f"data set {wildcards.dataset!r}: the community's HDF5 files are already "
                "cropped around the label, so evaluation.protocol 'clean' cannot apply to "
                "them; use the 'paper' protocol, or the raw images (raw.format: image)"
            )
        settings = {
            "format": "community_h5",
            "spacing": ds["raw"]["spacing"],
            "classes": ds["classes"],
            "label_map": ds["label_map"],
        }
        # Only when set: the params of cases converted as stored stay what they were.
        if ds["raw"]["resample_to"] is not None:
            settings["resample_to"] = ds["raw"]["resample_to"]
        return settings
    pre = dict(ds["preprocessing"])
    unlabelled_crop = pre.pop("unlabelled_crop_source")
    if pre["label_orientation"] == "header":
        del pre["label_orientation_ratio"]  # used by 'auto' only
    if is_extra_unlabelled(wildcards.dataset, wildcards.case):
        pre["crop_source"] = unlabelled_crop
        for key in ("label_orientation", "label_orientation_ratio"):
            pre.pop(key, None)  # no label to orient
    elif ev["protocol"] == "clean" and wildcards.case in test_cases(wildcards.dataset):
        pre["crop_source"] = ev["test_crop_source"]
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


def split_settings(dataset, split):
    """The settings of a split name: a configured split, or a sweep variant of one
    (`{base}-lc{lambda_c}` or `{base}-u{number of unlabelled cases}`)."""
    m = re.fullmatch(
        r"(?P<base>[A-Za-z0-9]+)(?:-lc(?P<lc>[0-9.]+)|-u(?P<u>[0-9]+))?", split
    )
    if m is None or m["base"] not in DATASETS[dataset]["splits"]:
        raise WorkflowError(
            f"data set {dataset!r}: unknown split {split!r}; configured splits: "
            f"{', '.join(DATASETS[dataset]['splits'])} (sweep variants: "
            "<split>-lc<lambda_c>, <split>-u<number of unlabelled cases>)"
        )
    settings = dict(DATASETS[dataset]["splits"][m["base"]])
    if m["lc"] is not None:
        settings["lambda_c"] = float(m["lc"])
    if m["u"] is not None:
        settings["max_unlabelled"] = int(m["u"])
    return settings


def split_selection(wildcards):
    """The labelled-selection settings of one split (not its training weights)."""
    chosen = split_settings(wildcards.dataset, wildcards.split)
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
    """Every generated (demo) data set: its data stages, and every model, the ablation
    table and the figures of its first split."""
    targets = []
    for name in GENERATED:
        first = next(iter(DATASETS[name]["splits"]))
        targets += data_targets(name) + model_targets(name, first)
        targets += [
            f"{RESULTS}/tables/{name}_{first}.csv",
            f"{RESULTS}/tables/{name}_{first}.md",
        ] + figure_targets(name, first)
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
    + ("bcl_max_samples", "bcl_temperature", "bcl_features", "projection_channels"),
    "aua_bcl_pl": TRAIN_COMMON + ("unlabelled_batch", "stage2_init", "stage2_loss"),
    "full": TRAIN_COMMON
    + (
        "unlabelled_batch",
        "stage2_init",
        "stage2_loss",
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
        params["lambda_c"] = split_settings(dataset, split)["lambda_c"]
    if method == "full":
        params["lambda_r"] = split_settings(dataset, split)["lambda_r"]
    return params


_SPLITS = {}


def split_of(dataset, split):
    """The split lists, computed at parse time exactly as make_split writes them."""
    from semiseg.splits import split_from_config

    key = (dataset, split)
    if key not in _SPLITS:
        selection = {
            k: v
            for k, v in split_settings(dataset, split).items()
            if k in SPLIT_SELECTION_KEYS
        }
        _SPLITS[key] = split_from_config(
            cases(dataset),
            DATASETS[dataset]["split"],
            selection,
            extra_unlabelled=extra_unlabelled(dataset),
        )
        n_unlabelled = selection.get("max_unlabelled")
        if n_unlabelled is not None and len(_SPLITS[key].unlabelled) < n_unlabelled:
            raise WorkflowError(
                f"data set {dataset!r}, split {split!r}: asks for {n_unlabelled} "
                f"unlabelled cases, but the split has only "
                f"{len(_SPLITS[key].unlabelled)}"
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

STAGE1_DIR = f"{RESULTS}/models/{{dataset}}_{{split}}/stage1_aua_bcl"
STAGE1_MODEL = f"{STAGE1_DIR}/model.pt"


def stage1_snapshot_iteration(dataset):
    """between_stages.stage1_iteration checked against the data set's stage-1 iterations."""
    try:
        return check_stage1_iteration(
            STAGE1_ITERATION, training_settings(dataset)["iterations"], dataset
        )
    except ConfigError as exc:
        raise WorkflowError(str(exc)) from None


def between_stages_model_file(wildcards):
    """The stage-1 model the pseudo labels and prototypes come from (semiseg.jobs decides)."""
    try:
        return between_stages_model(
            STAGE1_DIR.format(dataset=wildcards.dataset, split=wildcards.split),
            STAGE1_ITERATION,
            training_settings(wildcards.dataset)["iterations"],
            wildcards.dataset,
        )
    except ConfigError as exc:
        raise WorkflowError(str(exc)) from None


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
        "model": between_stages_model_file(wildcards),
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
    counts["fully_supervised"] = [len(f.train), 0]  # extra unlabelled images excluded
    return counts


# ---- sweeps (paper, Tables VII and VIII) -----------------------------------------


def _plain(value):
    """A number as it appears in a split name: positional, no exponent (0.05, 0.0001)."""
    from decimal import Decimal

    text = format(Decimal(repr(float(value))), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def sweep_rows(dataset, split, sweep):
    """[(swept value, split name of its models)] of one sweep table; the value the split
    itself uses maps to the split (its models are reused)."""
    settings = split_settings(dataset, split)
    values = settings.get("sweep", {}).get(sweep)
    if not values:
        raise WorkflowError(
            f"data set {dataset!r}, split {split!r}: no values for the {sweep!r} sweep; "
            f"set datasets.{dataset}.splits.{split}.sweep.{sweep} in config.yaml"
        )
    if sweep == "lambda_c":
        return [
            (v, split if v == settings["lambda_c"] else f"{split}-lc{_plain(v)}")
            for v in values
        ]
    n = len(split_of(dataset, split).unlabelled)
    rows = []
    for fraction in values:
        k = int(fraction * n + 0.5)  # round half up, as the labelled count
        if k < 1:
            raise WorkflowError(
                f"data set {dataset!r}, split {split!r}: unlabelled fraction {fraction} "
                f"of {n} cases keeps none"
            )
        rows.append((k, split if k == n else f"{split}-u{k}"))
    return rows


def sweep_inputs(wildcards):
    return [
        f"{RESULTS}/metrics/{wildcards.dataset}_{s}/full.csv"
        for _, s in sweep_rows(wildcards.dataset, wildcards.split, wildcards.sweep)
    ]


def sweep_params(wildcards):
    rows = sweep_rows(wildcards.dataset, wildcards.split, wildcards.sweep)
    counts = []
    for _, s in rows:
        chosen = split_of(wildcards.dataset, s)
        counts.append([len(chosen.labelled), len(chosen.unlabelled)])
    return {"values": [v for v, _ in rows], "counts": counts}


# ---- figures ----------------------------------------------------------------------


def figure_options(name):
    """The options of one figure (its rule's params hold exactly these)."""
    return config["figures"][name]


def qualitative_case(wildcards):
    """The test case of the qualitative panel: figures.qualitative.case[<data set>],
    else the split's first test case."""
    test = split_of(wildcards.dataset, wildcards.split).test
    chosen = figure_options("qualitative")["case"].get(wildcards.dataset)
    if chosen is None:
        return test[0]
    if chosen not in test:
        raise WorkflowError(
            f"figures.qualitative.case.{wildcards.dataset} = {chosen!r} is not a test case "
            f"of split {wildcards.split!r} (test cases: {', '.join(test)})"
        )
    return chosen


def qualitative_inputs(wildcards):
    case = qualitative_case(wildcards)
    prefix = f"{RESULTS}/predictions/{wildcards.dataset}_{wildcards.split}"
    return {
        "case": f"{RESULTS}/preprocessed/{wildcards.dataset}/{case}.h5",
        "pred": [f"{prefix}/{m}/{case}.h5" for m in ABLATION],
    }


def curves_inputs(wildcards):
    return [
        os.path.join(
            os.path.dirname(model_file(wildcards.dataset, wildcards.split, m)),
            "losses.csv",
        )
        for m in ABLATION
    ]


def figure_targets(dataset, split):
    prefix = f"{RESULTS}/figures/{dataset}_{split}"
    return [
        f"{prefix}/{name}.png"
        for name in ("qualitative", "training_curves", "pseudo_quality")
    ]
