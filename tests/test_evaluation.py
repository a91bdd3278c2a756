"""Evaluation: test-case predictions, per-case metrics, the ablation table."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from semiseg.evaluation import (
    ABLATION_ROWS,
    ablation_table,
    case_metrics,
    predict_case,
    sweep_table,
)
from semiseg.metrics import segmentation_metrics
from semiseg.preprocessing import PreprocessingParams, preprocess_case
from semiseg.training.engine import TrainConfig, train
from tests.conftest import phantom, write_volume
from tests.test_training import TINY


@pytest.fixture(scope="module")
def case_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    image, label, geom = phantom(shape=(40, 36, 16))
    img_p = write_volume(root / "img.nii.gz", image, geom)
    lab_p = write_volume(root / "lab.nii.gz", label, geom)
    case = root / "case.h5"
    preprocess_case("case", img_p, lab_p, case, PreprocessingParams(crop_margin=6))
    model = train(TrainConfig(method="supervised", **{**TINY, "iterations": 2}), [case], [], root / "m", device="cpu", progress=False)
    return case, model, img_p


def test_predict_case_writes_both_geometries(case_and_model, tmp_path):
    import SimpleITK as sitk

    case, model, img_p = case_and_model
    predict_case(model, case, tmp_path / "p.h5", tmp_path / "p.nii.gz", (16, 16, 16), (8, 8, 8), device="cpu")
    with h5py.File(tmp_path / "p.h5", "r") as f, h5py.File(case, "r") as c:
        assert f["label"].shape == c["image"].shape and f["label"].dtype == np.uint8
    nii, raw = sitk.ReadImage(str(tmp_path / "p.nii.gz")), sitk.ReadImage(str(img_p))
    assert nii.GetSize() == raw.GetSize() and np.allclose(nii.GetOrigin(), raw.GetOrigin())
    # Teacher weights requested of a model without a teacher: its student is used.
    predict_case(model, case, tmp_path / "q.h5", None, (16, 16, 16), (8, 8, 8), weights="teacher", device="cpu")
    with h5py.File(tmp_path / "p.h5", "r") as a, h5py.File(tmp_path / "q.h5", "r") as b:
        assert np.array_equal(a["label"][...], b["label"][...])


def test_case_metrics_and_table(case_and_model, tmp_path):
    case, model, _ = case_and_model
    predict_case(model, case, tmp_path / "p.h5", None, (16, 16, 16), (8, 8, 8), device="cpu")
    with h5py.File(case, "r") as c:
        gt = c["label"][...]
    # A perfect "prediction" and the model's, as two cases.
    with h5py.File(tmp_path / "gt.h5", "w") as f:
        f.create_dataset("label", data=gt)
    table = case_metrics([tmp_path / "gt.h5", tmp_path / "p.h5"], [case, case], out_path=tmp_path / "m.csv")
    assert table["dice"][0] == 1.0 and table["asd"][0] == 0.0
    with h5py.File(tmp_path / "p.h5", "r") as f:
        expected = segmentation_metrics(f["label"][...], gt)
    assert table["dice"][1] == pytest.approx(expected["dice"]) and table["hd95"][1] == pytest.approx(expected["hd95"])
    mm = case_metrics([tmp_path / "gt.h5"], [case], unit="mm")
    assert mm["dice"][0] == 1.0
    table.assign(case=["gt", "model"]).to_csv(tmp_path / "m2.csv", index=False)  # one case twice: named apart
    files = {k: {0: tmp_path / "m2.csv"} for k in ABLATION_ROWS}  # one seed per row
    counts = {k: (2, 30) for k in ABLATION_ROWS}
    out = ablation_table(files, counts, "voxel", tmp_path / "t.csv", tmp_path / "t.md")
    assert list(out["Method"]) == list(ABLATION_ROWS.values())
    assert list(out.columns) == ["Method", "Labeled", "Unlabeled", "Dice[%]", "Jaccard[%]", "ASD[voxel]", "95HD[voxel]",
                                 "Test cases", "Empty predictions", "Seeds", "p (Wilcoxon vs full)"]
    d = table["dice"] * 100
    assert out["Dice[%]"][0] == f"{d.mean():.2f} ± {d.std(ddof=0):.2f}"
    assert out["Seeds"].tolist() == [1] * 6
    # one seed, 2 test cases: too few pairs for a p-value; the reference row shows a dash
    assert out["p (Wilcoxon vs full)"].tolist() == ["n/a (n<6)"] * 4 + ["—", "n/a (n<6)"]
    assert pd.read_csv(tmp_path / "t.csv").shape == (6, 11)
    md = (tmp_path / "t.md").read_text(encoding="utf-8").split("\n\n")
    assert md[0] == "± is the standard deviation over the test cases (one seed)."
    assert md[1].startswith("p: two-sided Wilcoxon signed-rank test")
    lines = md[2].splitlines()
    assert lines[0].startswith("| Method | Labeled |") and len(lines) == 2 + 6


def _metrics_csv(path, dice):
    pd.DataFrame({"case": [f"c{i}" for i in range(len(dice))], "empty_pred": [d == 0 for d in dice], "empty_ref": False,
                  "dice": dice, "jaccard": [d / (2 - d) for d in dice], "asd": 1.0, "hd95": 3.0}).to_csv(path, index=False)
    return path


def test_sweep_table_rows_in_order_with_protocol_note(tmp_path):
    files = [_metrics_csv(tmp_path / f"m{i}.csv", d) for i, d in enumerate(([0.5, 0.7], [0.8, 0.0]))]
    evaluation = {"protocol": "clean", "unit": "mm"}
    seeded = [{0: f} for f in files]
    out = sweep_table("unlabelled", [12, 48], seeded, [(12, 12), (12, 48)], "mm", tmp_path / "s.csv", tmp_path / "s.md", evaluation)
    assert list(out.columns) == ["#Unlabeled", "Labeled", "Unlabeled", "Dice[%]", "Jaccard[%]", "ASD[mm]", "95HD[mm]",
                                 "Test cases", "Empty predictions", "Seeds", "Protocol"]
    assert list(out["#Unlabeled"]) == [12, 48] and list(out["Unlabeled"]) == [12, 48]
    assert out["Dice[%]"][0] == "60.00 ± 10.00" and out["Empty predictions"].tolist() == [0, 1]
    md = (tmp_path / "s.md").read_text(encoding="utf-8")
    assert md.startswith("Evaluation protocol: **clean** (no test label used before inference). Settings: unit = mm.\n\n"
                         "± is the standard deviation over the test cases (one seed).\n\n| #Unlabeled |")
    with pytest.raises(ValueError, match="unknown sweep"):
        sweep_table("lr", [1], seeded[:1], [(1, 1)])
    with pytest.raises(ValueError, match="2 values, 1 metric files"):
        sweep_table("lambda_c", [0.1, 0.2], seeded[:1], [(1, 1)])
    with pytest.raises(TypeError, match="expected {seed: per-case metrics CSV}"):
        sweep_table("unlabelled", [12], files[:1], [(12, 12)])
