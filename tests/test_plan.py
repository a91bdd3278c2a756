"""semiseg.plan: every job's settings and files from the config, without Snakemake."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from semiseg.config import validate_config
from semiseg.errors import ConfigError
from semiseg.plan import ABLATION, METHOD_KEYS, Plan, plain_number

REPO = Path(__file__).resolve().parents[1]
DEMO_CASES = [f"demo_{i:03d}" for i in range(40)]


def base_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))


def listed_cases(name: str, ds: dict) -> list[str]:
    """A data set's case IDs: those of its published lists, else DEMO_CASES."""
    lists = [ds["split"][k] for k in ("test_list", "train_list") if k in ds["split"]]
    if not lists:
        return list(DEMO_CASES)
    return sorted({c for f in lists for c in (REPO / f).read_text(encoding="utf-8").split()})


@pytest.fixture(autouse=True)
def _in_checkout(monkeypatch):
    monkeypatch.chdir(REPO)  # the published split lists are relative to the working directory


def make_plan(cfg: dict | None = None, extra: list[str] | None = None) -> Plan:
    cfg = validate_config(copy.deepcopy(cfg or base_config()), REPO / "workflow/schemas/config.schema.yaml")
    return Plan(cfg, cases=listed_cases, unlabelled_cases=lambda name, ds: list(extra or []))


def test_train_params_hold_exactly_the_method_keys_and_the_seed():
    plan = make_plan()
    for method in ("supervised", "aua", "aua_bcl", "aua_bcl_pl", "full", "fully_supervised"):
        params = plan.train_params("demo", method, "5pct", 7)
        expected = set(METHOD_KEYS[method]) | {"method", "patch_size", "num_classes", "seed"}
        expected |= {"lambda_c"} if method == "aua_bcl" else set()
        expected |= {"lambda_r"} if method == "full" else set()
        assert set(params) == expected, method
        assert params["seed"] == 7 and params["method"] == method
    # the demo's training block overrides single keys of the top-level one
    assert plan.train_params("demo", "supervised", "5pct", 1)["iterations"] == 250
    assert plan.train_params("colon", "supervised", "5pct", 1)["iterations"] == 6000
    assert plan.train_params("colon", "supervised", "5pct", 1)["augmentation"] == {"rotate": True, "flip": True}


def test_train_params_feed_the_engine_config():
    from semiseg.training.engine import TrainConfig

    plan = make_plan()
    for method in METHOD_KEYS:
        cfg = TrainConfig.from_dict(plan.train_params("demo", method, "5pct", 3))
        assert cfg.seed == 3 and cfg.method == method


def test_sweep_variants_change_lambda_c_or_the_unlabelled_count():
    plan = make_plan()
    assert plan.train_params("demo", "aua_bcl", "5pct", 1)["lambda_c"] == 0.01
    assert plan.train_params("demo", "aua_bcl", "5pct-lc0.05", 1)["lambda_c"] == 0.05
    assert plan.split_selection("demo", "5pct-u3") == {"labelled_percent": 5, "max_unlabelled": 3}
    assert len(plan.split_of("demo", "5pct-u3").unlabelled) == 3
    with pytest.raises(ConfigError, match="unknown split '7pct'"):
        plan.split_settings("demo", "7pct")
    with pytest.raises(ConfigError, match="asks for 99 unlabelled cases"):
        plan.split_of("demo", "5pct-u99")


def test_seeds_top_level_and_per_data_set():
    plan = make_plan()
    assert plan.seeds("demo") == [1337]
    assert plan.seeds("pancreas") == [1337, 1338, 1339]
    cfg = base_config()
    cfg["seeds"] = [5]
    assert make_plan(cfg).seeds("colon") == [5]


def test_removed_training_seed_names_its_replacement():
    cfg = base_config()
    cfg["training"]["seed"] = 4
    with pytest.raises(ConfigError, match=r"training\.seed: the training seed is now the list 'seeds'.*seeds: \[4\]"):
        make_plan(cfg)
    cfg = base_config()
    cfg["seeds"] = []
    with pytest.raises(ConfigError, match="seeds"):
        make_plan(cfg)


