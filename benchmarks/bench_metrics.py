"""``segmentation_metrics`` vs medpy (dc, jc, asd, hd95), side by side in one run.

Cases: a real LA label (from ``--la``, eroded by 2 voxels as the "prediction") and a
512 x 512 x 200 volume with a pancreas-sized object (its prediction shifted by 3 voxels).
Prints both timings, the speed-up (target >= 10x) and the largest difference of values
(target: identical).

    python benchmarks/bench_metrics.py [--la ../shared/data/la2018_h5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import h5py
import numpy as np
from medpy.metric import binary
from scipy import ndimage

from semiseg.metrics import segmentation_metrics


def medpy_all(p, r):
    return {"dice": binary.dc(p, r), "jaccard": binary.jc(p, r), "asd": binary.asd(p, r), "hd95": binary.hd95(p, r)}


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--la", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "la2018_h5"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cases = []
    la = sorted(Path(args.la).glob("*/mri_norm2.h5"))
    if la:
        with h5py.File(la[0], "r") as f:
            ref = f["label"][...] > 0
        cases.append((f"LA {la[0].parent.name} {ref.shape}", ndimage.binary_erosion(ref, iterations=2), ref))
    else:
        print(f"LA cases not found at {args.la}: skipping the real case")
    shape = (512, 512, 200)
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
    ref = ((x - 250) / 40.0) ** 2 + ((y - 260) / 12.0) ** 2 + ((z - 100) / 25.0) ** 2 <= 1
    cases.append((f"synthetic {shape}", np.roll(ref, 3, axis=0), ref))
    print(f"{'case':<40}{'medpy s':>9}{'ours s':>9}{'speed-up':>10}  max |diff|")
    for name, pred, r in cases:
        t_m, m = timed(lambda: medpy_all(pred, r), args.repeats)
        t_o, o = timed(lambda: segmentation_metrics(pred, r), args.repeats)
        diff = max(abs(o[k] - m[k]) for k in m)
        print(f"{name:<40}{t_m:>9.3f}{t_o:>9.3f}{t_m / t_o:>9.1f}x  {diff:.2e}  (target >= 10x, identical)")


if __name__ == "__main__":
    main()
