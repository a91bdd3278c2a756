"""Score the pipeline's trained models on training cases that have ground truth but were
used without it: the unlabelled pool of an LA split, transductive or held out.

Four test cases decide the LA study's headline numbers, and at the 10 % split only one of
them (UTBU) is a case the supervised baseline under-segments. The 72 unlabelled training
cases of ``la_lowres`` ``10pct`` have ground truth too; this script scores any set of the
pipeline's models on them, paired by case name, so that the size of the semi-supervised
gain can be read off many more cases.

Whether a score is held out depends on the model and the case, and the script says which
for every row (column ``seen``):

- ``labelled only`` (method ``supervised``): the model never saw the pool's images, so its
  scores on them are held-out estimates;
- ``images`` (the semi-supervised methods, stages 1 and 2): the model trained on the case's
  image without its label, so its score is transductive (an upper estimate for unseen
  cases);
- ``images and labels`` (``fully_supervised``): trained on the case with its label;
- ``no``: the case is outside the unlabelled list of the model's split (e.g. scored with a
  model of ``10pct-u36``, trained on the first 36 unlabelled cases only, on the other 36):
  a held-out score.

Which cases a model trained on is read from the pipeline's layout: a model at
``<results>/models/<data set>_<split>/seed<seed>/<model dir>/model.pt`` used the cases of
``<results>/splits/<data set>/<split>/unlabelled.txt`` (semi-supervised methods), and the
method is the one the model file records.

Predictions use the pipeline's own function (:func:`semiseg.pseudo.write_pseudo_labels`,
the model's student weights, the patch size and sliding-window stride the model file
records), and scores :func:`semiseg.pseudo.pseudo_label_quality`; predictions made by a
byte-identical model are reused. The paired differences to the ``--reference`` model use
the project's Wilcoxon signed-rank test (:func:`semiseg.evaluation.paired_wilcoxon`) over
all (seed, case) pairs, and are also split by the reference's own Dice (below / at least
``--fail``), which separates repairs of failed cases from changes elsewhere.

    python benchmarks/la_unlabelled_pool.py --results results --cases results/splits/la_lowres/10pct/unlabelled.txt \\
        --preprocessed results/preprocessed/la_lowres --seeds 1340 1341 1342 --reference supervised \\
        --model supervised=results/models/la_lowres_10pct/seed{seed}/stage1_supervised/model.pt \\
        --model first_stage=results/models/la_lowres_10pct/seed{seed}/stage1_aua_bcl/model.pt \\
        --model full=results/models/la_lowres_10pct/seed{seed}/stage2_full/model.pt --out results/unlabelled_pool

``--exclude FILE`` drops the cases listed in FILE (e.g. the unlabelled list of
``10pct-u36``, to score only the held-out rest). Writes ``<out>/scores.csv`` (one row per
model, seed and case), ``<out>/summary.md`` (the printed tables) and ``<out>/scatter.png``
(each model's per-case Dice against the reference's, held-out pairs filled,
:func:`semiseg.figures.paired_case_scatter`).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from semiseg.evaluation import format_p, paired_wilcoxon
from semiseg.figures import paired_case_scatter
from semiseg.io.atomic import atomic_path
from semiseg.models import ModelFileError, read_model_info
from semiseg.precision import cpu_model
from semiseg.pseudo import pseudo_label_is_current, pseudo_label_quality, write_pseudo_labels


def parse_model(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` (PATH may contain ``{seed}``) -> (name, path template)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"--model {spec!r}: expected NAME=PATH (PATH may contain {{seed}})")
    return name, path


def read_list(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"case list {p} does not exist")
    return p.read_text(encoding="utf-8").split()


def model_info(model_path: Path) -> tuple[str, dict, set[str]]:
    """(method, deployment record, unlabelled cases of the model's split) of one model file,
    read with the package's safe reader (:func:`semiseg.models.read_model_info`)."""
    if not model_path.is_file():
        raise SystemExit(f"model {model_path} does not exist")
    try:
        info = read_model_info(model_path)
        deployment = info.require_deployment()
    except ModelFileError as err:
        raise SystemExit(str(err)) from None
    run_dir = model_path.parent.parent.parent  # <results>/models/<data set>_<split>
    dataset, sep, split = run_dir.name.rpartition("_")
    pool = run_dir.parent.parent / "splits" / dataset / split / "unlabelled.txt"
    if not sep or run_dir.parent.name != "models" or not pool.is_file():
        raise SystemExit(f"model {model_path}: not in the pipeline's layout <results>/models/<data set>_<split>/seed<seed>/"
                         f"<model>/model.pt with <results>/splits/<data set>/<split>/unlabelled.txt ({pool} is missing)")
    return info.method, deployment, set(read_list(pool))


def seen_kind(method: str, case: str, pool: set[str]) -> str:
    """How a model used a case of the unlabelled pool (see the module docstring)."""
    if method == "supervised":
        return "labelled only"
    if case not in pool:
        return "no"
    return "images and labels" if method == "fully_supervised" else "images"


def score_model(name: str, seed: int, model_path: Path, cases: list[Path], out: Path) -> pd.DataFrame:
    """Predict (or reuse current predictions) and score one model on ``cases``."""
    method, deployment, pool = model_info(model_path)
    folder = out / "predictions" / name / f"seed{seed}"
    todo = [c for c in cases if not ((folder / f"{c.stem}.h5").is_file() and pseudo_label_is_current(folder / f"{c.stem}.h5", model_path))]
    if todo:
        write_pseudo_labels(todo, model_path, folder, deployment["patch_size"], deployment["stride"], weights="student", device="auto")
    table = pseudo_label_quality([folder / f"{c.stem}.h5" for c in cases], cases)
    table = table[table["case"] != "mean"].copy()
    if table["dice"].isna().any():
        missing = ", ".join(table.loc[table["dice"].isna(), "case"])
        raise SystemExit(f"cases without ground truth cannot be scored: {missing}")
    table.insert(0, "seed", seed)
    table.insert(0, "model", name)
    table["method"] = method
    table["seen"] = [seen_kind(method, c, pool) for c in table["case"]]
    return table


def summarise(scores: pd.DataFrame, reference: str, fail: float) -> str:
    """Markdown tables: each model's scores, and its paired differences to ``reference``
    (all pairs, and split by the reference's Dice below / at least ``fail``)."""
    lines = [f"| model | seen | cases x seeds | Dice [%] | median | below {fail:g} (per seed) | below 0.5 (per seed) | recall | volume ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    seeds = sorted(scores["seed"].unique())
    for name, t in scores.groupby("model", sort=False):
        seen = ", ".join(f"{k} {v}" for k, v in t["seen"].value_counts().items())
        lines.append(f"| {name} | {seen} | {len(t)} | {100 * t.dice.mean():.2f} | {100 * t.dice.median():.2f} | "
                     f"{(t.dice < fail).sum() / len(seeds):.1f} | {(t.dice < 0.5).sum() / len(seeds):.1f} | "
                     f"{t.recall.mean():.3f} | {t.volume_ratio.mean():.3f} |")
    ref = scores[scores["model"] == reference].set_index(["seed", "case"])
    if ref.empty:
        raise SystemExit(f"--reference {reference!r} is not one of the models")
    lines += ["", f"Paired differences to {reference} (Dice points; Wilcoxon signed-rank over (seed, case) pairs):", "",
              f"| model | mean | per seed | median | better | p | where {reference} < {fail:g}: n, mean | where >= {fail:g}: n, mean |",
              "|---|---|---|---|---|---|---|---|"]
    for name, t in scores.groupby("model", sort=False):
        if name == reference:
            continue
        t = t.set_index(["seed", "case"])
        if set(t.index) != set(ref.index):
            raise SystemExit(f"model {name} and {reference} were scored on different (seed, case) pairs")
        d = 100 * (t["dice"] - ref["dice"].reindex(t.index))
        low = (ref["dice"].reindex(t.index) < fail).to_numpy()
        per_seed = " / ".join(f"{d.xs(s, level='seed').mean():+.2f}" for s in seeds)
        p = paired_wilcoxon({s: ref.xs(s, level="seed").reset_index() for s in seeds},
                            {s: t.xs(s, level="seed").reset_index() for s in seeds}, "dice", names=(reference, name))
        lo = f"{low.sum()}, {d[low].mean():+.2f}" if low.any() else "0, -"
        hi = f"{(~low).sum()}, {d[~low].mean():+.2f}" if (~low).any() else "0, -"
        lines.append(f"| {name} | {d.mean():+.2f} | {per_seed} | {np.median(d):+.2f} | {(d > 0).sum()}/{len(d)} | "
                     f"{format_p(p)} | {lo} | {hi} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", required=True, help="file listing the cases to score (e.g. a split's unlabelled.txt)")
    ap.add_argument("--exclude", help="file listing cases to leave out (e.g. the unlabelled.txt of a -u<n> split)")
    ap.add_argument("--preprocessed", required=True, help="folder of the pipeline's preprocessed <case>.h5 files")
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH of a model.pt; PATH may contain {seed}")
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--reference", required=True, help="model NAME the others are compared with")
    ap.add_argument("--fail", type=float, default=0.8, help="Dice under which a reference score counts as a failure")
    ap.add_argument("--out", required=True, help="folder for predictions, scores.csv and summary.md")
    args = ap.parse_args(argv)

    names = read_list(args.cases)
    if args.exclude:
        excluded = set(read_list(args.exclude))
        names = [c for c in names if c not in excluded]
    if not names:
        raise SystemExit(f"no cases left to score ({args.cases} minus {args.exclude})")
    cases = [Path(args.preprocessed) / f"{c}.h5" for c in names]
    missing = [str(c) for c in cases if not c.is_file()]
    if missing:
        raise SystemExit(f"preprocessed case file(s) missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    models = [parse_model(m) for m in args.model]
    if args.reference not in {n for n, _ in models}:
        raise SystemExit(f"--reference {args.reference!r} is not one of the --model names")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    start, tables = time.time(), []
    for name, template in models:
        for seed in args.seeds:
            t0 = time.time()
            tables.append(score_model(name, seed, Path(template.format(seed=seed)), cases, out))
            print(f"{name} seed {seed}: {len(cases)} cases, {time.time() - t0:.0f} s", flush=True)
    scores = pd.concat(tables, ignore_index=True)
    with atomic_path(out / "scores.csv", suffix=".csv") as tmp:
        scores.to_csv(tmp, index=False)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary = (f"{len(cases)} cases from {args.cases}" + (f" minus {args.exclude}" if args.exclude else "")
               + f"; seeds {', '.join(map(str, args.seeds))}; {cpu_model()}, "
               f"{torch.get_num_threads()} threads; {time.time() - start:.0f} s wall, "
               f"{usage.ru_utime:.0f} s user + {usage.ru_stime:.0f} s system CPU\n\n" + summarise(scores, args.reference, args.fail))
    paired_case_scatter(scores, args.reference, out / "scatter.png", fail=args.fail)
    with atomic_path(out / "summary.md", suffix=".md") as tmp:
        Path(tmp).write_text(summary, encoding="utf-8")
    print(summary)
    return summary


if __name__ == "__main__":
    main()
