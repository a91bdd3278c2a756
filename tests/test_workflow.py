"""The Snakemake workflow: dry run, lint, config errors, bad cases with --keep-going,
a micro end-to-end run, and "change one value, rebuild only what depends on it"."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import phantom, write_volume

REPO = Path(__file__).resolve().parents[1]


def _env_without_scontrol() -> dict[str, str]:
    """The environment with a failing ``scontrol`` first on PATH.

    The SLURM executor plugin (a test dependency) runs ``scontrol show config`` whenever
    Snakemake starts, and waits up to 10 s for an answer where SLURM's client is installed
    but no controller runs (as after tests/test_slurm.py). Runs that do not use SLURM hide
    it; nothing else changes.
    """
    shims = Path(tempfile.gettempdir()) / "semiseg-test-no-scontrol"
    shims.mkdir(exist_ok=True)
    shim = shims / "scontrol"
    if not shim.exists():  # written whole, then renamed: test processes run side by side
        tmp = shims / f"scontrol.{os.getpid()}"
        tmp.write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
        tmp.chmod(0o755)
        os.replace(tmp, shim)
    return {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}"}


def smk(workdir: Path, *args: str, timeout: int = 600, slurm: bool = False) -> subprocess.CompletedProcess:
    """Run this checkout's workflow in ``workdir``; ``slurm=True`` keeps the real scontrol.

    Runs without SLURM are forks of a process that has imported Snakemake once
    (``tests.smk_zygote``), which saves about 1.3 s of CPU a run; SLURM runs start
    ``python -m snakemake`` as a process of their own.
    """
    argv = ["--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    if slurm:
        return subprocess.run([sys.executable, "-m", "snakemake", *argv], capture_output=True, encoding="utf-8",
                              errors="replace", timeout=timeout, cwd=workdir)
    from tests.smk_zygote import run_snakemake

    return run_snakemake(argv, workdir, _env_without_scontrol(), timeout)


def job_counts(output: str) -> dict[str, int]:
    """Rule -> job count from a run's 'Job stats' table (empty when nothing to do)."""
    table = output.split("Job stats:", 1)
    counts: dict[str, int] = {}
    if len(table) == 2:
        for line in table[1].splitlines()[3:]:
            m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
            if not m:
                break
            if m.group(1) != "total":
                counts[m.group(1)] = int(m.group(2))
    return counts


def micro_config(**demo_overrides) -> dict:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    demo = cfg["datasets"]["demo"]
    demo["generate"]["num_cases"] = 4
    demo["split"] = {"seed": 0, "test_count": 1}
    demo["splits"] = {"5pct": {"labelled_percent": 5, "lambda_c": 0.01, "sweep": {"lambda_c": [0.01, 0.05], "unlabelled": [0.5, 1.0]}},
                      "50pct": {"labelled_percent": 50, "lambda_c": 0.09}}
    demo["preprocessing"]["target_spacing"] = [2.0, 2.0, 2.0]
    demo["patch_size"] = [32, 32, 16]
    demo["training"] = {"iterations": 2, "base_filters": 2, "samples": 2, "rank": 2, "bcl_max_samples": 64,
                        "projection_channels": 4, "checkpoint_every": 1, "num_workers": 0, "threads": 1}
    demo.update(demo_overrides)
    return {"device": "auto", "evaluation": cfg["evaluation"], "figures": cfg["figures"], "between_stages": cfg["between_stages"],
            "training": cfg["training"], "datasets": {"demo": demo}}


def write_config(workdir: Path, cfg: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


def test_dry_run_of_demo_target(tmp_path):
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    res = smk(tmp_path, "-n", "all")
    assert res.returncode == 0, res.stderr
    counts = job_counts(res.stdout + res.stderr)
    assert counts == {"generate_demo": 1, "preprocess_case": 40, "preprocessing_summary": 1, "make_split": 2, "all": 1,
                      "train_stage1": 3, "train_fully_supervised": 1, "pseudo_labels": 1, "prototypes": 1,
                      "pseudo_label_quality": 1, "train_stage2": 2, "predict": 6, "case_metrics": 6,
                      "ablation_table": 1, "figure_qualitative": 1, "figure_training_curves": 1,
                      "figure_pseudo_quality": 1}
    # The path to stage 2 starts first (Plan.train_priority): the AUA + BCL run, the jobs
    # between the stages and the stage-2 runs; everything else has the default priority.
    out = res.stdout + res.stderr
    first = {(rule, m.group(1) if (m := re.search(r"method2?=(\w+)", block)) else None)
             for rule, block in re.findall(r"^rule (\w+):\n((?:    .*\n)+)", out, flags=re.M) if "    priority: 1" in block}
    assert first == {("train_stage1", "aua_bcl"), ("pseudo_labels", None), ("prototypes", None),
                     ("train_stage2", "aua_bcl_pl"), ("train_stage2", "full")}


def test_forked_runs_answer_as_a_snakemake_process_does(tmp_path):
    """The tests' Snakemake runs are forks of a process that imported Snakemake once
    (tests/smk_zygote.py): same exit code, same job plan and same error text as
    ``python -m snakemake`` in a process of its own."""
    def own_process(*args):
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path), *args]
        return subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=300, cwd=tmp_path,
                              env=_env_without_scontrol())

    write_config(tmp_path, micro_config())
    targets = ["results/models/demo_5pct/seed1337/stage2_full/model.pt"]
    forked, own = smk(tmp_path, "-n", *targets), own_process("-n", *targets)
    assert forked.returncode == own.returncode == 0, forked.stderr + own.stderr
    assert job_counts(forked.stdout + forked.stderr) == job_counts(own.stdout + own.stderr) != {}
    bad = ["-n", *targets, "--config", "training={lr: fast}"]
    forked, own = smk(tmp_path, *bad), own_process(*bad)
    assert forked.returncode == own.returncode == 1
    for res in (forked, own):
        assert "training.lr: 'fast' is not of type 'number'" in res.stdout + res.stderr


