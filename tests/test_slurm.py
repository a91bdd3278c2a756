"""The SLURM profile (workflow/profiles/slurm) on a real single-node SLURM cluster.

tools/local_slurm.sh installs slurm-wlm and munge, configures this machine as a one-node
cluster (with a dummy GPU) and starts it; the micro demo's full-method metrics (one job of
every kind the ablation table needs: training, pseudo labels, prototypes, stage 2,
prediction, metrics) are then built through the profile, every non-local job as its own
sbatch job. Needs root and apt-get /
dpkg (the cluster tests are skipped otherwise). The SLURM profile's dry run and the
workstation profile's test run everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_workflow import micro_config, smk, write_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "local_slurm.sh"
PROFILE = REPO / "workflow" / "profiles" / "slurm"
# The main workflow plus the rule fail_first_attempt (its first attempt fails on purpose).
TEST_SNAKEFILE = REPO / "tests" / "slurm" / "Snakefile"
TABLE = "results/tables/demo_5pct.csv"
RETRIED = "results/test/retried.txt"
TRAINING = {"train_stage1", "train_fully_supervised", "train_stage2"}
GPU_RULES = TRAINING | {"pseudo_labels", "prototypes", "predict"}
LOCAL_RULES = {"preprocessing_summary", "make_split", "pseudo_label_quality", "ablation_table"}
# What the cluster run builds: the full method's per-case metrics (the stage-1 AUA + BCL run,
# the pseudo labels, prototypes, stage 2, its predictions and metrics), every kind of job the
# ablation table needs once (the table's other trainings are more of the same rules).
METRICS = "results/metrics/demo_5pct/seed1337/full.csv"
REMOTE_RULES = {"generate_demo": 1, "preprocess_case": 4, "train_stage1": 1, "pseudo_labels": 1, "prototypes": 1,
                "train_stage2": 1, "predict": 1, "case_metrics": 1, "fail_first_attempt": 1}


def _cluster_unavailable() -> str | None:
    """Why the local cluster cannot be started here (None: it can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the local SLURM cluster needs root (tools/local_slurm.sh installs packages and starts daemons)"
    if shutil.which("apt-get") is None or shutil.which("dpkg-query") is None:
        return "the local SLURM cluster needs a Debian-style package manager (apt-get, dpkg-query)"
    return None


needs_cluster = pytest.mark.skipif(_cluster_unavailable() is not None, reason=str(_cluster_unavailable()))


def run(*cmd, timeout=60, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, encoding="utf-8", errors="replace",
                          timeout=timeout, env=env)


def job_blocks(log: str) -> dict[int, tuple[str, bool]]:
    """Snakemake job ID -> (rule, run locally?) from a run's log ("rule x:" / "localrule x:")."""
    jobs = {}
    for m in re.finditer(r"^(local)?rule (\w+):\n(?:    .*\n)*?    jobid: (\d+)$", log, flags=re.M):
        jobs[int(m.group(3))] = (m.group(2), m.group(1) is not None)
    return jobs


def submissions(log: str) -> dict[int, list[str]]:
    """Snakemake job ID -> SLURM job IDs, in submission order (several after retries)."""
    subs: dict[int, list[str]] = {}
    for job, slurm_id in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log):
        subs.setdefault(int(job), []).append(slurm_id)
    return subs


def sbatch_calls(log: str) -> list[str]:
    """The sbatch command lines the plugin ran (logged with --verbose)."""
    return re.findall(r"^sbatch call: (sbatch .*)$", log, flags=re.M)


def scontrol_job(slurm_id: str) -> dict[str, str]:
    """`scontrol show job` as key -> value (finished jobs stay visible for MinJobAge)."""
    res = run("scontrol", "show", "job", slurm_id)
    assert res.returncode == 0, f"scontrol show job {slurm_id}: {res.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", res.stdout))


def test_slurm_profile_resources_dry_run(tmp_path):
    """Per-rule resources of the profile (no cluster needed): GPU for training and
    inference, runtime and memory per rule."""
    write_config(tmp_path, micro_config())
    res = smk(tmp_path, "--profile", str(PROFILE), "-n", TABLE)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    resources = {}
    for rule, line in re.findall(r"^rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", out, flags=re.M):
        resources[rule] = dict(kv.split("=", 1) for kv in line.split(", "))
    assert GPU_RULES | {"preprocess_case", "case_metrics", "make_split", "ablation_table"} <= set(resources)
    for rule, res_ in resources.items():
        assert ("gpu" in res_) == (rule in GPU_RULES), (rule, res_)
    assert resources["train_stage1"]["gpu"] == "1"
    assert resources["train_stage1"]["mem_mb"] == "16000" and resources["train_stage1"]["runtime"] == "480"
    assert resources["predict"]["mem_mb"] == "8000" and resources["predict"]["runtime"] == "60"
    assert resources["ablation_table"]["mem_mb"] == "4000" and resources["ablation_table"]["runtime"] == "60"


def test_workstation_profile_sets_cores_and_caps_gpu(tmp_path):
    """workflow/profiles/default, given by name: all cores, gpu=1 (no cluster needed)."""
    write_config(tmp_path, micro_config())
    res = smk(tmp_path, "--snakefile", str(TEST_SNAKEFILE), "--workflow-profile", str(REPO / "workflow/profiles/default"),
              "--retries", "1", RETRIED)  # a one-line shell rule; cores are required to run it
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "Using workflow specific profile" in out
    assert re.search(r"^Provided cores: \d+$", out, flags=re.M), out
    assert re.search(r"^Provided resources: gpu=.*\b1\b", out, flags=re.M), out


