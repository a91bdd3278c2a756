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
- ``*_drop01``: the same with dropout 0.1 instead of 0.5;
- ``fully_supervised``: every labelled and unlabelled case with its ground truth (the upper
  bound at this budget).

Stage-2 variants (``s2_*``) train from the pseudo labels and prototypes of one stage-1 model,
``--stage1`` (default ``aua_bcl``; trained first if missing), made by the pipeline's own
functions (:func:`semiseg.pseudo.write_pseudo_label` at ``la_lowres``'s stride 9 x 9 x 2,
:func:`semiseg.pseudo.estimate_prototypes`):

- ``s2_full``: the method's stage 2 as ``la_lowres`` runs it (fresh V-Net, PCL lambda_r 0.1,
  the authors' summed loss, dropout 0.5);
- ``s2_pl``: pseudo labelling alone (lambda_r 0);
- ``s2_full_init1``: started from the stage-1 model (``stage2_init: stage1``);
- ``s2_full_drop01``: dropout 0.1; ``s2_full_pooled``: ``stage2_loss: pooled``;
- ``s2_full_teacher``: pseudo labels and prototypes from the stage-1 EMA teacher;
- ``s2_full_lcc``: pseudo labels reduced to their largest 26-connected component;
- ``s2_true_labels``: ``s2_full`` with the unlabelled cases' ground truth in place of their
  pseudo labels (and prototypes from it): what stage 2 reaches with perfect pseudo labels at
  this budget, which separates pseudo-label noise from the stage-2 schedule.

The stage-1 model's EMA teacher is scored as well (row ``<stage1>@teacher``), and the pseudo
labels' Dice against the unlabelled cases' ground truth is printed (mean, median, cases
under 0.5) for each kind of label a variant uses (``s2_full_lcc``: after the filter).

Evaluation cases: the 4 shared test cases and ``--holdout`` cases held out of the end of the
training list (then neither labelled nor unlabelled), so that 4 cases do not decide alone.
Each row: mean +- sd Dice over those cases, and the paired difference to ``supervised`` with
a Wilcoxon signed-rank p-value (SciPy). Data: the ``la_lowres`` data set of ``config.yaml``
(the community LA HDF5 cases at 1.25 mm, converted by the pipeline's own code), written once
to ``--workdir``; patch 64 x 64 x 48 as ``la_lowres``; a sliding-window stride of 16 x 16 x 8
(coarser than ``la_lowres``'s 9 x 9 x 2, to keep 100+ predictions affordable; the same for
every variant).

    python benchmarks/la_short_budget.py [--iterations 300] [--variants supervised aua_bcl ...]
    python benchmarks/la_short_budget.py --iterations 1000 --variants supervised aua_bcl s2_full s2_pl ...
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
from semiseg.io.atomic import atomic_path
from semiseg.preprocessing.community import convert_community_case
from semiseg.pseudo import dice, estimate_prototypes, write_pseudo_label
from semiseg.postprocessing import largest_component
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
    "fully_supervised": {"method": "fully_supervised"},
}

# Stage-2 variants: TrainConfig values, plus where the unlabelled crops' labels come from
# ("labels": pseudo | lcc | true) and which stage-1 weights made them ("weights").
_FULL = {"method": "full", "lambda_r": 0.1}
STAGE2_VARIANTS: dict[str, dict] = {
    "s2_full": dict(_FULL),
    "s2_pl": {"method": "aua_bcl_pl"},
    "s2_full_init1": {**_FULL, "stage2_init": "stage1"},
    "s2_full_drop01": {**_FULL, "dropout": 0.1},
    "s2_full_pooled": {**_FULL, "stage2_loss": "pooled"},
    "s2_full_teacher": {**_FULL, "weights": "teacher"},
    "s2_full_lcc": {**_FULL, "labels": "lcc"},
    "s2_true_labels": {**_FULL, "labels": "true"},
}
PSEUDO_STRIDE = (9, 9, 2)  # la_lowres's stride: what the pipeline's pseudo_label rule uses


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


def between_stages(stage1_model: Path, weights: str, labels: str, labelled: list[Path], unlabelled: list[Path],
                   patch, out: Path) -> tuple[list[Path], Path, dict]:
    """Label files for the unlabelled cases and the prototype file stage 2 trains from.

    ``labels``: ``pseudo`` (the stage-1 model's sliding-window argmax, the pipeline's pseudo
    labels), ``lcc`` (their largest component) or ``true`` (the cases' own ground truth).
    Returns (label files, prototype file, pseudo-label Dice summary against the ground truth).
    """
    out.mkdir(parents=True, exist_ok=True)
    if labels == "true":
        files = list(unlabelled)
    else:
        raw = out.parent / f"pseudo_{weights}"
        raw.mkdir(parents=True, exist_ok=True)
        files = []
        for case in unlabelled:
            dest = raw / f"{case.stem}.h5"
            if not dest.exists():
                write_pseudo_label(case, stage1_model, dest, patch, PSEUDO_STRIDE, weights=weights, device="cpu", batch_size=4)
            if labels == "lcc":
                lcc = out / f"{case.stem}.h5"
                if not lcc.exists():
                    with h5py.File(dest, "r") as f:
                        lab = largest_component(f["label"][...][None])[0]  # BCP's filter
                    with atomic_path(lcc) as tmp, h5py.File(tmp, "w") as f:
                        f.create_dataset("label", data=lab, compression="gzip", compression_opts=1)
                dest = lcc
            files.append(dest)
    scores = []
    for case, lf in zip(unlabelled, files, strict=True):
        with h5py.File(case, "r") as fc, h5py.File(lf, "r") as fl:
            scores.append(dice(fl["label"][...], fc["label"][...]))
    summary = {"mean": float(np.mean(scores)), "median": float(np.median(scores)), "under_0.5": int(sum(d < 0.5 for d in scores))}
    proto = out / "prototypes.pt"
    if not proto.exists():
        estimate_prototypes(stage1_model, labelled, unlabelled, files, patch, weights=weights, device="cpu").save(proto)
    return files, proto, summary


