"""The ``semiseg`` command: predict new scans with a workflow-trained model file, inspect
it, evaluate two folders of label maps, re-export a model file of the older format."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from tests.test_workflow import micro_config, smk, write_config

MODEL = "results/models/demo_5pct/seed1337/stage2_full/model.pt"


def semiseg(*args: str) -> subprocess.CompletedProcess:
    """Run the installed console script (``[project.scripts]``), as a user would."""
    exe = Path(sys.executable).with_name("semiseg")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "semiseg.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, encoding="utf-8", errors="replace", timeout=600)


def test_console_script_is_installed():
    assert Path(sys.executable).with_name("semiseg").exists(), "pip install -e . installs the 'semiseg' command"


def rotated_anisotropic(image: sitk.Image, degrees: float = 20.0, spacing=(1.3, 0.9, 2.2)) -> sitk.Image:
    """The scan on a grid rotated by ``degrees`` about its z axis, with another voxel size, covering it."""
    size = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    a = math.radians(degrees)
    rot = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    extent = np.abs(rot) @ size  # the rotated grid's extent that covers the scan
    new_size = [int(math.ceil(e / s)) for e, s in zip(extent, spacing, strict=True)]
    ref = sitk.Image(new_size, image.GetPixelID())
    ref.SetSpacing(spacing)
    direction = rot @ np.asarray(image.GetDirection()).reshape(3, 3)
    ref.SetDirection(direction.ravel().tolist())
    half = (np.asarray(new_size) - 1) / 2 * np.asarray(spacing)
    ref.SetOrigin((centre - direction @ half).tolist())
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, -1000.0)


def same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.fixture(scope="module")
def clean_run(micro_run, tmp_path_factory):
    """A copy of the micro run whose test case is predicted under the clean protocol
    (cropped by its body mask, no label), as ``semiseg predict --crop body`` crops a new scan."""
    wd = tmp_path_factory.mktemp("clean") / "run"
    shutil.copytree(micro_run, wd, symlinks=True)
    cfg = micro_config()
    cfg["evaluation"]["protocol"] = "clean"
    write_config(wd, cfg)
    (case,) = (wd / "results/splits/demo/5pct/test.txt").read_text(encoding="utf-8").split()
    res = smk(wd, "--cores", "1", "results/predictions/demo_5pct/seed1337/full")  # the model's prediction folder
    assert res.returncode == 0, res.stderr[-3000:]
    return wd, case


def test_predict_new_scans_in_their_own_geometry(clean_run, tmp_path):
    wd, case = clean_run
    raw = sitk.ReadImage(str(wd / f"results/raw/demo/imagesTr/{case}.nii.gz"))
    scans = tmp_path / "scans"
    scans.mkdir()
    sitk.WriteImage(raw, str(scans / f"{case}.nii.gz"))
    sitk.WriteImage(rotated_anisotropic(raw), str(scans / "rotated.nii.gz"))
    rotated = sitk.ReadImage(str(scans / "rotated.nii.gz"))  # as stored (NIfTI keeps float32 geometry)
    assert not np.allclose(rotated.GetDirection(), raw.GetDirection(), atol=0.1)
    (scans / "broken.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    res = semiseg("predict", "-m", str(wd / MODEL), "-i", str(scans), "-o", str(out), "--crop", "body", "--probabilities")
    # The bad scan: one line naming it, the others written, exit status 1.
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("semiseg: error:")]
    assert len(errors) == 1 and "case broken:" in errors[0] and "broken.nii.gz" in errors[0], res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{case}.nii.gz", f"{case}_prob_pancreas.nii.gz", "rotated.nii.gz", "rotated_prob_pancreas.nii.gz"])

    # Each output has its scan's geometry.
    pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
    same_geometry(pred, raw)
    assert pred.GetPixelID() == sitk.sitkUInt8
    pred_rot = sitk.ReadImage(str(out / "rotated.nii.gz"))
    same_geometry(pred_rot, rotated)
    prob = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_prob_pancreas.nii.gz")))
    assert prob.min() >= 0 and prob.max() <= 1

    # The scan the workflow predicted: the same label map as the workflow's.
    ours = sitk.GetArrayFromImage(pred)
    workflow = sitk.GetArrayFromImage(sitk.ReadImage(str(wd / f"results/predictions/demo_5pct/seed1337/full/{case}.nii.gz")))
    assert ours.shape == workflow.shape
    assert np.mean(ours == workflow) > 0.9999, np.mean(ours == workflow)

    # The rotated scan's prediction, put back on the original grid, overlays on the original's.
    back = sitk.GetArrayFromImage(sitk.Resample(pred_rot, raw, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    if ours.any() or back.any():
        dice = 2 * np.count_nonzero(ours & back) / (np.count_nonzero(ours) + np.count_nonzero(back))
        assert dice > 0.5, dice


def test_predict_refuses_a_label_cropped_model_without_a_crop(micro_run, tmp_path):
    raw = next((micro_run / "results/raw/demo/imagesTr").glob("*.nii.gz"))
    res = semiseg("predict", "-m", str(micro_run / MODEL), "-i", str(raw), "-o", str(tmp_path / "out"), "-q")
    assert res.returncode == 1 and not (tmp_path / "out").exists()
    (line,) = res.stderr.strip().splitlines()
    assert "crop_source 'label'" in line and "--crop body" in line and "crop_source: body" in line


def test_info_describes_the_model(micro_run):
    res = semiseg("info", str(micro_run / MODEL))
    assert res.returncode == 0, res.stderr
    for text in ("method:      full (stage 2)", "format:      semiseg-model-2", "classes:     0 = background, 1 = pancreas",
                 "patch:       32 x 32 x 16 voxels", "stride:      16 x 16 x 16 voxels", "crop_source: label",
                 "target_spacing: 2 x 2 x 2", "iterations:  2", "seed:        1337", "data set:    demo"):
        assert text in res.stdout, text
    info = json.loads(semiseg("info", "--json", str(micro_run / MODEL)).stdout)
    assert info["deployment"]["dataset_config"]["patch_size"] == [32, 32, 16]
    assert info["training"]["lambda_r"] > 0


def test_evaluate_equals_the_workflow_metrics(micro_run, tmp_path):
    preds = micro_run / "results/predictions/demo_5pct/seed1337/full"
    out = tmp_path / "metrics.csv"
    res = semiseg("evaluate", "-p", str(preds), "-r", str(micro_run / "results/preprocessed/demo"), "--ext", ".h5",
                  "--unit", "voxel", "--empty-policy", "worst", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "3 reference(s) without a prediction were not scored" in res.stdout
    ours = pd.read_csv(out)
    workflow = pd.read_csv(micro_run / "results/metrics/demo_5pct/seed1337/full.csv")
    assert list(ours["case"]) == list(workflow["case"])
    for col in ("dice", "jaccard", "asd", "hd95", "empty_pred"):
        assert np.allclose(ours[col].astype(float), workflow[col].astype(float), equal_nan=True), col
    # Both file types of a case in one folder: ask for one.
    res = semiseg("evaluate", "-p", str(preds), "-r", str(preds), "-o", str(tmp_path / "x.csv"))
    assert res.returncode == 1 and "--ext" in res.stderr


def test_evaluate_nifti_in_mm_and_a_grid_mismatch(tmp_path):
    ref = np.zeros((20, 18, 10), np.uint8)
    ref[5:12, 4:10, 3:7] = 1
    pred = np.roll(ref, 1, axis=0)
    for folder, arr in (("ref", ref), ("pred", pred)):
        img = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
        img.SetSpacing((0.5, 0.5, 2.0))
        (tmp_path / folder).mkdir()
        sitk.WriteImage(img, str(tmp_path / folder / "c1.nii.gz"))
    res = semiseg("evaluate", "-p", str(tmp_path / "pred"), "-r", str(tmp_path / "ref"), "-o", str(tmp_path / "m.csv"))
    assert res.returncode == 0, res.stderr
    row = pd.read_csv(tmp_path / "m.csv").iloc[0]
    from semiseg.metrics import segmentation_metrics

    expected = segmentation_metrics(pred, ref, spacing=(0.5, 0.5, 2.0))
    assert row["dice"] == pytest.approx(expected["dice"]) and row["hd95"] == pytest.approx(expected["hd95"])
    img = sitk.ReadImage(str(tmp_path / "pred" / "c1.nii.gz"))
    img.SetOrigin((3.0, 0.0, 0.0))
    sitk.WriteImage(img, str(tmp_path / "pred" / "c1.nii.gz"))
    res = semiseg("evaluate", "-p", str(tmp_path / "pred"), "-r", str(tmp_path / "ref"), "-o", str(tmp_path / "m2.csv"))
    assert res.returncode == 1 and "origin" in res.stderr and "c1.nii.gz" in res.stderr
    assert not (tmp_path / "m2.csv").exists()


def test_an_older_model_file_says_how_to_re_export(micro_run, tmp_path):
    blob = torch.load(micro_run / MODEL, weights_only=True)
    old = {k: v for k, v in blob.items() if k != "deployment"}
    old["format"] = "semiseg-model-1"
    torch.save(old, tmp_path / "old.pt")
    raw = next((micro_run / "results/raw/demo/imagesTr").glob("*.nii.gz"))
    res = semiseg("predict", "-m", str(tmp_path / "old.pt"), "-i", str(raw), "-o", str(tmp_path / "out"), "--crop", "body")
    assert res.returncode == 1 and "semiseg export-model" in res.stderr and "older format" in res.stderr
    case = sorted((micro_run / "results/preprocessed/demo").glob("*.h5"))[0]
    res = semiseg("export-model", str(tmp_path / "old.pt"), "--case", str(case), "--stride", "16", "16", "16",
                  "--dataset", "demo", "-o", str(tmp_path / "new.pt"))
    assert res.returncode == 0, res.stderr
    from semiseg.models import read_model_info

    new, current = read_model_info(tmp_path / "new.pt"), read_model_info(micro_run / MODEL)
    assert new.format == "semiseg-model-2"
    assert new.deployment["preprocessing"] == current.deployment["preprocessing"]
    assert new.deployment["patch_size"] == current.deployment["patch_size"]


def test_the_prediction_path_imports_neither_training_nor_pseudo():
    code = ("import sys, semiseg.cli, semiseg.predict, semiseg.inference, semiseg.evaluation; "
            "bad = [m for m in ('semiseg.training', 'semiseg.training.engine', 'semiseg.pseudo') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