def test_lint_clean():
    res = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], capture_output=True, encoding="utf-8", errors="replace", cwd=REPO, timeout=300,
                         env=_env_without_scontrol())
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "Congratulations, your workflow is in a good condition" in out, out


def test_snakefmt_clean():
    files = [str(REPO / "Snakefile"), *map(str, sorted((REPO / "workflow" / "rules").glob("*.smk")))]
    res = subprocess.run([sys.executable, "-m", "snakefmt", "--check", *files], capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_invalid_config_fails_before_any_job(tmp_path):
    cfg = micro_config()
    cfg["datasets"]["demo"]["preprocessing"]["crop_margin"] = -3
    write_config(tmp_path, cfg)
    res = smk(tmp_path, "--cores", "1", "all")
    assert res.returncode != 0
    assert "datasets.demo.preprocessing.crop_margin" in res.stderr
    assert not (tmp_path / "results").exists()


def test_missing_real_data_fails_at_once(tmp_path):
    cfg = micro_config()
    cfg["datasets"]["colon"] = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))["datasets"]["colon"]
    write_config(tmp_path, cfg)
    res = smk(tmp_path, "-n", "results/preprocessed/colon/summary.tsv")
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "data/Task10_Colon" in out and "medicaldecathlon" in out and "snakemake --cores" in out
    # One line, naming both templates and the documentation, without a rule's traceback.
    (line,) = [ln for ln in out.splitlines() if "raw data not found" in ln]
    assert line.startswith("Error: data set 'colon'") and "images imagesTr/{case}.nii.gz" in line
    assert "labels labelsTr/{case}.nii.gz" in line and "'Real data' (docs/real-data.md)" in line
    assert "Traceback" not in out and "InputFunctionException" not in out


def test_keep_going_with_bad_cases(tmp_path):
    raw = tmp_path / "rawdata"
    for i in range(3):
        image, label, geom = phantom(seed=i)
        write_volume(raw / "imagesTr" / f"ok_{i}.nii.gz", image, geom)
        write_volume(raw / "labelsTr" / f"ok_{i}.nii.gz", label, geom)
    image, label, geom = phantom(seed=9)
    write_volume(raw / "imagesTr" / "empty_1.nii.gz", image, geom)
    write_volume(raw / "labelsTr" / "empty_1.nii.gz", np.zeros_like(label), geom)
    good = write_volume(raw / "imagesTr" / "trunc_1.nii.gz", image, geom)
    good.write_bytes(gzip.compress(gzip.decompress(good.read_bytes())[:-500]))
    write_volume(raw / "labelsTr" / "trunc_1.nii.gz", label, geom)
    cfg = micro_config()
    cfg["datasets"]["mini"] = {
        "modality": "CT", "classes": ["background", "organ"],
        "raw": {"dir": str(raw), "image": "imagesTr/{case}.nii.gz", "label": "labelsTr/{case}.nii.gz"},
        "preprocessing": {"intensity_clip": [-125, 275], "target_spacing": [1.0, 1.0, 1.0], "crop_margin": 4},
        "patch_size": [32, 32, 32], "stride": [16, 16, 16],
        "split": {"test_count": 1}, "splits": {"all": {"labelled_percent": 100}},
    }
    write_config(tmp_path, cfg)
    res = smk(tmp_path, "--cores", "2", "--keep-going", "results/preprocessed/mini/summary.tsv")
    assert res.returncode != 0
    out = tmp_path / "results" / "preprocessed" / "mini"
    assert sorted(p.name for p in out.iterdir()) == ["ok_0.h5", "ok_1.h5", "ok_2.h5"]
    logs = tmp_path / "results" / "logs" / "preprocess" / "mini"
    empty_log = (logs / "empty_1.log").read_text(encoding="utf-8")
    assert re.search(r"ERROR case empty_1: \S*labelsTr/empty_1.nii.gz: label is empty", empty_log)
    trunc_log = (logs / "trunc_1.log").read_text(encoding="utf-8")
    assert re.search(r"ERROR case trunc_1: \S*imagesTr/trunc_1.nii.gz: cannot read image .*truncated", trunc_log)
    assert "case empty_1" in res.stderr and "case trunc_1" in res.stderr


