"""How well the label-orientation criterion (``label_orientation: auto``) separates placements.

For each case: the boundary score of the label as stored, the ratio of the best score to
the runner-up's (the criterion asks for >= 1.1), and, for every other signed axis
permutation that fits the shape, whether a label stored in that orientation is put back
exactly (recovered), refused as ambiguous, or wrongly placed. Data:

- the real LA 2018 cases in ``../shared/data/la2018_h5`` (MR, cropped around the atrium: the
  hard case, since every flip still overlaps the atrium);
- synthetic abdominal CT (``semiseg.data.synthetic``: liver, spleen, kidneys, bowel, and a
  pancreas-like target enhancing like the bowel next to it), clipped to [-125, 275] HU and
  padded to a square in-plane size so that x/y transposes fit too;
- the time of one decision on a 512 x 512 x 200 CT with a pancreas-sized label.

    python benchmarks/bench_label_orientation.py [--la DIR] [--synthetic 12]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import h5py
import numpy as np

from semiseg.data.synthetic import generate_case
from semiseg.errors import CaseError
from semiseg.preprocessing.orientation import (
    DEFAULT_RATIO,
    candidate_orientations,
    choose_label_orientation,
)

REPO = Path(__file__).resolve().parents[1]


def evaluate(name: str, image: np.ndarray, label: np.ndarray) -> dict:
    stored = choose_label_orientation(name, "-", image, label, ratio=1.0)
    outcome = {"recovered": 0, "ambiguous": 0, "wrong": 0}
    for o in candidate_orientations(label.shape, image.shape)[1:]:
        moved = o.apply(label)
        if np.array_equal(moved, label):
            continue  # a symmetry of this label: nothing to recover
        try:
            check = choose_label_orientation(name, "-", image, moved, ratio=DEFAULT_RATIO)
        except CaseError:
            outcome["ambiguous"] += 1
            continue
        outcome["recovered" if np.array_equal(check.chosen.apply(moved), label) else "wrong"] += 1
    return {
        "case": name,
        "stored_is_best": stored.chosen.is_identity,
        "score": stored.scores[0][1] if stored.chosen.is_identity else dict(stored.scores)[stored.chosen],
        "ratio": stored.ratio if stored.chosen.is_identity else 0.0,
        **outcome,
    }


def square(image: np.ndarray, label: np.ndarray, fill: float) -> tuple[np.ndarray, np.ndarray]:
    n = max(image.shape[:2])
    img = np.full((n, n, image.shape[2]), fill, image.dtype)
    lab = np.zeros(img.shape, label.dtype)
    img[: image.shape[0], : image.shape[1]] = image
    lab[: image.shape[0], : image.shape[1]] = label
    return img, lab


def report(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| case | stored is best | score (nats) | best / next | other orientations: recovered / ambiguous / wrong |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['stored_is_best']} | {r['score']:.4f} | {r['ratio']:.2f} | "
              f"{r['recovered']} / {r['ambiguous']} / {r['wrong']} |")
    ratios = [r["ratio"] for r in rows]
    total = {k: sum(r[k] for r in rows) for k in ("recovered", "ambiguous", "wrong")}
    print(f"stored best in {sum(r['stored_is_best'] for r in rows)} of {len(rows)}; best/next min {min(ratios):.2f}, "
          f"median {float(np.median(ratios)):.2f}; moved labels: {total}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--la", type=Path, default=REPO.parent / "shared" / "data" / "la2018_h5")
    ap.add_argument("--synthetic", type=int, default=12, help="number of synthetic CT cases")
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, numpy {np.__version__}")

    if args.la.is_dir():
        rows = []
        for path in sorted(args.la.glob("*/mri_norm2.h5")):
            with h5py.File(path, "r") as f:
                rows.append(evaluate(path.parent.name, f["image"][...], f["label"][...]))
        report(f"Real LA 2018 cases ({args.la})", rows)
    else:
        print(f"(no LA cases at {args.la})")

    rows = []
    for i in range(args.synthetic):
        image, label, _ = generate_case(20261125, i)
        image, label = square(np.clip(image, -125, 275), label, -125.0)
        rows.append(evaluate(f"synthetic_{i:02d} {image.shape}", image, label))
    report("Synthetic abdominal CT (clipped to [-125, 275] HU, square in-plane)", rows)

    rng = np.random.default_rng(0)
    image = rng.normal(40, 20, size=(512, 512, 200)).astype(np.float32)
    x, y, z = np.ogrid[:512, :512, :200]
    label = (((x - 300) / 40.0) ** 2 + ((y - 250) / 15.0) ** 2 + ((z - 90) / 30.0) ** 2 <= 1).astype(np.uint8)
    image[label > 0] += 80
    t0 = time.perf_counter()
    check = choose_label_orientation("big", "-", image, np.flip(label, 2).copy())
    print(f"\n512 x 512 x 200, {int(label.sum())} label voxels, {len(check.scores)} distinct placements: "
          f"{time.perf_counter() - t0:.2f} s ({check.chosen.describe()})")


if __name__ == "__main__":
    main()
