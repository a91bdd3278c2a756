"""Label orientation (``label_orientation: auto``): candidates, the boundary score, the
decision, and preprocessing of a TCIA-like DICOM case whose label axes are permuted/flipped."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from semiseg.data.synthetic import generate_case
from semiseg.errors import CaseError
from semiseg.io.h5 import read_attrs, read_case
from semiseg.io.readers import Geometry
from semiseg.preprocessing import PreprocessingParams, preprocess_case
from semiseg.preprocessing.orientation import (
    Orientation,
    boundary_score,
    candidate_orientations,
    choose_label_orientation,
    mutual_information,
)
from tests.conftest import write_volume
from tests.test_readers import write_dicom_series

SEED = 20261125


def test_orientation_apply_matches_numpy_and_describes_itself():
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    o = Orientation((1, 0, 2), (False, False, True))
    assert np.array_equal(o.apply(a), a.transpose(1, 0, 2)[:, :, ::-1])
    assert o.output_shape(a.shape) == (3, 2, 4)
    assert o.describe() == "label axes (y, x, z) as image (x, y, z), reversed along image z"
    assert Orientation().describe() == "as stored" and Orientation().is_identity
    assert Orientation((0, 1, 2), (True, True, False)).describe() == "reversed along image x and y"


def test_candidates_are_the_signed_permutations_that_fit():
    cands = candidate_orientations((4, 4, 6), (4, 4, 6))
    assert len(cands) == 16 and cands[0].is_identity  # x/y swaps fit a square in-plane size
    assert len(candidate_orientations((3, 4, 5), (3, 4, 5))) == 8
    only = candidate_orientations((5, 4, 3), (3, 4, 5))
    assert len(only) == 8 and all(o.perm == (2, 1, 0) for o in only)
    assert candidate_orientations((3, 4, 5), (3, 4, 6)) == []


def test_mutual_information_limits():
    assert mutual_information([5, 5], [10, 10]) == pytest.approx(0.0)  # mask independent of the bins
    # The mask is exactly bin 0: MI = entropy of the mask.
    assert mutual_information([10, 0], [10, 30]) == pytest.approx(-(0.25 * np.log(0.25) + 0.75 * np.log(0.75)))
    assert mutual_information([0, 0], [10, 10]) == 0.0


def test_boundary_score_is_high_on_the_organ_and_low_elsewhere():
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (40, 40, 20))
    x, y, z = np.ogrid[:40, :40, :20]
    organ = ((x - 12) ** 2 + (y - 20) ** 2 + (z - 10) ** 2) <= 36
    image[organ] += 5
    assert boundary_score(image, organ) > 0.4
    assert boundary_score(image, np.roll(organ, 16, axis=0)) < 0.05


def test_ambiguous_and_unfitting_labels_fail_with_the_case_and_file():
    rng = np.random.default_rng(1)
    image = rng.normal(0, 1, (30, 20, 10))
    x, y, z = np.ogrid[:30, :20, :10]
    left = ((x - 7) ** 2 + (y - 10) ** 2 + (z - 5) ** 2) <= 9
    image[left] += 5
    image[::-1][left] += 5  # its mirror image: two identical organs
    image = (image + image[::-1]) / 2  # exactly symmetric under a flip of x
    with pytest.raises(CaseError, match=r"^case c7: lab.nii.gz: ambiguous label orientation: .* fit the image about equally well"):
        choose_label_orientation("c7", "lab.nii.gz", image, left.astype(np.uint8))
    with pytest.raises(CaseError, match="under no axis order"):
        choose_label_orientation("c7", "lab.nii.gz", image, np.ones((30, 20, 11), np.uint8))
    with pytest.raises(CaseError, match="label is empty"):
        choose_label_orientation("c7", "lab.nii.gz", image, np.zeros((30, 20, 10), np.uint8))


def test_real_la_labels_stored_order_wins_and_moved_labels_are_put_back(la_h5_dir):
    ids = (la_h5_dir / "test.list").read_text(encoding="utf-8").split()
    for case in ids:
        with h5py.File(la_h5_dir / case / "mri_norm2.h5", "r") as f:
            image, label = f["image"][...], f["label"][...]
        stored = choose_label_orientation(case, "mri_norm2.h5", image, label)
        assert stored.chosen.is_identity and stored.ratio > 1.1, (case, stored.scores[:2])
        for o in (Orientation((0, 1, 2), (False, False, True)), Orientation((0, 1, 2), (True, True, False))):
            moved = o.apply(label)
            check = choose_label_orientation(case, "mri_norm2.h5", image, moved)
            assert check.fixed and np.array_equal(check.chosen.apply(moved), label), (case, o)


def squared_case(index: int) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """A synthetic abdominal CT (int16 HU) padded with air to a square in-plane size."""
    image, label, geom = generate_case(SEED, index)
    n = max(image.shape[:2])
    img = np.full((n, n, image.shape[2]), -1000, np.int16)
    lab = np.zeros(img.shape, np.uint8)
    img[: image.shape[0], : image.shape[1]] = image
    lab[: image.shape[0], : image.shape[1]] = label
    return img, lab, Geometry(img.shape, geom.spacing, geom.origin, geom.direction)


def tcia_label(path: Path, label: np.ndarray, geom: Geometry) -> Path:
    """A label NIfTI as TCIA ships them: the voxel array only; its header (origin) is not the DICOM series'."""
    return write_volume(path, label, Geometry(label.shape, geom.spacing, (0.0, 0.0, 0.0), geom.direction))


