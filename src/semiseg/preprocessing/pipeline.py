"""One case from raw image (+ label) to the HDF5 case file.

Order (paper, Sec. IV-A, after DTC): CT clip -> resample to the target spacing ->
crop around the foreground with a margin -> z-score normalisation.

Memory: the label (and, for ``crop_source: body``, the body mask) is resampled onto the
whole target grid to find the crop box; the image is then clipped and resampled only on
the raw region that the crop box needs. The result is identical to resampling the whole
image and cropping afterwards (each output voxel depends only on its physical position),
at a fraction of the memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

import semiseg
from semiseg.errors import CaseError
from semiseg.io import h5
from semiseg.io.readers import Geometry, from_xyz_array, geometry_mismatch, read_image, to_xyz_array
from semiseg.preprocessing.cropping import body_mask, bounding_box, expand_box
from semiseg.preprocessing.intensity import clip_intensity, zscore_
from semiseg.preprocessing.orientation import DEFAULT_RATIO, choose_label_orientation
from semiseg.preprocessing.resampling import covering_region, resample_to_grid, subgrid, target_grid

CROP_SOURCES = ("label", "body", "none")
NORMALISATIONS = ("zscore", "none")
LABEL_ORIENTATIONS = ("header", "auto")
log = logging.getLogger("semiseg.preprocessing")


@dataclass(frozen=True)
class PreprocessingParams:
    """Everything that determines one case's preprocessed output.

    - ``classes``: class names; label voxels must map to ``0 .. len(classes) - 1``.
    - ``label_map``: raw label value -> class index (e.g. ``{255: 1}`` for LA);
      None means the identity on ``0 .. len(classes) - 1``.
    - ``intensity_clip``: ``[low, high]`` (HU for CT) or None (MR).
    - ``target_spacing``: mm (x, y, z) or None to keep the raw spacing.
    - ``interpolation``: image interpolator (``linear`` or ``bspline``); labels always
      use nearest neighbour.
    - ``crop_source``: ``label`` (the paper's protocol; uses the label of test cases too),
      ``body`` (label-free: largest component above ``body_threshold``, Otsu if None)
      or ``none``.
    - ``crop_margin``: voxels of the target grid added on each side of the crop source's
      bounding box (clipped to the volume).
    - ``normalisation``: ``zscore`` (over the cropped volume) or ``none``.
    - ``label_orientation``: ``header`` (the label file's geometry must match the image's,
      within tolerance) or ``auto`` (the label's voxel array is put on the image's grid in
      the axis order and flips that fit the image best, its header ignored; see
      :mod:`semiseg.preprocessing.orientation`), with ``label_orientation_ratio`` the factor
      by which the best placement must beat every other one.
    """

    classes: tuple[str, ...] = ("background", "foreground")
    label_map: Mapping[int, int] | None = None
    intensity_clip: tuple[float, float] | None = (-125.0, 275.0)
    target_spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)
    interpolation: str = "linear"
    crop_source: str = "label"
    crop_margin: int | tuple[int, int, int] = 25
    normalisation: str = "zscore"
    body_threshold: float | None = -500.0
    compression_level: int = 1
    label_orientation: str = "header"
    label_orientation_ratio: float = DEFAULT_RATIO
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.crop_source not in CROP_SOURCES:
            raise ValueError(f"crop_source must be one of {CROP_SOURCES}, got {self.crop_source!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        if self.interpolation not in ("linear", "bspline"):
            raise ValueError(f"interpolation must be 'linear' or 'bspline', got {self.interpolation!r}")
        if self.label_orientation not in LABEL_ORIENTATIONS:
            raise ValueError(f"label_orientation must be one of {LABEL_ORIENTATIONS}, got {self.label_orientation!r}")
        if self.label_orientation_ratio < 1:
            raise ValueError(f"label_orientation_ratio must be >= 1, got {self.label_orientation_ratio}")
        if len(self.classes) < 2:
            raise ValueError("at least two classes (background and one foreground) are needed")

    @classmethod
    def from_config(cls, preprocessing: Mapping[str, Any], classes: Sequence[str], label_map: Mapping | None) -> PreprocessingParams:
        """Build from a data set's ``preprocessing`` config block plus its classes and label map."""
        p = dict(preprocessing)
        clip = p.get("intensity_clip")
        spacing = p.get("target_spacing")
        margin = p.get("crop_margin", 25)
        return cls(
            classes=tuple(classes),
            label_map=None if label_map is None else {int(k): int(v) for k, v in label_map.items()},
            intensity_clip=None if clip is None else (float(clip[0]), float(clip[1])),
            target_spacing=None if spacing is None else tuple(float(s) for s in spacing),
            interpolation=p.get("interpolation", "linear"),
            crop_source=p.get("crop_source", "label"),
            crop_margin=margin if isinstance(margin, int) else tuple(int(m) for m in margin),
            normalisation=p.get("normalisation", "zscore"),
            body_threshold=p.get("body_threshold", -500.0),
            compression_level=int(p.get("compression_level", 1)),
            label_orientation=p.get("label_orientation", "header"),
            label_orientation_ratio=float(p.get("label_orientation_ratio", DEFAULT_RATIO)),
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PreprocessingParams:
        """Rebuild the parameters from the ``preprocessing`` record a case file (and a model
        file's deployment record) carries; the inverse of the record written with each case."""
        names = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(record) - names)
        if unknown:
            raise ValueError(f"unknown preprocessing record keys {unknown} (a newer semiseg wrote it?)")
        v = dict(record)
        if v.get("label_map") is not None:
            v["label_map"] = {int(k): int(c) for k, c in v["label_map"].items()}
        for key in ("classes", "intensity_clip", "target_spacing"):
            if v.get(key) is not None:
                v[key] = tuple(v[key])
        if isinstance(v.get("crop_margin"), list):
            v["crop_margin"] = tuple(int(m) for m in v["crop_margin"])
        return cls(**v)

    def lookup_table(self) -> dict[int, int]:
        return dict(self.label_map) if self.label_map is not None else {c: c for c in range(len(self.classes))}


def _map_labels(case: str, path: Path, label: sitk.Image, params: PreprocessingParams) -> sitk.Image:
    """Check label values and map them to class indices (uint8 image, same geometry)."""
    arr = sitk.GetArrayViewFromImage(label)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise CaseError(case, path, "label contains NaN or infinite values")
        if not np.all(arr == np.round(arr)):
            raise CaseError(case, path, "label contains non-integer values")
    if arr.dtype == np.uint8:
        counts = np.bincount(arr.ravel(), minlength=256)
        values = np.flatnonzero(counts)
    else:
        values = np.unique(arr)
    lut = params.lookup_table()
    unknown = [v for v in values.tolist() if int(v) not in lut]
    if unknown:
        shown = ", ".join(str(int(v)) for v in unknown[:10])
        raise CaseError(
            case, path,
            f"label values {{{shown}}} are not among the configured classes (allowed raw values: {sorted(lut)}; "
            "set the data set's label_map to map them)",
        )
    if all(int(v) == lut[int(v)] for v in values.tolist()) and arr.dtype == np.uint8:
        return label
    table = np.zeros(int(max(max(lut), int(values.max()))) + 1, dtype=np.uint8)
    for raw, cls in lut.items():
        if raw >= 0:
            table[raw] = cls
    mapped = sitk.GetImageFromArray(table[arr.astype(np.int64)])
    mapped.CopyInformation(label)
    return mapped


def _check_finite(case: str, path: Path, image: sitk.Image) -> None:
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise CaseError(case, path, f"image contains {bad} NaN or infinite voxels")


def preprocess_case(
    case: str,
    image_path: str | Path,
    label_path: str | Path | None,
    out_path: str | Path,
    params: PreprocessingParams,
    dataset: str = "",
) -> dict[str, Any]:
    """Preprocess one case and write its HDF5 file atomically.

    ``label_path`` None means an unlabelled case (then ``crop_source`` must not be
    ``label``). Returns a summary (shapes, spacings, crop box, foreground fraction,
    seconds). Raises :class:`CaseError` naming the case, the file and the problem for bad
    input; nothing is written then.
    """
    t0 = time.perf_counter()
    image_path = Path(image_path)
    image = read_image(case, image_path, what="image")
    _check_finite(case, image_path, image)
    raw_geom = Geometry.of(image)

    label = None
    orientation: dict[str, Any] = {}
    if label_path is not None:
        label_path = Path(label_path)
        label = read_image(case, label_path, what="label")
        if params.label_orientation == "header":
            mismatch = geometry_mismatch(raw_geom, Geometry.of(label))
            if mismatch:
                raise CaseError(case, label_path, f"label does not share the image's geometry: {mismatch}")
            label.CopyInformation(image)  # within tolerance: use the image's exact geometry
            orientation = {"label_orientation": "header"}
        label = _map_labels(case, label_path, label, params)
        if not np.any(sitk.GetArrayViewFromImage(label)):
            raise CaseError(case, label_path, "label is empty (no foreground voxel) in a labelled case")
        if params.label_orientation == "auto":
            label, orientation = _orient_label(case, image, label_path, label, params.label_orientation_ratio)
    elif params.crop_source == "label":
        raise CaseError(case, image_path, "crop_source is 'label' but the case has no label file")

    grid = target_grid(raw_geom, params.target_spacing)

    label_full = None
    if label is not None:
        label_full = to_xyz_array(resample_to_grid(label, grid, "nearest", 0, sitk.sitkUInt8))
        del label

    if params.crop_source == "label":
        box = bounding_box(label_full)
        if box is None:  # foreground thinner than the target spacing
            raise CaseError(case, label_path, "label foreground vanishes when resampled to the target spacing")
        box = expand_box(box, params.crop_margin, grid.size)
    elif params.crop_source == "body":
        mask = to_xyz_array(resample_to_grid(body_mask(image, params.body_threshold), grid, "nearest", 0, sitk.sitkUInt8))
        box = bounding_box(mask)
        del mask
        if box is None:
            raise CaseError(case, image_path, f"no body found above the threshold {params.body_threshold}")
        box = expand_box(box, params.crop_margin, grid.size)
    else:
        box = ((0, 0, 0), tuple(grid.size))
    crop_grid = subgrid(grid, *box)

    # Clip and resample only the raw region that the crop needs.
    start, size = covering_region(raw_geom, crop_grid)
    if list(size) == list(raw_geom.size):
        region = image  # the whole volume: no copy
    else:
        region = sitk.RegionOfInterest(image, size, start)
    del image
    if params.intensity_clip is not None:
        region = clip_intensity(region, *params.intensity_clip)
        fill = float(params.intensity_clip[0])
    else:
        fill = float(np.min(sitk.GetArrayViewFromImage(region)))
    resampled = resample_to_grid(region, crop_grid, params.interpolation, fill, sitk.sitkFloat32)
    del region
    image_arr = to_xyz_array(resampled)
    del resampled

    norm_mean = norm_std = None
    if params.normalisation == "zscore":
        try:
            norm_mean, norm_std = zscore_(image_arr)
        except ValueError as exc:
            raise CaseError(case, image_path, str(exc)) from exc

    label_arr = None
    fg_fraction = None
    if label_full is not None:
        sl = tuple(slice(a, b) for a, b in zip(*box, strict=True))
        label_arr = np.ascontiguousarray(label_full[sl])
        del label_full
        fg_fraction = float(np.count_nonzero(label_arr)) / label_arr.size

    attrs: dict[str, Any] = {
        "case_id": case,
        "dataset": dataset,
        "semiseg_version": semiseg.__version__,
        "source_image": str(image_path),
        "source_label": "null" if label_path is None else str(label_path),
        "shape": list(image_arr.shape),
        "spacing": list(crop_grid.spacing),
        "origin": list(crop_grid.origin),
        "direction": list(crop_grid.direction),
        "resampled_size": list(grid.size),
        "resampled_origin": list(grid.origin),
        "crop_start": list(box[0]),
        "crop_stop": list(box[1]),
        "raw_size": list(raw_geom.size),
        "raw_spacing": list(raw_geom.spacing),
        "raw_origin": list(raw_geom.origin),
        "raw_direction": list(raw_geom.direction),
        "classes": list(params.classes),
        "preprocessing": _params_record(params),
        "normalisation_mean": norm_mean,
        "normalisation_std": norm_std,
        **orientation,
    }
    h5.write_case(out_path, image_arr, label_arr, attrs, compression_level=params.compression_level)
    return {
        "case": case,
        "shape": tuple(image_arr.shape),
        "spacing": crop_grid.spacing,
        "raw_size": raw_geom.size,
        "raw_spacing": raw_geom.spacing,
        "crop_start": box[0],
        "crop_stop": box[1],
        "foreground_fraction": fg_fraction,
        **orientation,
        "seconds": time.perf_counter() - t0,
    }


def _orient_label(
    case: str, image: sitk.Image, label_path: Path, label: sitk.Image, ratio: float
) -> tuple[sitk.Image, dict[str, Any]]:
    """Put the (class-mapped) label's voxel array on the image's grid in the best-fitting axis order.

    Returns the label on the image's exact geometry and the record of the choice (also
    logged; a warning when the label was re-oriented).
    """
    raw_geom, label_geom = Geometry.of(image), Geometry.of(label)
    # (x, y, z) views, no copies: only boxes around the label are read for the decision.
    label_arr = sitk.GetArrayViewFromImage(label).transpose(2, 1, 0)
    image_arr = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)
    check = choose_label_orientation(case, label_path, image_arr, label_arr, ratio)
    oriented = from_xyz_array(check.chosen.apply(label_arr), raw_geom)
    record = check.record()
    # The label file's own geometry is not used; say whether it even described the image's grid.
    record["label_header_mismatch"] = geometry_mismatch(raw_geom, label_geom)
    scores = ", ".join(f"{s:.4f}" for s in record["label_orientation_scores"])
    if check.fixed:
        log.warning(
            "case %s: %s: label axes re-oriented onto the image grid: %s (boundary score best, next: %s nats)",
            case, label_path, record["label_orientation"], scores,
        )
    else:
        log.info("case %s: label orientation as stored (boundary score best, next: %s nats)", case, scores)
    if record["label_header_mismatch"]:
        log.info(
            "case %s: %s: label header ignored (its %s); the voxel array was placed on the image grid",
            case, label_path, record["label_header_mismatch"],
        )
    return oriented, record


def _params_record(params: PreprocessingParams) -> dict[str, Any]:
    rec = asdict(params)
    rec.pop("extra", None)
    rec["label_map"] = {str(k): v for k, v in params.lookup_table().items()}
    rec["classes"] = list(params.classes)
    for key in ("intensity_clip", "target_spacing", "crop_margin"):
        if isinstance(rec[key], tuple):
            rec[key] = list(rec[key])
    return rec
