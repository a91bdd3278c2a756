"""Label post-processing: the largest connected component per class, as a pseudo-label filter."""

from __future__ import annotations

import numpy as np
import pytest

from semiseg.postprocessing import LABEL_FILTERS, filter_label


def test_largest_component_filter_keeps_the_largest_blob_of_each_class():
    lab = np.zeros((12, 10, 8), np.uint8)
    lab[1:5, 1:5, 1:5] = 1       # 64 voxels: kept
    lab[8:10, 7:9, 6:8] = 1      # 8 voxels, apart: removed
    lab[6:8, 1:3, 1:2] = 2       # class 2: its only blob, kept
    out = filter_label(lab, "largest_component", num_classes=3)
    assert out.dtype == lab.dtype and out.shape == lab.shape
    assert np.count_nonzero(out == 1) == 64 and not out[8:10, 7:9, 6:8].any()
    assert np.array_equal(out == 2, lab == 2)
    diag = np.zeros((4, 4, 4), np.uint8)
    diag[0, 0, 0] = diag[1, 1, 1] = 1  # touching at a corner: one 26-connected component
    assert np.array_equal(filter_label(diag, "largest_component", 2), diag)


def test_no_filter_and_unknown_filter():
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[0, 0, 0] = lab[3, 3, 3] = 1
    assert filter_label(lab, "none", 2) is lab
    assert LABEL_FILTERS == ("none", "largest_component")
    with pytest.raises(ValueError, match="label filter must be one of"):
        filter_label(lab, "opening", 2)
    assert np.count_nonzero(filter_label(np.zeros((3, 3, 3), np.uint8), "largest_component", 2)) == 0
