"""Per-case preprocessing time and peak memory on a typical abdominal CT volume.

Writes a synthetic 512 x 512 x 200 int16 CT at 0.8 x 0.8 x 2.5 mm (NIfTI, gzip) with a
pancreas-sized label, then preprocesses it to 1 mm (HU clip, resample, crop, z-score,
HDF5) once per crop source, each in a fresh process (``--label-orientation auto``: with the
Pancreas-CT label placement check). Peak memory is the process's peak
resident set (VmHWM) minus its resident set just before the call, and is printed as a
ratio to the raw volume's float32 size. Target: ratio < 6.

    python benchmarks/bench_preprocess.py [--shape 512 512 200] [--spacing 0.8 0.8 2.5] [--label-orientation auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
from semiseg.preprocessing import PreprocessingParams, preprocess_case

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
image, label, out, source, orientation = sys.argv[1:6]
params = PreprocessingParams(crop_source=source, target_spacing=(1.0, 1.0, 1.0), crop_margin=25,
                             label_orientation=orientation)
before = status("VmRSS:")
t0 = time.perf_counter()
summary = preprocess_case("bench", image, label, out, params)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "rss_before": before, "peak": status("VmHWM:"), "shape": list(summary["shape"])}))
"""


def write_ct(folder: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[Path, Path]:
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    x = ((np.arange(shape[0]) - shape[0] / 2) * spacing[0]).astype(np.float32)[:, None, None]
    y = ((np.arange(shape[1]) - shape[1] / 2) * spacing[1]).astype(np.float32)[None, :, None]
    z = ((np.arange(shape[2]) - shape[2] / 2) * spacing[2]).astype(np.float32)[None, None, :]
    image = np.full(shape, -1000, dtype=np.int16)
    body = (x / 170) ** 2 + (y / 120) ** 2 <= 1
    image[np.broadcast_to(body, shape)] = 40
    image[np.broadcast_to((x / 20) ** 2 + ((y - 70) / 20) ** 2 <= 1, shape)] = 700  # spine
    label = (((x + 10) / 45) ** 2 + ((y + 10) / 12) ** 2 + ((z - 20) / 25) ** 2 <= 1).astype(np.uint8)
    image[label == 1] = 100
    image += rng.normal(0, 15, size=shape).astype(np.int16)
    paths = []
    for name, arr in (("image", image), ("label", label)):
        img = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
        img.SetSpacing(spacing)
        img.SetOrigin((-200.0, -210.0, -400.0))
        p = folder / f"{name}.nii.gz"
        sitk.WriteImage(img, str(p), useCompression=True)
        paths.append(p)
    return paths[0], paths[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 200))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5))
    ap.add_argument("--sources", nargs="+", default=["label", "body", "none"])
    ap.add_argument("--label-orientation", choices=["header", "auto"], default="header",
                    help="'auto': also time putting the label on the image grid (Pancreas-CT)")
    args = ap.parse_args()
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    raw_f32 = int(np.prod(shape)) * 4
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        image, label = write_ct(Path(tmp), shape, spacing)
        print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}")
        print(f"volume: {shape} voxels at {spacing} mm, raw float32 size {raw_f32 / 2**20:.0f} MiB (written in {time.perf_counter() - t0:.1f} s)")
        print(f"{'crop_source':<12}{'output shape':<18}{'seconds':>9}{'peak MiB':>10}{'ratio':>8}  target < 6")
        worst = 0.0
        for source in args.sources:
            out = Path(tmp) / f"{source}.h5"
            res = subprocess.run([sys.executable, "-c", CHILD, str(image), str(label), str(out), source,
                                  args.label_orientation],
                                 capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            peak = r["peak"] - r["rss_before"]
            ratio = peak / raw_f32
            worst = max(worst, ratio)
            print(f"{source:<12}{'x'.join(map(str, r['shape'])):<18}{r['seconds']:>9.2f}{peak / 2**20:>10.0f}{ratio:>8.2f}  {'ok' if ratio < 6 else 'OVER'}")
        print(f"worst peak-memory ratio: {worst:.2f} (target < 6)")


if __name__ == "__main__":
    main()
