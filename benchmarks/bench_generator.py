"""The demo generator's time, measured side by side in one run.

1. The smooth random fields of every demo case (two per case: 14 mm and 4 mm correlation
   length), made the generator's way (separable cubic B-spline matrices,
   ``semiseg.data.synthetic._smooth_noise``) and the earlier way (SimpleITK's B-spline
   resampler over the whole grid), with the largest difference between the two.
2. The whole demo data set (``write_demo_dataset``: generation and compressed NIfTI files)
   with 1 and with 2 worker processes.

    python benchmarks/bench_generator.py [--cases 40] [--seed 20261125]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from semiseg.data import synthetic
from semiseg.data.synthetic import SyntheticParams, write_demo_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--seed", type=int, default=20261125)
    args = ap.parse_args()
    p = SyntheticParams()
    grids = []
    for i in range(args.cases):  # the cases' grids, drawn as generate_case draws them
        rng = np.random.default_rng([args.seed, i])
        sxy, sz = round(rng.uniform(*p.inplane_spacing), 4), round(rng.uniform(*p.slice_spacing), 3)
        ax, ay = rng.uniform(*p.body_semi_axis_x), rng.uniform(*p.body_semi_axis_y)
        fx, fy = 2 * (ax + rng.uniform(*p.fov_margin)), 2 * (ay + rng.uniform(*p.fov_margin))
        shape = (int(round(fx / sxy)), int(round(fy / sxy)), int(round(rng.uniform(*p.z_extent) / sz)))
        grids.append((shape, np.array([sxy, sxy, sz])))
    t_fast = t_slow = 0.0
    worst = 0.0
    for i, (shape, spacing) in enumerate(grids):
        for scale in (14.0, 4.0):
            t0 = time.perf_counter()
            a = synthetic._smooth_noise(np.random.default_rng(i), shape, spacing, scale)
            t1 = time.perf_counter()
            b = synthetic.smooth_noise_by_resampling(np.random.default_rng(i), shape, spacing, scale)
            t2 = time.perf_counter()
            t_fast += t1 - t0
            t_slow += t2 - t1
            worst = max(worst, float(np.abs(a - b).max()))
    print(f"{os.cpu_count()} CPUs; {args.cases} cases, {sum(int(np.prod(s)) for s, _ in grids) / 1e6:.1f} M voxels")
    print(f"smooth fields: separable B-spline {t_fast:.2f} s, SimpleITK resampling {t_slow:.2f} s "
          f"({t_slow / t_fast:.1f}x); largest difference {worst:.1e}")
    times = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            write_demo_dataset(tmp, args.cases, args.seed, workers=workers)
            times[workers] = time.perf_counter() - t0
    print(f"write_demo_dataset: 1 worker {times[1]:.1f} s, 2 workers {times[2]:.1f} s ({times[1] / times[2]:.2f}x)")


if __name__ == "__main__":
    main()
