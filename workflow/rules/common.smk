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
from semiseg.datasets import RawDataMissing, list_cases, raw_case_paths
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


_CASES = {}


def cases(dataset):
    """Case IDs of a data set (cached); a clear error if its raw data is missing."""
    if dataset not in _CASES:
        try:
            _CASES[dataset] = list_cases(dataset, DATASETS[dataset])
        except RawDataMissing as exc:
            raise WorkflowError(str(exc)) from None
    return _CASES[dataset]


def raw_inputs(wildcards):
    """Raw image (and label) path of one case."""
    image, label = raw_case_paths(DATASETS[wildcards.dataset], wildcards.case)
    inputs = {"image": str(image)}
    if label is not None:
        inputs["label"] = str(label)
    return inputs


def preprocessing_params(wildcards):
    """Exactly what preprocess_case uses: the preprocessing block, classes, label map."""
    ds = DATASETS[wildcards.dataset]
    return {
        "preprocessing": ds["preprocessing"],
        "classes": ds["classes"],
        "label_map": ds["label_map"],
    }


def preprocessed_cases(wildcards):
    return expand(
        f"{RESULTS}/preprocessed/{{dataset}}/{{case}}.h5",
        dataset=wildcards.dataset,
        case=cases(wildcards.dataset),
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


def default_targets():
    """The data stages of every generated (demo) data set."""
    return [t for name in GENERATED for t in data_targets(name)]
