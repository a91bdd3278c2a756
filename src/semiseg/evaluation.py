"""Evaluation: predictions of test cases, per-case metrics, and the paper's tables (ablation,
sweeps, comparison) over one or more training seeds with paired Wilcoxon tests.

PyTorch is imported by the prediction functions only: the metric, table and figure jobs,
which import this module, then start without it (about 2 s of CPU time per job).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from semiseg.io.atomic import atomic_path
from semiseg.metrics import segmentation_metrics

_log = logging.getLogger("semiseg.predict")

#: Table rows (paper, Table V, plus the fully supervised upper bound of Table II): key -> label.
ABLATION_ROWS = {
    "supervised": "Supervised baseline",
    "aua": "AUA",
    "aua_bcl": "AUA + BCL (First stage)",
    "aua_bcl_pl": "AUA + BCL + Pseudo labeling",
    "full": "AUA + BCL + Pseudo labeling + PCL (Full)",
    "fully_supervised": "Fully supervised (upper bound)",
}


def load_prediction_network(model_path: str | Path, weights: str = "student", device: str = "auto"):
    """The network of a model file on the resolved ``device``, ready for :func:`predict_case`.

    ``weights`` (``student`` / ``teacher``) applies to mean-teacher models; a model without
    a teacher gives its student weights for ``teacher``.
    """
    from semiseg.models import load_model
    from semiseg.precision import resolve_device

    dev = str(resolve_device(device))
    try:
        return load_model(model_path, weights, dev)
    except ValueError:  # no teacher in this model: its student
        if weights != "teacher":
            raise
        return load_model(model_path, "student", dev)


def predict_case(
    model_path: str | Path,
    case_path: str | Path,
    out_h5: str | Path,
    out_nifti: str | Path | None,
    patch_size: Sequence[int],
    stride: Sequence[int],
    weights: str = "student",
    weighting: str = "uniform",
    device: str = "auto",
    batch_size: int = 2,
    amp: bool = False,
    network=None,
) -> dict:
    """Predict one preprocessed case; write the label in the preprocessed grid (HDF5) and,
    with ``out_nifti``, as NIfTI in the raw scan's geometry (each file atomically).

    ``weights`` (``student`` / ``teacher``) applies to mean-teacher models; the other
    models have student weights only, which are then used. ``amp``: see
    :func:`semiseg.inference.sliding_window_predict`. ``network``: the model file's network
    already loaded (:func:`load_prediction_network`), as :func:`predict_cases` passes it.
    """
    from semiseg.inference import predict_probabilities, write_prediction_nifti

    net = network if network is not None else load_prediction_network(model_path, weights, device)
    probs = predict_probabilities(net, case_path, patch_size, stride, weights, weighting, device, batch_size, amp)
    label = probs.argmax(0).astype(np.uint8)
    if out_nifti is not None:
        from semiseg.io.h5 import read_attrs

        case_attrs = read_attrs(case_path)
        if "raw_size" not in case_attrs:
            raise ValueError(f"{case_path}: no raw-geometry attributes, cannot write the prediction in the raw geometry")
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("label", data=label, chunks=tuple(min(32, n) for n in label.shape), compression="gzip", compression_opts=1)
        f.attrs.update({"model_path": str(model_path), "case_path": str(case_path), "weights": weights, "weighting": weighting, "amp": bool(amp)})
    if out_nifti is not None:
        write_prediction_nifti(label, case_attrs, out_nifti)
    return {"case": Path(case_path).stem, "foreground_fraction": float((label > 0).mean())}


def predict_cases(
    model_path: str | Path,
    case_paths: Sequence[str | Path],
    out_dir: str | Path,
    patch_size: Sequence[int],
    stride: Sequence[int],
    weights: str = "student",
    weighting: str = "uniform",
    device: str = "auto",
    batch_size: int = 2,
    amp: bool = False,
    nifti: bool = True,
    log_dir: str | Path | None = None,
) -> list[dict]:
    """Predict every case of ``case_paths`` with one model, loaded once (the rule ``predict``).

    Writes ``out_dir/<case>.h5`` (and ``<case>.nii.gz`` with ``nifti``) per case, as
    :func:`predict_case`, and with ``log_dir`` one log per case (``log_dir/<case>.log``).
    Returns the per-case summaries. A case that fails stops the job with its error, which
    names the case and is also in that case's log.
    """
    from semiseg.jobs import case_log, case_files_in

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = load_prediction_network(model_path, weights, device)
    summaries = []
    for case_path, h5_path, nii_path in zip(
        case_paths, case_files_in(out, case_paths), case_files_in(out, case_paths, ".nii.gz"), strict=True
    ):
        with case_log(log_dir, Path(case_path).stem):
            summary = predict_case(model_path, case_path, h5_path, nii_path if nifti else None, patch_size, stride,
                                   weights, weighting, device, batch_size, amp, network=net)
            _log.info("%s", summary)
        summaries.append(summary)
    return summaries


def case_metrics(
    pred_paths: Sequence[str | Path],
    case_paths: Sequence[str | Path],
    unit: str = "voxel",
    empty_policy: str = "worst",
    out_path: str | Path | None = None,
) -> pd.DataFrame:
    """One row per test case: Dice, Jaccard, ASD, 95HD (voxels or mm) and empty flags."""
    if unit not in ("voxel", "mm"):
        raise ValueError(f"unit must be 'voxel' or 'mm', got {unit!r}")
    rows = []
    for pp, cp in zip(pred_paths, case_paths, strict=True):
        with h5py.File(pp, "r") as fp, h5py.File(cp, "r") as fc:
            if "label" not in fc:
                raise ValueError(f"{cp}: test case has no ground-truth label")
            spacing = fc.attrs.get("spacing") if unit == "mm" else None
            m = segmentation_metrics(fp["label"][...], fc["label"][...], spacing=spacing, empty_policy=empty_policy)
        rows.append({"case": Path(cp).stem, **m})
    table = pd.DataFrame(rows)
    if out_path is not None:
        with atomic_path(out_path, suffix=".csv") as tmp:
            table.to_csv(tmp, index=False)
    return table


def _read_label_map(path: Path, what: str) -> tuple[np.ndarray, tuple[float, ...] | None, object]:
    """(X, Y, Z) label array, spacing (mm) or None, and the image geometry (None for HDF5)."""
    from semiseg.io.readers import Geometry, image_stem, read_image, to_xyz_array

    if path.name.lower().endswith(".h5"):
        with h5py.File(path, "r") as f:
            if "label" not in f:
                raise ValueError(f"{path}: {what} file has no 'label' dataset")
            spacing = f.attrs.get("spacing")
            return f["label"][...], None if spacing is None else tuple(float(v) for v in spacing), None
    image = read_image(image_stem(path), path, what=what)
    return to_xyz_array(image), tuple(image.GetSpacing()), Geometry.of(image)


def _label_files(folder: Path, ext: str | None, what: str) -> dict[str, Path]:
    from semiseg.io.readers import IMAGE_SUFFIXES, image_stem

    if not folder.is_dir():
        raise ValueError(f"{folder}: {what} folder does not exist")
    endings = (ext.lower(),) if ext else (*IMAGE_SUFFIXES, ".h5")
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.lower().endswith(endings):
            name = image_stem(p)
            if name in files:
                raise ValueError(f"{folder}: {files[name].name} and {p.name} are both {what} '{name}'; choose one "
                                 "file type with --ext (e.g. --ext .nii.gz)")
            files[name] = p
    return files


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    unit: str = "mm",
    empty_policy: str = "worst",
    ext: str | None = None,
    out_path: str | Path | None = None,
) -> pd.DataFrame:
    """Per-case metrics of two folders of label maps matched by file name (``semiseg evaluate``).

    Files: NIfTI / NRRD / MHA label maps, or semiseg HDF5 files with a ``label`` dataset
    (predictions and preprocessed cases of the workflow); ``ext`` keeps one file ending
    only. The case name is the file name without its ending. Foreground is every non-zero
    voxel, as in :func:`case_metrics`. ``unit``: ``mm`` (the reference's spacing) or
    ``voxel``. Every prediction needs a reference of the same name and grid (size, and for
    image files spacing, origin and direction), else a ``ValueError`` names the files;
    references without a prediction are not scored (the number is in the returned frame's
    ``attrs["unscored_references"]``). One row per prediction, in name order: ``case``,
    ``dice``, ``jaccard``, ``asd``, ``hd95``, ``empty_pred``, ``empty_ref``; written
    atomically as CSV to ``out_path`` when given.
    """
    from semiseg.io.readers import geometry_mismatch

    if unit not in ("voxel", "mm"):
        raise ValueError(f"unit must be 'voxel' or 'mm', got {unit!r}")
    preds = _label_files(Path(pred_dir), ext, "prediction")
    refs = _label_files(Path(ref_dir), ext, "reference")
    if not preds:
        raise ValueError(f"{pred_dir}: no predicted label maps (NIfTI, NRRD, MHA or HDF5) in this folder")
    missing = [name for name in preds if name not in refs]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"{ref_dir}: no reference for {len(missing)} of the {len(preds)} predictions: {shown}")
    rows = []
    for name, pred_path in preds.items():
        ref_path = refs[name]
        pred, _, pred_geom = _read_label_map(pred_path, "prediction")
        ref, spacing, ref_geom = _read_label_map(ref_path, "reference")
        if pred.shape != ref.shape:
            raise ValueError(f"{pred_path}: prediction of size {list(pred.shape)} against the reference {ref_path} "
                             f"of size {list(ref.shape)}")
        if pred_geom is not None and ref_geom is not None:
            mismatch = geometry_mismatch(ref_geom, pred_geom)
            if mismatch:
                raise ValueError(f"{pred_path}: not on the grid of the reference {ref_path}: {mismatch}")
        if unit == "mm" and spacing is None:
            raise ValueError(f"{ref_path}: no spacing attribute, so distances in mm are undefined; use --unit voxel")
        m = segmentation_metrics(pred, ref, spacing=spacing if unit == "mm" else None, empty_policy=empty_policy)
        rows.append({"case": name, **m})
    table = pd.DataFrame(rows)[["case", "dice", "jaccard", "asd", "hd95", "empty_pred", "empty_ref"]]
    table.attrs["unscored_references"] = len(set(refs) - set(preds))
    if out_path is not None:
        with atomic_path(out_path, suffix=".csv") as tmp:
            table.to_csv(tmp, index=False)
    return table


# ---- tables -------------------------------------------------------------------------
#
# Every table row is one method (or swept value) trained with one or more seeds; each
# seed has its own per-case metrics (a CSV of :func:`case_metrics`: columns case, dice,
# jaccard, asd, hd95, empty_pred[, empty_ref]). A row is given as {seed: CSV or frame}.

#: One seed's per-case metrics: the CSV written by :func:`case_metrics`, or that frame.
MetricSource = str | Path | pd.DataFrame
#: A training seed, as the workflow names it.
Seed = int | str

#: Per-case metric column -> (table column, scale). ``{unit}``: voxel or mm.
METRIC_COLUMNS: dict[str, tuple[str, float]] = {
    "dice": ("Dice[%]", 100.0),
    "jaccard": ("Jaccard[%]", 100.0),
    "asd": ("ASD[{unit}]", 1.0),
    "hd95": ("95HD[{unit}]", 1.0),
}
REQUIRED_METRIC_COLUMNS = frozenset({"case", "dice", "jaccard", "asd", "hd95", "empty_pred"})

#: Fewest (seed, case) pairs for which a table gives a Wilcoxon p-value: with 5 pairs the
#: smallest two-sided exact p-value is 2 / 2**5 = 0.0625, so the test could never reject.
MIN_PAIRS = 6
#: Largest number of non-zero differences without ties for which the exact null
#: distribution is used (scipy's own threshold for ``method="auto"``).
EXACT_MAX_PAIRS = 50


def seed_map(seeds: Sequence[Seed], files: str | Path | Sequence[str | Path], what: str = "row") -> dict[Seed, str | Path]:
    """{seed: file} from the seed list and the files in that order (a rule's param
    ``seeds`` and one of its inputs); a single file stands for a list of one."""
    file_list = [files] if isinstance(files, str | Path) else list(files)
    seed_list = list(seeds)
    if len(file_list) != len(seed_list):
        raise ValueError(f"{what}: {len(file_list)} metric files for {len(seed_list)} seeds {seed_list}")
    if len(set(seed_list)) != len(seed_list):
        raise ValueError(f"{what}: repeated seeds in {seed_list}")
    return dict(zip(seed_list, file_list, strict=True))


def read_metrics(source: MetricSource, what: str = "metrics") -> pd.DataFrame:
    """One seed's per-case metrics as a frame (case names as strings), checked: the
    required columns, at least one case, no case twice."""
    if isinstance(source, pd.DataFrame):
        frame = source.copy()
        if "case" in frame:
            frame["case"] = frame["case"].astype(str)
    else:
        frame = pd.read_csv(source, dtype={"case": str})
        what = f"{what} ({source})"
    missing = REQUIRED_METRIC_COLUMNS - set(frame.columns)
    if missing:
        raise ValueError(f"{what}: per-case metrics lack columns {sorted(missing)}")
    if frame.empty:
        raise ValueError(f"{what}: no test cases")
    dup = frame["case"][frame["case"].duplicated()].tolist()
    if dup:
        raise ValueError(f"{what}: cases listed twice: {dup[:5]}")
    return frame


def read_seed_metrics(files: Mapping[Seed, MetricSource], what: str = "row") -> dict[Seed, pd.DataFrame]:
    """{seed: per-case metrics frame} of one table row from {seed: CSV or frame}."""
    if not isinstance(files, Mapping):
        raise TypeError(f"{what}: expected {{seed: per-case metrics CSV}}, got {type(files).__name__}")
    if not files:
        raise ValueError(f"{what}: no seeds")
    return {seed: read_metrics(src, f"{what}, seed {seed}") for seed, src in files.items()}


def summary_row(metrics: pd.DataFrame, unit: str = "voxel") -> dict[str, object]:
    """One table row from one seed's per-case metrics: Dice[%], Jaccard[%], ASD, 95HD
    (``unit``) as ``mean ± std`` over the test cases (population std, ddof=0), the
    number of test cases and of empty predictions."""

    def fmt(col: str, scale: float = 1.0) -> str:
        v = metrics[col].astype(float) * scale
        return f"{v.mean():.2f} ± {v.std(ddof=0):.2f}"

    return {
        "Dice[%]": fmt("dice", 100), "Jaccard[%]": fmt("jaccard", 100),
        f"ASD[{unit}]": fmt("asd"), f"95HD[{unit}]": fmt("hd95"),
        "Test cases": len(metrics), "Empty predictions": int(metrics["empty_pred"].astype(bool).sum()),
    }


#: What each evaluation protocol means, for the line above a table.
PROTOCOL_TEXT = {
    "paper": "the field's protocol behind the paper's tables: test cases cropped around their ground-truth box before inference",
    "clean": "no test label used before inference",
}


def protocol_note(evaluation: dict | None) -> str:
    """The line naming the evaluation protocol and settings a table was made with."""
    if not evaluation:
        return ""
    ev = dict(evaluation)
    head = ""
    if "protocol" in ev:
        name = ev.pop("protocol")
        head = f"Evaluation protocol: **{name}** ({PROTOCOL_TEXT.get(name, name)}). "
    return head + "Settings: " + ", ".join(f"{k} = {v}" for k, v in ev.items()) + "."


def write_table(table: pd.DataFrame, out_csv: str | Path | None, out_md: str | Path | None, note: str = "") -> None:
    """Write a table as CSV and as Markdown (``note`` as a paragraph above it), atomically."""
    if out_csv is not None:
        with atomic_path(out_csv, suffix=".csv") as tmp:
            table.to_csv(tmp, index=False)
    if out_md is not None:
        header = "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
        body = "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in table.itertuples(index=False))
        with atomic_path(out_md, suffix=".md") as tmp:
            tmp.write_text((f"{note}\n\n" if note else "") + header + body, encoding="utf-8")


def _with_protocol(table: pd.DataFrame, evaluation: dict | None) -> pd.DataFrame:
    if evaluation and "protocol" in evaluation and not table.empty:
        table["Protocol"] = evaluation["protocol"]
    return table


def per_seed_means(metrics: Mapping[Seed, pd.DataFrame], unit: str = "voxel") -> pd.DataFrame:
    """One row per seed (in the given order): ``Seed``, the test-set means Dice[%],
    Jaccard[%] (percent), ASD and 95HD (``unit``: voxels or mm) as plain numbers, and
    that seed's number of test cases and of empty predictions."""
    rows = []
    for seed, frame in metrics.items():
        row: dict[str, object] = {"Seed": seed}
        for col, (header, scale) in METRIC_COLUMNS.items():
            row[header.format(unit=unit)] = float(frame[col].astype(float).mean() * scale)
        row["Test cases"] = len(frame)
        row["Empty predictions"] = int(frame["empty_pred"].astype(bool).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def seed_summary_row(metrics: Mapping[Seed, pd.DataFrame], unit: str = "voxel", what: str = "row") -> dict[str, object]:
    """One table row from {seed: per-case metrics}.

    Several seeds: each metric (Dice[%], Jaccard[%] in percent; ASD, 95HD in ``unit``)
    as the mean over seeds of the per-seed test-set mean ± the sample standard deviation
    (ddof=1) of those per-seed means; ``Test cases``: the cases per seed (every seed must
    have as many); ``Empty predictions``: summed over all seeds' predictions. One seed:
    :func:`summary_row` (± the population std over the test cases). Plus ``Seeds``: the
    number of seeds.
    """
    if not metrics:
        raise ValueError(f"{what}: no seeds")
    if len(metrics) == 1:
        return {**summary_row(next(iter(metrics.values())), unit), "Seeds": 1}
    means = per_seed_means(metrics, unit)
    n_cases = sorted(set(means["Test cases"]))
    if len(n_cases) != 1:
        detail = ", ".join(f"seed {s}: {n}" for s, n in zip(means["Seed"], means["Test cases"]))
        raise ValueError(f"{what}: seeds have different numbers of test cases ({detail})")
    row: dict[str, object] = {}
    for header, _ in METRIC_COLUMNS.values():
        v = means[header.format(unit=unit)]
        row[header.format(unit=unit)] = f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"
    row["Test cases"] = int(n_cases[0])
    row["Empty predictions"] = int(means["Empty predictions"].sum())
    row["Seeds"] = len(metrics)
    return row


def _pairs(metrics: Mapping[Seed, pd.DataFrame], metric: str) -> pd.Series:
    """One metric per (seed, case) pair."""
    index = pd.MultiIndex.from_tuples(
        [(seed, case) for seed, frame in metrics.items() for case in frame["case"].astype(str)], names=["seed", "case"])
    values = np.concatenate([frame[metric].to_numpy(dtype=np.float64) for frame in metrics.values()])
    return pd.Series(values, index=index)


def paired_wilcoxon(
    reference: Mapping[Seed, pd.DataFrame],
    other: Mapping[Seed, pd.DataFrame],
    metric: str = "dice",
    min_pairs: int = MIN_PAIRS,
    names: tuple[str, str] = ("reference", "other"),
) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of ``other`` against ``reference`` (each
    {seed: per-case metrics frame}) on ``metric``, paired by (seed, test case).

    Raises ValueError when either side has a (seed, case) pair the other lacks, or a
    metric is NaN. Returns None when there are fewer than ``min_pairs`` pairs (with 5 the
    smallest possible p-value is 0.0625); 1.0 when every difference is zero.

    Method (fixed here, not left to scipy's version-dependent ``"auto"``): the
    differences ``other - reference`` are rounded to 12 decimals (so that round-off
    makes no spurious ranks or non-zeros); zero differences are dropped (Wilcoxon's
    ``zero_method="wilcox"``) and the test runs on the rest with
    :func:`scipy.stats.wilcoxon`: ``method="exact"`` (the exact null distribution) when
    there are at most ``EXACT_MAX_PAIRS`` (50) of them and no ties among their absolute
    values, else ``method="asymptotic"`` (normal approximation with scipy's tie
    correction of the variance, no continuity correction).
    """
    from scipy.stats import wilcoxon

    ref, oth = _pairs(reference, metric), _pairs(other, metric)
    for a, b, name_a, name_b in ((ref, oth, *names), (oth, ref, *names[::-1])):
        missing = a.index.difference(b.index)
        if len(missing):
            shown = ", ".join(f"(seed {s}, {c})" for s, c in list(missing)[:5])
            raise ValueError(f"paired test of {names[1]} against {names[0]}: {name_b} lacks {len(missing)} "
                             f"(seed, case) pair(s) that {name_a} has: {shown}{' ...' if len(missing) > 5 else ''}")
    d = (oth.reindex(ref.index) - ref).to_numpy()
    if np.isnan(d).any():
        raise ValueError(f"paired test of {names[1]} against {names[0]}: NaN {metric} values")
    if len(d) < min_pairs:
        return None
    d = np.round(d, 12)
    nonzero = d[d != 0]
    if nonzero.size == 0:
        return 1.0
    ties = np.unique(np.abs(nonzero)).size < nonzero.size
    method = "exact" if nonzero.size <= EXACT_MAX_PAIRS and not ties else "asymptotic"
    result = wilcoxon(nonzero, zero_method="wilcox", correction=False, alternative="two-sided", method=method)
    return float(result.pvalue)


def format_p(p: float | None, min_pairs: int = MIN_PAIRS) -> str:
    """A p-value cell: ``0.031``, ``<0.001``, or ``n/a (n<6)`` for None (too few pairs)."""
    if p is None:
        return f"n/a (n<{min_pairs})"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def p_column(reference_name: str) -> str:
    """The p-value column's name: ``p (Wilcoxon vs <reference row>)``."""
    return f"p (Wilcoxon vs {reference_name})"


def spread_note(seed_counts: Sequence[int]) -> str:
    """The Markdown line saying what ``±`` shows, given each row's number of seeds."""
    counts = sorted({int(n) for n in seed_counts})
    over_seeds = "± is the sample standard deviation over {n} seeds of the per-seed test-set mean"
    over_cases = "± is the standard deviation over the test cases (one seed)"
    empties = "; Empty predictions counts the predictions of all seeds"
    if not counts:
        return ""
    if counts == [1]:
        return over_cases + "."
    if len(counts) == 1:
        return over_seeds.format(n=counts[0]) + empties + "."
    return ("Where Seeds > 1, " + over_seeds.format(n="the row's") + "; where Seeds = 1, "
            + over_cases + empties + ".")


def wilcoxon_note(reference_label: str, min_pairs: int = MIN_PAIRS, several_seeds: bool = True) -> str:
    """The Markdown line explaining the p-value column (see :func:`paired_wilcoxon`);
    ``several_seeds``: with the caveat that pairs of different seeds share test cases."""
    caveat = (" Pairs of different seeds share test cases, so they are not independent: read p as descriptive."
              if several_seeds else "")
    return (
        f"p: two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon) of each row's per-case Dice against "
        f"{reference_label} (—), paired by (seed, test case); zero differences are dropped (zero_method='wilcox') "
        f"and p = 1.000 when all are zero; exact null distribution for at most {EXACT_MAX_PAIRS} non-zero "
        f"differences without ties, else the normal approximation. n/a (n<{min_pairs}): fewer than {min_pairs} "
        f"pairs (with 5 the smallest possible p is 0.0625)."
    ) + caveat


#: A table row being built: its key, its leading columns, {seed: per-case metrics}.
_Row = tuple[object, dict[str, object], dict[Seed, pd.DataFrame]]


def _seed_table(
    rows: Sequence[_Row],
    reference: object | None,
    reference_name: str,
    unit: str,
    reference_label: str = "",
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The table, its per-seed frame and its notes (spread; p-values when ``reference``,
    a row key, is given: column ``p (Wilcoxon vs <reference_name>)``, the note naming
    ``reference_label``)."""
    by_key = {key: (lead, metrics) for key, lead, metrics in rows}
    if reference is not None and reference not in by_key:
        raise ValueError(f"reference row {reference_name!r} is not among the table's rows")
    table_rows, seed_rows = [], []
    ref_lead, ref_metrics = by_key[reference] if reference is not None else (None, None)
    ref_what = str(next(iter(ref_lead.values()))) if ref_lead else ""
    for key, lead, metrics in rows:
        what = str(next(iter(lead.values())))
        row = {**lead, **seed_summary_row(metrics, unit, what)}
        if reference is not None:
            row[p_column(reference_name)] = "—" if key == reference else format_p(
                paired_wilcoxon(ref_metrics, metrics, names=(ref_what, what)))
        table_rows.append(row)
        label_col = next(iter(lead))
        for rec in per_seed_means(metrics, unit).to_dict("records"):
            seed_rows.append({label_col: lead[label_col], **rec})
    table = pd.DataFrame(table_rows)
    notes = [spread_note(table["Seeds"]) if not table.empty else ""]
    if reference is not None:
        notes.append(wilcoxon_note(reference_label or f"the row {ref_what}", several_seeds=bool((table["Seeds"] > 1).any())))
    return table, pd.DataFrame(seed_rows), notes


def _write_seed_table(
    table: pd.DataFrame,
    per_seed: pd.DataFrame,
    notes: Sequence[str],
    evaluation: dict | None,
    out_csv: str | Path | None,
    out_md: str | Path | None,
    out_per_seed: str | Path | None,
) -> pd.DataFrame:
    table = _with_protocol(table, evaluation)
    note = "\n\n".join(n for n in (protocol_note(evaluation), *notes) if n)
    write_table(table, out_csv, out_md, note)
    if out_per_seed is not None:
        write_table(per_seed, out_per_seed, None)
    return table


def ablation_table(
    metric_files: Mapping[str, Mapping[Seed, MetricSource]],
    counts: Mapping[str, tuple[int, int]],
    unit: str = "voxel",
    out_csv: str | Path | None = None,
    out_md: str | Path | None = None,
    evaluation: dict | None = None,
    reference: str | None = "full",
    out_per_seed: str | Path | None = None,
) -> pd.DataFrame:
    """The paper's Table V layout: one row per method (``ABLATION_ROWS`` order).

    ``metric_files``: method -> {seed: per-case metrics CSV or frame}; ``counts``:
    method -> (labelled, unlabelled) scans used. Columns: Method, Labeled, Unlabeled,
    Dice[%], Jaccard[%], ASD, 95HD (``unit``) as ``mean ± sd`` (see
    :func:`seed_summary_row`), Test cases, Empty predictions, Seeds, then
    ``p (Wilcoxon vs <reference>)`` (:func:`paired_wilcoxon` on Dice against the row
    ``reference``, which must be present; None: no p column). ``evaluation``: the
    settings the metrics were computed with: its ``protocol`` becomes a last column, and
    all of them a line above the Markdown table, followed by the spread and p-value
    notes. ``out_per_seed``: CSV of :func:`per_seed_means` per row (column Method first).
    """
    rows: list[_Row] = []
    for key, label in ABLATION_ROWS.items():
        if key not in metric_files:
            continue
        lab, unl = counts[key]
        rows.append((key, {"Method": label, "Labeled": lab, "Unlabeled": unl}, read_seed_metrics(metric_files[key], label)))
    if reference is not None and reference not in ABLATION_ROWS:
        raise ValueError(f"ablation: unknown reference row {reference!r}; expected one of {list(ABLATION_ROWS)}")
    label = f"the row “{ABLATION_ROWS[reference]}”" if reference is not None else ""
    table, per_seed, notes = _seed_table(rows, reference, reference or "", unit, label)
    return _write_seed_table(table, per_seed, notes, evaluation, out_csv, out_md, out_per_seed)


#: Sweep tables: sweep name -> first column (paper, Tables VII and VIII).
SWEEP_COLUMNS = {"lambda_c": "lambda_c", "unlabelled": "#Unlabeled"}


def sweep_table(
    sweep: str,
    values: Sequence[float],
    metric_files: Sequence[Mapping[Seed, MetricSource]],
    counts: Sequence[tuple[int, int]],
    unit: str = "voxel",
    out_csv: str | Path | None = None,
    out_md: str | Path | None = None,
    evaluation: dict | None = None,
    reference: float | None = None,
    out_per_seed: str | Path | None = None,
) -> pd.DataFrame:
    """A sweep table of the full method (paper, Table VII: ``sweep="lambda_c"``; Table
    VIII: ``sweep="unlabelled"``): one row per swept value, in the given order, with the
    labelled / unlabelled scan counts and the metrics as in :func:`ablation_table`
    (``metric_files``: one {seed: per-case metrics} per value).

    ``reference``: the swept value the split itself is configured with (its row is the
    split's own full model); each row's Dice is then tested against that row
    (column ``p (Wilcoxon vs <first column> = <value>)``). None: no p column.
    """
    if sweep not in SWEEP_COLUMNS:
        raise ValueError(f"unknown sweep {sweep!r}; expected one of {sorted(SWEEP_COLUMNS)}")
    if not (len(values) == len(metric_files) == len(counts)) or not values:
        raise ValueError(f"sweep {sweep!r}: {len(values)} values, {len(metric_files)} metric files, {len(counts)} counts")
    col = SWEEP_COLUMNS[sweep]
    ref_index = None
    if reference is not None:
        hits = [i for i, v in enumerate(values) if np.isclose(float(v), float(reference), rtol=1e-9, atol=0.0)]
        if not hits:
            raise ValueError(f"sweep {sweep!r}: reference value {reference} is not among the values {list(values)}")
        ref_index = hits[0]
    rows: list[_Row] = [
        (i, {col: v, "Labeled": lab, "Unlabeled": unl}, read_seed_metrics(f, f"{col} = {v}"))
        for i, (v, f, (lab, unl)) in enumerate(zip(values, metric_files, counts))
    ]
    name = f"{col} = {values[ref_index]}" if ref_index is not None else ""
    label = f"the row {name} (the split's own setting)" if ref_index is not None else ""
    table, per_seed, notes = _seed_table(rows, ref_index, name, unit, label)
    return _write_seed_table(table, per_seed, notes, evaluation, out_csv, out_md, out_per_seed)


#: Comparison table rows (paper, Tables II-IV, plus the fully supervised upper bound):
#: key -> label, in table order.
COMPARISON_ROWS = {
    "supervised": "Supervised baseline",
    "mt": "MT",
    "uamt": "UA-MT",
    "bcp": "BCP",
    "aua_bcl": "Ours (first stage)",
    "full": "Ours (full)",
    "fully_supervised": "Fully supervised (upper bound)",
}
#: The comparison rows that are this method, in table order (the last present is the
#: automatic reference of the p-values).
OURS_ROWS = ("aua_bcl", "full")


def comparison_table(
    methods: Sequence[str],
    metric_files: Mapping[str, Mapping[Seed, MetricSource]],
    counts: Mapping[str, tuple[int, int]],
    unit: str = "voxel",
    out_csv: str | Path | None = None,
    out_md: str | Path | None = None,
    evaluation: dict | None = None,
    reference: str | None = "auto",
    out_per_seed: str | Path | None = None,
) -> pd.DataFrame:
    """The paper's Tables II-IV layout: the rows ``methods`` (keys of
    ``COMPARISON_ROWS``, e.g. config ``comparison.methods``), always in
    ``COMPARISON_ROWS`` order whatever the order of ``methods``.

    ``metric_files``: method -> {seed: per-case metrics CSV or frame} (needed for every
    method in ``methods``; others are ignored); ``counts``: method -> (labelled,
    unlabelled) scans. Columns as :func:`ablation_table`. ``reference``: the row the
    p-values are against; ``"auto"``: ``full`` if present, else ``aua_bcl`` (the last
    of ``OURS_ROWS`` present), else no p column; None: no p column; a key: that row
    (must be among ``methods``).
    """
    unknown = [m for m in methods if m not in COMPARISON_ROWS]
    if unknown:
        raise ValueError(f"comparison: unknown methods {unknown}; expected keys of {list(COMPARISON_ROWS)}")
    if not methods:
        raise ValueError("comparison: no methods")
    missing = [m for m in methods if m not in metric_files]
    if missing:
        raise ValueError(f"comparison: no metric files for {missing}")
    keys = [k for k in COMPARISON_ROWS if k in set(methods)]
    if reference == "auto":
        reference = next((k for k in reversed(OURS_ROWS) if k in keys), None)
    elif reference is not None and reference not in keys:
        raise ValueError(f"comparison: reference {reference!r} is not among the methods {keys}")
    rows: list[_Row] = []
    for key in keys:
        lab, unl = counts[key]
        label = COMPARISON_ROWS[key]
        rows.append((key, {"Method": label, "Labeled": lab, "Unlabeled": unl}, read_seed_metrics(metric_files[key], label)))
    ref_label = f"the row “{COMPARISON_ROWS[reference]}”" if reference is not None else ""
    table, per_seed, notes = _seed_table(rows, reference, reference or "", unit, ref_label)
    return _write_seed_table(table, per_seed, notes, evaluation, out_csv, out_md, out_per_seed)
