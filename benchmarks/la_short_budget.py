"""Why do the semi-supervised models lose to the supervised baseline at short budgets on LA?

Issue 14, item 3: on LA at the 10 % split (8 labelled cases), 2x downsampled, width 8, 300
iterations a stage, the supervised baseline beat AUA + BCL (81.3 vs 77.3 % Dice on 4 test
cases) and lost at 1000 iterations. This script trains stage-1 variants that switch one
ingredient at a time, all with the same data, seed, batches and iteration budget, and
scores each on the same evaluation cases, so the difference between two rows is the effect
of that ingredient:

- ``supervised``: plain V-Net, 0.5 * (CE + Dice) on the labelled crops (the baseline);
- ``aua_bcl``: the method's stage 1 (lambda_c 0.09, lambda_g ramped to 0.15 over the run);
- ``aua_sup_only``: ``aua`` with lambda_g = 0: the aleatoric head and the MC-integral NLL as
  the supervised term, no unlabelled signal: the supervised loss formulation alone;
- ``aua``: AUA without BCL (lambda_c = 0);
- ``bcl_sup_only``: ``aua_bcl`` with lambda_g = 0: BCL on top of the supervised term alone;
- ``aua_bcl_lc001``: ``aua_bcl`` with lambda_c 0.01 (the paper's value at 5 % labelled);
- ``aua_bcl_predrop``: ``aua_bcl`` with BCL on the decoder features before the last dropout;
- ``*_drop01``: the same with dropout 0.1 instead of 0.5.

Evaluation cases: the 4 shared test cases and ``--holdout`` cases held out of the end of the
training list (then neither labelled nor unlabelled), so that 4 cases do not decide alone.
Each row: mean +- sd Dice over those cases, and the paired difference to ``supervised`` with
a Wilcoxon signed-rank p-value (SciPy). Data: the ``la_lowres`` data set of ``config.yaml``
(the community LA HDF5 cases at 1.25 mm, converted by the pipeline's own code), written once
to ``--workdir``; patch 64 x 64 x 48 as ``la_lowres``; a sliding-window stride of 16 x 16 x 8
(coarser than ``la_lowres``'s 9 x 9 x 2, to keep 100+ predictions affordable; the same for
every variant).

    python benchmarks/la_short_budget.py [--iterations 300] [--variants supervised aua_bcl ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from semiseg.inference import sliding_window_predict
from semiseg.preprocessing.community import convert_community_case
from semiseg.pseudo import dice
from semiseg.training.engine import TrainConfig, load_model, train

REPO = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, dict] = {
    "supervised": {"method": "supervised"},
    "aua_bcl": {"method": "aua_bcl", "lambda_c": 0.09},
    "aua_sup_only": {"method": "aua", "consistency_max": 0.0},
    "aua": {"method": "aua"},
    "bcl_sup_only": {"method": "aua_bcl", "lambda_c": 0.09, "consistency_max": 0.0},
    "aua_bcl_lc001": {"method": "aua_bcl", "lambda_c": 0.01},
    "aua_bcl_predrop": {"method": "aua_bcl", "lambda_c": 0.09, "bcl_features": "before_dropout"},
    "supervised_drop01": {"method": "supervised", "dropout": 0.1},
    "aua_bcl_drop01": {"method": "aua_bcl", "lambda_c": 0.09, "dropout": 0.1},
}


def prepare(la: Path, work: Path) -> tuple[list[Path], list[Path]]:
    """The ``la_lowres`` case files (training list order, test list order) in ``work/cases``:
    the community files resampled to 1.25 mm by the pipeline's own conversion
    (:func:`semiseg.preprocessing.community.convert_community_case`, ``resample_to``)."""
    train_ids = (la / "train.list").read_text(encoding="utf-8").split()
    test_ids = [c for c in (la / "test.list").read_text(encoding="utf-8").split() if (la / c / "mri_norm2.h5").exists()]
    out = work / "cases"
    out.mkdir(parents=True, exist_ok=True)
    for case in train_ids + test_ids:
        dest = out / f"{case}.h5"
        if not dest.exists():
            convert_community_case(case, la / case / "mri_norm2.h5", dest, spacing=(0.625,) * 3,
                                   classes=("background", "left_atrium"), dataset="la_lowres", resample_to=(1.25,) * 3)
    return [out / f"{c}.h5" for c in train_ids], [out / f"{c}.h5" for c in test_ids]


def evaluate(model_path: Path, cases: list[Path], patch, stride) -> dict[str, float]:
    """Foreground Dice per case of the student's argmax (stored grid)."""
    net = load_model(model_path, "student")
    scores = {}
    for p in cases:
        with h5py.File(p, "r") as f:
            img, lab = f["image"][...], f["label"][...]
        probs = sliding_window_predict(net, img, patch, stride, batch_size=4, device="cpu")
        scores[p.stem] = dice(probs.argmax(0), lab)
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--la", default=str(REPO.parent / "shared" / "data" / "la2018_h5"))
    ap.add_argument("--workdir", default="/tmp/semiseg_la_short")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--labelled", type=int, default=8)
    ap.add_argument("--holdout", type=int, default=16)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--patch", type=int, nargs=3, default=(64, 64, 48))
    ap.add_argument("--stride", type=int, nargs=3, default=(16, 16, 8))
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    a = ap.parse_args()
    work = Path(a.workdir)
    t0 = time.perf_counter()
    train_cases, test_cases = prepare(Path(a.la), work)
    labelled = train_cases[: a.labelled]
    held = train_cases[len(train_cases) - a.holdout:] if a.holdout else []
    unlabelled = train_cases[a.labelled: len(train_cases) - a.holdout]
    eval_cases = test_cases + held
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{len(labelled)} labelled, {len(unlabelled)} unlabelled, {len(eval_cases)} evaluation cases "
          f"({len(test_cases)} test + {len(held)} held out); {a.iterations} iterations, width {a.width}, "
          f"patch {tuple(a.patch)}, seed {a.seed}", flush=True)
    results = {}
    for name in a.variants:
        v = dict(VARIANTS[name])
        cfg = TrainConfig(patch_size=tuple(a.patch), iterations=a.iterations, lr_step=int(0.8 * a.iterations),
                          base_filters=a.width, bcl_max_samples=2000, seed=a.seed, **v)
        out = work / f"it{a.iterations}_w{a.width}_s{a.seed}" / name
        t1 = time.perf_counter()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        model = out / "model.pt"
        if not model.exists():
            train(cfg, labelled, unlabelled, out, device="cpu", checkpoint_every=100, num_workers=1, progress=False)
        t2 = time.perf_counter()
        scores = evaluate(model, eval_cases, a.patch, a.stride)
        cpu2 = resource.getrusage(resource.RUSAGE_SELF)
        results[name] = {"scores": scores, "train_s": t2 - t1, "eval_s": time.perf_counter() - t2,
                         "cpu_s": (cpu2.ru_utime + cpu2.ru_stime) - (cpu1.ru_utime + cpu1.ru_stime)}
        d = list(scores.values())
        print(f"{name:20s} Dice {100 * statistics.mean(d):6.2f} +- {100 * statistics.stdev(d):5.2f} "
              f"(test 4: {100 * statistics.mean(d[:len(test_cases)]):6.2f}); train {t2 - t1:.0f} s", flush=True)
    from scipy.stats import wilcoxon

    base = results.get("supervised")
    lines = ["| variant | Dice [%] mean +- sd (all) | 4 test cases | paired diff to supervised [points] | Wilcoxon p | train s |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        d = np.array(list(r["scores"].values()))
        diff = p = ""
        if base is not None and name != "supervised":
            b = np.array(list(base["scores"].values()))
            diff = f"{100 * (d - b).mean():+.2f}"
            p = f"{wilcoxon(d, b).pvalue:.3f}"
        lines.append(f"| {name} | {100 * d.mean():.2f} +- {100 * d.std(ddof=1):.2f} | {100 * d[:len(test_cases)].mean():.2f} "
                     f"| {diff} | {p} | {r['train_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    tag = f"it{a.iterations}_w{a.width}_s{a.seed}"
    (work / f"{tag}.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (work / f"{tag}.md").write_text(table + "\n", encoding="utf-8")
    print(f"wall-clock {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
