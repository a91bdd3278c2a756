"""Evaluation: predictions of test cases, per-case metrics, and the paper's ablation table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from semiseg.inference import write_prediction_nifti
from semiseg.io.atomic import atomic_path
from semiseg.metrics import segmentation_metrics
from semiseg.pseudo import predict_probabilities

#: Table rows (paper, Table V, plus the fully supervised upper bound of Table II): key -> label.
ABLATION_ROWS = {
    "supervised": "Supervised baseline",
    "aua": "AUA",
    "aua_bcl": "AUA + BCL (First stage)",
    "aua_bcl_pl": "AUA + BCL + Pseudo labeling",
    "full": "AUA + BCL + Pseudo labeling + PCL (Full)",
    "fully_supervised": "Fully supervised (upper bound)",
}


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
) -> dict:
    """Predict one preprocessed case; write the label in the preprocessed grid (HDF5) and,
    with ``out_nifti``, as NIfTI in the raw scan's geometry.

    ``weights`` (``student`` / ``teacher``) applies to mean-teacher models; the other
    models have student weights only, which are then used. ``amp``: see
    :func:`semiseg.inference.sliding_window_predict`.
    """
    try:
        probs = predict_probabilities(model_path, case_path, patch_size, stride, weights, weighting, device, batch_size, amp)
    except ValueError:  # no teacher in this model: its student
        if weights != "teacher":
            raise
        probs = predict_probabilities(model_path, case_path, patch_size, stride, "student", weighting, device, batch_size, amp)
    label = probs.argmax(0).astype(np.uint8)
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("label", data=label, chunks=tuple(min(32, n) for n in label.shape), compression="gzip", compression_opts=1)
        f.attrs.update({"model_path": str(model_path), "case_path": str(case_path), "weights": weights, "weighting": weighting, "amp": bool(amp)})
    if out_nifti is not None:
        from semiseg.io.h5 import read_attrs

        case_attrs = read_attrs(case_path)
        if "raw_size" in case_attrs:
            write_prediction_nifti(label, case_attrs, out_nifti)
        else:
            raise ValueError(f"{case_path}: no raw-geometry attributes, cannot write the prediction in the raw geometry")
    return {"case": Path(case_path).stem, "foreground_fraction": float((label > 0).mean())}


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


def summary_row(metrics: pd.DataFrame, unit: str = "voxel") -> dict[str, object]:
    """One table row from a per-case metrics frame: Dice[%], Jaccard[%], ASD, 95HD as
    ``mean ± std`` (population std), the number of test cases and of empty predictions."""

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


def ablation_table(
    metric_files: dict[str, str | Path],
    counts: dict[str, tuple[int, int]],
    unit: str = "voxel",
    out_csv: str | Path | None = None,
    out_md: str | Path | None = None,
    evaluation: dict | None = None,
) -> pd.DataFrame:
    """The paper's Table V layout: one row per method (``ABLATION_ROWS`` order).

    ``metric_files``: method -> per-case metrics CSV; ``counts``: method -> (labelled,
    unlabelled) scans used. Columns: labelled / unlabelled counts, Dice[%], Jaccard[%],
    ASD, 95HD as ``mean ± std``, test cases and empty predictions. ``evaluation``: the
    settings the metrics were computed with: its ``protocol`` becomes a last column, and
    all of them a line above the Markdown table.
    """
    rows = []
    for key, label in ABLATION_ROWS.items():
        if key not in metric_files:
            continue
        lab, unl = counts[key]
        rows.append({"Method": label, "Labeled": lab, "Unlabeled": unl, **summary_row(pd.read_csv(metric_files[key]), unit)})
    table = _with_protocol(pd.DataFrame(rows), evaluation)
    write_table(table, out_csv, out_md, protocol_note(evaluation))
    return table


#: Sweep tables: sweep name -> first column (paper, Tables VII and VIII).
SWEEP_COLUMNS = {"lambda_c": "lambda_c", "unlabelled": "#Unlabeled"}


def sweep_table(
    sweep: str,
    values: Sequence[float],
    metric_files: Sequence[str | Path],
    counts: Sequence[tuple[int, int]],
    unit: str = "voxel",
    out_csv: str | Path | None = None,
    out_md: str | Path | None = None,
    evaluation: dict | None = None,
) -> pd.DataFrame:
    """A sweep table of the full method (paper, Table VII: ``sweep="lambda_c"``; Table
    VIII: ``sweep="unlabelled"``): one row per swept value, in the given order, with the
    labelled / unlabelled scan counts and the metrics as in :func:`ablation_table`."""
    if sweep not in SWEEP_COLUMNS:
        raise ValueError(f"unknown sweep {sweep!r}; expected one of {sorted(SWEEP_COLUMNS)}")
    if not (len(values) == len(metric_files) == len(counts)) or not values:
        raise ValueError(f"sweep {sweep!r}: {len(values)} values, {len(metric_files)} metric files, {len(counts)} counts")
    rows = [
        {SWEEP_COLUMNS[sweep]: v, "Labeled": lab, "Unlabeled": unl, **summary_row(pd.read_csv(f), unit)}
        for v, f, (lab, unl) in zip(values, metric_files, counts)
    ]
    table = _with_protocol(pd.DataFrame(rows), evaluation)
    write_table(table, out_csv, out_md, protocol_note(evaluation))
    return table
