"""Intensity operations: clipping (CT windows in HU) and z-score normalisation."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk


def clip_intensity(image: sitk.Image, low: float, high: float) -> sitk.Image:
    """Clamp voxel values to ``[low, high]`` (for CT: Hounsfield units).

    Integer images are clamped in their own pixel type when both bounds are integers
    (exact, and half the memory of a float copy); otherwise the image is cast to
    float32 first. Geometry is kept.
    """
    if low > high:
        raise ValueError(f"intensity clip low {low} is above high {high}")
    integer_types = {
        sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkInt32, sitk.sitkUInt32,
    }
    if image.GetPixelID() in integer_types and float(low).is_integer() and float(high).is_integer():
        info = np.iinfo(sitk.GetArrayViewFromImage(image).dtype)
        lo, hi = max(int(low), info.min), min(int(high), info.max)
        return sitk.Clamp(image, lowerBound=lo, upperBound=hi)
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        image = sitk.Cast(image, sitk.sitkFloat32)
    return sitk.Clamp(image, lowerBound=float(low), upperBound=float(high))


def mean_std(array: np.ndarray, chunk_voxels: int = 1 << 22) -> tuple[float, float]:
    """Mean and population standard deviation of ``array``, in float64.

    Two passes over slabs of the last axis, so the float64 temporaries stay at about
    ``chunk_voxels`` elements whatever the volume size.
    """
    flat = array.reshape(-1, array.shape[-1]) if array.ndim > 1 else array.reshape(-1, 1)
    n = flat.size
    if n == 0:
        raise ValueError("mean_std of an empty array")
    step = max(1, chunk_voxels // max(1, flat.shape[0]))
    total = 0.0
    for k in range(0, flat.shape[1], step):
        total += float(np.sum(flat[:, k : k + step], dtype=np.float64))
    mean = total / n
    sq = 0.0
    for k in range(0, flat.shape[1], step):
        d = flat[:, k : k + step].astype(np.float64) - mean
        sq += float(np.einsum("ij,ij->", d, d))
    return mean, math.sqrt(sq / n)


def zscore_(array: np.ndarray) -> tuple[float, float]:
    """Normalise a float32 ``array`` in place to zero mean and unit variance.

    Returns the (mean, std) that were removed. Raises ValueError for a constant image.
    """
    if array.dtype != np.float32:
        raise TypeError(f"zscore_ expects float32, got {array.dtype}")
    mean, std = mean_std(array)
    if not std > 0:
        raise ValueError("the image is constant (standard deviation 0); cannot z-score normalise it")
    array -= np.float32(mean)
    array *= np.float32(1.0 / std)
    return mean, std
