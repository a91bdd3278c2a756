"""Preprocessing: HU clip, resampling, crop margin, normalisation, labels, geometry round trip."""

import numpy as np
import pytest
import SimpleITK as sitk

from semiseg.errors import CaseError
from semiseg.io.h5 import CaseGeometry, read_case
from semiseg.io.readers import Geometry, to_xyz_array
from semiseg.preprocessing import PreprocessingParams, preprocess_case
from semiseg.preprocessing.cropping import bounding_box, expand_box
from semiseg.preprocessing.intensity import mean_std, zscore_
from semiseg.preprocessing.resampling import target_grid
from tests.conftest import phantom, write_volume

ROTATED = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def run(tmp_path, image, label, geom, name="c1", **kw):
    img_p = write_volume(tmp_path / "raw" / f"{name}_img.nii.gz", image, geom)
    lab_p = None if label is None else write_volume(tmp_path / "raw" / f"{name}_lab.nii.gz", label, geom)
    out = tmp_path / "out" / f"{name}.h5"
    params = PreprocessingParams(**{"crop_margin": 3, **kw})
    summary = preprocess_case(name, img_p, lab_p, out, params, dataset="t")
    img, lab, attrs = read_case(out)
    return img, lab, attrs, summary


def naive_reference(image_path, label_path, spacing, clip, margin):
    """Resample the whole clipped image and label, then crop: the textbook order."""
    raw = sitk.Cast(sitk.ReadImage(str(image_path)), sitk.sitkFloat32)
    raw = sitk.Clamp(raw, lowerBound=clip[0], upperBound=clip[1])
    lab = sitk.ReadImage(str(label_path))
    grid = target_grid(Geometry.of(raw), spacing)
    ref = sitk.Image(list(grid.size), sitk.sitkFloat32)
    ref.SetSpacing(grid.spacing)
    ref.SetOrigin(grid.origin)
    ref.SetDirection(grid.direction)
    img_r = to_xyz_array(sitk.Resample(raw, ref, sitk.Transform(), sitk.sitkLinear, clip[0], sitk.sitkFloat32))
    lab_r = to_xyz_array(sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    box = expand_box(bounding_box(lab_r), margin, grid.size)
    sl = tuple(slice(a, b) for a, b in zip(*box))
    return img_r[sl], lab_r[sl], box, grid


@pytest.mark.parametrize("direction", [None, ROTATED])
def test_equals_resample_then_crop(tmp_path, direction):
    kw = {} if direction is None else {"direction": direction}
    image, label, geom = phantom(**kw)
    img, lab, attrs, _ = run(tmp_path, image, label, geom, normalisation="none", target_spacing=(1.0, 1.0, 1.0))
    raw = tmp_path / "raw"
    ref_img, ref_lab, box, grid = naive_reference(raw / "c1_img.nii.gz", raw / "c1_lab.nii.gz", (1.0, 1.0, 1.0), (-125, 275), 3)
    assert img.shape == ref_img.shape
    assert np.allclose(img, ref_img, atol=1e-4)
    assert np.array_equal(lab, ref_lab)
    assert tuple(attrs["crop_start"]) == box[0] and tuple(attrs["crop_stop"]) == box[1]


def test_hu_clip(tmp_path):
    image, label, geom = phantom()
    img, _, _, _ = run(tmp_path, image, label, geom, normalisation="none", target_spacing=None, crop_source="none")
    assert img.min() >= -125 and img.max() <= 275
    # Voxels at 300 +- noise (target) and air are clipped to the window's edges.
    assert np.isclose(img.max(), 275) and np.isclose(img.min(), -125)


def test_no_clip_for_mr(tmp_path):
    image, label, geom = phantom()
    img, _, _, _ = run(tmp_path, image, label, geom, normalisation="none", target_spacing=None, intensity_clip=None, crop_source="none")
    assert img.max() > 275 and img.min() < -900


def test_resampled_spacing_and_shape(tmp_path):
    image, label, geom = phantom(shape=(50, 44, 18), spacing=(0.8, 0.8, 2.5))
    _, _, attrs, _ = run(tmp_path, image, label, geom, target_spacing=(1.0, 1.0, 1.0), crop_source="none")
    assert attrs["spacing"] == [1.0, 1.0, 1.0]
    assert attrs["resampled_size"] == [40, 35, 45]  # round(50*0.8), round(44*0.8)=35, 18*2.5
    assert attrs["shape"] == attrs["resampled_size"] and attrs["crop_start"] == [0, 0, 0]
    _, _, attrs2, _ = run(tmp_path, image, label, geom, name="c2", target_spacing=(2.0, 1.5, 1.25), crop_source="none")
    assert attrs2["shape"] == [20, 23, 36]


def test_crop_margin_and_clipping_at_volume_edge(tmp_path):
    image, label, geom = phantom(shape=(40, 36, 20), spacing=(1.0, 1.0, 1.0))
    _, lab, attrs, _ = run(tmp_path, image, label, geom, target_spacing=None, crop_margin=4)
    start, stop = bounding_box(label)
    exp_start = [max(0, s - 4) for s in start]
    exp_stop = [min(n, e + 4) for e, n in zip(stop, label.shape)]
    assert attrs["crop_start"] == exp_start and attrs["crop_stop"] == exp_stop
    # The foreground sits at least `margin` voxels (or the volume edge) inside the crop.
    fs, fe = bounding_box(lab)
    for a in range(3):
        assert fs[a] == start[a] - exp_start[a]
        assert lab.shape[a] - fe[a] == exp_stop[a] - stop[a]
    # Per-axis margins, larger than the volume: clipped to the volume.
    _, _, attrs2, _ = run(tmp_path, image, label, geom, name="c2", target_spacing=None, crop_margin=(0, 0, 50))
    assert attrs2["crop_start"][2] == 0 and attrs2["crop_stop"][2] == 20
    assert attrs2["crop_start"][:2] == list(start[:2])


def test_zscore_statistics(tmp_path):
    image, label, geom = phantom()
    img, _, attrs, _ = run(tmp_path, image, label, geom)
    assert abs(img.astype(np.float64).mean()) < 1e-5 and abs(img.astype(np.float64).std() - 1) < 1e-5
    raw, _, _, _ = run(tmp_path, image, label, geom, name="c2", normalisation="none")
    assert np.isclose(attrs["normalisation_mean"], raw.astype(np.float64).mean(), rtol=1e-6)
    assert np.allclose((raw - attrs["normalisation_mean"]) / attrs["normalisation_std"], img, atol=1e-4)


def test_mean_std_chunked_matches_numpy():
    rng = np.random.default_rng(0)
    a = (rng.normal(1000, 3, size=(30, 20, 17))).astype(np.float32)
    m, s = mean_std(a, chunk_voxels=100)
    assert np.isclose(m, a.astype(np.float64).mean(), rtol=1e-12)
    assert np.isclose(s, a.astype(np.float64).std(), rtol=1e-9)
    with pytest.raises(ValueError, match="constant"):
        zscore_(np.ones((3, 3, 3), np.float32))


def test_label_values_preserved_and_mapped(tmp_path):
    image, label, geom = phantom()
    multi = label.copy()
    multi[:, :, : label.shape[2] // 2] *= 2  # classes 0, 1, 2
    _, lab, _, _ = run(tmp_path, image, multi, geom, classes=("bg", "a", "b"), target_spacing=(0.6, 0.6, 1.3))
    assert set(np.unique(lab)) == {0, 1, 2}
    la_style = (label * 255).astype(np.uint8)
    _, lab2, attrs, _ = run(tmp_path, image, la_style, geom, name="c2", label_map={0: 0, 255: 1})
    assert set(np.unique(lab2)) == {0, 1} and attrs["preprocessing"]["label_map"] == {"0": 0, "255": 1}
    assert lab2.dtype == np.uint8


def test_geometry_round_trip_landmark(tmp_path):
    """A stored voxel maps back to the same physical point of the raw image."""
    image, label, geom = phantom(shape=(48, 40, 16), spacing=(0.7, 0.7, 2.2), origin=(12.5, -40.0, 7.0), direction=ROTATED)
    _, lab, attrs, _ = run(tmp_path, image, label, geom, target_spacing=(1.0, 1.0, 1.0))
    cg = CaseGeometry.from_attrs(attrs)
    # Exact: stored voxel ijk is resampled voxel crop_start + ijk of the raw extent.
    ijk = np.array([[0, 0, 0], [3, 5, 7], list(np.array(lab.shape) - 1)])
    assert np.allclose(cg.stored.index_to_physical(ijk), cg.resampled.index_to_physical(ijk + cg.crop_start), atol=1e-6)
    assert np.allclose(cg.resampled.origin, geom.origin) and np.allclose(cg.raw.spacing, geom.spacing)
    # Landmark: the label's centroid, found in the stored grid, maps to the raw centroid.
    stored_centroid = np.argwhere(lab == 1).mean(axis=0)
    raw_centroid = np.argwhere(label == 1).mean(axis=0)
    back = cg.stored_to_raw_index(stored_centroid)
    err_mm = np.abs(geom.index_to_physical(back) - geom.index_to_physical(raw_centroid))
    assert err_mm.max() < 0.6, err_mm
    # Voxel values too: a stored voxel's intensity matches the raw value at the mapped point.
    img, _, _, _ = run(tmp_path, image, label, geom, name="c2", target_spacing=(0.7, 0.7, 2.2), normalisation="none", intensity_clip=None)
    cg2 = CaseGeometry.from_attrs(read_case(tmp_path / "out" / "c2.h5")[2])
    for v in ([2, 3, 4], [10, 9, 5]):
        r = np.round(cg2.stored_to_raw_index(np.array(v))).astype(int)
        assert np.allclose(cg2.stored_to_raw_index(np.array(v)), r, atol=1e-6)
        assert img[tuple(v)] == image[tuple(r)]


def test_body_crop_is_label_free(tmp_path):
    image, label, geom = phantom(shape=(40, 36, 20), spacing=(1.0, 1.0, 1.0))
    img, lab, attrs, _ = run(tmp_path, image, None, geom, target_spacing=None, crop_source="body", crop_margin=0, body_threshold=-500)
    assert lab is None and attrs["source_label"] is None
    body = image > -500
    assert (tuple(attrs["crop_start"]), tuple(attrs["crop_stop"])) == bounding_box(body)
    assert attrs["crop_start"][0] > 0 and attrs["crop_stop"][0] < 40  # air trimmed


def test_unlabelled_case_cannot_crop_on_label(tmp_path):
    image, _, geom = phantom()
    with pytest.raises(CaseError, match="no label file"):
        run(tmp_path, image, None, geom, crop_source="label")
