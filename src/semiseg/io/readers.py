"""Raw image readers (NIfTI, NRRD, MHA/MHD, DICOM series) through SimpleITK.

Arrays handed to the rest of the package are in (x, y, z) order, the order of the
community's HDF5 files; SimpleITK's own array order is (z, y, x).
Geometry (spacing, origin, direction) is in the image's physical space, in mm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from semiseg.errors import CaseError
from semiseg.io.nifti_scan import NiftiScanError, is_nifti, scan_nifti

#: Tolerances for "the image and the label share geometry".
SPACING_RTOL = 1e-3
ORIGIN_ATOL_FRACTION = 0.5  # of the smallest voxel side, in mm
DIRECTION_ATOL = 1e-3


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a 3D image.

    ``size`` (x, y, z) voxels; ``spacing`` (x, y, z) mm; ``origin`` physical position of
    voxel (0, 0, 0) in mm; ``direction`` 3x3 row-major cosine matrix as a 9-tuple, whose
    columns are the physical directions of the x, y and z index axes.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    def index_to_physical(self, index: np.ndarray) -> np.ndarray:
        """Map continuous voxel indices (..., 3) in (x, y, z) order to mm (..., 3)."""
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        idx = np.asarray(index, dtype=np.float64)
        return np.asarray(self.origin) + (idx * np.asarray(self.spacing)) @ d.T

    def physical_to_index(self, point: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`index_to_physical`: mm (..., 3) -> continuous indices."""
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        rel = np.asarray(point, dtype=np.float64) - np.asarray(self.origin)
        return (rel @ np.linalg.inv(d).T) / np.asarray(self.spacing)


def _fmt(values, decimals: int) -> tuple[float, ...]:
    return tuple(float(v) for v in np.round(np.asarray(values, dtype=np.float64), decimals))


def geometry_mismatch(a: Geometry, b: Geometry) -> str | None:
    """Describe how two grids differ beyond tolerance, or return None if they match."""
    if a.size != b.size:
        return f"size {b.size} differs from the image's {a.size}"
    sa, sb = np.asarray(a.spacing), np.asarray(b.spacing)
    if not np.allclose(sa, sb, rtol=SPACING_RTOL, atol=0):
        return f"spacing {_fmt(sb, 5)} mm differs from the image's {_fmt(sa, 5)} mm"
    tol = ORIGIN_ATOL_FRACTION * float(min(sa.min(), sb.min()))
    if np.abs(np.asarray(a.origin) - np.asarray(b.origin)).max() > tol:
        return (
            f"origin {_fmt(b.origin, 3)} mm differs from the image's "
            f"{_fmt(a.origin, 3)} mm by more than {tol:.3g} mm"
        )
    if np.abs(np.asarray(a.direction) - np.asarray(b.direction)).max() > DIRECTION_ATOL:
        return f"direction {_fmt(b.direction, 4)} differs from the image's {_fmt(a.direction, 4)}"
    return None


def _read_dicom_series(case: str, folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = {}
    for root in sorted({p.parent for p in folder.rglob("*") if p.is_file()} | {folder}):
        for sid in reader.GetGDCMSeriesIDs(str(root)) or ():
            files = reader.GetGDCMSeriesFileNames(str(root), sid)
            if len(files) > len(series.get(sid, ())):
                series[sid] = files
    if not series:
        raise CaseError(case, folder, "no DICOM series found in this folder or below it")
    if len(series) > 1:
        sizes = ", ".join(f"{sid} ({len(f)} files)" for sid, f in series.items())
        raise CaseError(case, folder, f"more than one DICOM series found: {sizes}; keep one series per case")
    (files,) = series.values()
    reader.SetFileNames(files)
    # GDCM applies RescaleSlope/RescaleIntercept, so CT comes out in Hounsfield units.
    return reader.Execute()


#: File name endings of image files (one scan or label map each).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def image_stem(path: str | Path) -> str:
    """A file's name without its image ending (``case_01.nii.gz`` -> ``case_01``); a folder's name."""
    name = Path(path).name
    for suffix in (*IMAGE_SUFFIXES, ".h5"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_image(case: str, path: str | Path, *, what: str = "image") -> sitk.Image:
    """Read one 3D image (file or DICOM series folder) with SimpleITK.

    DICOM series have RescaleSlope/Intercept applied (CT in HU). Raises
    :class:`CaseError` naming the case and file for a missing, unreadable or
    truncated file, a multi-component or non-3D image.
    """
    path = Path(path)
    if not path.exists():
        raise CaseError(case, path, f"{what} file is missing")
    non_finite = 0
    if is_nifti(path) and path.is_file():
        # ITK silently zero-fills truncated .nii.gz files and reads NaN voxels as 0.
        try:
            non_finite = scan_nifti(path).non_finite
        except NiftiScanError as exc:
            raise CaseError(case, path, f"cannot read {what} (unreadable or truncated file): {exc}") from None
    try:
        if path.is_dir():
            image = _read_dicom_series(case, path)
        else:
            image = sitk.ReadImage(str(path))
    except CaseError:
        raise
    except RuntimeError as exc:  # SimpleITK/ITK read errors
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip().startswith(("Description", "itk::ERROR"))), None)
        detail = (first or str(exc).strip().splitlines()[-1]).replace("Description:", "").strip()
        raise CaseError(case, path, f"cannot read {what} (unreadable or truncated file): {detail}") from exc
    if non_finite:
        raise CaseError(case, path, f"{what} contains {non_finite} NaN or infinite voxels")
    if image.GetDimension() != 3:
        raise CaseError(case, path, f"{what} is {image.GetDimension()}D, expected a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(
            case, path, f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel, expected 1"
        )
    if min(image.GetSize()) < 2:
        raise CaseError(case, path, f"{what} has size {image.GetSize()}, which is not a 3D volume")
    return image


def to_xyz_array(image: sitk.Image, dtype=None) -> np.ndarray:
    """Copy a SimpleITK image to a NumPy array in (x, y, z) order."""
    view = sitk.GetArrayViewFromImage(image)  # no copy; the one copy is the transpose
    arr = np.ascontiguousarray(view.transpose(2, 1, 0), dtype=dtype)
    return arr


def from_xyz_array(array: np.ndarray, geometry: Geometry | None = None) -> sitk.Image:
    """Make a SimpleITK image from an (x, y, z) array, with ``geometry`` if given."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    if geometry is not None:
        image.SetSpacing(geometry.spacing)
        image.SetOrigin(geometry.origin)
        image.SetDirection(geometry.direction)
    return image