PANCREAS = PreprocessingParams(target_spacing=(2.0, 2.0, 2.0), crop_margin=4, label_orientation="auto")


def test_pancreas_dicom_label_in_tcia_order_and_permuted_flipped(tmp_path):
    image, label, geom = squared_case(0)
    raw = tmp_path / "Pancreas-CT"
    write_dicom_series(raw / "PANCREAS_0001" / "1.2.3-study" / "1.2.3.4-series", image, geom, intercept=-1024.0)
    labels = tmp_path / "TCIA_pancreas_labels-02-05-2017"
    stored = tcia_label(labels / "label0001.nii.gz", label, geom)
    out = tmp_path / "out"

    # The header check (the default for other data sets) refuses this label: its origin is not the series'.
    with pytest.raises(CaseError, match="label does not share the image's geometry: origin"):
        preprocess_case("PANCREAS_0001", raw / "PANCREAS_0001", stored, out / "x.h5", PreprocessingParams(label_orientation="header"))

    s1 = preprocess_case("PANCREAS_0001", raw / "PANCREAS_0001", stored, out / "a.h5", PANCREAS)
    img_a, lab_a, attrs_a = read_case(out / "a.h5")
    assert s1["label_orientation"] == "as stored" and attrs_a["label_orientation_fixed"] is False
    assert "origin" in attrs_a["label_header_mismatch"]
    assert attrs_a["label_orientation_scores"][0] > 1.1 * attrs_a["label_orientation_scores"][1]

    # The same label stored with x and y swapped and the slices reversed: detected, fixed, reported.
    moved = label.transpose(1, 0, 2)[:, :, ::-1]
    swapped = tcia_label(labels / "label0002.nii.gz", moved, geom)
    s2 = preprocess_case("PANCREAS_0001", raw / "PANCREAS_0001", swapped, out / "b.h5", PANCREAS)
    img_b, lab_b, attrs_b = read_case(out / "b.h5")
    assert attrs_b["label_orientation_fixed"] is True
    assert attrs_b["label_orientation"] == s2["label_orientation"] == "label axes (y, x, z) as image (x, y, z), reversed along image z"
    assert np.array_equal(lab_b, lab_a) and np.array_equal(img_b, img_a)  # the same case file as the stored label gives
    assert attrs_b["crop_start"] == attrs_a["crop_start"] and attrs_b["crop_stop"] == attrs_a["crop_stop"]


def test_pancreas_ambiguous_label_fails_and_writes_nothing(tmp_path):
    image, label, geom = generate_case(SEED, 1)
    # A scan that is its own mirror image in x: a label on one half fits the other half as well.
    image = np.concatenate([image, image[::-1]], axis=0)
    label = np.concatenate([label, np.zeros_like(label)], axis=0)
    geom = Geometry(image.shape, geom.spacing, geom.origin, geom.direction)
    write_dicom_series(tmp_path / "PANCREAS_0003" / "study" / "series", image, geom)
    lab = tcia_label(tmp_path / "label0003.nii.gz", label, geom)
    out = tmp_path / "out" / "PANCREAS_0003.h5"
    with pytest.raises(CaseError) as info:
        preprocess_case("PANCREAS_0003", tmp_path / "PANCREAS_0003", lab, out, PANCREAS)
    msg = str(info.value)
    assert msg.startswith("case PANCREAS_0003: ") and "label0003.nii.gz" in msg and "\n" not in msg
    assert "ambiguous label orientation: as stored" in msg and "reversed along image x" in msg
    assert not out.exists()


def test_header_mode_records_its_choice(tmp_path):
    image, label, geom = generate_case(SEED, 2)
    img = write_volume(tmp_path / "img.nii.gz", image, geom)
    lab = write_volume(tmp_path / "lab.nii.gz", label, geom)
    preprocess_case("c", img, lab, tmp_path / "c.h5", PreprocessingParams(target_spacing=(2.0, 2.0, 2.0), crop_margin=2))
    assert read_attrs(tmp_path / "c.h5")["label_orientation"] == "header"
