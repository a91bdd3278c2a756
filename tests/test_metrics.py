"""Metrics equal medpy's (random and real shapes, voxels and mm); empty-mask policy."""

import h5py
import numpy as np
import pytest
from medpy.metric import binary
from scipy import ndimage

from semiseg.metrics import segmentation_metrics, union_box


def medpy_metrics(p, r, spacing=None):
    return {"dice": binary.dc(p, r), "jaccard": binary.jc(p, r),
            "asd": binary.asd(p, r, voxelspacing=spacing), "hd95": binary.hd95(p, r, voxelspacing=spacing)}


def assert_same(p, r, spacing=None):
    ours, ref = segmentation_metrics(p, r, spacing), medpy_metrics(p, r, spacing)
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-6), (k, ours[k], ref[k])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spacing", [None, (0.7, 0.8, 2.5)])
def test_random_shapes(seed, spacing):
    rng = np.random.default_rng(seed)
    shape = (40, 36, 30)
    p = ndimage.binary_opening(rng.random(shape) > 0.6, iterations=1)
    r = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    assert_same(p, r, spacing)


def test_objects_touching_the_volume_edge():
    p = np.zeros((20, 20, 20), bool)
    r = np.zeros((20, 20, 20), bool)
    p[0:8, 5:15, 12:20] = True
    r[2:10, 4:14, 10:20] = True
    assert_same(p, r)
    assert union_box(p, r) == (slice(0, 11), slice(3, 16), slice(9, 20))


def test_real_la_shapes(la_h5_dir):
    case = sorted(p for p in la_h5_dir.iterdir() if (p / "mri_norm2.h5").exists())[1]
    with h5py.File(case / "mri_norm2.h5", "r") as f:
        ref = f["label"][...] > 0
    variants = {
        "eroded": ndimage.binary_erosion(ref, iterations=2),
        "dilated": ndimage.binary_dilation(ref, iterations=3),
        "shifted": np.roll(ref, (4, -3, 2), axis=(0, 1, 2)),
    }
    for pred in variants.values():
        assert_same(pred, ref)
        assert_same(pred, ref, (0.625, 0.625, 0.625))


def test_empty_policies():
    r = np.zeros((10, 12, 14), bool)
    r[3:6, 3:6, 3:6] = True
    empty = np.zeros_like(r)
    worst = segmentation_metrics(empty, r)
    assert worst["dice"] == 0 and worst["jaccard"] == 0 and worst["empty_pred"] and not worst["empty_ref"]
    assert worst["asd"] == worst["hd95"] == pytest.approx(np.sqrt(10**2 + 12**2 + 14**2))
    mm = segmentation_metrics(empty, r, spacing=(1, 1, 2))
    assert mm["hd95"] == pytest.approx(np.sqrt(10**2 + 12**2 + 28**2))
    assert np.isnan(segmentation_metrics(empty, r, empty_policy="nan")["asd"])
    assert segmentation_metrics(r, empty, empty_policy="zero")["hd95"] == 0.0
    both = segmentation_metrics(empty, empty)
    assert both["dice"] == 1 and both["asd"] == 0 and both["empty_pred"] and both["empty_ref"]
    with pytest.raises(ValueError, match="empty_policy"):
        segmentation_metrics(r, r, empty_policy="best")
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(r, r[:-1])


def test_surface_equals_erosion_definition():
    from semiseg.metrics import _surface

    rng = np.random.default_rng(5)
    m = ndimage.gaussian_filter(rng.random((17, 15, 13)), 1.5) > 0.5
    m[0, :, :] |= rng.random((15, 13)) > 0.5  # touching the edge
    face = ndimage.generate_binary_structure(3, 1)
    assert np.array_equal(_surface(m), m ^ ndimage.binary_erosion(m, structure=face, iterations=1))
