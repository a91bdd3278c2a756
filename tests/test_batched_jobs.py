"""Jobs that process many cases with one model loaded once (rules ``predict`` and
``pseudo_labels``): the same files as one case at a time, one log per case, errors that
name the case."""

from __future__ import annotations

import logging
import shutil

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from semiseg.evaluation import predict_case, predict_cases
from semiseg.jobs import case_files_in, case_log
from semiseg.pseudo import write_pseudo_label, write_pseudo_labels
from semiseg.training.engine import TrainConfig, train
from tests.test_training import TINY, tiny_cases  # noqa: F401  (fixture)

PATCH, STRIDE = (16, 16, 16), (8, 8, 8)


@pytest.fixture(scope="module")
def model(tiny_cases, tmp_path_factory):  # noqa: F811
    lab, unl = tiny_cases
    cfg = TrainConfig(method="aua_bcl", lambda_c=0.1, **{**TINY, "iterations": 3})
    return train(cfg, lab, unl, tmp_path_factory.mktemp("batched"), device="cpu", progress=False)


def test_case_files_in_keeps_the_case_order(tmp_path):
    cases = ["a/results/preprocessed/demo/demo_007.h5", "b/demo_002.h5"]
    assert case_files_in(tmp_path, cases) == [tmp_path / "demo_007.h5", tmp_path / "demo_002.h5"]
    assert case_files_in("p", cases, ".nii.gz")[1].name == "demo_002.nii.gz"


def test_case_log_copies_the_case_lines_and_its_error(tmp_path):
    log = logging.getLogger("semiseg.test")
    with case_log(tmp_path, "c1"):
        log.info("working on c1")
    with pytest.raises(ValueError, match="bad voxel"), case_log(tmp_path, "c2"):
        log.info("working on c2")
        raise ValueError("case c2: bad voxel")
    log.info("after the cases")
    one, two = (tmp_path / "c1.log").read_text(encoding="utf-8"), (tmp_path / "c2.log").read_text(encoding="utf-8")
    assert "INFO working on c1" in one and "c2" not in one and "after" not in one
    assert "INFO working on c2" in two and "ERROR case c2: bad voxel" in two
    assert not logging.getLogger().handlers or all(
        getattr(h, "baseFilename", "").find(str(tmp_path)) < 0 for h in logging.getLogger().handlers
    ), "the per-case handler is removed"
    with case_log(None, "c3"):  # no folder: nothing written
        log.info("x")
    assert not (tmp_path / "c3.log").exists()


def test_predict_cases_equals_one_case_at_a_time(tiny_cases, model, tmp_path):  # noqa: F811
    lab, unl = tiny_cases
    cases = [*lab, *unl]
    summaries = predict_cases(model, cases, tmp_path / "pred", PATCH, STRIDE, weights="teacher", device="cpu",
                              nifti=False, log_dir=tmp_path / "logs")
    assert [s["case"] for s in summaries] == [c.stem for c in cases]
    for case in cases:
        predict_case(model, case, tmp_path / "one.h5", None, PATCH, STRIDE, weights="teacher", device="cpu")
        with h5py.File(tmp_path / "pred" / f"{case.stem}.h5", "r") as a, h5py.File(tmp_path / "one.h5", "r") as b:
            assert np.array_equal(a["label"][...], b["label"][...])
            assert dict(a.attrs) == dict(b.attrs)
        text = (tmp_path / "logs" / f"{case.stem}.log").read_text(encoding="utf-8")
        assert f"'case': '{case.stem}'" in text and "foreground_fraction" in text
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == sorted(f"{c.stem}.h5" for c in cases)


def test_predict_cases_writes_nifti_and_names_the_failing_case(model, tmp_path):
    from semiseg.preprocessing import PreprocessingParams, preprocess_case
    from tests.conftest import phantom, write_volume

    image, label, geom = phantom(shape=(40, 36, 16))
    img_p = write_volume(tmp_path / "img.nii.gz", image, geom)
    lab_p = write_volume(tmp_path / "lab.nii.gz", label, geom)
    good = tmp_path / "good.h5"
    preprocess_case("good", img_p, lab_p, good, PreprocessingParams(crop_margin=6))
    predict_cases(model, [good], tmp_path / "pred", PATCH, STRIDE, device="cpu")
    nii = sitk.ReadImage(str(tmp_path / "pred" / "good.nii.gz"))
    assert nii.GetSize() == sitk.ReadImage(str(img_p)).GetSize()
    # A case without raw-geometry attributes: an error naming its file, in its own log, and
    # no half-written prediction of it.
    bare = tmp_path / "bare.h5"
    shutil.copy(good, bare)
    with h5py.File(bare, "a") as f:
        del f.attrs["raw_size"]
    with pytest.raises(ValueError, match="bare.h5: no raw-geometry attributes"):
        predict_cases(model, [good, bare], tmp_path / "pred2", PATCH, STRIDE, device="cpu", log_dir=tmp_path / "logs")
    assert "ERROR" in (tmp_path / "logs" / "bare.log").read_text(encoding="utf-8")
    assert "ERROR" not in (tmp_path / "logs" / "good.log").read_text(encoding="utf-8")
    assert sorted(p.name for p in (tmp_path / "pred2").iterdir()) == ["good.h5", "good.nii.gz"]


def test_write_pseudo_labels_equals_one_case_at_a_time(tiny_cases, model, tmp_path):  # noqa: F811
    _, unl = tiny_cases
    summaries = write_pseudo_labels(unl, model, tmp_path / "labels", PATCH, STRIDE, device="cpu",
                                    label_filter="largest_component", log_dir=tmp_path / "logs")
    assert [s["case"] for s in summaries] == [c.stem for c in unl]
    for case in unl:
        write_pseudo_label(case, model, tmp_path / "one.h5", PATCH, STRIDE, device="cpu", label_filter="largest_component")
        with h5py.File(tmp_path / "labels" / f"{case.stem}.h5", "r") as a, h5py.File(tmp_path / "one.h5", "r") as b:
            for key in ("label", "probability"):
                assert np.array_equal(a[key][...], b[key][...])
            assert {k: str(v) for k, v in a.attrs.items()} == {k: str(v) for k, v in b.attrs.items()}
        assert "filtered_voxels" in (tmp_path / "logs" / f"{case.stem}.log").read_text(encoding="utf-8")
