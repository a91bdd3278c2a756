import os
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
from semiseg.datasets import RawDataMissing
from semiseg.errors import ConfigError
from semiseg.plan import (
    ABLATION,
    SPLIT_PATTERN,
    STAGE1_METHODS,
    STAGE2_METHODS,
    SWEEPS,
    MODELS,
    Plan,
)

try:
    validate_config(
        config, os.path.join(CHECKOUT, "workflow/schemas/config.schema.yaml")
    )
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

# Every job's settings and input files are decided by semiseg.plan.Plan (unit-tested
# without Snakemake); the functions below only pass wildcards to it and turn its errors
# into WorkflowError.
RESULTS = "results"
PLAN = Plan(config, results=RESULTS)
DATASETS = config["datasets"]
GENERATED = PLAN.generated

# between_stages.stage1_iteration: when set, the AUA + BCL run (whose model makes the pseudo
# labels and prototypes) also writes its model at that iteration, so it is trained by the
# rule train_stage1_snapshot (an extra output) and train_stage1 trains the other methods.
STAGE1_SNAPSHOT = PLAN.stage1_snapshot
TRAIN_STAGE1_METHODS = "|".join(
    m for m in STAGE1_METHODS if STAGE1_SNAPSHOT is None or m != "aua_bcl"
)


wildcard_constraints:
    dataset="|".join(DATASETS),
    case="[A-Za-z0-9_.-]+",
    split=SPLIT_PATTERN,
    seed="[0-9]+",
    method="|".join(STAGE1_METHODS),
    method2="|".join(STAGE2_METHODS),
    model="|".join(MODELS),


def glue(fn):
    """Call a Plan method; its one-line errors become Snakemake's WorkflowError, except
    missing raw data: that stops the run with its one line alone (no rule's traceback).
    """

    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RawDataMissing as exc:
            print(f"Error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        except ConfigError as exc:
            raise WorkflowError(str(exc)) from None

    call.__name__ = getattr(fn, "__name__", "plan")
    return call


# ---- data, preprocessing, splits ---------------------------------------------------

cases = glue(PLAN.cases)
extra_unlabelled = glue(PLAN.extra_unlabelled)
split_of = glue(PLAN.split_of)
training_settings = glue(PLAN.training_settings)
evaluation_settings = glue(PLAN.evaluation_settings)
figure_options = glue(PLAN.figure_options)
default_targets = glue(PLAN.default_targets)
seeds = glue(PLAN.seeds)


def raw_inputs(w):
    return glue(PLAN.raw_inputs)(w.dataset, w.case)


def preprocessing_params(w):
    return glue(PLAN.preprocessing_params)(w.dataset, w.case)


def preprocessed_cases(w):
    return glue(PLAN.preprocessed_cases)(w.dataset)


def split_inputs(w):
    return glue(PLAN.split_inputs)(w.dataset)


def split_selection(w):
    return glue(PLAN.split_selection)(w.dataset, w.split)


# ---- training ----------------------------------------------------------------------


def train_params(w, method=None):
    """The hyperparameters of one run: the method from the wildcards unless given."""
    method = method or w.get("method") or w.get("method2")
    return glue(PLAN.train_params)(w.dataset, method, w.get("split"), int(w.seed))


def train_threads(w):
    return glue(PLAN.train_threads)(w.dataset)


def train_priority(w):
    return glue(PLAN.train_priority)(w.get("method") or w.get("method2"))


def stage1_inputs(w):
    return glue(PLAN.stage1_inputs)(w.dataset, w.split)


def fully_supervised_inputs(w):
    return glue(PLAN.fully_supervised_inputs)(w.dataset)


def stage1_snapshot_iteration(w):
    return glue(PLAN.stage1_snapshot_iteration)(w.dataset)


# ---- between the stages and stage 2 ------------------------------------------------


def pseudo_inputs(w):
    return glue(PLAN.pseudo_inputs)(w.dataset, w.split, int(w.seed))


def pseudo_quality_inputs(w):
    return glue(PLAN.pseudo_quality_inputs)(w.dataset, w.split, int(w.seed))


def prototype_inputs(w):
    return glue(PLAN.prototype_inputs)(w.dataset, w.split, int(w.seed))


def stage2_inputs(w):
    return glue(PLAN.stage2_inputs)(w.dataset, w.split, int(w.seed), w.method2)


def feature_params(w):
    return glue(PLAN.feature_params)(w.dataset)


# ---- evaluation --------------------------------------------------------------------


def predict_inputs(w):
    return glue(PLAN.predict_inputs)(w.dataset, w.split, int(w.seed), w.model)


def metrics_inputs(w):
    return glue(PLAN.metrics_inputs)(w.dataset, w.split, int(w.seed), w.model)


def table_inputs(w):
    """Per row of the ablation table, its metric files (one per seed)."""
    return glue(PLAN.seed_metric_files)(w.dataset, w.split, ABLATION)


def scan_counts(w):
    return glue(PLAN.scan_counts)(w.dataset, w.split)


comparison_methods = glue(PLAN.comparison_methods)


def comparison_inputs(w):
    """Per row of the comparison table, its metric files (one per seed)."""
    return glue(PLAN.comparison_inputs)(w.dataset, w.split)


def comparison_counts(w):
    return glue(PLAN.scan_counts)(w.dataset, w.split, PLAN.comparison_methods())


def sweep_inputs(w):
    files = glue(PLAN.sweep_metric_files)(w.dataset, w.split, w.sweep)
    return [f for row in files for f in row]


def sweep_params(w):
    return glue(PLAN.sweep_params)(w.dataset, w.split, w.sweep)


# ---- figures -----------------------------------------------------------------------


def qualitative_case(w):
    return glue(PLAN.qualitative_case)(w.dataset, w.split)


def qualitative_inputs(w):
    return glue(PLAN.qualitative_inputs)(w.dataset, w.split)


def curves_inputs(w):
    return glue(PLAN.curves_inputs)(w.dataset, w.split)


def comparison_curves_inputs(w):
    return glue(PLAN.comparison_curves_inputs)(w.dataset, w.split)


def pseudo_quality_figure_input(w):
    return PLAN.pseudo_quality_file(w.dataset, w.split, PLAN.figure_seed(w.dataset))
