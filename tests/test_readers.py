"""Raw readers: NIfTI / NRRD / MHA / DICOM series, geometry checks, unreadable input."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from semiseg.errors import CaseError
from semiseg.io.readers import Geometry, geometry_mismatch, read_image, to_xyz_array
from tests.conftest import phantom, write_volume


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_read_formats_keep_values_and_geometry(tmp_path, suffix):
    image, _, geom = phantom(direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    path = write_volume(tmp_path / f"img{suffix}", image, geom)
    out = read_image("c1", path)
    assert np.array_equal(to_xyz_array(out), image)
    g = Geometry.of(out)
    assert g.size == geom.size
    assert np.allclose(g.spacing, geom.spacing, atol=1e-5) and np.allclose(g.origin, geom.origin, atol=1e-4)
    assert np.allclose(g.direction, geom.direction, atol=1e-6)


def write_dicom_series(folder: Path, hu: np.ndarray, geom: Geometry, intercept: float = -1024.0, slope: float = 1.0):
    """Write an (x, y, z) HU volume as a CT DICOM series; the files store (HU - intercept) / slope."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(hu.transpose(2, 1, 0).astype(np.int16))
    img.SetSpacing(geom.spacing)
    img.SetOrigin(geom.origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        tags = {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.7", "0020|000e": "1.2.826.0.1.3680043.2.1125.8",
            "0020|0032": "\\".join(f"{v:.4f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(k + 1),
            "0028|1052": f"{intercept:g}", "0028|1053": f"{slope:g}",
        }
        for key, val in tags.items():
            s.SetMetaData(key, val)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)
    return folder


def test_dicom_series_rescaled_to_hu(tmp_path):
    image, _, geom = phantom(shape=(12, 10, 6))
    folder = write_dicom_series(tmp_path / "PANCREAS_0001" / "study" / "series", image, geom)
    # The files store HU + 1024, so the reader must apply RescaleIntercept.
    stored = np.frombuffer((folder / "slice000.dcm").read_bytes()[-image[:, :, 0].size * 2 :], dtype=np.int16)
    assert np.array_equal(stored.reshape(10, 12).T, image[:, :, 0] + 1024)
    out = read_image("PANCREAS_0001", tmp_path / "PANCREAS_0001")  # nested folders
    assert np.array_equal(to_xyz_array(out), image)
    assert np.allclose(out.GetSpacing(), geom.spacing, atol=1e-4)
    assert np.allclose(out.GetOrigin(), geom.origin, atol=1e-3)


def test_dicom_two_series_is_an_error(tmp_path):
    image, _, geom = phantom(shape=(8, 8, 4))
    write_dicom_series(tmp_path / "c" / "s1", image, geom)
    # A second series with another UID.
    folder = tmp_path / "c" / "s2"
    folder.mkdir(parents=True)
    for f in (tmp_path / "c" / "s1").iterdir():
        r = sitk.ImageFileReader()
        r.SetFileName(str(f))
        r.LoadPrivateTagsOn()
        s = r.Execute()
        for key in r.GetMetaDataKeys():
            s.SetMetaData(key, r.GetMetaData(key))
        s.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.99")
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetFileName(str(folder / f.name))
        w.Execute(s)
    with pytest.raises(CaseError, match="more than one DICOM series"):
        read_image("c", tmp_path / "c")


def test_empty_folder_is_not_a_dicom_series(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(CaseError, match="no DICOM series"):
        read_image("c", tmp_path / "c")


def test_geometry_mismatch_descriptions():
    g = Geometry((10, 10, 10), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    assert geometry_mismatch(g, g) is None
    assert "size" in geometry_mismatch(g, Geometry((10, 10, 11), g.spacing, g.origin, g.direction))
    assert "spacing" in geometry_mismatch(g, Geometry(g.size, (1.0, 1.0, 2.5), g.origin, g.direction))
    assert "origin" in geometry_mismatch(g, Geometry(g.size, g.spacing, (0.0, 0.0, 3.0), g.direction))
    # Within tolerance: float noise in origin and spacing.
    assert geometry_mismatch(g, Geometry(g.size, (1.0000001, 1.0, 2.0), (1e-4, 0.0, 0.0), g.direction)) is None
    flipped = (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    assert "direction" in geometry_mismatch(g, Geometry(g.size, g.spacing, g.origin, flipped))


def test_index_physical_round_trip():
    g = Geometry((5, 6, 7), (0.7, 0.8, 2.5), (10.0, -20.0, 30.0), (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    idx = np.array([[0, 0, 0], [1.5, 2, 3], [4, 5, 6]])
    img = sitk.Image(list(g.size), sitk.sitkUInt8)
    img.SetSpacing(g.spacing)
    img.SetOrigin(g.origin)
    img.SetDirection(g.direction)
    for row in idx:
        assert np.allclose(g.index_to_physical(row), img.TransformContinuousIndexToPhysicalPoint(row.tolist()))
    assert np.allclose(g.physical_to_index(g.index_to_physical(idx)), idx)
