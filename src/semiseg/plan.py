"""The workflow's plan: from a validated configuration to every job's settings and files.

What a job reads and the hyperparameters it is run with are decided here, in plain
Python, so they are unit-tested without Snakemake; ``workflow/rules/common.smk`` only
calls a :class:`Plan` (and turns :class:`ConfigError` into Snakemake's error type).

Paths are relative to the working directory, under ``results`` (the constructor's
``results``). Per data set, split and seed:

- models: ``{results}/models/{dataset}_{split}/seed{seed}/stage1_{method}/model.pt`` (and
  ``stage2_{method}``); the upper bound ``{results}/models/{dataset}/seed{seed}/fully_supervised/model.pt``;
- pseudo labels and prototypes: ``{results}/pseudo/{dataset}_{split}/seed{seed}/labels/{case}.h5``
  (the folder is one job's output), 
  ``{results}/prototypes/{dataset}_{split}/seed{seed}/prototypes.npz``;
- predictions and metrics: ``{results}/predictions/{dataset}_{split}/seed{seed}/{model}/{case}.h5``
  and ``.nii.gz`` (the folder is one job's output),
  ``{results}/metrics/{dataset}_{split}/seed{seed}/{model}.csv``.

Preprocessed cases and splits do not depend on the seed (the labelled cases stay the
published ones). Tables and figures aggregate over the data set's ``seeds``.

This module imports no PyTorch, so the workflow can use it while it parses.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from semiseg.datasets import list_cases, list_unlabelled_cases, raw_case_paths
from semiseg.errors import ConfigError
from semiseg.jobs import between_stages_model, check_stage1_iteration, stage1_snapshot_name

#: Stage-1 methods trained per data set, split and seed (one engine, config variants): the
#: paper's and the baselines of the comparison table.
STAGE1_METHODS = ("supervised", "aua", "aua_bcl", "mt", "uamt", "bcp")
#: Stage-2 methods (they share the pseudo labels and prototypes of the split and seed).
STAGE2_METHODS = ("aua_bcl_pl", "full")
#: Every model that can be predicted and scored (the rows of the tables).
MODELS = STAGE1_METHODS + STAGE2_METHODS + ("fully_supervised",)

#: A split name: a configured split (``5pct``) or a sweep variant of one: ``5pct-lc0.05``
#: (lambda_c = 0.05; the paper's Table VII) or ``5pct-u12`` (the first 12 unlabelled cases
#: only; Table VIII). Variants go through the same rules as their base split.
SPLIT_PATTERN = r"[A-Za-z0-9]+(-lc[0-9]+(\.[0-9]+)?|-u[0-9]+)?"
SWEEPS = ("lambda_c", "unlabelled")
#: The split settings that select cases (not training weights).
SPLIT_SELECTION_KEYS = ("labelled_percent", "labelled_number", "labelled_ids", "max_unlabelled")

#: The paper's ablation table (Table V) and the upper bound of Table II, in row order.
ABLATION = ("supervised", "aua", "aua_bcl", "aua_bcl_pl", "full", "fully_supervised")

#: The comparison table's rows (paper, Tables II-IV), in order; ``comparison.methods`` picks.
COMPARISON = ("supervised", "mt", "uamt", "bcp", "aua_bcl", "full", "fully_supervised")

#: Evaluation protocols (the method notes, "Evaluation conventions of the field").
PROTOCOLS = {
    "paper": {"unit": "voxel", "empty_policy": "zero"},
    "clean": {"unit": "mm", "empty_policy": "worst"},
}

# Hyperparameters each method uses (its training rule's params hold exactly these).
TRAIN_COMMON = (
    "iterations", "lr", "lr_step", "lr_gamma", "momentum", "weight_decay", "labelled_batch",
    "base_filters", "dropout", "amp", "cpu_amp", "augmentation",
)
MEAN_TEACHER = (
    "unlabelled_batch", "ema_decay", "teacher_noise_sd", "teacher_noise_clip", "consistency_max",
    "consistency_rampup", "samples", "rank",
)
MT_BASELINE = (
    "unlabelled_batch", "ema_decay", "teacher_noise_sd", "teacher_noise_clip", "consistency_rampup", "mt_consistency",
)
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "supervised": TRAIN_COMMON,
    "fully_supervised": TRAIN_COMMON + ("unlabelled_batch",),
    "aua": TRAIN_COMMON + MEAN_TEACHER,
    "aua_bcl": TRAIN_COMMON + MEAN_TEACHER + ("bcl_max_samples", "bcl_temperature", "bcl_features", "projection_channels"),
    "aua_bcl_pl": TRAIN_COMMON + ("unlabelled_batch", "stage2_init", "stage2_loss"),
    "full": TRAIN_COMMON + ("unlabelled_batch", "stage2_init", "stage2_loss", "pcl_tau", "pcl_normalise", "prototype_update"),
    # Baselines (the comparison table): mean teacher with the field's softmax MSE, and UA-MT.
    "mt": TRAIN_COMMON + MT_BASELINE,
    "uamt": TRAIN_COMMON + MT_BASELINE + ("uamt_passes", "uamt_threshold_start"),
    # BCP: labelled copy-paste pre-training, then bidirectional copy-paste self-training.
    "bcp": TRAIN_COMMON + ("unlabelled_batch", "ema_decay", "bcp_pretrain_iterations", "bcp_mask_ratio", "bcp_u_weight"),
}


def plain_number(value: float) -> str:
    """A number as it appears in a split name: positional, no exponent (0.05, 0.0001, 2)."""
    text = format(Decimal(repr(float(value))), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


class Plan:
    """Every job's settings and input files, from a validated config (``validate_config``).

    ``cases`` / ``unlabelled_cases``: how a data set's case IDs are listed (default: from
    its raw data, :func:`semiseg.datasets.list_cases`); tests pass their own. Results are
    cached per data set. Errors are :class:`ConfigError` (or the lister's
    :class:`~semiseg.datasets.RawDataMissing`), one line naming the key or data set.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        results: str = "results",
        cases: Callable[[str, Mapping[str, Any]], list[str]] = list_cases,
        unlabelled_cases: Callable[[str, Mapping[str, Any]], list[str]] = list_unlabelled_cases,
    ) -> None:
        self.config = config
        self.datasets: Mapping[str, Any] = config["datasets"]
        self.results = results
        self._list_cases, self._list_unlabelled = cases, unlabelled_cases
        self._cases: dict[str, list[str]] = {}
        self._extra: dict[str, list[str]] = {}
        self._splits: dict[tuple[str, str], Any] = {}
        # between_stages.stage1_iteration: when set, the AUA + BCL run also writes its model
        # at that iteration, which the pseudo labels and prototypes are made from.
        self.stage1_iteration: int | None = config["between_stages"]["stage1_iteration"]

    # ---- data sets, cases, splits ---------------------------------------------------

    @property
    def generated(self) -> list[str]:
        """Data sets the workflow writes itself (the synthetic demo)."""
        return [name for name, ds in self.datasets.items() if ds.get("generate")]

    def dataset(self, name: str) -> Mapping[str, Any]:
        if name not in self.datasets:
            raise ConfigError(f"unknown data set {name!r}; configured: {', '.join(self.datasets)}")
        return self.datasets[name]

    def cases(self, dataset: str) -> list[str]:
        """Case IDs of a data set with a label (cached)."""
        if dataset not in self._cases:
            self._cases[dataset] = list(self._list_cases(dataset, self.dataset(dataset)))
        return self._cases[dataset]

    def extra_unlabelled(self, dataset: str) -> list[str]:
        """IDs of the data set's extra images without a label (``raw.unlabelled_image``), cached."""
        if dataset not in self._extra:
            extra = list(self._list_unlabelled(dataset, self.dataset(dataset)))
            clash = sorted(set(extra) & set(self.cases(dataset)))
            if clash:
                raise ConfigError(
                    f"data set '{dataset}': extra unlabelled images with the ID of a labelled case: {', '.join(clash[:8])}"
                )
            self._extra[dataset] = extra
        return self._extra[dataset]

    def is_extra_unlabelled(self, dataset: str, case: str) -> bool:
        return bool(self.dataset(dataset)["raw"].get("unlabelled_image")) and case in set(self.extra_unlabelled(dataset))

    def raw_inputs(self, dataset: str, case: str) -> dict[str, str]:
        """Raw image (and label) path of one case."""
        image, label = raw_case_paths(self.dataset(dataset), case, unlabelled=self.is_extra_unlabelled(dataset, case))
        inputs = {"image": str(image)}
        if label is not None:
            inputs["label"] = str(label)
        return inputs

    def first_split(self, dataset: str) -> str:
        return next(iter(self.dataset(dataset)["splits"]))

    def split_settings(self, dataset: str, split: str) -> dict[str, Any]:
        """The settings of a split name: a configured split, or a sweep variant of one
        (``{base}-lc{lambda_c}`` or ``{base}-u{number of unlabelled cases}``)."""
        m = re.fullmatch(r"(?P<base>[A-Za-z0-9]+)(?:-lc(?P<lc>[0-9]+(?:\.[0-9]+)?)|-u(?P<u>[0-9]+))?", split)
        splits = self.dataset(dataset)["splits"]
        if m is None or m["base"] not in splits:
            raise ConfigError(
                f"data set {dataset!r}: unknown split {split!r}; configured splits: {', '.join(splits)} "
                "(sweep variants: <split>-lc<lambda_c>, <split>-u<number of unlabelled cases>)"
            )
        settings = dict(splits[m["base"]])
        if m["lc"] is not None:
            settings["lambda_c"] = float(m["lc"])
        if m["u"] is not None:
            settings["max_unlabelled"] = int(m["u"])
        return settings

    def split_selection(self, dataset: str, split: str) -> dict[str, Any]:
        """The labelled-selection settings of one split (not its training weights)."""
        return {k: v for k, v in self.split_settings(dataset, split).items() if k in SPLIT_SELECTION_KEYS}

    def split_list_files(self, dataset: str) -> list[str]:
        """Published list files a data set's splits are taken from (inputs, so edits rerun them)."""
        split = self.dataset(dataset)["split"]
        return [split[k] for k in ("test_list", "train_list") if k in split]

    def split_inputs(self, dataset: str) -> dict[str, Any]:
        inputs: dict[str, Any] = {"lists": self.split_list_files(dataset)}
        if dataset in self.generated:
            inputs["raw"] = f"{self.results}/raw/{dataset}/dataset.json"
        return inputs

    def split_of(self, dataset: str, split: str):
        """The split lists (:class:`semiseg.splits.Split`), computed exactly as make_split writes them."""
        from semiseg.splits import split_from_config

        key = (dataset, split)
        if key not in self._splits:
            selection = self.split_selection(dataset, split)
            chosen = split_from_config(
                self.cases(dataset), self.dataset(dataset)["split"], selection,
                extra_unlabelled=self.extra_unlabelled(dataset),
            )
            n_unlabelled = selection.get("max_unlabelled")
            if n_unlabelled is not None and len(chosen.unlabelled) < n_unlabelled:
                raise ConfigError(
                    f"data set {dataset!r}, split {split!r}: asks for {n_unlabelled} unlabelled cases, "
                    f"but the split has only {len(chosen.unlabelled)}"
                )
            self._splits[key] = chosen
        return self._splits[key]

    def test_cases(self, dataset: str) -> list[str]:
        """The test cases of a data set (the same for all its splits)."""
        return list(self.split_of(dataset, self.first_split(dataset)).test)

    def seeds(self, dataset: str) -> list[int]:
        """The training seeds of a data set: its own ``seeds``, else the top-level list."""
        return list(self.dataset(dataset).get("seeds") or self.config["seeds"])

    # ---- preprocessing ----------------------------------------------------------

    def evaluation_settings(self) -> dict[str, Any]:
        """The effective evaluation settings (protocol, its unit and empty policy unless set
        explicitly, weights, window weighting); written under every table."""
        ev = self.config["evaluation"]
        preset = PROTOCOLS[ev["protocol"]]
        return {
            "protocol": ev["protocol"],
            "test_crop": ev["test_crop_source"] if ev["protocol"] == "clean" else "the data set's crop_source",
            "unit": ev["unit"] or preset["unit"],
            "empty_policy": ev["empty_policy"] or preset["empty_policy"],
            "weights": ev["weights"],
            "weighting": ev["weighting"],
        }

    def preprocessing_params(self, dataset: str, case: str) -> dict[str, Any]:
        """Exactly what preprocess_case uses for this case.

        Raw images: the preprocessing block (for an extra unlabelled image, crop_source is its
        unlabelled_crop_source; under the clean protocol a test case is cropped without its
        label), classes, label map. Community HDF5 files: the format, the voxel size, classes
        and label map (the preprocessing block is not applied to them), and raw.resample_to
        when set.
        """
        ds = self.dataset(dataset)
        ev = self.config["evaluation"]
        if ds["raw"]["format"] == "community_h5":
            if ev["protocol"] == "clean":
                raise ConfigError(
                    f"data set {dataset!r}: the community's HDF5 files are already cropped around the label, so "
                    "evaluation.protocol 'clean' cannot apply to them; use the 'paper' protocol, or the raw images "
                    "(raw.format: image)"
                )
            settings = {"format": "community_h5", "spacing": ds["raw"]["spacing"], "classes": ds["classes"],
                        "label_map": ds["label_map"]}
            # Only when set: the params of cases converted as stored stay what they were.
            if ds["raw"]["resample_to"] is not None:
                settings["resample_to"] = ds["raw"]["resample_to"]
            return settings
        pre = dict(ds["preprocessing"])
        unlabelled_crop = pre.pop("unlabelled_crop_source")
        if pre["label_orientation"] == "header":
            del pre["label_orientation_ratio"]  # used by 'auto' only
        if self.is_extra_unlabelled(dataset, case):
            pre["crop_source"] = unlabelled_crop
            for key in ("label_orientation", "label_orientation_ratio"):
                pre.pop(key, None)  # no label to orient
        elif ev["protocol"] == "clean" and case in self.test_cases(dataset):
            pre["crop_source"] = ev["test_crop_source"]
        return {"preprocessing": pre, "classes": ds["classes"], "label_map": ds["label_map"]}

    def case_files(self, dataset: str, ids: Sequence[str]) -> list[str]:
        return [f"{self.results}/preprocessed/{dataset}/{c}.h5" for c in ids]

    def preprocessed_cases(self, dataset: str) -> list[str]:
        return self.case_files(dataset, self.cases(dataset) + self.extra_unlabelled(dataset))

    # ---- training ---------------------------------------------------------------

    def training_settings(self, dataset: str) -> dict[str, Any]:
        """The top-level training block with the data set's overrides."""
        return {**self.config["training"], **self.dataset(dataset).get("training", {})}

    def train_threads(self, dataset: str) -> int:
        """CPU threads of one training job of ``dataset`` (``training.threads``, a runtime setting)."""
        return int(self.training_settings(dataset)["threads"])

    def train_priority(self, method: str) -> int:
        """Snakemake scheduling priority of ``method``'s training jobs.

        1 for the runs on the path to stage 2 (the AUA + BCL stage-1 run, whose model the
        pseudo labels and prototypes come from, and the stage-2 runs; the between-stage
        rules have priority 1 too), 0 for every other run. Ready jobs of priority 1 start
        first, so the ablation's longest chain (stage 1 -> between the stages -> stage 2)
        does not wait behind runs that nothing depends on, which fill the other cores.
        Priorities only order jobs: they change neither what runs nor its results.
        """
        if method not in METHOD_KEYS:
            raise ConfigError(f"unknown training method {method!r}; choose one of {', '.join(METHOD_KEYS)}")
        return 1 if method == "aua_bcl" or method in STAGE2_METHODS else 0

    def train_params(self, dataset: str, method: str, split: str | None, seed: int) -> dict[str, Any]:
        """Exactly the hyperparameters one training run uses (``TrainConfig.from_dict``'s input)."""
        if method not in METHOD_KEYS:
            raise ConfigError(f"unknown training method {method!r}; choose one of {', '.join(METHOD_KEYS)}")
        merged = self.training_settings(dataset)
        params = {k: merged[k] for k in METHOD_KEYS[method]}
        ds = self.dataset(dataset)
        params.update(method=method, patch_size=ds["patch_size"], num_classes=len(ds["classes"]), seed=int(seed))
        if method == "aua_bcl":
            params["lambda_c"] = self.split_settings(dataset, split)["lambda_c"]
        if method == "full":
            params["lambda_r"] = self.split_settings(dataset, split)["lambda_r"]
        return params

    def run_dir(self, dataset: str, split: str | None, seed: int, model: str) -> str:
        """The folder of one training run (``model.pt``, ``losses.csv``, ``checkpoint.pt``)."""
        if model == "fully_supervised":
            return f"{self.results}/models/{dataset}/seed{seed}/fully_supervised"
        stage = "stage2" if model in STAGE2_METHODS else "stage1"
        return f"{self.results}/models/{dataset}_{split}/seed{seed}/{stage}_{model}"

    def model_file(self, dataset: str, split: str, seed: int, model: str) -> str:
        return f"{self.run_dir(dataset, split, seed, model)}/model.pt"

    def split_file(self, dataset: str, split: str) -> str:
        return f"{self.results}/splits/{dataset}/{split}/split.json"

    def stage1_inputs(self, dataset: str, split: str) -> dict[str, Any]:
        s = self.split_of(dataset, split)
        return {
            "split": self.split_file(dataset, split),
            "labelled": self.case_files(dataset, s.labelled),
            "unlabelled": self.case_files(dataset, s.unlabelled),
        }

    def fully_supervised_inputs(self, dataset: str) -> dict[str, Any]:
        """Every training case with a label (those of the data set's first split: the same for
        all splits; extra unlabelled images excluded)."""
        first = self.first_split(dataset)
        return {
            "split": self.split_file(dataset, first),
            "labelled": self.case_files(dataset, self.split_of(dataset, first).train),
            "unlabelled": [],
        }

    @property
    def stage1_snapshot(self) -> str | None:
        """File name of the stage-1 snapshot the between-stage rules read, or None (the final model)."""
        return None if self.stage1_iteration is None else stage1_snapshot_name(self.stage1_iteration)

    def stage1_snapshot_iteration(self, dataset: str) -> int | None:
        """between_stages.stage1_iteration checked against the data set's stage-1 iterations."""
        return check_stage1_iteration(self.stage1_iteration, self.training_settings(dataset)["iterations"], dataset)

    # ---- between the stages and stage 2 ------------------------------------------

    def between_stages_model_file(self, dataset: str, split: str, seed: int) -> str:
        """The stage-1 model the pseudo labels and prototypes come from (:func:`semiseg.jobs.between_stages_model`)."""
        return between_stages_model(
            self.run_dir(dataset, split, seed, "aua_bcl"), self.stage1_iteration,
            self.training_settings(dataset)["iterations"], dataset,
        )

    def pseudo_dir(self, dataset: str, split: str, seed: int) -> str:
        """The folder of one split's and seed's pseudo labels: one ``<case>.h5`` per unlabelled
        case, all written by one job (``pseudo_labels``)."""
        return f"{self.results}/pseudo/{dataset}_{split}/seed{seed}/labels"

    def pseudo_inputs(self, dataset: str, split: str, seed: int) -> dict[str, Any]:
        return {
            "model": self.between_stages_model_file(dataset, split, seed),
            "cases": self.case_files(dataset, self.split_of(dataset, split).unlabelled),
        }

    def pseudo_quality_file(self, dataset: str, split: str, seed: int) -> str:
        return f"{self.results}/pseudo/{dataset}_{split}/seed{seed}/quality.csv"

    def pseudo_quality_inputs(self, dataset: str, split: str, seed: int) -> dict[str, Any]:
        return {
            "pseudo": self.pseudo_dir(dataset, split, seed),
            "cases": self.case_files(dataset, self.split_of(dataset, split).unlabelled),
        }

    def prototype_file(self, dataset: str, split: str, seed: int) -> str:
        return f"{self.results}/prototypes/{dataset}_{split}/seed{seed}/prototypes.npz"

    def prototype_inputs(self, dataset: str, split: str, seed: int) -> dict[str, Any]:
        s = self.split_of(dataset, split)
        return {
            "model": self.between_stages_model_file(dataset, split, seed),
            "labelled": self.case_files(dataset, s.labelled),
            "unlabelled": self.case_files(dataset, s.unlabelled),
            "pseudo": self.pseudo_dir(dataset, split, seed),
        }

    def stage2_inputs(self, dataset: str, split: str, seed: int, method: str) -> dict[str, Any]:
        inputs = {**self.stage1_inputs(dataset, split), "pseudo": self.pseudo_dir(dataset, split, seed)}
        if method == "full":
            inputs["prototypes"] = self.prototype_file(dataset, split, seed)
        if self.training_settings(dataset)["stage2_init"] == "stage1":
            inputs["init"] = self.model_file(dataset, split, seed, "aua_bcl")
        return inputs

    def feature_params(self, dataset: str) -> dict[str, Any]:
        """What the stage-1 features / predictions used between the stages depend on."""
        return {"weights": self.config["between_stages"]["weights"], "patch_size": self.dataset(dataset)["patch_size"]}

    # ---- evaluation -------------------------------------------------------------

    def prediction_dir(self, dataset: str, split: str, seed: int, model: str) -> str:
        """The folder of one model's test-set predictions (``<case>.h5`` and ``<case>.nii.gz``
        per test case), all written by one job (``predict``)."""
        return f"{self.results}/predictions/{dataset}_{split}/seed{seed}/{model}"

    def prediction_file(self, dataset: str, split: str, seed: int, model: str, case: str, ext: str = "h5") -> str:
        return f"{self.prediction_dir(dataset, split, seed, model)}/{case}.{ext}"

    def predict_inputs(self, dataset: str, split: str, seed: int, model: str) -> dict[str, Any]:
        return {"model": self.model_file(dataset, split, seed, model), "cases": self.case_files(dataset, self.split_of(dataset, split).test)}

    def metrics_file(self, dataset: str, split: str, seed: int, model: str) -> str:
        return f"{self.results}/metrics/{dataset}_{split}/seed{seed}/{model}.csv"

    def metrics_inputs(self, dataset: str, split: str, seed: int, model: str) -> dict[str, list[str]]:
        test = self.split_of(dataset, split).test
        return {"pred": self.prediction_dir(dataset, split, seed, model), "cases": self.case_files(dataset, test)}

    def seed_metric_files(self, dataset: str, split: str, models: Sequence[str]) -> dict[str, list[str]]:
        """model -> its per-case metric files, one per seed (in :meth:`seeds` order)."""
        return {m: [self.metrics_file(dataset, split, s, m) for s in self.seeds(dataset)] for m in models}

    def scan_counts(self, dataset: str, split: str, models: Sequence[str] = ABLATION) -> dict[str, list[int]]:
        """(labelled, unlabelled) scans each row uses."""
        s = self.split_of(dataset, split)
        n_l, n_u = len(s.labelled), len(s.unlabelled)
        counts = {m: [n_l, n_u] for m in models}
        if "supervised" in counts:
            counts["supervised"] = [n_l, 0]
        if "fully_supervised" in counts:
            first = self.split_of(dataset, self.first_split(dataset))
            counts["fully_supervised"] = [len(first.train), 0]  # extra unlabelled images excluded
        return counts

    def comparison_methods(self) -> list[str]:
        """The comparison table's rows: ``comparison.methods`` in the table's order."""
        chosen = set(self.config["comparison"]["methods"])
        return [m for m in COMPARISON if m in chosen]

    def comparison_inputs(self, dataset: str, split: str) -> dict[str, list[str]]:
        """Per comparison row, its metric files (one per seed)."""
        return self.seed_metric_files(dataset, split, self.comparison_methods())

    # ---- sweeps (paper, Tables VII and VIII) --------------------------------------

    def sweep_rows(self, dataset: str, split: str, sweep: str) -> list[tuple[float | int, str]]:
        """[(swept value, split name of its models)] of one sweep table; the value the split
        itself uses maps to the split (its models are reused)."""
        if sweep not in SWEEPS:
            raise ConfigError(f"unknown sweep {sweep!r}; choose one of {', '.join(SWEEPS)}")
        settings = self.split_settings(dataset, split)
        values = settings.get("sweep", {}).get(sweep)
        if not values:
            raise ConfigError(
                f"data set {dataset!r}, split {split!r}: no values for the {sweep!r} sweep; "
                f"set datasets.{dataset}.splits.{split}.sweep.{sweep} in config.yaml"
            )
        if sweep == "lambda_c":
            return [(v, split if v == settings["lambda_c"] else f"{split}-lc{plain_number(v)}") for v in values]
        n = len(self.split_of(dataset, split).unlabelled)
        rows: list[tuple[float | int, str]] = []
        for fraction in values:
            k = int(fraction * n + 0.5)  # round half up, as the labelled count
            if k < 1:
                raise ConfigError(f"data set {dataset!r}, split {split!r}: unlabelled fraction {fraction} of {n} cases keeps none")
            rows.append((k, split if k == n else f"{split}-u{k}"))
        return rows

    def sweep_metric_files(self, dataset: str, split: str, sweep: str) -> list[list[str]]:
        """Per sweep row, the full method's metric files of every seed."""
        return [[self.metrics_file(dataset, s, seed, "full") for seed in self.seeds(dataset)]
                for _, s in self.sweep_rows(dataset, split, sweep)]

    def sweep_params(self, dataset: str, split: str, sweep: str) -> dict[str, Any]:
        rows = self.sweep_rows(dataset, split, sweep)
        counts = []
        for _, s in rows:
            chosen = self.split_of(dataset, s)
            counts.append([len(chosen.labelled), len(chosen.unlabelled)])
        # The Wilcoxon reference: the row of the split itself (its configured value), if swept.
        own = [v for v, s in rows if s == split]
        return {"values": [v for v, _ in rows], "counts": counts, "reference": own[0] if own else None}

    # ---- figures ----------------------------------------------------------------

    def figure_options(self, name: str) -> dict[str, Any]:
        """The options of one figure (its rule's params hold exactly these)."""
        return self.config["figures"][name]

    def qualitative_case(self, dataset: str, split: str) -> str:
        """The test case of the qualitative panel: figures.qualitative.case[<data set>], else
        the split's first test case."""
        test = self.split_of(dataset, split).test
        chosen = self.figure_options("qualitative")["case"].get(dataset)
        if chosen is None:
            return test[0]
        if chosen not in test:
            raise ConfigError(
                f"figures.qualitative.case.{dataset} = {chosen!r} is not a test case of split {split!r} "
                f"(test cases: {', '.join(test)})"
            )
        return chosen

    def figure_seed(self, dataset: str) -> int:
        """The seed whose runs the per-run figures (qualitative, training curves, pseudo-label
        quality) show: the data set's first seed."""
        return self.seeds(dataset)[0]

    def qualitative_inputs(self, dataset: str, split: str) -> dict[str, Any]:
        case, seed = self.qualitative_case(dataset, split), self.figure_seed(dataset)
        return {
            "case": f"{self.results}/preprocessed/{dataset}/{case}.h5",
            "pred": [self.prediction_dir(dataset, split, seed, m) for m in ABLATION],
        }

    def curves_inputs(self, dataset: str, split: str) -> list[str]:
        seed = self.figure_seed(dataset)
        return [f"{self.run_dir(dataset, split, seed, m)}/losses.csv" for m in ABLATION]

    def comparison_curves_inputs(self, dataset: str, split: str) -> list[str]:
        """The ``losses.csv`` of every comparison method's run with the figure seed, in the
        comparison table's row order."""
        seed = self.figure_seed(dataset)
        return [f"{self.run_dir(dataset, split, seed, m)}/losses.csv" for m in self.comparison_methods()]

    def figure_targets(self, dataset: str, split: str) -> list[str]:
        prefix = f"{self.results}/figures/{dataset}_{split}"
        return [f"{prefix}/{name}.png" for name in ("qualitative", "training_curves", "pseudo_quality")]

    # ---- targets ----------------------------------------------------------------

    def data_targets(self, dataset: str) -> list[str]:
        """Preprocessing summary and every split of a data set."""
        return [f"{self.results}/preprocessed/{dataset}/summary.tsv"] + [
            self.split_file(dataset, s) for s in self.dataset(dataset)["splits"]
        ]

    def model_targets(self, dataset: str, split: str) -> list[str]:
        """Every model of one data set and split, every seed (stage 1, upper bound, stage 2)
        and the pseudo-label quality."""
        targets = []
        for seed in self.seeds(dataset):
            targets += [self.model_file(dataset, split, seed, m) for m in ABLATION]
            targets.append(self.pseudo_quality_file(dataset, split, seed))
        return targets

    def default_targets(self) -> list[str]:
        """Every generated (demo) data set: its data stages, and every model, the ablation
        table and the figures of its first split."""
        targets = []
        for name in self.generated:
            first = self.first_split(name)
            targets += self.data_targets(name) + self.model_targets(name, first)
            targets += [f"{self.results}/tables/{name}_{first}.csv", f"{self.results}/tables/{name}_{first}.md"]
            targets += self.figure_targets(name, first)
        return targets
