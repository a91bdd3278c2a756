"""The community's preprocessed HDF5 cases (LA 2018 ``<case>/mri_norm2.h5``) as a raw layout.

These files (UA-MT, DTC, MC-Net, ...) hold ``image`` (float32, already z-scored over the raw
volume) and ``label`` (uint8 0/1), (x, y, z) order, already cropped around the label, and
no geometry. They are consumed as already preprocessed: converted to the project's case
format (:mod:`semiseg.io.h5`) without clipping, cropping or re-normalising, so every
downstream rule runs on them unchanged. The one optional step is resampling to another
voxel size (``raw.resample_to``, e.g. 1.25 mm for a CPU-sized LA): see
:func:`semiseg.preprocessing.resampling.resample_arrays`.

Geometry written: ``spacing`` as configured (the files store none; LA 2018 is 0.625 mm
isotropic), origin (0, 0, 0), identity direction. The "raw" grid is the stored grid (crop
box = the whole array), so predictions written back "in raw geometry" are on this grid.
Resampled, the case file's grid (``spacing``, ``origin``, ``shape``) is the new one and the
raw grid (``raw_size``, ``raw_spacing``, ``raw_origin``) stays the stored file's, so
predictions are still written back onto the community file's grid (nearest neighbour).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import semiseg
from semiseg.errors import CaseError
from semiseg.io import h5
from semiseg.preprocessing.resampling import resample_arrays

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FORMAT = "community_h5"


def _read_dataset(case: str, path: Path, f: h5py.File, name: str) -> np.ndarray:
    obj = f[name]
    if not isinstance(obj, h5py.Dataset):
        raise CaseError(case, path, f"'{name}' is not a dataset")
    if obj.ndim != 3:
        raise CaseError(case, path, f"'{name}' is {obj.ndim}D {tuple(obj.shape)}, expected a 3D (x, y, z) volume")
    if min(obj.shape) < 2:
        raise CaseError(case, path, f"'{name}' has shape {tuple(obj.shape)}, which is not a 3D volume")
    try:
        return obj[...]
    except OSError as exc:  # truncated or corrupt chunks
        raise CaseError(case, path, f"cannot read '{name}' (unreadable or truncated file): {exc}") from None


def convert_community_case(
    case: str,
    path: str | Path,
    out_path: str | Path,
    spacing: Sequence[float],
    classes: Sequence[str] = ("background", "foreground"),
    label_map: Mapping[int, int] | None = None,
    compression_level: int = 1,
    dataset: str = "",
    resample_to: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Convert one community HDF5 case (``image``, optional ``label``) to the project's format.

    ``spacing`` (x, y, z) mm of the stored arrays. ``label_map`` maps raw label values to
    class indices (None: identity on ``0 .. len(classes) - 1``). The image is copied as
    float32 unchanged, unless ``resample_to`` (x, y, z) mm is given: then image and label
    are resampled to that voxel size by :func:`~semiseg.preprocessing.resampling.resample_arrays`
    (whole-number factors: block mean and block majority; otherwise linear and nearest
    neighbour), still in (x, y, z) order, and the case file's geometry is the new grid's.
    Raises :class:`CaseError` naming the case, the file and the problem for an unreadable
    file, a missing ``image``, non-3D arrays, NaN/inf voxels, a label of another shape,
    label values outside the classes, an empty label (also one emptied by resampling) or a
    volume too small for ``resample_to``; nothing is written then. Returns a summary like
    :func:`~semiseg.preprocessing.preprocess_case`'s.
    """
    t0 = time.perf_counter()
    path = Path(path)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (mm), got {spacing}")
    target = None if resample_to is None else tuple(float(s) for s in resample_to)
    if target is not None and (len(target) != 3 or min(target) <= 0):
        raise ValueError(f"resample_to must be three positive numbers (mm), got {target}")
    if not path.is_file():
        raise CaseError(case, path, "image file is missing")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CaseError(case, path, f"cannot read image (not an HDF5 file, or truncated): {exc}") from None
    with f:
        if "image" not in f:
            raise CaseError(case, path, f"no 'image' dataset (found: {sorted(f.keys())})")
        image = _read_dataset(case, path, f, "image").astype(np.float32, copy=False)
        label = _read_dataset(case, path, f, "label") if "label" in f else None
    if not np.isfinite(image).all():
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        raise CaseError(case, path, f"image contains {bad} NaN or infinite voxels")
    if label is not None:
        label = _map_label_values(case, path, label, classes, label_map)
        if label.shape != image.shape:
            raise CaseError(case, path, f"label shape {label.shape} differs from the image's {image.shape}")
        if not label.any():
            raise CaseError(case, path, "label is empty (no foreground voxel) in a labelled case")
    raw_shape = [int(s) for s in image.shape]
    raw_origin = [0.0, 0.0, 0.0]
    out_spacing, origin, method = spacing, raw_origin, None
    if target is not None:
        try:
            res = resample_arrays(image, label, spacing, target, num_classes=len(classes), origin=raw_origin)
        except ValueError as exc:
            raise CaseError(case, path, f"cannot resample to {list(target)} mm (raw.resample_to): {exc}") from None
        image, label, out_spacing, origin, method = res.image, res.label, res.spacing, list(res.origin), res.method
        if label is not None and not label.any():
            raise CaseError(case, path, f"label foreground vanishes when resampled to {list(target)} mm (raw.resample_to)")
    shape = [int(s) for s in image.shape]
    record = {
        "format": FORMAT,
        "spacing": list(spacing),
        "resample_to": None if target is None else list(target),
        "classes": list(classes),
        "label_map": None if label_map is None else {str(k): int(v) for k, v in label_map.items()},
        "compression_level": int(compression_level),
    }
    attrs: dict[str, Any] = {
        "case_id": case,
        "dataset": dataset,
        "semiseg_version": semiseg.__version__,
        "source_image": str(path),
        "source_label": "null" if label is None else str(path),
        "source_format": FORMAT,
        "shape": shape,
        "spacing": list(out_spacing),
        "origin": origin,
        "direction": list(IDENTITY),
        "resampled_size": shape,
        "resampled_origin": origin,
        "resampling": "none (as stored)" if method is None else method,
        "crop_start": [0, 0, 0],
        "crop_stop": shape,
        "raw_size": raw_shape,
        "raw_spacing": list(spacing),
        "raw_origin": raw_origin,
        "raw_direction": list(IDENTITY),
        "classes": list(classes),
        "preprocessing": record,
        "normalisation_mean": None,  # normalised upstream, not here
        "normalisation_std": None,
    }
    h5.write_case(out_path, image, label, attrs, compression_level=compression_level)
    return {
        "case": case,
        "shape": tuple(shape),
        "spacing": tuple(out_spacing),
        "source_format": FORMAT,
        "foreground_fraction": None if label is None else float(np.count_nonzero(label)) / label.size,
        "seconds": time.perf_counter() - t0,
    }


def _map_label_values(
    case: str, path: Path, label: np.ndarray, classes: Sequence[str], label_map: Mapping[int, int] | None
) -> np.ndarray:
    if label.dtype.kind == "f":
        if not np.isfinite(label).all():
            raise CaseError(case, path, "label contains NaN or infinite values")
        if not np.all(label == np.round(label)):
            raise CaseError(case, path, "label contains non-integer values")
    lut = {int(k): int(v) for k, v in label_map.items()} if label_map is not None else {c: c for c in range(len(classes))}
    values = np.unique(label).astype(np.int64)
    unknown = [int(v) for v in values if int(v) not in lut]
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:10])
        raise CaseError(
            case, path,
            f"label values {{{shown}}} are not among the configured classes (allowed raw values: {sorted(lut)}; "
            "set the data set's label_map to map them)",
        )
    table = np.zeros(max(max(lut), int(values.max())) + 1, dtype=np.uint8)
    for raw, cls in lut.items():
        if raw >= 0:
            table[raw] = cls
    return table[label.astype(np.int64)]
