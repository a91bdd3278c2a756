"""Resampling onto a target voxel spacing (nnU-Net style small helpers)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from semiseg.io.readers import Geometry

INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "nearest": sitk.sitkNearestNeighbor,
}


def target_grid(geometry: Geometry, target_spacing: Sequence[float] | None) -> Geometry:
    """The grid that covers ``geometry``'s extent at ``target_spacing`` (mm, x y z).

    Same origin (centre of voxel 0) and direction; size per axis is
    ``max(1, round(size * spacing / target_spacing))``. ``None`` keeps the grid.
    """
    if target_spacing is None:
        return geometry
    ts = np.asarray(target_spacing, dtype=np.float64)
    if ts.shape != (3,) or np.any(ts <= 0):
        raise ValueError(f"target spacing must be 3 positive values in mm, got {target_spacing}")
    size = np.maximum(1, np.round(np.asarray(geometry.size) * np.asarray(geometry.spacing) / ts)).astype(int)
    return Geometry(tuple(int(s) for s in size), tuple(float(s) for s in ts), geometry.origin, geometry.direction)


def subgrid(grid: Geometry, start: Sequence[int], stop: Sequence[int]) -> Geometry:
    """The part ``[start, stop)`` (voxel indices, x y z) of ``grid`` as a grid of its own."""
    start_a = np.asarray(start, dtype=np.float64)
    origin = grid.index_to_physical(start_a)
    size = tuple(int(b - a) for a, b in zip(start, stop, strict=True))
    if min(size) < 1:
        raise ValueError(f"empty sub-grid [{tuple(start)}, {tuple(stop)})")
    return Geometry(size, grid.spacing, tuple(float(o) for o in origin), grid.direction)


def resample_to_grid(
    image: sitk.Image,
    grid: Geometry,
    interpolation: str = "linear",
    default_value: float = 0.0,
    output_pixel_type: int | None = None,
) -> sitk.Image:
    """Resample ``image`` onto ``grid`` (identity transform, physical space).

    ``interpolation``: ``linear``, ``bspline`` or ``nearest`` (use ``nearest`` for label
    maps: it never creates label values that were not there). Points outside the
    input take ``default_value``.
    """
    if interpolation not in INTERPOLATORS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {sorted(INTERPOLATORS)}")
    pixel_type = image.GetPixelID() if output_pixel_type is None else output_pixel_type
    return sitk.Resample(
        image,
        list(grid.size),
        sitk.Transform(),
        INTERPOLATORS[interpolation],
        list(grid.origin),
        list(grid.spacing),
        list(grid.direction),
        float(default_value),
        pixel_type,
    )


def covering_region(image_geometry: Geometry, grid: Geometry, support: int = 2) -> tuple[list[int], list[int]]:
    """Index region (start, size) of ``image_geometry`` that covers ``grid`` plus interpolation support.

    Used to clip and resample only the part of a raw volume that the crop needs.
    """
    corners = np.array([[i, j, k] for i in (0, grid.size[0] - 1) for j in (0, grid.size[1] - 1) for k in (0, grid.size[2] - 1)], dtype=np.float64)
    idx = image_geometry.physical_to_index(grid.index_to_physical(corners))
    lo = np.floor(idx.min(axis=0)).astype(int) - support
    hi = np.ceil(idx.max(axis=0)).astype(int) + support + 1
    size = np.asarray(image_geometry.size)
    lo = np.clip(lo, 0, size - 1)
    hi = np.clip(hi, lo + 1, size)
    return [int(v) for v in lo], [int(v) for v in hi - lo]
