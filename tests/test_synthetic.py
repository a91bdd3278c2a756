"""Synthetic demo data: determinism and realism (HU ranges, target contrast, geometry variety)."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from semiseg.data.synthetic import TISSUE_HU, generate_case, write_demo_dataset


@pytest.fixture(scope="module")
def cases():
    return [generate_case(7, i) for i in range(6)]


def test_same_seed_same_case():
    a = generate_case(3, 1)
    b = generate_case(3, 1)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_different_seed_or_index_differs():
    a, b, c = generate_case(3, 1), generate_case(4, 1), generate_case(3, 2)
    assert a[2] != b[2] and a[2] != c[2]


def test_types_and_label_values(cases):
    for image, label, geom in cases:
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert image.shape == label.shape == geom.size
        assert set(np.unique(label)) == {0, 1}


def test_hu_ranges(cases):
    for image, label, geom in cases:
        corner = image[:5, :5, :]
        assert -1030 <= np.median(corner) <= -950, "air outside the body"
        assert image.max() > 500, "cortical bone present"
        # Soft-tissue target within the pancreas' enhanced range.
        t = image[label == 1].astype(float)
        assert 60 <= np.median(t) <= 140
        # Fat is present: a substantial share of voxels in the fat window.
        fat = np.mean((image > -150) & (image < -50))
        assert fat > 0.05


def _shell(label, width):
    from semiseg.io.readers import from_xyz_array

    dil = sitk.BinaryDilate(from_xyz_array(label), [width] * 3)
    return np.asarray(sitk.GetArrayFromImage(dil)).transpose(2, 1, 0).astype(bool) & (label == 0)


def test_target_contrast_close_to_neighbours(cases):
    for image, label, geom in cases:
        t = image[label == 1].astype(float)
        shell = image[_shell(label, 2)].astype(float)
        soft_neighbours = shell[(shell > 0) & (shell < 250)]
        # Some neighbouring soft tissue (bowel, duodenum) enhances like the target ...
        assert soft_neighbours.size > 0.1 * shell.size
        assert abs(np.median(soft_neighbours) - np.median(t)) < 35
        # ... so intensity alone does not separate them: overlapping ranges.
        lo, hi = np.percentile(t, [10, 90])
        assert np.mean((soft_neighbours >= lo) & (soft_neighbours <= hi)) > 0.3


def test_target_is_elongated(cases):
    for image, label, geom in cases:
        pts = np.argwhere(label == 1) * np.asarray(geom.spacing)
        ev = np.sort(np.linalg.eigvalsh(np.cov(pts.T)))
        assert ev[-1] > 4 * ev[0], "elongated (pancreas-like), not a blob"


def test_geometry_variety(cases):
    sp = np.array([g.spacing for _, _, g in cases])
    assert np.all(sp[:, 0] < 1.0) and np.all(sp[:, 0] == sp[:, 1])
    assert np.all((sp[:, 2] >= 1.5) & (sp[:, 2] <= 3.0))
    assert len({round(s, 3) for s in sp[:, 2]}) == len(cases)
    assert len({g.size for _, _, g in cases}) == len(cases)
    assert all(np.abs(g.origin).max() > 1 for _, _, g in cases)
    fg_centres = [np.argwhere(lab == 1).mean(0) * np.asarray(g.spacing) for _, lab, g in cases]
    assert np.ptp(np.array(fg_centres), axis=0).max() > 5, "target position varies"
    assert set(TISSUE_HU) >= {"fat", "muscle", "bone_cortex", "target"}


def test_write_demo_dataset_msd_layout(tmp_path):
    ids = write_demo_dataset(tmp_path, num_cases=2, seed=5)
    meta = json.loads((tmp_path / "dataset.json").read_text(encoding="utf-8"))
    assert meta["numTraining"] == 2 and meta["labels"]["1"] == "pancreas"
    for cid in ids:
        img = sitk.ReadImage(str(tmp_path / "imagesTr" / f"{cid}.nii.gz"))
        lab = sitk.ReadImage(str(tmp_path / "labelsTr" / f"{cid}.nii.gz"))
        assert img.GetSpacing() == lab.GetSpacing() and img.GetOrigin() == lab.GetOrigin()
        image, label, geom = generate_case(5, int(cid.split("_")[1]))
        assert np.allclose(img.GetSpacing(), geom.spacing) and np.allclose(img.GetOrigin(), geom.origin)
        assert np.array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), image)
    assert not list(tmp_path.rglob("*.part*")), "no temporary files left"


@pytest.mark.parametrize(
    ("shape", "spacing", "scale"),
    [((61, 47, 19), (0.83, 0.83, 2.4), 14.0), ((40, 52, 30), (0.7, 0.7, 1.6), 4.0), ((5, 4, 3), (1.0, 1.0, 1.0), 14.0)],
)
def test_smooth_noise_matches_sitk_bspline_resampling(shape, spacing, scale):
    from semiseg.data.synthetic import _smooth_noise, smooth_noise_by_resampling

    spacing = np.asarray(spacing)
    fast = _smooth_noise(np.random.default_rng(11), shape, spacing, scale)
    slow = smooth_noise_by_resampling(np.random.default_rng(11), shape, spacing, scale)
    assert fast.shape == slow.shape == shape and fast.dtype == np.float32
    assert np.abs(fast - slow).max() < 1e-5


def test_ellipsoid_box_matches_full_volume_formula():
    from semiseg.data.synthetic import _ellipsoid

    rng = np.random.default_rng(2)
    X = (np.arange(50, dtype=np.float32) * 0.8 - 20)[:, None, None]
    Y = (np.arange(40, dtype=np.float32) * 0.8 - 16)[None, :, None]
    Z = (np.arange(20, dtype=np.float32) * 2.0 - 20)[None, None, :]
    wob = rng.standard_normal((50, 40, 20)).astype(np.float32) * 2
    for centre, axes, amount in [((0, 0, 0), (8, 6, 9), 0.2), ((18, -15, 15), (7, 5, 8), 0.3), ((0, 0, 0), (5, 5, 1e4), 0.0), ((90, 0, 0), (3, 3, 3), 0.1)]:
        r = ((X - centre[0]) / axes[0]) ** 2 + ((Y - centre[1]) / axes[1]) ** 2 + ((Z - centre[2]) / axes[2]) ** 2
        full = (r + amount * wob) <= 1.0
        assert np.array_equal(_ellipsoid(X, Y, Z, centre, axes, wob, amount), full)


def test_parallel_writer_writes_the_same_files(tmp_path):
    write_demo_dataset(tmp_path / "one", num_cases=3, seed=5)
    write_demo_dataset(tmp_path / "two", num_cases=3, seed=5, workers=2)
    for sub in ("imagesTr", "labelsTr"):
        for f in sorted((tmp_path / "one" / sub).iterdir()):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "two" / sub / f.name)))
            assert np.array_equal(a, b)
    assert (tmp_path / "one" / "dataset.json").read_text() == (tmp_path / "two" / "dataset.json").read_text()
