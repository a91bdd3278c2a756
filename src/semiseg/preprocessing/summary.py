"""Per-data-set summary of preprocessed case files (a TSV to inspect at a glance)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from semiseg.io.atomic import atomic_path
from semiseg.io.h5 import read_attrs


def summarise_cases(paths: Sequence[str | Path], out_path: str | Path | None = None) -> pd.DataFrame:
    """One row per case file: shape, spacing, raw size/spacing, crop box, foreground share,
    and how the label was put on the image (``label_orientation``: ``header``, ``as stored``
    or the re-orientation applied; empty for an unlabelled or converted case).

    Writes a TSV atomically when ``out_path`` is given.
    """
    rows = []
    for path in paths:
        attrs = read_attrs(path)
        with h5py.File(path, "r") as f:
            fg = None
            if "label" in f:
                lab = f["label"][...]
                fg = float(np.count_nonzero(lab)) / lab.size
        rows.append(
            {
                "case": attrs.get("case_id", Path(path).stem),
                "shape": "x".join(str(v) for v in attrs.get("shape", [])),
                "spacing_mm": "x".join(f"{v:g}" for v in attrs.get("spacing", [])),
                "raw_size": "x".join(str(v) for v in attrs.get("raw_size", [])),
                "raw_spacing_mm": "x".join(f"{v:.4g}" for v in attrs.get("raw_spacing", [])),
                "crop_start": " ".join(str(v) for v in attrs.get("crop_start", [])),
                "crop_stop": " ".join(str(v) for v in attrs.get("crop_stop", [])),
                "foreground_fraction": fg,
                "normalisation_mean": attrs.get("normalisation_mean"),
                "normalisation_std": attrs.get("normalisation_std"),
                "label_orientation": attrs.get("label_orientation", ""),
                "file": str(path),
            }
        )
    table = pd.DataFrame(rows)
    if out_path is not None:
        with atomic_path(out_path, suffix=".tsv") as tmp:
            table.to_csv(tmp, sep="\t", index=False)
    return table