def test_every_run_file_has_its_seed_and_splits_do_not():
    plan = make_plan()
    assert plan.model_file("demo", "5pct", 2, "aua") == "results/models/demo_5pct/seed2/stage1_aua/model.pt"
    assert plan.model_file("demo", "5pct", 2, "full") == "results/models/demo_5pct/seed2/stage2_full/model.pt"
    assert plan.model_file("demo", "5pct", 2, "fully_supervised") == "results/models/demo/seed2/fully_supervised/model.pt"
    s = plan.split_of("demo", "5pct")
    inputs = plan.stage2_inputs("demo", "5pct", 2, "full")
    assert inputs["split"] == "results/splits/demo/5pct/split.json"
    assert inputs["pseudo"] == "results/pseudo/demo_5pct/seed2/labels"  # one <case>.h5 per unlabelled case
    pseudo = plan.pseudo_inputs("demo", "5pct", 2)
    assert pseudo == {"model": "results/models/demo_5pct/seed2/stage1_aua_bcl/model.pt",
                      "cases": [f"results/preprocessed/demo/{c}.h5" for c in s.unlabelled]}
    assert inputs["prototypes"] == "results/prototypes/demo_5pct/seed2/prototypes.npz"
    assert inputs["init"] == "results/models/demo_5pct/seed2/stage1_aua_bcl/model.pt"  # the demo's stage2_init: stage1
    assert "prototypes" not in plan.stage2_inputs("demo", "5pct", 2, "aua_bcl_pl")
    assert "init" not in plan.stage2_inputs("colon", "5pct", 2, "full")  # the paper: fresh
    metrics = plan.metrics_inputs("demo", "5pct", 2, "aua")
    assert metrics == {"pred": "results/predictions/demo_5pct/seed2/aua", "cases": [f"results/preprocessed/demo/{c}.h5" for c in s.test]}
    assert plan.predict_inputs("demo", "5pct", 2, "aua") == {"model": "results/models/demo_5pct/seed2/stage1_aua/model.pt",
                                                               "cases": metrics["cases"]}
    assert plan.seed_metric_files("demo", "5pct", ["aua"]) == {"aua": ["results/metrics/demo_5pct/seed1337/aua.csv"]}


def test_between_stages_model_follows_stage1_iteration():
    plan = make_plan()
    assert plan.between_stages_model_file("demo", "5pct", 1) == "results/models/demo_5pct/seed1/stage1_aua_bcl/model.pt"
    cfg = base_config()
    cfg["between_stages"]["stage1_iteration"] = 100
    plan = make_plan(cfg)
    assert plan.stage1_snapshot == "model_iter100.pt"
    assert plan.between_stages_model_file("demo", "5pct", 1).endswith("seed1/stage1_aua_bcl/model_iter100.pt")
    cfg["between_stages"]["stage1_iteration"] = 251  # the demo trains 250
    with pytest.raises(ConfigError, match="between_stages.stage1_iteration: 251"):
        make_plan(cfg).between_stages_model_file("demo", "5pct", 1)


def test_evaluation_settings_follow_the_protocol():
    cfg = base_config()
    assert make_plan(cfg).evaluation_settings()["unit"] == "voxel"
    assert make_plan(cfg).evaluation_settings()["empty_policy"] == "worst"  # set explicitly in config.yaml
    cfg["evaluation"].update(protocol="clean", empty_policy=None)
    ev = make_plan(cfg).evaluation_settings()
    assert (ev["unit"], ev["empty_policy"], ev["test_crop"]) == ("mm", "worst", "body")


def test_preprocessing_params():
    cfg = base_config()
    plan = make_plan(cfg)
    demo = plan.preprocessing_params("demo", "demo_000")
    assert demo["preprocessing"]["crop_source"] == "label" and "label_orientation_ratio" not in demo["preprocessing"]
    assert plan.preprocessing_params("la_lowres", "x")["resample_to"] == [1.25, 1.25, 1.25]
    assert "resample_to" not in plan.preprocessing_params("la_h5", "x")
    cfg["evaluation"]["protocol"] = "clean"
    plan = make_plan(cfg)
    test_case = plan.test_cases("demo")[0]
    assert plan.preprocessing_params("demo", test_case)["preprocessing"]["crop_source"] == "body"
    with pytest.raises(ConfigError, match="protocol 'clean' cannot apply"):
        plan.preprocessing_params("la_lowres", "x")


def test_extra_unlabelled_images():
    cfg = base_config()
    cfg["datasets"]["colon"]["raw"]["unlabelled_image"] = "imagesTs/{case}.nii.gz"
    plan = make_plan(cfg, extra=["u1", "u2"])
    assert plan.is_extra_unlabelled("colon", "u1") and not plan.is_extra_unlabelled("colon", "demo_001")
    assert plan.preprocessing_params("colon", "u1")["preprocessing"]["crop_source"] == "body"
    assert {"u1", "u2"} <= set(plan.split_of("colon", "5pct").unlabelled)
    with pytest.raises(ConfigError, match="extra unlabelled images with the ID of a labelled case: demo_001"):
        make_plan(cfg, extra=["demo_001"]).extra_unlabelled("colon")


def test_scan_counts_and_tables():
    plan = make_plan()
    s = plan.split_of("demo", "5pct")
    counts = plan.scan_counts("demo", "5pct")
    assert counts["supervised"] == [len(s.labelled), 0]
    assert counts["full"] == [len(s.labelled), len(s.unlabelled)]
    assert counts["fully_supervised"] == [len(s.train), 0]
    assert list(counts) == list(ABLATION)


