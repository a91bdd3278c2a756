"""Foreground bounding boxes and crop boxes (voxel indices, x y z, half-open)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Half-open bounding box ``(start, stop)`` of the non-zero voxels of ``mask``.

    Returns None for an empty mask. Works on any array of ndim >= 1 without making a
    full boolean copy per axis.
    """
    start, stop = [], []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        profile = np.any(mask, axis=others) if others else mask.astype(bool)
        nz = np.flatnonzero(profile)
        if nz.size == 0:
            return None
        start.append(int(nz[0]))
        stop.append(int(nz[-1]) + 1)
    return tuple(start), tuple(stop)


def expand_box(
    box: tuple[Sequence[int], Sequence[int]], margin: int | Sequence[int], shape: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Grow a half-open box by ``margin`` voxels per side, clipped to ``shape``."""
    start, stop = box
    m = np.broadcast_to(np.asarray(margin, dtype=int), (len(shape),))
    if np.any(m < 0):
        raise ValueError(f"crop margin must be >= 0, got {margin}")
    new_start = tuple(int(max(0, s - k)) for s, k in zip(start, m, strict=True))
    new_stop = tuple(int(min(n, e + k)) for e, k, n in zip(stop, m, shape, strict=True))
    return new_start, new_stop


def body_mask(image: sitk.Image, threshold: float | None) -> sitk.Image:
    """Largest connected component of ``image > threshold`` (Otsu's threshold if None).

    A label-free crop source: the patient's body outline (uint8, 1 inside).
    """
    if threshold is None:
        mask = sitk.OtsuThreshold(image, 0, 1)
    else:
        mask = sitk.Cast(image > float(threshold), sitk.sitkUInt8)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return sitk.Cast(components == 1, sitk.sitkUInt8)