MODELS = [f"results/models/demo_5pct/seed1337/stage1_{m}/model.pt" for m in ("supervised", "aua", "aua_bcl")] + [
    "results/models/demo/seed1337/fully_supervised/model.pt"
] + [f"results/models/demo_5pct/seed1337/stage2_{m}/model.pt" for m in ("aua_bcl_pl", "full")] + [
    "results/pseudo/demo_5pct/seed1337/quality.csv"
]
TABLE = "results/tables/demo_5pct.csv"
FIGURES = [f"results/figures/demo_5pct/{name}.png" for name in ("qualitative", "training_curves", "pseudo_quality")]
SWEEPS = [f"results/{kind}/demo_5pct_{sweep}.{ext}" for sweep in ("lambda_c", "unlabelled")
          for kind, ext in (("tables", "csv"), ("figures", "png"))]
DATA = ["results/preprocessed/demo/summary.tsv"] + [f"results/splits/demo/{s}/split.json" for s in ("5pct", "50pct")]


def build_micro_run(wd: Path) -> Path:
    """The micro workflow run that the ``micro_run`` fixture (tests/conftest.py, once a session) shares."""
    write_config(wd, micro_config())
    res = smk(wd, "--cores", "2", "all", *MODELS, TABLE, *FIGURES, *SWEEPS)
    assert res.returncode == 0, res.stderr[-3000:]
    return wd


def test_micro_demo_end_to_end(micro_run):
    res_dir = micro_run / "results"
    assert len(list((res_dir / "raw" / "demo" / "imagesTr").glob("*.nii.gz"))) == 4
    assert len(list((res_dir / "preprocessed" / "demo").glob("*.h5"))) == 4
    summary = (res_dir / "preprocessed" / "demo" / "summary.tsv").read_text(encoding="utf-8").splitlines()
    assert len(summary) == 5 and summary[0].startswith("case\tshape")
    for split, n_lab in (("5pct", 1), ("50pct", 2)):
        d = res_dir / "splits" / "demo" / split
        assert len(d.joinpath("labelled.txt").read_text(encoding="utf-8").split()) == n_lab
        assert len(d.joinpath("test.txt").read_text(encoding="utf-8").split()) == 1
    for model in MODELS[:-1]:
        run_dir = (micro_run / model).parent
        assert (run_dir / "model.pt").stat().st_size > 0
        rows = (run_dir / "losses.csv").read_text(encoding="utf-8").splitlines()
        assert len(rows) == 3 and rows[0].startswith("iteration,lr,")
    log = (micro_run / "results/logs/train/demo_5pct/seed1337/stage1_aua_bcl.log").read_text(encoding="utf-8")
    assert "training aua_bcl" in log and "lambda_c=0.01" in log
    quality = (micro_run / "results/pseudo/demo_5pct/seed1337/quality.csv").read_text(encoding="utf-8").splitlines()
    assert quality[0] == "case,dice,precision,recall,volume_ratio" and len(quality) == 2 + 2 and quality[-1].startswith("mean,")
    assert (micro_run / "results/prototypes/demo_5pct/seed1337/prototypes.npz").exists()
    assert smk(micro_run, "-n", "all").stdout.count("rule ") == 0  # up to date


def test_micro_training_precision_and_float32_redos_are_on_record(micro_run):
    """Every training job logs its CPU precision; a bfloat16 run logs its convolution-kernel
    check, and trains in float32 where the check fails; a bfloat16 run's ``losses.csv`` marks
    each step redone in float32 (``float32_redo``) exactly as often as its log warns of one.
    A failed kernel check (oneDNN's AVX512_CORE_BF16 weight gradient at the micro network's
    2x2x1 bottleneck, docs/benchmarks.md) and redone steps are repeated as a pytest warning,
    so that the CI's summary shows which convolutions, parameters and iterations."""
    logs = sorted((micro_run / "results/logs/train").rglob("*.log"))
    assert len(logs) >= 6  # the ablation runs and the sweeps' runs
    redo_lines = []
    for log_path in logs:
        text = log_path.read_text(encoding="utf-8")
        m = re.search(r"training precision on the CPU: (bfloat16 autocast|float32) \(cpu_amp (\w+); bfloat16 units: ([^)]*)\)", text)
        assert m, log_path
        losses = micro_run / "results/models" / log_path.relative_to(micro_run / "results/logs/train").with_suffix("") / "losses.csv"
        header, *rows = losses.read_text(encoding="utf-8").splitlines()
        columns = header.split(",")
        warned = [line for line in text.splitlines() if "non-finite gradients in bfloat16" in line]
        kernels = [line for line in text.splitlines() if "bfloat16 convolution kernels" in line]
        assert len(kernels) == (m.group(1) == "bfloat16 autocast"), log_path  # checked once, in bfloat16 runs only
        if m.group(1) == "float32" or "this run trains in float32" in text:
            assert "float32_redo" not in columns and not warned, log_path
            redo_lines += [f"{log_path.name} ({m.group(3)}): {line.split(' WARNING ')[-1][:400]}"
                           for line in kernels if "disagree" in line]
            continue
        redone = [float(r.split(",")[columns.index("float32_redo")]) for r in rows]
        assert sum(redone) == len(warned), log_path
        redo_lines += [f"{log_path.name} ({m.group(3)}): {line.split(' WARNING ')[-1][:300]}" for line in warned]
    if redo_lines:
        warnings.warn("bfloat16 kernels that disagree with float32, or steps redone in float32, on this CPU:\n"
                      + "\n".join(redo_lines), stacklevel=1)


