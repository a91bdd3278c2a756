"""The NIfTI integrity scan (truncation and non-finite voxels ITK does not report)."""

import gzip

import numpy as np
import pytest

from semiseg.io import nifti_scan
from semiseg.io.nifti_scan import NiftiScanError, scan_nifti
from tests.conftest import phantom, write_volume


def test_counts_voxels_and_non_finite_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(nifti_scan, "CHUNK", 1001)  # odd chunk size: values straddle chunks
    _, _, geom = phantom(shape=(30, 20, 10))
    a = np.zeros(geom.size, np.float32)
    a.flat[[5, 777, 5999]] = [np.nan, np.inf, -np.inf]
    for name in ("f.nii", "f.nii.gz"):
        scan = scan_nifti(write_volume(tmp_path / name, a, geom))
        assert scan.voxels == a.size and scan.non_finite == 3
    ints = scan_nifti(write_volume(tmp_path / "i.nii.gz", np.zeros(geom.size, np.int16), geom))
    assert ints.non_finite == 0 and ints.data_bytes == a.size * 2


def test_truncation_detected(tmp_path):
    image, _, geom = phantom()
    p = write_volume(tmp_path / "x.nii", image, geom)
    raw = p.read_bytes()
    (tmp_path / "short.nii").write_bytes(raw[:-10])
    with pytest.raises(NiftiScanError, match="truncated"):
        scan_nifti(tmp_path / "short.nii")
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw)[:-50])
    with pytest.raises(NiftiScanError, match="gzip"):
        scan_nifti(tmp_path / "short.nii.gz")
    (tmp_path / "head.nii").write_bytes(raw[:100])
    with pytest.raises(NiftiScanError, match="header"):
        scan_nifti(tmp_path / "head.nii")