def evaluate(model_path: Path, cases: list[Path], patch, stride, weights: str = "student") -> dict[str, float]:
    """Foreground Dice per case of the argmax of ``weights`` (stored grid)."""
    net = load_model(model_path, weights)
    scores = {}
    for p in cases:
        with h5py.File(p, "r") as f:
            img, lab = f["image"][...], f["label"][...]
        probs = sliding_window_predict(net, img, patch, stride, batch_size=4, device="cpu")
        scores[p.stem] = dice(probs.argmax(0), lab)
    return scores


def markdown_table(results: dict[str, dict], references: list[str], n_test: int) -> str:
    """One row per scored model: Dice over the evaluation cases, and the paired difference
    (points) with its Wilcoxon signed-rank p to each reference row present."""
    from scipy.stats import wilcoxon

    refs = [r for r in dict.fromkeys(references) if r in results]
    head = "".join(f" vs `{r}` [points], p |" for r in refs)
    lines = [f"| variant | Dice [%] mean +- sd (all) | median | {n_test} test cases |{head} train s |",
             "|---|---|---|---|" + "---|" * len(refs) + "---|"]
    for name, r in results.items():
        d = np.array(list(r["scores"].values()))
        cells = ""
        for ref in refs:
            if ref == name:
                cells += " — |"
                continue
            b = np.array([results[ref]["scores"][c] for c in r["scores"]])
            p = wilcoxon(d, b).pvalue if np.any(d != b) else 1.0
            cells += f" {100 * (d - b).mean():+.2f}, {p:.3f} |"
        lines.append(f"| {name} | {100 * d.mean():.2f} +- {100 * d.std(ddof=1):.2f} | {100 * np.median(d):.2f} "
                     f"| {100 * d[:n_test].mean():.2f} |{cells} {r['train_s']:.0f} |")
    return "\n".join(lines)