DOWNSTREAM_OF_AUA_BCL = {"pseudo_labels": 1, "prototypes": 1, "pseudo_label_quality": 1, "train_stage2": 2}
TRAIN_ALL = {"train_stage1": 3, "train_fully_supervised": 1, **DOWNSTREAM_OF_AUA_BCL}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c["datasets"]["demo"]["preprocessing"].update(crop_margin=3),
         {"preprocess_case": 4, "preprocessing_summary": 1, **TRAIN_ALL}),
        (lambda c: c["datasets"]["demo"]["splits"]["50pct"].update(labelled_percent=70), {"make_split": 1}),
        (lambda c: c["datasets"]["demo"]["split"].update(seed=5), {"make_split": 2, **TRAIN_ALL}),
        (lambda c: c["datasets"]["demo"]["splits"]["5pct"].update(lambda_c=0.5), {"train_stage1": 1, **DOWNSTREAM_OF_AUA_BCL}),
        (lambda c: c["datasets"]["demo"]["training"].update(bcl_temperature=0.1), {"train_stage1": 1, **DOWNSTREAM_OF_AUA_BCL}),
        (lambda c: c["training"].update(bcl_features="before_dropout"), {"train_stage1": 1, **DOWNSTREAM_OF_AUA_BCL}),
        (lambda c: c["training"].update(consistency_max=0.3), {"train_stage1": 2, **DOWNSTREAM_OF_AUA_BCL}),
        (lambda c: c["datasets"]["demo"]["training"].update(lr=0.02), TRAIN_ALL),
        (lambda c: c["datasets"]["demo"]["splits"]["5pct"].update(lambda_r=0.3), {"train_stage2": 1}),
        (lambda c: c["training"].update(pcl_tau=50), {"train_stage2": 1}),
        (lambda c: c["training"].update(pcl_normalise=False), {"prototypes": 1, "train_stage2": 1}),
        (lambda c: c["between_stages"].update(weights="teacher"), DOWNSTREAM_OF_AUA_BCL),
        (lambda c: c["between_stages"].update(feature_layer="projection"), {"prototypes": 1, "train_stage2": 1}),
        (lambda c: c["between_stages"].update(pseudo_label_filter="largest_component"), DOWNSTREAM_OF_AUA_BCL),
        (lambda c: c["training"].update(stage2_init="stage1"), {"train_stage2": 2}),
        (lambda c: c["training"].update(stage2_loss="pooled"), {"train_stage2": 2}),
        # The AUA + BCL run now also writes its model at iteration 1, which pseudo labels and
        # prototypes come from; the other stage-1 runs are left alone.
        (lambda c: c["between_stages"].update(stage1_iteration=1), {"train_stage1_snapshot": 1, **DOWNSTREAM_OF_AUA_BCL}),
        (lambda c: c["datasets"]["demo"]["training"].update(checkpoint_every=7, num_workers=1, threads=2), {}),
        (lambda c: c["between_stages"].update(batch_size=1), {}),
        (lambda c: c["datasets"]["demo"]["training"].update(augmentation={"rotate": True, "flip": True}), TRAIN_ALL),
        # Settings this data set does not use (header-mode labels, no extra unlabelled images): nothing reruns.
        (lambda c: c["datasets"]["demo"]["preprocessing"].update(label_orientation_ratio=1.5, unlabelled_crop_source="none"), {}),
        (lambda c: c["datasets"]["demo"]["preprocessing"].update(label_orientation="auto"),
         {"preprocess_case": 4, "preprocessing_summary": 1, **TRAIN_ALL}),
    ],
    ids=["crop_margin", "labelled_percent", "split_seed", "lambda_c", "bcl_temperature", "bcl_features", "consistency_max", "lr",
         "lambda_r", "pcl_tau", "pcl_normalise", "between_weights", "feature_layer", "pseudo_label_filter", "stage2_init", "stage2_loss", "stage1_iteration",
         "runtime_only",
         "runtime_batch", "augmentation", "unused_preprocessing", "label_orientation"],
)
def test_change_one_value_reruns_only_dependents(micro_run, change, expected):
    cfg = micro_config()
    change(cfg)
    write_config(micro_run, cfg)
    try:
        res = smk(micro_run, "-n", *DATA, *MODELS)
        assert res.returncode == 0, res.stderr
        assert job_counts(res.stdout + res.stderr) == expected
        out = res.stdout + res.stderr
        if expected.get("train_stage1") in (1, 2):
            assert "output: results/models/demo_5pct/seed1337/stage1_supervised" not in out
        if expected.get("train_stage2") == 1:
            assert "output: results/models/demo_5pct/seed1337/stage2_aua_bcl_pl" not in out
    finally:
        write_config(micro_run, micro_config())


