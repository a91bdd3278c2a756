"""``sliding_window_predict`` vs the field's naive window loop, side by side in one run.

The naive loop is UA-MT's ``test_single_case`` pattern: one window at a time under
``torch.no_grad``, softmax, copy to NumPy, accumulate a float32 score map and a count map
in NumPy, divide at the end. Both run the same network (V-Net, seeded weights, eval mode,
segmentation logits only) over the same windows of a real LA case (``--la``, the
community's ``mri_norm2.h5``) at the paper's LA setting: patch 112 x 112 x 80, stride
18 x 18 x 4. Prints the timings (best of ``--repeats``, alternating), the speed-ups
(issue 5's target: >= 3x on CPU) and whether the argmax is identical: for
``sliding_window_predict`` in float32 (the pipeline's setting) and with ``amp=True``
(bfloat16 autocast on the CPU, float16 on CUDA). ``--model`` takes trained weights (a
``model.pt`` of the pipeline); without it the V-Net has seeded random weights.

    python benchmarks/bench_inference.py [--la ../shared/data/la2018_h5] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from semiseg.inference import sliding_window_predict
from semiseg.networks.vnet import SegmentationNet
from semiseg.precision import resolve_device


def naive_predict(net, image: np.ndarray, patch, stride, device) -> np.ndarray:
    """The field's usual loop (UA-MT ``test_single_case``), volume at least the patch size."""
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch[0]) / stride[0]) + 1
    sy = math.ceil((hh - patch[1]) / stride[1]) + 1
    sz = math.ceil((dd - patch[2]) / stride[2]) + 1
    score = None
    cnt = np.zeros(image.shape, dtype=np.float32)
    with torch.no_grad():
        for x in range(sx):
            xs = min(stride[0] * x, ww - patch[0])
            for y in range(sy):
                ys = min(stride[1] * y, hh - patch[1])
                for z in range(sz):
                    zs = min(stride[2] * z, dd - patch[2])
                    tile = image[xs : xs + patch[0], ys : ys + patch[1], zs : zs + patch[2]]
                    t = torch.from_numpy(np.ascontiguousarray(tile)[None, None]).to(device)
                    y1 = net(t, heads=False).logits
                    prob = torch.softmax(y1, dim=1).cpu().numpy()[0]
                    if score is None:
                        score = np.zeros((prob.shape[0], *image.shape), dtype=np.float32)
                    score[:, xs : xs + patch[0], ys : ys + patch[1], zs : zs + patch[2]] += prob
                    cnt[xs : xs + patch[0], ys : ys + patch[1], zs : zs + patch[2]] += 1
    return score / cnt[None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--la", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "la2018_h5"))
    ap.add_argument("--case", default=None, help="LA case folder (default: the first)")
    ap.add_argument("--patch", type=int, nargs=3, default=[112, 112, 80])
    ap.add_argument("--stride", type=int, nargs=3, default=[18, 18, 4])
    ap.add_argument("--base-filters", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default=None, help="a trained model.pt (default: seeded random weights)")
    ap.add_argument("--no-amp", action="store_true", help="skip the amp=True run")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    root = Path(a.la)
    case = a.case or min(p.name for p in root.iterdir() if (p / "mri_norm2.h5").exists())
    with h5py.File(root / case / "mri_norm2.h5", "r") as f:
        image = f["image"][...].astype(np.float32)
    dev = resolve_device(a.device)
    if a.model:
        from semiseg.models import load_model

        net = load_model(a.model, "student", str(dev)).eval()
        a.base_filters = net.backbone.out_channels
    else:
        torch.manual_seed(0)
        net = SegmentationNet(in_channels=1, num_classes=2, base_filters=a.base_filters).to(dev).eval()
    n_win = np.prod([math.ceil((n - p) / s) + 1 for n, p, s in zip(image.shape, a.patch, a.stride)])
    print(f"case {case}: volume {image.shape}, patch {a.patch}, stride {a.stride}, {n_win} windows, "
          f"width {a.base_filters}, device {dev}, {torch.get_num_threads()} threads")

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    runs = {"float32": False} if a.no_amp else {"float32": False, "amp": True}
    best = {"naive": float("inf"), **{k: float("inf") for k in runs}}
    out = {}
    for _ in range(a.repeats):
        t, out["naive"] = timed(lambda: naive_predict(net, image, a.patch, a.stride, dev))
        best["naive"] = min(best["naive"], t)
        for name, amp in runs.items():
            t, out[name] = timed(lambda amp=amp: sliding_window_predict(
                net, image, a.patch, a.stride, batch_size=a.batch_size, device=dev, amp=amp))
            best[name] = min(best[name], t)
    ref = out["naive"].argmax(0)
    print(f"naive loop (one window at a time, NumPy accumulation): {best['naive']:.2f} s")
    for name in runs:
        lab = out[name].argmax(0)
        diff = int((lab != ref).sum())
        print(f"sliding_window_predict {name} (batch {a.batch_size}): {best[name]:.2f} s, speed-up "
              f"{best['naive'] / best[name]:.2f}x (target >= 3x); identical argmax: {diff == 0} "
              f"({diff} of {ref.size} voxels differ); max |dp| {float(np.abs(out[name] - out['naive']).max()):.2e}")


if __name__ == "__main__":
    main()