def report(work: Path, tag: str, references: list[str], n_test: int) -> str:
    """The table over every row that the runs of ``tag`` scored (all ``<tag>_*.json`` files
    in ``work``), in the variants' order; rows scored twice (the same model) are kept once."""
    order = list(VARIANTS) + [f"{v}@teacher" for v in VARIANTS] + list(STAGE2_VARIANTS)
    rows: dict[str, dict] = {}
    quality: dict[str, dict] = {}
    for path in sorted(work.glob(f"{tag}_*.json")):
        blob = json.loads(path.read_text(encoding="utf-8"))
        for name, r in blob["rows"].items():
            if name not in rows or r["train_s"] > rows[name]["train_s"]:  # the run that trained it
                rows[name] = r
        quality.update(blob.get("pseudo_quality", {}))
    rows = dict(sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    notes = [f"- labels of the unlabelled cases `{k}`: Dice mean {q['mean']:.3f}, median {q['median']:.3f}, "
             f"{q['under_0.5']} under 0.5" for k, q in sorted(quality.items())]
    return markdown_table(rows, references, n_test) + ("\n\n" + "\n".join(notes) if notes else "")


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
    ap.add_argument("--cpu-amp", default="off", choices=["off", "bfloat16", "auto"],
                    help="training.cpu_amp of every run (default off: float32, as every study on record); "
                         "other values write to their own folder (<tag>_cpuamp-<value>)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS) + list(STAGE2_VARIANTS))
    ap.add_argument("--stage1", default="aua_bcl", choices=list(VARIANTS),
                    help="the stage-1 variant whose model the s2_* variants start from (trained if missing)")
    ap.add_argument("--against", default=None,
                    help="a second reference row for the paired differences (default: --stage1)")
    ap.add_argument("--report", action="store_true",
                    help="train nothing: print one table of every row the runs at these settings scored")
    ap.add_argument("--curves", default=None, metavar="PNG",
                    help="with --report: also draw the training curves of the stage-2 runs at these settings")
    a = ap.parse_args()
    work = Path(a.workdir)
    tag = f"it{a.iterations}_w{a.width}_s{a.seed}" + ("" if a.cpu_amp == "off" else f"_cpuamp-{a.cpu_amp}")
    if a.report:
        n_test = len([c for c in (Path(a.la) / "test.list").read_text(encoding="utf-8").split()
                      if (Path(a.la) / c / "mri_norm2.h5").exists()])
        print(report(work, tag, ["supervised", a.against or a.stage1], n_test))
        if a.curves:
            import pandas as pd

            from semiseg.figures import training_curves

            runs = {d.name.split("_from_")[0]: pd.read_csv(d / "losses.csv")
                    for d in sorted((work / tag).glob(f"s2_*_from_{a.stage1}")) if (d / "losses.csv").exists()}
            order = list(STAGE2_VARIANTS)
            runs = dict(sorted(runs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
            print("curves:", ", ".join(training_curves(runs, a.curves, smoothing=25)))
        return
    t0 = time.perf_counter()
    train_cases, test_cases = prepare(Path(a.la), work)
    labelled = train_cases[: a.labelled]
    held = train_cases[len(train_cases) - a.holdout:] if a.holdout else []
    unlabelled = train_cases[a.labelled: len(train_cases) - a.holdout]
    eval_cases = test_cases + held
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{len(labelled)} labelled, {len(unlabelled)} unlabelled, {len(eval_cases)} evaluation cases "
          f"({len(test_cases)} test + {len(held)} held out); {a.iterations} iterations, width {a.width}, "
          f"patch {tuple(a.patch)}, seed {a.seed}, cpu_amp {a.cpu_amp}", flush=True)
    results: dict[str, dict] = {}

    def config(values: dict) -> TrainConfig:
        return TrainConfig(patch_size=tuple(a.patch), iterations=a.iterations, lr_step=int(0.8 * a.iterations),
                           base_filters=a.width, bcl_max_samples=2000, seed=a.seed, cpu_amp=a.cpu_amp, **values)

    def trained(name: str) -> tuple[Path, float]:
        """The stage-1 variant's model (trained now if missing) and the seconds it took."""
        out = work / tag / name
        model = out / "model.pt"
        t1 = time.perf_counter()
        if not model.exists():
            train(config(VARIANTS[name]), labelled, unlabelled, out, device="cpu", checkpoint_every=100, num_workers=1,
                  progress=False)
        return model, time.perf_counter() - t1

    rows: list[tuple[str, Path, str, float]] = []  # (row name, model, weights, train s)
    pseudo_quality = {}
    for name in a.variants:
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        if name in VARIANTS:
            model, train_s = trained(name)
            rows.append((name, model, "student", train_s))
            if name == a.stage1:
                rows.append((f"{name}@teacher", model, "teacher", 0.0))
        else:
            v = dict(STAGE2_VARIANTS[name])
            weights, labels = v.pop("weights", "student"), v.pop("labels", "pseudo")
            source, source_s = trained(a.stage1)
            if not any(r[0] == a.stage1 for r in rows):
                rows += [(a.stage1, source, "student", source_s), (f"{a.stage1}@teacher", source, "teacher", 0.0)]
            files, proto, quality = between_stages(source, weights, labels, labelled, unlabelled, a.patch,
                                                   work / tag / f"between_{a.stage1}" / f"{labels}_{weights}")
            pseudo_quality[f"{labels}_{weights}"] = quality
            print(f"  labels of the unlabelled cases ({labels}, {weights}): Dice mean {quality['mean']:.3f}, "
                  f"median {quality['median']:.3f}, {quality['under_0.5']} under 0.5", flush=True)
            out = work / tag / f"{name}_from_{a.stage1}"
            model = out / "model.pt"
            t1 = time.perf_counter()
            if not model.exists():
                train(config(v), labelled, unlabelled, out, device="cpu", checkpoint_every=100, num_workers=1,
                      progress=False, pseudo=files, prototypes=proto if v.get("lambda_r") else None,
                      init_from=source)
            rows.append((name, model, "student", time.perf_counter() - t1))
        for row, model, weights, train_s in rows:
            if row in results:
                continue
            t2 = time.perf_counter()
            scores = evaluate(model, eval_cases, a.patch, a.stride, weights)
            cpu2 = resource.getrusage(resource.RUSAGE_SELF)
            results[row] = {"scores": scores, "train_s": train_s, "eval_s": time.perf_counter() - t2,
                            "cpu_s": (cpu2.ru_utime + cpu2.ru_stime) - (cpu1.ru_utime + cpu1.ru_stime)}
            d = list(scores.values())
            print(f"{row:20s} Dice {100 * statistics.mean(d):6.2f} +- {100 * statistics.stdev(d):5.2f} "
                  f"(test 4: {100 * statistics.mean(d[:len(test_cases)]):6.2f}); train {train_s:.0f} s", flush=True)
    table = markdown_table(results, ["supervised", a.against or a.stage1], len(test_cases))
    print(table)
    stem = f"{tag}_{'-'.join(a.variants)}"  # one file per run: --report reads them all
    for suffix, text in ((".json", json.dumps({"rows": results, "pseudo_quality": pseudo_quality}, indent=1)),
                         (".md", table + "\n")):
        with atomic_path(work / f"{stem}{suffix}", suffix=suffix) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    print(f"wall-clock {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