def test_stage1_iteration_picks_the_snapshot(tmp_path):
    """between_stages.stage1_iteration n: the AUA + BCL run (only) also writes model_iter<n>.pt,
    and the pseudo labels and prototypes read it; n beyond the run's iterations is an error
    naming the key, before any job runs."""
    cfg = micro_config()
    cfg["between_stages"]["stage1_iteration"] = 1
    write_config(tmp_path, cfg)
    targets = ["results/models/demo_5pct/seed1337/stage2_full/model.pt", "results/models/demo_5pct/seed1337/stage1_aua/model.pt"]
    res = smk(tmp_path, "-n", *targets)
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    counts = job_counts(out)
    assert counts["train_stage1_snapshot"] == 1 and counts["train_stage1"] == 1  # aua_bcl with the snapshot; aua without
    snapshot = "results/models/demo_5pct/seed1337/stage1_aua_bcl/model_iter1.pt"
    assert re.search(rf"rule train_stage1_snapshot:\n(?:    .*\n)*?    output: [^\n]*{snapshot}", out)
    for rule in ("pseudo_labels", "prototypes"):
        blocks = re.findall(rf"^rule {rule}:\n((?:    .*\n)+)", out, flags=re.M)
        assert blocks and all(snapshot in b and "stage1_aua_bcl/model.pt" not in b for b in blocks), rule
    assert "model_iter" not in re.search(r"rule train_stage1:\n((?:    .*\n)+)", out)[1]
    cfg["between_stages"]["stage1_iteration"] = 3  # the micro demo trains 2 iterations
    write_config(tmp_path, cfg)
    res = smk(tmp_path, "--cores", "1", *targets)
    assert res.returncode != 0
    assert "between_stages.stage1_iteration: 3 is not a stage-1 iteration of data set 'demo'" in res.stdout + res.stderr
    assert not (tmp_path / "results").exists()


def test_demo_ablation_dag_shares_the_artifacts(tmp_path):
    """Stage-1 model, each pseudo label and the prototype file: made once, used by both stage-2 runs."""
    write_config(tmp_path, micro_config())
    targets = [f"results/models/demo_5pct/seed1337/stage2_{m}/model.pt" for m in ("aua_bcl_pl", "full")]
    res = smk(tmp_path, "-n", *targets)
    assert res.returncode == 0, res.stderr
    counts = job_counts(res.stdout + res.stderr)
    assert counts["train_stage1"] == 1 and counts["prototypes"] == 1 and counts["train_stage2"] == 2
    assert counts["pseudo_labels"] == 1  # one job for both unlabelled cases
    dag = smk(tmp_path, "--dag", "dot", *targets).stdout
    edges = re.findall(r"(\d+) -> (\d+)", dag)
    labels = dict(re.findall(r'(\d+)\[label = "([a-z_0-9]+)', dag))
    stage2 = [n for n, name in labels.items() if name == "train_stage2"]
    into = {n: {labels[a] for a, b in edges if b == n} for n in stage2}
    assert sorted(map(sorted, into.values())) == sorted([
        ["make_split", "preprocess_case", "pseudo_labels"],
        ["make_split", "preprocess_case", "prototypes", "pseudo_labels"],
    ])
    pseudo_nodes = [n for n, name in labels.items() if name == "pseudo_labels"]
    for n in pseudo_nodes:  # each pseudo label feeds both stage-2 runs and the prototypes
        assert {labels[b] for a, b in edges if a == n} == {"train_stage2", "prototypes"}
        assert sum(1 for a, b in edges if a == n and labels[b] == "train_stage2") == 2


def test_micro_table(micro_run):
    table = (micro_run / TABLE).read_text(encoding="utf-8").splitlines()
    assert table[0] == ("Method,Labeled,Unlabeled,Dice[%],Jaccard[%],ASD[voxel],95HD[voxel],Test cases,Empty predictions,"
                        "Seeds,p (Wilcoxon vs full),Protocol")
    assert all(row.endswith(",paper") for row in table[1:])
    assert len(table) == 1 + 6 and table[1].startswith("Supervised baseline,1,0,")
    assert table[-1].startswith("Fully supervised (upper bound),3,0,")
    assert (micro_run / "results/tables/demo_5pct.md").exists()
    # The model's prediction folder (one job's output): a file pair per test case, per-case logs.
    preds = sorted(p for p in (micro_run / "results/predictions/demo_5pct/seed1337/full").iterdir() if not p.name.startswith("."))
    assert sorted(p.name.split(".", 1)[1] for p in preds) == ["h5", "nii.gz"]
    case = preds[0].name.split(".", 1)[0]
    log = (micro_run / f"results/logs/predict/demo_5pct/seed1337/full/{case}.log").read_text(encoding="utf-8")
    assert f"'case': '{case}'" in log
    assert "predicted 1 cases" in (micro_run / "results/logs/predict/demo_5pct/seed1337/full.log").read_text(encoding="utf-8")
    pseudo = sorted(p.name for p in (micro_run / "results/pseudo/demo_5pct/seed1337/labels").iterdir() if not p.name.startswith("."))
    unlabelled = (micro_run / "results/splits/demo/5pct/unlabelled.txt").read_text(encoding="utf-8").split()
    assert pseudo == sorted(f"{c}.h5" for c in unlabelled)
    assert all((micro_run / f"results/logs/pseudo/demo_5pct/seed1337/labels/{c}.log").exists() for c in unlabelled)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c["evaluation"].update(empty_policy="nan"), {"case_metrics": 6, "ablation_table": 1}),
        (lambda c: c["evaluation"].update(weighting="gaussian"), {"predict": 6, "case_metrics": 6, "ablation_table": 1}),
        (lambda c: c["evaluation"].update(amp=True), {"predict": 6, "case_metrics": 6, "ablation_table": 1}),
        (lambda c: c["evaluation"].update(batch_size=1), {}),
    ],
    ids=["empty_policy", "weighting", "amp", "runtime_batch"],
)
def test_evaluation_settings_rerun_only_evaluation(micro_run, change, expected):
    cfg = micro_config()
    change(cfg)
    write_config(micro_run, cfg)
    try:
        res = smk(micro_run, "-n", TABLE)
        assert res.returncode == 0, res.stderr
        assert job_counts(res.stdout + res.stderr) == expected
    finally:
        write_config(micro_run, micro_config())