@pytest.fixture(scope="module")
def slurm_cluster():
    """The local cluster, started for this module and stopped afterwards (left running if
    it was already running before)."""
    was_running = run(SCRIPT, "status").returncode == 0
    # Two dummy GPUs: the micro run's 15 GPU jobs then run two at a time on the 2 CPUs.
    try:
        res = run(SCRIPT, "start", timeout=900, env={**os.environ, "LOCAL_SLURM_GPUS": "2"})
        assert res.returncode == 0, f"tools/local_slurm.sh start failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        yield
    finally:
        if not was_running:
            res = run(SCRIPT, "stop", timeout=120)
            assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory):
    """The micro demo's table plus the fail-once rule, through the SLURM profile."""
    wd = tmp_path_factory.mktemp("slurm")
    write_config(wd, micro_config())
    start = time.monotonic()
    res = smk(
        wd,
        "--snakefile", str(TEST_SNAKEFILE),  # replaces smk's main Snakefile (the last one counts)
        "--profile", str(PROFILE),
        # The test node has 2 CPUs; the training rules ask for 4 threads (sbatch
        # --cpus-per-task=4 could never be scheduled here).
        "--max-threads", "1",
        # First status check 2 s after submission (plugin default: 40 s), and again 2 s
        # after each check that saw a job finish: minutes less on this run of short jobs.
        "--slurm-init-seconds-before-status-checks", "2",
        "--slurm-keep-successful-logs",
        "--verbose",  # logs each sbatch command line
        METRICS, RETRIED,
        timeout=900,
        slurm=True,  # the real scontrol
    )
    seconds = time.monotonic() - start
    log = res.stdout + res.stderr
    (wd / "snakemake.log").write_text(log, encoding="utf-8")
    print(f"SLURM run: {seconds:.0f} s, log in {wd / 'snakemake.log'}")
    assert res.returncode == 0, log[-5000:]
    return wd, log


@needs_cluster
def test_slurm_metrics_have_the_local_structure(slurm_run):
    import pandas as pd

    wd, _ = slurm_run
    metrics = pd.read_csv(wd / METRICS)
    (case,) = (wd / "results/splits/demo/5pct/test.txt").read_text(encoding="utf-8").split()
    assert list(metrics["case"]) == [case] and {"dice", "jaccard", "asd", "hd95"} <= set(metrics.columns)
    assert 0.0 <= metrics["dice"].iloc[0] <= 1.0
    assert (wd / f"results/predictions/demo_5pct/seed1337/full/{case}.nii.gz").exists()


@needs_cluster
def test_every_non_local_job_went_through_sbatch(slurm_run):
    _, log = slurm_run
    jobs, subs = job_blocks(log), submissions(log)
    remote = {j for j, (_, local) in jobs.items() if not local}
    local = {jobs[j][0] for j, (_, is_local) in jobs.items() if is_local}
    assert local == {"make_split"}, local  # the local rule this target needs
    assert local <= LOCAL_RULES
    assert set(subs) == remote, (sorted(remote - set(subs)), sorted(set(subs) - remote))
    rules = [jobs[j][0] for j in remote]
    assert {r: rules.count(r) for r in set(rules)} == REMOTE_RULES
    all_ids = [i for ids in subs.values() for i in ids]
    assert len(set(all_ids)) == len(all_ids) == 13  # the failed attempt was a SLURM job of its own
    logs = {p.name for p in (slurm_run[0] / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert {f"{i}.log" for i in all_ids} <= logs  # each job's SLURM output file


@needs_cluster
def test_gpu_jobs_asked_slurm_for_a_gpu(slurm_run):
    _, log = slurm_run
    jobs, subs = job_blocks(log), submissions(log)
    calls = sbatch_calls(log)
    assert len(calls) == 13
    by_rule: dict[str, list[dict[str, str]]] = {}
    for job, ids in subs.items():
        for slurm_id in ids:
            by_rule.setdefault(jobs[job][0], []).append(scontrol_job(slurm_id))
    for rule, records in by_rule.items():
        for rec in records:
            asked_gpu = "gpu" in rec.get("TresPerJob", "") or "gpu" in rec.get("TresPerNode", "")
            assert asked_gpu == (rule in GPU_RULES), (rule, rec)
            assert rec["JobState"] in ("COMPLETED", "FAILED"), (rule, rec["JobState"])
    assert sum(len(by_rule.get(r, [])) for r in TRAINING) == 2
    assert all(r in by_rule for r in GPU_RULES - {"train_fully_supervised"})
    train_calls = [c for c in calls if "rule_train_" in c]
    assert len(train_calls) == 2 and all("--gpus=1" in c for c in train_calls), train_calls
    # runtime and memory from the profile (attempt 1), threads capped by --max-threads
    assert all(" -t 480 " in c and " --mem 16000 " in c and "--cpus-per-task=1" in c for c in train_calls)


@needs_cluster
def test_failed_job_is_retried_with_more_resources(slurm_run):
    wd, log = slurm_run
    jobs, subs = job_blocks(log), submissions(log)
    (job,) = [j for j, (rule, _) in jobs.items() if rule == "fail_first_attempt"]
    first, second = subs[job]
    assert scontrol_job(first)["JobState"] == "FAILED"
    assert scontrol_job(second)["JobState"] == "COMPLETED"
    assert (wd / RETRIED).read_text(encoding="utf-8").strip() == "attempt 2 succeeded"
    calls = [c for c in sbatch_calls(log) if "rule_fail_first_attempt" in c]
    assert len(calls) == 2
    # default-resources of the profile, scaled by attempt
    assert " -t 60 " in calls[0] and " --mem 4000 " in calls[0]
    assert " -t 120 " in calls[1] and " --mem 8000 " in calls[1]