def test_sweep_rows_reuse_the_split_itself():
    cfg = base_config()
    plan = make_plan(cfg)
    rows = plan.sweep_rows("pancreas", "20pct", "lambda_c")
    assert rows == [(0.03, "20pct-lc0.03"), (0.05, "20pct-lc0.05"), (0.07, "20pct-lc0.07"), (0.09, "20pct")]
    with pytest.raises(ConfigError, match="no values for the 'lambda_c' sweep"):
        plan.sweep_rows("demo", "5pct", "lambda_c")
    with pytest.raises(ConfigError, match="unknown sweep"):
        plan.sweep_rows("demo", "5pct", "nope")
    cfg["datasets"]["demo"]["splits"]["5pct"]["sweep"] = {"unlabelled": [0.5, 1.0]}
    plan = make_plan(cfg)
    n = len(plan.split_of("demo", "5pct").unlabelled)
    assert plan.sweep_rows("demo", "5pct", "unlabelled") == [(int(n / 2 + 0.5), f"5pct-u{int(n / 2 + 0.5)}"), (n, "5pct")]
    assert plan.sweep_params("demo", "5pct", "unlabelled")["counts"][1] == [len(plan.split_of("demo", "5pct").labelled), n]
    assert plan.sweep_metric_files("demo", "5pct", "unlabelled")[1] == ["results/metrics/demo_5pct/seed1337/full.csv"]


def test_plain_number():
    assert [plain_number(v) for v in (0.05, 0.0001, 2.0, 1e-05)] == ["0.05", "0.0001", "2", "0.00001"]


def test_figures_show_the_first_seed_and_check_the_case():
    cfg = base_config()
    cfg["datasets"]["demo"]["seeds"] = [9, 4]
    plan = make_plan(cfg)
    assert plan.figure_seed("demo") == 9
    assert all("/seed9/" in p for p in plan.curves_inputs("demo", "5pct"))
    cfg["comparison"]["methods"] = ["full", "mt", "fully_supervised"]
    assert make_plan(cfg).comparison_curves_inputs("demo", "5pct") == [
        "results/models/demo_5pct/seed9/stage1_mt/losses.csv",
        "results/models/demo_5pct/seed9/stage2_full/losses.csv",
        "results/models/demo/seed9/fully_supervised/losses.csv",
    ]
    cfg["figures"]["qualitative"]["case"] = {"demo": "nope"}
    with pytest.raises(ConfigError, match="is not a test case of split '5pct'"):
        make_plan(cfg).qualitative_case("demo", "5pct")


def test_default_targets_cover_every_seed_of_the_demo():
    cfg = base_config()
    cfg["datasets"]["demo"]["seeds"] = [1, 2]
    targets = make_plan(cfg).default_targets()
    for seed in (1, 2):
        assert f"results/models/demo_5pct/seed{seed}/stage2_full/model.pt" in targets
        assert f"results/pseudo/demo_5pct/seed{seed}/quality.csv" in targets
    assert "results/tables/demo_5pct.csv" in targets
    assert not any(t.startswith("results/models/pancreas") for t in targets)


def test_training_threads_are_a_runtime_setting_per_data_set():
    plan = make_plan()
    assert plan.train_threads("demo") == 1  # the demo: two 1-thread trainings side by side on 2 cores
    assert plan.train_threads("colon") == 4
    assert "threads" not in plan.train_params("demo", "aua_bcl", "5pct", 1)  # not a param: changing it reruns nothing


def test_the_path_to_stage_2_is_scheduled_first():
    plan = make_plan()
    assert plan.train_priority("aua_bcl") == 1  # its model feeds the pseudo labels and prototypes
    assert plan.train_priority("full") == plan.train_priority("aua_bcl_pl") == 1
    assert {plan.train_priority(m) for m in ("supervised", "aua", "mt", "uamt", "bcp", "fully_supervised")} == {0}
    with pytest.raises(ConfigError, match="unknown training method 'nope'"):
        plan.train_priority("nope")


def test_the_metric_table_and_figure_modules_load_without_torch():
    """The per-case metric, table and figure jobs import semiseg.evaluation and
    semiseg.figures; PyTorch (about 2 s of CPU time per process) stays out of them."""
    import subprocess
    import sys

    code = ("import sys\nimport semiseg.evaluation, semiseg.figures, semiseg.jobs, semiseg.metrics\n"
            "print(sorted(m for m in ('torch', 'SimpleITK') if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_the_workflow_parses_without_the_heavy_libraries():
    """What common.smk imports while Snakemake parses (the plan, the config check, the case
    lists of a generated data set) loads neither PyTorch nor NumPy, SciPy, SimpleITK or h5py:
    every Snakemake start, dry runs included, would pay for them."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from semiseg.plan import Plan\n"
        "from semiseg.config import validate_config\n"
        "from semiseg.datasets import generated_cases\n"
        "from semiseg.jobs import job\n"
        "assert generated_cases({'generate': {'num_cases': 2}}) == ['demo_000', 'demo_001']\n"
        "print(sorted(m for m in ('torch', 'numpy', 'scipy', 'SimpleITK', 'h5py') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