def test_micro_figures(micro_run):
    import matplotlib.image as mpimg

    for fig in FIGURES + [s for s in SWEEPS if s.endswith(".png")]:
        img = mpimg.imread(micro_run / fig)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, fig
        assert img[..., :3].std() > 0.01, f"{fig} is blank"
    log = (micro_run / "results/logs/figures/demo_5pct_training_curves.log").read_text(encoding="utf-8")
    for term in ("ce_dice", "sup_nll", "consistency", "bcl", "pcl"):
        assert term in log


def test_micro_sweep_tables(micro_run):
    import pandas as pd

    lc = pd.read_csv(micro_run / "results/tables/demo_5pct_lambda_c.csv")
    assert list(lc["lambda_c"]) == [0.01, 0.05]
    assert list(lc["Unlabeled"]) == [2, 2] and list(lc["Labeled"]) == [1, 1]
    unl = pd.read_csv(micro_run / "results/tables/demo_5pct_unlabelled.csv")
    assert list(unl["#Unlabeled"]) == [1, 2]
    # The row at the split's own value is the split's full-method row (models reused) ...
    full = pd.read_csv(micro_run / TABLE).set_index("Method").loc["AUA + BCL + Pseudo labeling + PCL (Full)"]
    assert lc.iloc[0]["Dice[%]"] == full["Dice[%]"] == unl.iloc[1]["Dice[%]"]
    # ... and the other rows come from their own runs through the same rules.
    assert (micro_run / "results/models/demo_5pct-lc0.05/seed1337/stage2_full/model.pt").exists()
    assert not (micro_run / "results/models/demo_5pct-lc0.05/seed1337/stage1_aua").exists()
    assert len((micro_run / "results/splits/demo/5pct-u1/unlabelled.txt").read_text(encoding="utf-8").split()) == 1
    md = (micro_run / "results/tables/demo_5pct_lambda_c.md").read_text(encoding="utf-8")
    assert md.startswith("Evaluation protocol: **paper** (the field's protocol behind the paper's tables: test cases "
                         "cropped around their ground-truth box before inference). Settings: test_crop = the data set's "
                         "crop_source, unit = voxel, empty_policy = worst, weights = student, weighting = uniform.")


def test_unknown_sweep_variant_and_too_many_unlabelled_fail_clearly(micro_run):
    res = smk(micro_run, "-n", "results/models/demo_5pct-u9/seed1337/stage1_aua_bcl/model.pt")
    assert res.returncode != 0 and "asks for 9 unlabelled cases, but the split has only 2" in res.stdout + res.stderr
    cfg = micro_config()
    del cfg["datasets"]["demo"]["splits"]["5pct"]["sweep"]
    write_config(micro_run, cfg)
    try:
        res = smk(micro_run, "-n", "results/tables/demo_5pct_lambda_c.csv")
        assert res.returncode != 0 and "set datasets.demo.splits.5pct.sweep.lambda_c" in res.stdout + res.stderr
    finally:
        write_config(micro_run, micro_config())


EVAL_OF = {"predict": 3, "case_metrics": 3, "ablation_table": 1}
NEW_SWEEP_RUN = {"make_split": 1, "train_stage1": 1, "pseudo_labels": 1, "prototypes": 1, "train_stage2": 1,
                 "predict": 1, "case_metrics": 1}


