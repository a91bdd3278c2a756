"""Resampling onto a target voxel spacing (nnU-Net style small helpers).

Raw images (SimpleITK, physical space): :func:`target_grid`, :func:`resample_to_grid`. Arrays
already on a regular grid without geometry of their own (the community's HDF5 cases):
:func:`resample_arrays` (block mean / majority for whole-number factors, else linear /
nearest neighbour).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from semiseg.io.readers import Geometry, from_xyz_array, to_xyz_array

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


# ---- arrays already on a regular grid (the community's HDF5 cases) ------------------------


@dataclass(frozen=True)
class ResampledArrays:
    """An image (and label) moved to a coarser or finer grid by :func:`resample_arrays`.

    ``image`` (X', Y', Z') float32; ``label`` (X', Y', Z') uint8 class indices or None;
    ``spacing`` (x, y, z) mm of the new grid; ``origin`` (x, y, z) mm, the physical position of
    the new voxel (0, 0, 0) with the input's voxel (0, 0, 0) at ``input_origin``; ``method``
    says how the values were made (recorded in the case file).
    """

    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    method: str


def edge_aligned_grid(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Size and origin offset of the grid at ``target_spacing`` whose first voxel starts where the input's does.

    ``shape`` (x, y, z) voxels at ``spacing`` (mm). The new grid covers the input's extent
    from its first voxel's outer edge: ``floor(n * spacing / target)`` whole new voxels per
    axis (a last part thinner than one new voxel is left out), and its voxel 0's centre lies
    ``(target - spacing) / 2`` mm from the input's voxel 0's centre (the returned offset).
    For an integer factor ``k = target / spacing`` each new voxel is exactly the block of
    ``k`` input voxels ``[k i, k i + k)``.
    """
    n = np.asarray(shape, dtype=np.float64)
    s = np.asarray(spacing, dtype=np.float64)
    t = np.asarray(target_spacing, dtype=np.float64)
    if n.shape != (3,) or s.shape != (3,) or t.shape != (3,) or np.any(s <= 0) or np.any(t <= 0):
        raise ValueError(f"need a 3D shape and two positive (x, y, z) spacings in mm, got {shape}, {spacing}, {target_spacing}")
    size = np.floor(n * s / t + 1e-6).astype(int)
    return tuple(int(v) for v in size), tuple(float(v) for v in (t - s) / 2)


def integer_factors(spacing: Sequence[float], target_spacing: Sequence[float], tol: float = 1e-6) -> tuple[int, int, int] | None:
    """``target / spacing`` per axis when each is a whole number >= 1 (within ``tol``), else None."""
    ratio = np.asarray(target_spacing, dtype=np.float64) / np.asarray(spacing, dtype=np.float64)
    k = np.round(ratio)
    if np.all(k >= 1) and np.all(np.abs(ratio - k) <= tol * np.maximum(1.0, k)):
        return tuple(int(v) for v in k)
    return None


def _blocks(array: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """View of ``array`` (X, Y, Z) as (X/kx, kx, Y/ky, ky, Z/kz, kz); trailing remainders dropped."""
    m = [n // k for n, k in zip(array.shape, factors, strict=True)]
    if min(m) < 1:
        raise ValueError(f"array of shape {tuple(array.shape)} is smaller than one {tuple(factors)} block")
    kept = array[tuple(slice(0, mi * k) for mi, k in zip(m, factors, strict=True))]
    return kept.reshape(m[0], factors[0], m[1], factors[1], m[2], factors[2])


def block_mean(image: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Mean of each ``kx x ky x kz`` block of ``image`` (X, Y, Z): exact area averaging.

    Returns float32 (X // kx, Y // ky, Z // kz), summed in float64; a trailing remainder of
    fewer than ``k`` voxels per axis is left out (as in :func:`edge_aligned_grid`).
    """
    return _blocks(image, factors).mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def block_majority(label: np.ndarray, factors: Sequence[int], num_classes: int) -> np.ndarray:
    """The most frequent class of each ``kx x ky x kz`` block of ``label`` (X, Y, Z), uint8.

    ``label`` holds class indices ``0 .. num_classes - 1``. A tie goes to the higher class index
    (for two classes: a block at least half foreground is foreground, as a 0.5 threshold of
    the block mean), so the label is never thinned below a boundary that cuts a block in half.
    Shape (X // kx, Y // ky, Z // kz), remainders left out as in :func:`block_mean`.
    """
    blocks = _blocks(label, factors)
    counts = np.stack([(blocks == c).sum(axis=(1, 3, 5), dtype=np.int32) for c in range(num_classes)])
    # argmax returns the first maximum: search the classes from the highest down.
    return (num_classes - 1 - np.argmax(counts[::-1], axis=0)).astype(np.uint8)


def resample_arrays(
    image: np.ndarray,
    label: np.ndarray | None,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    num_classes: int,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
) -> ResampledArrays:
    """Resample an (x, y, z) image (and label) stored at ``spacing`` mm onto ``target_spacing`` mm.

    The new grid is :func:`edge_aligned_grid`'s (axis-aligned, identity direction). When every
    ``target / spacing`` is a whole number (2, 2, 2 for LA's 0.625 mm -> 1.25 mm), the image is
    the block mean (exact area averaging of the input voxels each new voxel covers) and the
    label the block majority (:func:`block_majority`). Otherwise the image is linearly
    interpolated and the label taken by nearest neighbour (SimpleITK) at the new voxel
    centres; linear interpolation does not average over the whole new voxel, so a
    downsampling factor of 2 or more aliases a little. ``image`` float, ``label`` uint8 class
    indices ``0 .. num_classes - 1`` or None; ``origin`` (mm) of the input's voxel 0.
    Raises ValueError when the new grid would have fewer than 2 voxels on an axis.
    """
    shape = tuple(int(n) for n in image.shape)
    if label is not None and tuple(label.shape) != shape:
        raise ValueError(f"label shape {tuple(label.shape)} differs from the image's {shape}")
    size, offset = edge_aligned_grid(shape, spacing, target_spacing)
    if min(size) < 2:
        raise ValueError(
            f"resampling {shape} voxels of {tuple(float(s) for s in spacing)} mm to {tuple(float(t) for t in target_spacing)} mm "
            f"leaves {size} voxels (fewer than 2 on an axis)"
        )
    new_spacing = tuple(float(t) for t in target_spacing)
    new_origin = tuple(float(o) + d for o, d in zip(origin, offset, strict=True))
    factors = integer_factors(spacing, target_spacing)
    if factors is not None:
        img = block_mean(image, factors)
        lab = None if label is None else block_majority(label, factors, num_classes)
        block = "x".join(str(k) for k in factors)
        method = f"image: {block} block mean; label: {block} block majority (ties to the higher class)"
    else:
        identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        source = Geometry(shape, tuple(float(s) for s in spacing), tuple(float(o) for o in origin), identity)
        grid = Geometry(size, new_spacing, new_origin, identity)
        img = to_xyz_array(resample_to_grid(from_xyz_array(image.astype(np.float32, copy=False), source), grid,
                                            "linear", 0.0, sitk.sitkFloat32), np.float32)
        lab = None
        if label is not None:
            lab = to_xyz_array(resample_to_grid(from_xyz_array(label.astype(np.uint8, copy=False), source), grid,
                                                "nearest", 0.0, sitk.sitkUInt8), np.uint8)
        method = "image: linear interpolation; label: nearest neighbour"
    return ResampledArrays(img, lab, new_spacing, new_origin, method)
