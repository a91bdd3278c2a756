"""A real-data run on the CPU: the supervised baseline vs the full method on real LA cases.

A thin caller of the workflow's ``la_lowres`` data set (config.yaml: the community's LA HDF5
cases resampled to 1.25 mm when converted, patch 64 x 64 x 48, stride 9 x 9 x 2, width 8).
It writes ``--workdir/config.yaml``: this checkout's config.yaml with only ``la_lowres``,
its ``raw.dir`` and lists set to ``--la`` (``train.list``, ``test.list``; for
``../shared/data/la2018_h5``: the 80 training and 4 test cases), a split of ``--labelled``
labelled cases (the first of ``train.list``; the configured ``10pct`` / ``20pct`` split when
it has that many, else ``<n>lab`` with LA's lambda_c), ``--iterations`` iterations per stage
(learning rate x0.1 at 80 %), a width-``--width`` V-Net, the training ``--seeds`` (default one:
1337), and, as this benchmark always ran,
stage 2 from the stage-1 model and 2000 BCL samples a crop. Then it runs the workflow
(this checkout's Snakefile) up to the per-case metrics of the supervised baseline and the
full method, and prints the two-row table (paper protocol: the community's label-cropped
volumes, distances in voxels of the 1.25 mm grid) and the wall-clock time.

    python benchmarks/bench_la_cpu.py [--la ../shared/data/la2018_h5] [--iterations 300] [--seeds 1337 1338]

The same data set without this script: ``snakemake --cores 2 results/tables/la_lowres_10pct.csv``
(README, Real data).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

from semiseg.config import validate_config
from semiseg.evaluation import ablation_table
from semiseg.plan import Plan
from semiseg.splits import labelled_count, read_list

REPO = Path(__file__).resolve().parents[1]
DATASET = "la_lowres"


def write_config(work: Path, la: Path, iterations: int, labelled: int, width: int, seeds: list[int]) -> tuple[str, dict]:
    """Write ``work/config.yaml`` (the ``la_lowres`` block run on ``la``); return the split's name and the config."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    ds = cfg["datasets"][DATASET]
    n_train = len(read_list(la / "train.list"))
    counts = {name: s.get("labelled_number") or labelled_count(s["labelled_percent"], n_train)
              for name, s in ds["splits"].items() if "labelled_ids" not in s}
    named = [name for name, n in counts.items() if n == labelled]
    if named:
        split = named[0]
        ds["splits"] = {split: ds["splits"][split]}
    else:
        split = f"{labelled}lab"
        lambda_c = next(iter(ds["splits"].values()))["lambda_c"]
        ds["splits"] = {split: {"labelled_number": labelled, "lambda_c": lambda_c}}
    ds["raw"]["dir"] = str(la.resolve())
    ds["split"] = {"test_list": str((la / "test.list").resolve()), "train_list": str((la / "train.list").resolve())}
    ds["training"] = {**ds.get("training", {}), "iterations": iterations, "lr_step": max(1, int(0.8 * iterations)),
                      "base_filters": width, "bcl_max_samples": 2000, "stage2_init": "stage1",
                      "checkpoint_every": 100, "num_workers": 1}
    ds["seeds"] = list(seeds)
    cfg["datasets"] = {DATASET: ds}
    cfg["evaluation"]["protocol"] = "paper"
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return split, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--la", default=str(REPO.parent / "shared" / "data" / "la2018_h5"))
    ap.add_argument("--workdir", default="/tmp/semiseg_la_bench")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--labelled", type=int, default=4)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337])
    a = ap.parse_args()
    la, work = Path(a.la), Path(a.workdir)
    if not (la / "train.list").exists() or not (la / "test.list").exists():
        sys.exit(f"no LA cases in {la} (expected train.list, test.list and <case>/mri_norm2.h5)")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    split, cfg = write_config(work, la, a.iterations, a.labelled, a.width, a.seeds)
    plan = Plan(validate_config(cfg))  # the workflow's own paths
    metrics = {m: {s: work / plan.metrics_file(DATASET, split, s, m) for s in a.seeds} for m in ("supervised", "full")}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--cores", str(a.cores), "--workflow-profile", str(REPO / "workflow/profiles/default"),
           *[str(p.relative_to(work)) for per_seed in metrics.values() for p in per_seed.values()]]
    print(" ".join(cmd), flush=True)
    res = subprocess.run(cmd, cwd=work, check=False)
    if res.returncode:
        sys.exit(f"workflow failed ({res.returncode}); logs in {work / 'results/logs'}")
    elapsed = time.perf_counter() - t0
    train, test = read_list(la / "train.list"), read_list(la / "test.list")
    n_l, n_u = a.labelled, len(train) - a.labelled
    ablation_table(metrics, {"supervised": (n_l, 0), "full": (n_l, n_u)}, "voxel",
                   work / "table.csv", work / "table.md", {"protocol": "paper", "unit": "voxel"})
    print((work / "table.md").read_text(encoding="utf-8"))
    print(f"{len(train)} training ({n_l} labelled), {len(test)} test cases; {a.iterations} iterations a stage, "
          f"width {a.width}, seeds {a.seeds}; wall-clock {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