@pytest.mark.parametrize(
    ("change", "targets", "expected"),
    [
        (lambda c: c["datasets"]["demo"]["splits"]["5pct"].update(lambda_c=0.5), [TABLE, *FIGURES],
         {"train_stage1": 1, **DOWNSTREAM_OF_AUA_BCL, **EVAL_OF, "figure_qualitative": 1, "figure_training_curves": 1,
          "figure_pseudo_quality": 1}),
        (lambda c: c["figures"]["qualitative"].update(dpi=80), [TABLE, *FIGURES, *SWEEPS], {"figure_qualitative": 1}),
        (lambda c: c["figures"]["qualitative"]["slice"].update(demo=3), [TABLE, *FIGURES, *SWEEPS], {"figure_qualitative": 1}),
        (lambda c: c["figures"]["training_curves"].update(smoothing=3), [TABLE, *FIGURES, *SWEEPS],
         {"figure_training_curves": 1}),
        (lambda c: c["figures"]["pseudo_quality"].update(size=[4, 2]), [TABLE, *FIGURES, *SWEEPS],
         {"figure_pseudo_quality": 1}),
        (lambda c: c["figures"]["sweeps"].update(dpi=90), [TABLE, *FIGURES, *SWEEPS], {"figure_sweep": 2}),
        (lambda c: c["evaluation"].update(empty_policy="zero"), [TABLE, *FIGURES, *SWEEPS],
         {"case_metrics": 6 + 2, "ablation_table": 1, "sweep_table": 2, "figure_sweep": 2}),
        (lambda c: c["evaluation"].update(empty_policy=None), [TABLE, *FIGURES, *SWEEPS],  # the paper protocol's: zero
         {"case_metrics": 6 + 2, "ablation_table": 1, "sweep_table": 2, "figure_sweep": 2}),
        (lambda c: c["evaluation"].update(protocol="clean"), [TABLE, *FIGURES],
         {"preprocess_case": 1, "predict": 6, "case_metrics": 6, "ablation_table": 1, "figure_qualitative": 1}),
        (lambda c: c["datasets"]["demo"]["splits"]["5pct"]["sweep"].update(lambda_c=[0.01, 0.05, 0.2]),
         [TABLE, *FIGURES, *SWEEPS], {**NEW_SWEEP_RUN, "sweep_table": 1, "figure_sweep": 1}),
    ],
    ids=["lambda_c", "qualitative_dpi", "qualitative_slice", "curves_smoothing", "pseudo_size", "sweep_dpi",
         "empty_policy_zero", "empty_policy_protocol", "protocol_clean", "sweep_values"],
)
def test_change_one_value_rebuilds_tables_and_figures(micro_run, change, targets, expected):
    cfg = micro_config()
    change(cfg)
    write_config(micro_run, cfg)
    try:
        res = smk(micro_run, "-n", *targets)
        assert res.returncode == 0, res.stderr
        assert job_counts(res.stdout + res.stderr) == expected
    finally:
        write_config(micro_run, micro_config())


COMPARISON = "results/tables/demo_5pct_comparison.csv"
OURS = ["supervised", "aua_bcl", "full", "fully_supervised"]


def test_adding_a_method_or_a_seed_trains_only_it(micro_run):
    """comparison.methods and seeds: a new method trains only that method, a new seed only
    that seed's runs (the existing seed's models are reused)."""
    cfg = micro_config()
    cfg["comparison"] = {"methods": OURS}
    write_config(micro_run, cfg)
    try:
        res = smk(micro_run, "-n", COMPARISON)
        assert res.returncode == 0, res.stderr
        assert job_counts(res.stdout + res.stderr) == {"comparison_table": 1}  # every model and metric file exists
        cfg["comparison"] = {"methods": OURS + ["mt"]}
        write_config(micro_run, cfg)
        res = smk(micro_run, "-n", COMPARISON)
        out = res.stdout + res.stderr
        assert job_counts(out) == {"train_stage1": 1, "predict": 1, "case_metrics": 1, "comparison_table": 1}
        assert "output: results/models/demo_5pct/seed1337/stage1_mt/model.pt" in out
        cfg["comparison"] = {"methods": OURS}
        cfg["datasets"]["demo"]["seeds"] = [1337, 1338]
        write_config(micro_run, cfg)
        res = smk(micro_run, "-n", COMPARISON)
        out = res.stdout + res.stderr
        assert job_counts(out) == {"train_stage1": 2, "train_fully_supervised": 1, "pseudo_labels": 1, "prototypes": 1,
                                   "train_stage2": 1, "predict": 4, "case_metrics": 4, "comparison_table": 1}
        trained = [line for line in out.splitlines() if line.strip().startswith("output: results/models")]
        assert len(trained) == 4 and all("/seed1338/" in line for line in trained)
    finally:
        write_config(micro_run, micro_config())


def _check_comparison_outputs(micro_run: Path, seeds: list[int]) -> None:
    """What the comparison rules wrote for ``seeds``: the table's rows in the fixed order,
    the per-seed table, the loss terms in the curves figure and the baselines' models."""
    import pandas as pd

    curves_log = (micro_run / "results/logs/figures/demo_5pct_comparison_curves.log").read_text(encoding="utf-8")
    drawn = curves_log.split("loss terms drawn: ")[1].splitlines()[0].split(", ")
    assert {"ce_dice", "consistency", "loss_u", "pcl"} <= set(drawn), drawn  # MT / UA-MT, BCP, stage 2
    assert not {"consistency_weight", "uncertainty_threshold", "bcp_phase"} & set(drawn)
    table = pd.read_csv(micro_run / COMPARISON)
    assert list(table["Method"]) == ["Supervised baseline", "MT", "UA-MT", "BCP", "Ours (full)"]
    assert set(table["Seeds"]) == {len(seeds)} and set(table["Unlabeled"]) == {0, 2}
    assert table.set_index("Method").loc["Ours (full)", "p (Wilcoxon vs full)"] == "—"
    assert set(table["p (Wilcoxon vs full)"]) - {"—"} == {"n/a (n<6)"}  # at most 2 seeds x 1 test case
    per_seed = pd.read_csv(micro_run / "results/tables/demo_5pct_comparison_per_seed.csv")
    assert len(per_seed) == 5 * len(seeds) and set(per_seed["Seed"]) == set(seeds)
    md = (micro_run / "results/tables/demo_5pct_comparison.md").read_text(encoding="utf-8")
    assert ("over 2 seeds" in md) if len(seeds) == 2 else ("over the test cases (one seed)" in md)
    for method in ("mt", "uamt", "bcp"):
        for seed in seeds:
            assert (micro_run / f"results/models/demo_5pct/seed{seed}/stage1_{method}/model.pt").exists()


