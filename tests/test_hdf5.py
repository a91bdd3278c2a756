"""The HDF5 case format: datasets, chunking, attributes, atomic writes, community files."""

import h5py
import numpy as np
import pytest

from semiseg.io.h5 import CaseGeometry, chunk_shape, read_attrs, read_case, write_case
from semiseg.preprocessing import PreprocessingParams, preprocess_case
from tests.conftest import phantom, write_volume

REQUIRED_ATTRS = {
    "format_version", "axis_order", "case_id", "dataset", "shape", "spacing", "origin", "direction",
    "resampled_size", "resampled_origin", "crop_start", "crop_stop", "raw_size", "raw_spacing",
    "raw_origin", "raw_direction", "classes", "preprocessing", "normalisation_mean", "normalisation_std",
    "source_image", "source_label", "semiseg_version",
}


def test_case_file_schema(tmp_path):
    image, label, geom = phantom(shape=(70, 60, 30))
    img_p = write_volume(tmp_path / "i.nii.gz", image, geom)
    lab_p = write_volume(tmp_path / "l.nii.gz", label, geom)
    out = tmp_path / "c.h5"
    preprocess_case("c", img_p, lab_p, out, PreprocessingParams(crop_source="none"), dataset="d")
    with h5py.File(out, "r") as f:
        assert set(f.keys()) == {"image", "label"}
        assert f["image"].dtype == np.float32 and f["label"].dtype == np.uint8
        assert f["image"].shape == f["label"].shape == tuple(f.attrs["shape"])
        for name in ("image", "label"):
            ds = f[name]
            assert ds.chunks is not None and max(ds.chunks) <= 32
            assert ds.compression == "gzip"
        assert REQUIRED_ATTRS <= set(f.attrs)
        assert f.attrs["axis_order"] == "xyz"
    attrs = read_attrs(out)
    assert attrs["preprocessing"]["intensity_clip"] == [-125.0, 275.0]
    assert attrs["preprocessing"]["crop_source"] == "none"
    assert attrs["classes"] == ["background", "foreground"]
    CaseGeometry.from_attrs(attrs)  # complete geometry


def test_random_crop_reads_only_its_chunks(tmp_path):
    arr = np.random.default_rng(0).normal(size=(96, 96, 64)).astype(np.float32)
    write_case(tmp_path / "c.h5", arr, None, {})
    with h5py.File(tmp_path / "c.h5", "r") as f:
        ds = f["image"]
        crop = (slice(33, 63), slice(0, 20), slice(10, 30))
        assert ds.chunks == (32, 32, 32) and ds.id.get_num_chunks() == 3 * 3 * 2
        assert np.array_equal(ds[crop], arr[crop])
    assert chunk_shape((200, 20, 5)) == (32, 20, 5)


def test_write_is_atomic_and_keeps_previous_file(tmp_path):
    out = tmp_path / "c.h5"
    good = np.zeros((4, 4, 4), np.float32)
    write_case(out, good, None, {"v": 1})
    with pytest.raises(ValueError):
        write_case(out, good, np.zeros((3, 3, 3), np.uint8), {"v": 2})
    assert read_attrs(out)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.h5"]


@pytest.mark.parametrize("proc", [True, False], ids=["proc_status", "umask_call"])
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_mode(tmp_path, monkeypatch, umask, mode, proc):
    # The temporary file behind an atomic write is created 0o600; the result must get the
    # mode a plainly created file would, so that a group can read a shared results folder.
    # The umask comes from /proc/self/status, or (where there is none) from os.umask.
    import os

    from semiseg.io import atomic
    from semiseg.io.atomic import atomic_write_text

    if not proc:
        monkeypatch.setattr(atomic, "_PROC_STATUS", tmp_path / "no_such_status")
    old = os.umask(umask)
    try:
        write_case(tmp_path / "c.h5", np.zeros((4, 4, 4), np.float32), None, {})
        atomic_write_text(tmp_path / "t.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "c.h5").stat().st_mode & 0o777 == mode
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == mode


def test_community_la_file_reads_unchanged(la_h5_dir):
    case = sorted(p for p in la_h5_dir.iterdir() if (p / "mri_norm2.h5").exists())[0]
    image, label, attrs = read_case(case / "mri_norm2.h5")
    with h5py.File(case / "mri_norm2.h5", "r") as f:
        assert np.array_equal(image, f["image"][...]) and np.array_equal(label, f["label"][...])
    assert image.ndim == 3 and image.shape[2] == 88 and attrs == {}
    assert set(np.unique(label)) <= {0, 1}
