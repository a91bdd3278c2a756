"""A real-data run on the CPU: the supervised baseline vs the full method on real LA cases.

Takes the community's LA HDF5 cases in ``--la`` (``../shared/data/la2018_h5``: 20 training
and 4 test cases), downsamples them 2x (image: 2 x 2 x 2 block mean; label: block majority;
1.25 mm), writes them as a ``community_h5`` raw data set in ``--workdir``, and runs the
workflow (this checkout's Snakefile) up to the per-case metrics of the supervised baseline
and the full method with ``--labelled`` labelled cases (the first of ``train.list``; the
other training cases unlabelled), a width-``--width`` V-Net and ``--iterations`` iterations
per stage. Prints the two-row table (paper protocol: the community's label-cropped volumes,
distances in voxels of the 1.25 mm grid) and the wall-clock time.

    python benchmarks/bench_la_cpu.py [--la ../shared/data/la2018_h5] [--iterations 300]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import yaml

from semiseg.evaluation import ablation_table

REPO = Path(__file__).resolve().parents[1]


def downsample2(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2 x 2 x 2 block mean of ``image`` and block majority (>= 4 of 8) of ``label``;
    a trailing odd voxel per axis is dropped."""
    sl = tuple(slice(0, n - n % 2) for n in image.shape)
    shape = tuple((n - n % 2) // 2 for n in image.shape)

    def blocks(a):
        return a[sl].reshape(shape[0], 2, shape[1], 2, shape[2], 2).astype(np.float32)

    img = blocks(image).mean(axis=(1, 3, 5))
    lab = (blocks(label).mean(axis=(1, 3, 5)) >= 0.5).astype(np.uint8)
    return img.astype(np.float32), lab


def prepare(la: Path, work: Path) -> tuple[list[str], list[str]]:
    train = (la / "train.list").read_text(encoding="utf-8").split()
    test = (la / "test.list").read_text(encoding="utf-8").split()
    for case in train + test:
        out = work / "raw" / case / "mri_norm2.h5"
        if out.exists():
            continue
        with h5py.File(la / case / "mri_norm2.h5", "r") as f:
            img, lab = downsample2(f["image"][...], f["label"][...])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.h5")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("image", data=img)
            f.create_dataset("label", data=lab)
        tmp.replace(out)
    (work / "train.list").write_text("\n".join(train) + "\n", encoding="utf-8")
    (work / "test.list").write_text("\n".join(test) + "\n", encoding="utf-8")
    return train, test


def write_config(work: Path, iterations: int, labelled: int, width: int) -> None:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    cfg["datasets"] = {
        "la_small": {
            "description": "LA 2018 community HDF5 cases, 2x downsampled (benchmark)",
            "source": "../shared/data/la2018_h5",
            "modality": "MR",
            "classes": ["background", "left_atrium"],
            "raw": {"dir": str(work / "raw"), "image": "{case}/mri_norm2.h5", "format": "community_h5",
                    "spacing": [1.25, 1.25, 1.25]},
            "patch_size": [64, 64, 32],
            "stride": [9, 9, 2],  # the paper's LA stride (18, 18, 4) at half resolution
            "split": {"test_list": str(work / "test.list"), "train_list": str(work / "train.list")},
            "splits": {f"{labelled}lab": {"labelled_number": labelled, "lambda_c": 0.09}},
            "training": {"iterations": iterations, "lr_step": int(0.8 * iterations), "base_filters": width,
                         "bcl_max_samples": 2000, "stage2_init": "stage1", "checkpoint_every": 100, "num_workers": 1},
        }
    }
    cfg["evaluation"]["protocol"] = "paper"
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--la", default=str(REPO.parent / "shared" / "data" / "la2018_h5"))
    ap.add_argument("--workdir", default="/tmp/semiseg_la_bench")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--labelled", type=int, default=4)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--cores", type=int, default=2)
    a = ap.parse_args()
    la, work = Path(a.la), Path(a.workdir)
    if not (la / "train.list").exists():
        sys.exit(f"no LA cases in {la} (expected train.list, test.list and <case>/mri_norm2.h5)")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, test = prepare(la, work)
    write_config(work, a.iterations, a.labelled, a.width)
    split = f"{a.labelled}lab"
    metrics = {m: work / f"results/metrics/la_small_{split}/{m}.csv" for m in ("supervised", "full")}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--cores", str(a.cores), "--workflow-profile", str(REPO / "workflow/profiles/default"),
           *[str(p.relative_to(work)) for p in metrics.values()]]
    print(" ".join(cmd), flush=True)
    res = subprocess.run(cmd, cwd=work, check=False)
    if res.returncode:
        sys.exit(f"workflow failed ({res.returncode}); logs in {work / 'results/logs'}")
    elapsed = time.perf_counter() - t0
    n_l, n_u = a.labelled, len(train) - a.labelled
    ablation_table({k: str(v) for k, v in metrics.items()}, {"supervised": (n_l, 0), "full": (n_l, n_u)}, "voxel",
                           work / "table.csv", work / "table.md", {"protocol": "paper", "unit": "voxel"})
    print((work / "table.md").read_text(encoding="utf-8"))
    print(f"{len(train)} training ({n_l} labelled), {len(test)} test cases; {a.iterations} iterations a stage, "
          f"width {a.width}; wall-clock {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
