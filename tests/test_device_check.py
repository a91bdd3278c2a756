"""benchmarks/device_check.py: the CPU smoke run of the GPU check, its imports, its data preparation.

The smoke run goes through every section's code path at tiny sizes on real LA cases, in a
subprocess whose imports of SimpleITK, pandas, medpy and snakemake raise ImportError (the
GPU machine has none of them), so one run checks both the report and the imports.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "device_check.py"
BLOCKED = ("SimpleITK", "pandas", "medpy", "snakemake")

# Run in a fresh interpreter before the code: a meta-path finder answers for the blocked
# packages with a spec of no origin (what probes such as torch._dynamo's find_spec skip) whose
# loader raises ModuleNotFoundError, so `import pandas` fails as on a machine without it.
BLOCKER = f"""
import importlib.abc, importlib.machinery, sys
BLOCKED = {BLOCKED!r}

class Refuse(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name.split(".")[0] in BLOCKED else None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}} (blocked: not on the GPU machine)", name=spec.name)

    def exec_module(self, module):
        pass

sys.meta_path.insert(0, Refuse())
for name in BLOCKED:
    sys.modules.pop(name, None)
"""


def run_blocked(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python with the blocked packages unimportable (cwd: the repository)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code],
        cwd=REPO,
        env=env,
        capture_output=True,
        encoding="utf-8",  # the summary has non-ASCII characters; a worker's locale may be ASCII
        errors="replace",
        timeout=timeout,
        check=False,
    )


def load_script():
    """The script as a module (its own folder on sys.path, as when it runs)."""
    if "device_check" in sys.modules:
        return sys.modules["device_check"]
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One ``--smoke`` run under the import blocker: (completed process, JSON report, output folder)."""
    from tests.conftest import LA_H5

    if not LA_H5.is_dir():
        pytest.skip(f"real LA cases not found at {LA_H5} (set SEMISEG_LA_H5 to their folder)")
    out = tmp_path_factory.mktemp("device_check")
    code = (
        f"import runpy\nsys.argv = ['device_check.py', '--smoke', '--data', {str(LA_H5)!r}, '--out', {str(out)!r}]\n"
        f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "finally:\n"
        "    print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))\n"
    )
    proc = run_blocked(code)
    report_path = out / "device_check.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else None
    return proc, report, out


def numbers(x, path="report"):
    """Every number in a JSON value, with where it is."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x
    elif isinstance(x, str) and x.lower() in ("nan", "inf", "-inf"):
        yield path, float(x)


def test_smoke_run_passes_every_section(smoke):
    proc, report, out = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report is not None and report["complete"] and report["passed"] and report["failed"] == []
    assert list(report["sections"]) == ["steps", "resume", "inference", "real_data", "projection"]
    for name, sec in report["sections"].items():
        assert sec["status"] == "pass", (name, sec["error"])
        assert sec["checks"] and all(c["passed"] for c in sec["checks"] if c["enforced"]), name
    runs = report["sections"]["steps"]["results"]["runs"]
    assert {(r["method"], r["amp"]) for r in runs} == {
        (m, amp)
        for m in ("supervised", "fully_supervised", "aua", "aua_bcl", "aua_bcl_pl", "full", "mt", "uamt", "bcp")
        for amp in (False, True)
    }
    for r in runs:
        assert r["s_per_iteration"] > 0 and r["bare_s_per_iteration"] > 0 and r["losses_finite"] and r["weights_finite"]
    bad = [(p, v) for p, v in numbers(report) if not math.isfinite(v)]
    assert not bad, bad
    resume = {r["method"]: r for r in report["sections"]["resume"]["results"]["runs"]}
    assert set(resume) == {"aua_bcl", "full"} and resume["aua_bcl"]["student"]["max_abs"] == 0.0  # the CPU: exact
    real = report["sections"]["real_data"]["results"]
    assert len(real["dice"]) == 2 and all(0 <= c["dice"] <= 1 for c in real["dice"])
    assert report["sections"]["projection"]["results"]["total_s"] > 0


def test_smoke_run_writes_and_prints_the_summary(smoke):
    proc, report, out = smoke
    md = (out / "device_check.md").read_text(encoding="utf-8")
    assert md.strip() and md.strip() in proc.stdout  # printed, too
    for title in (
        "Training step of every method",
        "Checkpoint and resume",
        "Sliding-window inference",
        "Short real-data run",
        "Projected time",
    ):
        assert title in md
    assert "s / iteration" in md and "T = 6000 t1" in md and "torch " in md
    assert (out / "real_data_losses.csv").read_text(encoding="utf-8").startswith("iteration,")


def test_smoke_run_never_imported_the_blocked_packages(smoke):
    proc, _, _ = smoke
    assert "LOADED []" in proc.stdout, proc.stdout[-2000:]


def test_the_import_blocker_bites():
    """The blocker makes a module that needs pandas or SimpleITK fail to import (so the smoke test can fail)."""
    proc = run_blocked("import semiseg.evaluation\n")
    assert proc.returncode != 0 and "(blocked: not on the GPU machine)" in proc.stderr, proc.stderr[-2000:]


def test_paper_constants_match_the_config():
    dc = load_script()
    la = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))["datasets"]["la_h5"]
    assert tuple(la["patch_size"]) == dc.LA_PATCH == dc.gpu_settings().patch
    assert tuple(la["stride"]) == dc.LA_STRIDE == dc.gpu_settings().stride
    assert la["splits"]["20pct"]["lambda_c"] == dc.LA_LAMBDA_C
    assert la["splits"]["20pct"]["labelled_percent"] == dc.LABELLED_PERCENT
    assert [dc.n_labelled(n) for n in (4, 5, 6, 12, 15, 80)] == [1, 1, 2, 3, 3, 16]
    train = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))["training"]
    assert (train["iterations"], train["lr_step"], train["base_filters"]) == (dc.PAPER_ITERATIONS, dc.PAPER_LR_STEP, 16)
    assert dc.gpu_settings().width == train["base_filters"]


def test_prepare_data_copies_labelled_first_and_is_ignored(la_h5_dir, tmp_path):
    dc = load_script()
    summary = dc.prepare_data(la_h5_dir, tmp_path / "la", n_train=6, n_test=1)
    train = (tmp_path / "la" / "train.list").read_text(encoding="utf-8").split()
    paper = (la_h5_dir / "train.list").read_text(encoding="utf-8").split()
    assert train == paper[:2] + paper[16:20]  # 20 % of 6 rounded up: 2 of the paper's labelled cases, then its pool
    assert (tmp_path / "la" / "test.list").read_text(encoding="utf-8").split() == summary["test"]
    for case in train + summary["test"]:
        assert (tmp_path / "la" / case / "mri_norm2.h5").stat().st_size == (
            la_h5_dir / case / "mri_norm2.h5"
        ).stat().st_size
    cases = dc.load_cases(tmp_path / "la", 6, 1)
    assert [p.parent.name for p in cases.labelled] == paper[:2] and len(cases.unlabelled) == 4
    assert "/device_data/" in (REPO / ".gitignore").read_text(encoding="utf-8").split()
    assert dc.PREPARED.relative_to(REPO).parts[0] == "device_data"
