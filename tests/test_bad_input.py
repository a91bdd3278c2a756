"""Bad input: each fails with one line naming the case, the file and the problem; nothing is written."""

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from semiseg.errors import CaseError
from semiseg.io.h5 import read_attrs, write_case
from semiseg.io.readers import from_xyz_array
from semiseg.preprocessing import PreprocessingParams, preprocess_case
from tests.conftest import phantom, write_volume


@pytest.fixture
def case_files(tmp_path):
    image, label, geom = phantom()
    img = write_volume(tmp_path / "raw" / "img.nii.gz", image, geom)
    lab = write_volume(tmp_path / "raw" / "lab.nii.gz", label, geom)
    return tmp_path, image, label, geom, img, lab


def expect_failure(tmp_path, image_path, label_path, file_name, *problem_words, params=None):
    out = tmp_path / "out" / "bad_case.h5"
    with pytest.raises(CaseError) as info:
        preprocess_case("bad_case", image_path, label_path, out, params or PreprocessingParams(crop_margin=2))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("case bad_case: ") and file_name in msg
    for word in problem_words:
        assert word in msg, msg
    assert not out.exists()
    assert not list(out.parent.glob("*")) if out.parent.exists() else True
    return msg


def test_unreadable_file(case_files):
    tmp, *_, img, lab = case_files
    junk = tmp / "raw" / "junk.nii.gz"
    junk.write_bytes(b"this is not an image" * 10)
    expect_failure(tmp, junk, lab, "junk.nii.gz", "cannot read image")


def test_truncated_file(case_files):
    tmp, *_, img, lab = case_files
    data = gzip.decompress(img.read_bytes())
    cut = tmp / "raw" / "cut.nii"
    cut.write_bytes(data[: len(data) // 2])
    expect_failure(tmp, cut, lab, "cut.nii", "cannot read image", "truncated")
    cutgz = tmp / "raw" / "cut.nii.gz"
    cutgz.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    expect_failure(tmp, cutgz, lab, "cut.nii.gz", "cannot read image")


def test_geometry_mismatch(case_files):
    tmp, image, label, geom, img, _ = case_files
    moved = write_volume(tmp / "raw" / "moved.nii.gz", label, geom.__class__(geom.size, geom.spacing, (0.0, 0.0, 0.0), geom.direction))
    expect_failure(tmp, img, moved, "moved.nii.gz", "does not share the image's geometry", "origin")
    small = write_volume(tmp / "raw" / "small.nii.gz", label[:-1], geom.__class__(label[:-1].shape, geom.spacing, geom.origin, geom.direction))
    expect_failure(tmp, img, small, "small.nii.gz", "size")


def test_label_values_outside_classes(case_files):
    tmp, image, label, geom, img, _ = case_files
    bad = write_volume(tmp / "raw" / "three.nii.gz", label * 3, geom)
    expect_failure(tmp, img, bad, "three.nii.gz", "label values {3}", "label_map")


def test_empty_label(case_files):
    tmp, image, label, geom, img, _ = case_files
    empty = write_volume(tmp / "raw" / "empty.nii.gz", np.zeros_like(label), geom)
    expect_failure(tmp, img, empty, "empty.nii.gz", "label is empty")


def test_nan_and_inf_voxels(case_files):
    tmp, image, label, geom, _, lab = case_files
    f = image.astype(np.float32)
    f[3, 4, 5] = np.nan
    f[1, 1, 1] = np.inf
    nan_p = write_volume(tmp / "raw" / "nan.nii.gz", f, geom)
    expect_failure(tmp, nan_p, lab, "nan.nii.gz", "2 NaN or infinite voxels")
    nrrd_p = write_volume(tmp / "raw" / "nan.nrrd", f, geom)
    expect_failure(tmp, nrrd_p, lab, "nan.nrrd", "2 NaN or infinite voxels")
    lab_nan = write_volume(tmp / "raw" / "labnan.nii.gz", np.where(label > 0, np.nan, 0).astype(np.float32), geom)
    expect_failure(tmp, nan_p.with_name("img.nii.gz"), lab_nan, "labnan.nii.gz", "label contains")


def test_non_3d_image(case_files):
    tmp, image, label, geom, _, lab = case_files
    p = tmp / "raw" / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(image[:, :, 0].T.copy()), str(p))
    expect_failure(tmp, p, lab, "flat.nii.gz", "2D", "expected a 3D volume")
    single = tmp / "raw" / "slab.nii.gz"
    sitk.WriteImage(from_xyz_array(image[:, :, :1], geom), str(single))
    expect_failure(tmp, single, lab, "slab.nii.gz", "not a 3D volume")


def test_missing_label_file(case_files):
    tmp, *_, img, _ = case_files
    expect_failure(tmp, img, tmp / "raw" / "nope.nii.gz", "nope.nii.gz", "label file is missing")


def test_failed_rerun_keeps_previous_output(case_files):
    tmp, image, label, geom, img, lab = case_files
    out = tmp / "out" / "bad_case.h5"
    write_case(out, np.zeros((2, 2, 2), np.float32), None, {"marker": "previous"})
    empty = write_volume(tmp / "raw" / "empty.nii.gz", np.zeros_like(label), geom)
    with pytest.raises(CaseError):
        preprocess_case("bad_case", img, empty, out, PreprocessingParams())
    assert read_attrs(out)["marker"] == "previous"
    assert sorted(p.name for p in out.parent.iterdir()) == ["bad_case.h5"]