def _build_comparison(micro_run: Path, seeds: list[int]) -> None:
    cfg = micro_config()
    cfg["datasets"]["demo"]["seeds"] = seeds
    cfg["comparison"] = {"methods": ["full", "bcp", "supervised", "uamt", "mt"]}  # any order: the table's is fixed
    write_config(micro_run, cfg)
    try:
        res = smk(micro_run, "--cores", "2", COMPARISON, "results/figures/demo_5pct/comparison.png",
                  "results/figures/demo_5pct/comparison_curves.png")
        assert res.returncode == 0, res.stderr[-3000:]
        _check_comparison_outputs(micro_run, seeds)
    finally:
        write_config(micro_run, micro_config())


def test_micro_comparison_one_seed(micro_run):
    """The comparison table end to end for the micro run's seed: the three baselines are
    trained, the supervised baseline and the full method are the ablation table's runs (the
    other rows are left out for the suite's time; the two-seed run below is marked slow)."""
    _build_comparison(micro_run, [1337])


@pytest.mark.slow
def test_micro_comparison_two_seeds(micro_run):
    """The same with two seeds: the second seed's whole chain (first stage, pseudo labels,
    prototypes, stage 2) and the baselines again, the table over both seeds. About 25 jobs,
    so it runs with ``-m slow`` (docs/benchmarks.md, "Test suite"); the per-seed aggregation
    itself is unit-tested in tests/test_seed_tables.py."""
    _build_comparison(micro_run, [1337, 1338])


def test_config_overrides_on_the_command_line_rerun_only_dependents(micro_run, tmp_path):
    """--config with nested keys (values typed as config.yaml would type them) and --configfile
    with an overlay: the same rerun scope as editing config.yaml."""
    res = smk(micro_run, "-n", *DATA, *MODELS, "--config", "training={lr: 0.02}")
    assert res.returncode == 0, res.stderr
    assert job_counts(res.stdout + res.stderr) == TRAIN_ALL
    res = smk(micro_run, "-n", TABLE, "--config", "evaluation={amp: true}")
    assert res.returncode == 0, res.stderr
    assert job_counts(res.stdout + res.stderr) == {"predict": 6, "case_metrics": 6, "ablation_table": 1}
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"training": {"pcl_tau": 50}, "evaluation": {"empty_policy": "nan"}}), encoding="utf-8")
    res = smk(micro_run, "-n", *MODELS, TABLE, "--configfile", str(micro_run / "config.yaml"), str(overlay))
    assert res.returncode == 0, res.stderr
    assert job_counts(res.stdout + res.stderr) == {"train_stage2": 1, "predict": 1, "case_metrics": 6, "ablation_table": 1}
    res = smk(micro_run, "-n", TABLE, "--config", "training={lr: fast}")
    assert res.returncode != 0 and "training.lr: 'fast' is not of type 'number'" in res.stdout + res.stderr


def test_report_holds_the_tables_and_figures(micro_run, tmp_path):
    """snakemake --report works from the README's install (pygments is a dependency) and
    collects the result tables next to the figures."""
    report = tmp_path / "report.html"
    res = smk(micro_run, "--report", str(report), TABLE, *FIGURES, *SWEEPS)
    assert res.returncode == 0, res.stderr[-3000:]
    html = report.read_text(encoding="utf-8")
    for name in ("demo_5pct.csv", "demo_5pct_lambda_c.csv", "qualitative.png", "training_curves.png", "pseudo_quality.png"):
        assert name in html, name
    assert "Tables" in html and "Figures" in html


def test_readme_change_one_value_example(micro_run):
    """The README's "change one value" dry run, as written there, reruns what the README says."""
    import shlex

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    (line,) = [ln.split("#")[0].strip() for ln in readme.splitlines() if ln.startswith("snakemake -n all --config")]
    args = shlex.split(line)[1:]
    at = args.index("all") + 1  # the micro run's own targets next to "all" (--config takes what follows it)
    res = smk(micro_run, *args[:at], TABLE, *FIGURES, *args[at:])
    assert res.returncode == 0, res.stderr
    assert job_counts(res.stdout + res.stderr) == {
        "train_stage1": 1, **DOWNSTREAM_OF_AUA_BCL, "predict": 3, "case_metrics": 3, "ablation_table": 1,
        "figure_qualitative": 1, "figure_training_curves": 1, "figure_pseudo_quality": 1, "all": 1}
    out = res.stdout + res.stderr
    assert "output: results/models/demo_5pct/seed1337/stage1_aua_bcl/model.pt" in out
    for kept in ("stage1_supervised", "stage1_aua/", "fully_supervised"):
        assert f"output: results/models/demo_5pct/seed1337/{kept}" not in out and "output: results/models/demo/seed1337/fully" not in out
