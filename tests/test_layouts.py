"""Raw data layouts through the same Snakemake rules to HDF5: NIH Pancreas-CT (DICOM series in
nested folders, TCIA label NIfTI, permuted/flipped and ambiguous labels), MSD (imagesTr,
labelsTr, dataset.json, imagesTs as extra unlabelled images), LA 2018 NRRD (label 255), the
community's preprocessed HDF5 (synthetic, and the real LA cases in ../shared/data/la2018_h5).

One small Snakemake run (module fixture) writes every layout; each test checks one."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from semiseg.config import validate_config
from semiseg.data.synthetic import generate_case
from semiseg.errors import CaseError, ConfigError
from semiseg.inference import write_prediction_nifti
from semiseg.io.h5 import read_case
from semiseg.io.readers import Geometry
from semiseg.preprocessing import convert_community_case
from semiseg.preprocessing.resampling import block_majority
from tests.conftest import LA_H5, phantom, write_volume
from tests.test_orientation import squared_case, tcia_label
from tests.test_readers import write_dicom_series
from tests.test_workflow import job_counts, micro_config, smk, write_config

SEED = 20261125
CT = {"intensity_clip": [-125, 275], "target_spacing": [2.0, 2.0, 2.0], "crop_margin": 4}
TRAIN = {"iterations": 2, "base_filters": 2, "samples": 2, "rank": 2, "bcl_max_samples": 64, "projection_channels": 4,
         "checkpoint_every": 1, "num_workers": 0}


def block(raw: dict, **extra) -> dict:
    ds = {"modality": "CT", "classes": ["background", "target"], "raw": raw, "preprocessing": dict(CT),
          "patch_size": [32, 32, 16], "stride": [16, 16, 16], "split": {"test_count": 1},
          "splits": {"one": {"labelled_number": 1, "lambda_c": 0.01}}, "training": dict(TRAIN)}
    ds.update(extra)
    return ds


def write_pancreas(root: Path) -> dict:
    """TCIA layout: Pancreas-CT/PANCREAS_000N/<study>/<series>/*.dcm, labels in TCIA_pancreas_labels-02-05-2017/."""
    labels = root / "TCIA_pancreas_labels-02-05-2017"
    for n, (index, move) in enumerate([(0, False), (1, True)], start=1):
        image, label, geom = squared_case(index)
        write_dicom_series(root / "Pancreas-CT" / f"PANCREAS_{n:04d}" / f"11-24-2015-PANCREAS{n:04d}-{n}" / f"Pancreas-{n}",
                           image, geom, intercept=-1024.0)
        tcia_label(labels / f"label{n:04d}.nii.gz", label.transpose(1, 0, 2)[:, :, ::-1] if move else label, geom)
    image, label, geom = generate_case(SEED, 2)  # its own mirror image in x: the label fits either half
    image, label = np.concatenate([image, image[::-1]]), np.concatenate([label, np.zeros_like(label)])
    geom = Geometry(image.shape, geom.spacing, geom.origin, geom.direction)
    write_dicom_series(root / "Pancreas-CT" / "PANCREAS_0003" / "study" / "series", image, geom)
    tcia_label(labels / "label0003.nii.gz", label, geom)
    return block(
        {"dir": str(root), "image": "Pancreas-CT/{case}", "label": "TCIA_pancreas_labels-02-05-2017/label{case_digits}.nii.gz"},
        preprocessing={**CT, "label_orientation": "auto"},
    )


def write_msd(root: Path) -> dict:
    """MSD Task10_Colon layout, with imagesTs used as extra unlabelled images and a macOS '._' file."""
    training = []
    for i in range(3):
        image, label, geom = phantom(seed=i)
        write_volume(root / "imagesTr" / f"colon_{i + 1:03d}.nii.gz", image, geom)
        write_volume(root / "labelsTr" / f"colon_{i + 1:03d}.nii.gz", label, geom)
        training.append({"image": f"./imagesTr/colon_{i + 1:03d}.nii.gz", "label": f"./labelsTr/colon_{i + 1:03d}.nii.gz"})
    for i in (4, 6):
        image, _, geom = phantom(seed=i, shape=(44, 40, 18))
        write_volume(root / "imagesTs" / f"colon_{i:03d}.nii.gz", image, geom)
    (root / "imagesTr" / "._colon_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Colon", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "colon cancer primaries"},
        "numTraining": 3, "numTest": 2, "training": training, "test": ["./imagesTs/colon_004.nii.gz", "./imagesTs/colon_006.nii.gz"],
    }), encoding="utf-8")
    return block({"dir": str(root), "image": "imagesTr/{case}.nii.gz", "label": "labelsTr/{case}.nii.gz",
                  "unlabelled_image": "imagesTs/{case}.nii.gz"})


def write_la_nrrd(root: Path) -> dict:
    """LA 2018 layout: <ID>/lgemri.nrrd and <ID>/laendo.nrrd with the atrium as 255."""
    for i, case in enumerate(("0RZDK210BSMWAA6467LU",)):
        image, label, geom = phantom(seed=i, spacing=(0.625, 0.625, 0.625))
        write_volume(root / case / "lgemri.nrrd", (image + 1000).astype(np.uint16), geom)  # MR-like: no HU
        write_volume(root / case / "laendo.nrrd", (label * 255).astype(np.uint8), geom)
    return block(
        {"dir": str(root), "image": "{case}/lgemri.nrrd", "label": "{case}/laendo.nrrd"},
        modality="MR", label_map={"0": 0, "255": 1},
        preprocessing={"intensity_clip": None, "target_spacing": None, "crop_margin": [15, 15, 88]},
    )


def write_community(root: Path) -> dict:
    """Community HDF5 layout: <ID>/mri_norm2.h5 with datasets image (float32) and label (uint8)."""
    rng = np.random.default_rng(0)
    for case, shape in (("AAA1", (40, 36, 20)), ("BBB2", (38, 40, 22))):
        (root / case).mkdir(parents=True)
        label = np.zeros(shape, np.uint8)
        label[10:25, 8:20, 5:15] = 1
        image = (rng.normal(0, 1, shape) + 2 * label).astype(np.float32)
        with h5py.File(root / case / "mri_norm2.h5", "w") as f:
            f.create_dataset("image", data=image, compression="gzip")
            f.create_dataset("label", data=label, compression="gzip")
    return block({"dir": str(root), "image": "{case}/mri_norm2.h5", "format": "community_h5", "spacing": [0.625] * 3},
                 modality="MR", preprocessing={})


@pytest.fixture(scope="module")
def layout_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("layouts")
    raw = wd / "raw"
    cfg = micro_config()
    datasets = {
        "pancreas": write_pancreas(raw / "NIH"),
        "colon": write_msd(raw / "Task10_Colon"),
        "la": write_la_nrrd(raw / "LA2018"),
        "lah5": write_community(raw / "LA2018_h5"),
    }
    datasets["lah5lo"] = {**datasets["lah5"], "raw": {**datasets["lah5"]["raw"], "resample_to": [1.25, 1.25, 1.25]}}
    targets = [f"results/preprocessed/pancreas/PANCREAS_000{n}.h5" for n in (1, 2, 3)]
    targets += [f"results/preprocessed/{d}/summary.tsv" for d in ("colon", "la", "lah5", "lah5lo")]
    targets += [f"results/splits/{d}/one/split.json" for d in ("colon", "lah5")]
    if LA_H5.is_dir():  # the 4 test cases and the first 2 training cases of the shared lists (test time)
        test, train = (LA_H5 / "test.list").read_text(encoding="utf-8").split(), (LA_H5 / "train.list").read_text(encoding="utf-8").split()
        (wd / "la_test.list").write_text("\n".join(test) + "\n", encoding="utf-8")
        (wd / "la_train.list").write_text("\n".join(train[:2]) + "\n", encoding="utf-8")
        real = block({"dir": str(LA_H5), "image": "{case}/mri_norm2.h5", "format": "community_h5", "spacing": [0.625] * 3},
                     modality="MR", preprocessing={}, patch_size=[112, 112, 80], stride=[18, 18, 4],
                     cases=test + train[:2], split={"test_list": "la_test.list", "train_list": "la_train.list"},
                     splits={"1lab": {"labelled_number": 1, "lambda_c": 0.09}})
        datasets["lareal"] = real
        targets += ["results/preprocessed/lareal/summary.tsv", "results/splits/lareal/1lab/split.json"]
    cfg["datasets"] = datasets
    write_config(wd, cfg)
    res = smk(wd, "--cores", "2", "--keep-going", *targets)
    return wd, res


def test_pancreas_dicom_through_the_rules(layout_run):
    wd, res = layout_run
    out = wd / "results" / "preprocessed" / "pancreas"
    _, _, a1 = read_case(out / "PANCREAS_0001.h5")
    _, lab2, a2 = read_case(out / "PANCREAS_0002.h5")
    assert a1["label_orientation"] == "as stored" and a1["label_orientation_fixed"] is False
    assert a2["label_orientation"] == "label axes (y, x, z) as image (x, y, z), reversed along image z"
    assert a2["label_orientation_fixed"] is True and lab2.any()
    assert Path(a1["source_image"]).name == "PANCREAS_0001" and a1["preprocessing"]["label_orientation"] == "auto"
    logs = wd / "results" / "logs" / "preprocess" / "pancreas"
    assert "WARNING case PANCREAS_0002: " in (logs / "PANCREAS_0002.log").read_text(encoding="utf-8")
    assert "label axes re-oriented onto the image grid" in (logs / "PANCREAS_0002.log").read_text(encoding="utf-8")
    # The ambiguous case fails alone, with one line naming the case, the file and the problem.
    assert not (out / "PANCREAS_0003.h5").exists()
    log3 = (logs / "PANCREAS_0003.log").read_text(encoding="utf-8")
    assert "ERROR case PANCREAS_0003: " in log3 and "label0003.nii.gz: ambiguous label orientation" in log3
    assert "case PANCREAS_0003" in res.stderr


def test_dicom_intensities_are_hounsfield_units(layout_run):
    wd, _ = layout_run
    _, _, attrs = read_case(wd / "results" / "preprocessed" / "pancreas" / "PANCREAS_0001.h5")
    image, _, _ = squared_case(0)
    # z-score of the clipped HU: the stored mean and std are those of HU values, not of HU + 1024.
    assert -125 <= attrs["normalisation_mean"] <= 275 and attrs["normalisation_std"] < 200
    assert attrs["raw_size"] == list(image.shape)


def test_msd_with_imagests_as_extra_unlabelled(layout_run):
    wd, _ = layout_run
    out = wd / "results" / "preprocessed" / "colon"
    assert sorted(p.name for p in out.glob("*.h5")) == [f"colon_00{i}.h5" for i in (1, 2, 3, 4, 6)]
    for case in ("colon_004", "colon_006"):
        _, label, attrs = read_case(out / f"{case}.h5")
        assert label is None and attrs["preprocessing"]["crop_source"] == "body"
        assert "label_orientation" not in attrs  # no label to put on the grid
    _, label, attrs = read_case(out / "colon_001.h5")
    assert label is not None and attrs["preprocessing"]["crop_source"] == "label"
    rows = list(csv.DictReader((out / "summary.tsv").open(encoding="utf-8"), delimiter="\t"))
    assert len(rows) == 5 and {r["case"]: r["label_orientation"] for r in rows}["colon_001"] == "header"
    split = json.loads((wd / "results" / "splits" / "colon" / "one" / "split.json").read_text(encoding="utf-8"))
    assert split["extra_unlabelled"] == ["colon_004", "colon_006"] and split["unlabelled"][-2:] == ["colon_004", "colon_006"]
    assert not {"colon_004", "colon_006"} & set(split["test"] + split["labelled"])
    assert split["counts"] == {"test": 1, "labelled": 1, "unlabelled": 3, "extra_unlabelled": 2}


def test_la_nrrd_with_label_255(layout_run):
    wd, _ = layout_run
    out = wd / "results" / "preprocessed" / "la"
    _, label, geom = phantom(seed=0, spacing=(0.625, 0.625, 0.625))
    _, lab, attrs = read_case(out / "0RZDK210BSMWAA6467LU.h5")
    assert set(np.unique(lab)) == {0, 1}
    sl = tuple(slice(a, b) for a, b in zip(attrs["crop_start"], attrs["crop_stop"]))
    assert np.array_equal(lab, label[sl])  # the 255 mask, mapped to 1, on the same voxels
    assert attrs["spacing"] == [0.625] * 3 and attrs["crop_start"][2] == 0 and attrs["crop_stop"][2] == geom.size[2]
    assert attrs["preprocessing"]["label_map"] == {"0": 0, "255": 1}


def test_community_h5_converted_unchanged(layout_run, tmp_path):
    wd, _ = layout_run
    src = wd / "raw" / "LA2018_h5" / "AAA1" / "mri_norm2.h5"
    img, lab, attrs = read_case(wd / "results" / "preprocessed" / "lah5" / "AAA1.h5")
    with h5py.File(src, "r") as f:
        assert np.array_equal(img, f["image"][...]) and np.array_equal(lab, f["label"][...])
    assert attrs["spacing"] == [0.625] * 3 and attrs["crop_start"] == [0, 0, 0] and attrs["crop_stop"] == list(img.shape)
    assert attrs["preprocessing"]["format"] == "community_h5" and attrs["normalisation_mean"] is None
    write_prediction_nifti(lab, attrs, tmp_path / "pred.nii.gz")  # evaluation writes predictions on this grid
    pred = sitk.ReadImage(str(tmp_path / "pred.nii.gz"))
    assert pred.GetSize() == img.shape and np.allclose(pred.GetSpacing(), 0.625)
    assert np.array_equal(sitk.GetArrayFromImage(pred).transpose(2, 1, 0), lab)


def test_the_same_downstream_rules_run_on_converted_and_extra_cases(layout_run):
    wd, _ = layout_run
    res = smk(wd, "-n", "results/models/colon_one/seed1337/stage2_full/model.pt", "results/models/colon/seed1337/fully_supervised/model.pt",
              "results/models/lah5_one/seed1337/stage1_aua_bcl/model.pt")
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    counts = job_counts(out)
    assert counts["pseudo_labels"] == 1 and "preprocess_case" not in counts
    pseudo = out.split("rule pseudo_labels:", 1)[1].split("rule ", 1)[0]
    inputs = re.search(r"input: (.*)", pseudo)[1]
    assert inputs.count("results/preprocessed/colon/") == 3  # the extras get pseudo labels
    fully = out.split("rule train_fully_supervised:", 1)[1].split("rule ", 1)[0]
    assert "colon_001.h5" in fully and "colon_004" not in fully and "colon_006" not in fully  # no label: not used


def test_community_h5_resampled_by_the_rule(layout_run):
    """raw.resample_to through the preprocess_case rule: the same files at 1.25 mm (2 x 2 x 2 blocks)."""
    wd, _ = layout_run
    src = wd / "raw" / "LA2018_h5" / "AAA1" / "mri_norm2.h5"
    img, lab, attrs = read_case(wd / "results" / "preprocessed" / "lah5lo" / "AAA1.h5")
    with h5py.File(src, "r") as f:
        image, label = f["image"][...], f["label"][...]
    assert img.shape == lab.shape == (20, 18, 10) and attrs["spacing"] == [1.25] * 3 and attrs["raw_size"] == [40, 36, 20]
    assert np.allclose(img[3, 4, 5], image[6:8, 8:10, 10:12].mean()) and np.array_equal(lab, block_majority(label, (2, 2, 2), 2))
    # The label box x 10..24, y 8..19, z 5..14: blocks half inside along one axis are foreground (ties), a quarter not.
    assert lab.sum() == 6 * (7 * 4 + 1 * 4 + 7 * 2)
    assert attrs["preprocessing"]["resample_to"] == [1.25] * 3 and attrs["resampling"].startswith("image: 2x2x2 block mean")
    rows = list(csv.DictReader((wd / "results" / "preprocessed" / "lah5lo" / "summary.tsv").open(encoding="utf-8"), delimiter="\t"))
    assert {r["spacing_mm"] for r in rows} == {"1.25x1.25x1.25"} and {r["raw_spacing_mm"] for r in rows} == {"0.625x0.625x0.625"}


def test_resample_to_reruns_the_conversion_only(layout_run):
    """raw.resample_to is a param of preprocess_case: changing it reruns the conversion of that
    data set's cases (and so everything made from them), not its split nor other data sets."""
    wd, _ = layout_run
    before = (wd / "config.yaml").read_text(encoding="utf-8")
    cfg = yaml.safe_load(before)
    cfg["datasets"]["lah5"]["raw"]["resample_to"] = [1.25, 1.25, 1.25]
    write_config(wd, cfg)
    targets = ["results/preprocessed/lah5/summary.tsv", "results/splits/lah5/one/split.json",
               "results/preprocessed/la/summary.tsv"]
    try:
        res = smk(wd, "-n", *targets)
        assert res.returncode == 0, res.stderr
        out = res.stdout + res.stderr
        assert job_counts(out) == {"preprocess_case": 2, "preprocessing_summary": 1}
        assert "reason: Params have changed since last execution" in out and "output: results/preprocessed/la/" not in out
    finally:
        (wd / "config.yaml").write_text(before, encoding="utf-8")
    assert job_counts(smk(wd, "-n", *targets).stdout) == {}  # back as it was: nothing to do


def test_real_la_community_cases(layout_run):
    if not LA_H5.is_dir():
        pytest.skip(f"real LA cases not found at {LA_H5} (set SEMISEG_LA_H5 to their folder)")
    wd, _ = layout_run
    out = wd / "results" / "preprocessed" / "lareal"
    test = (LA_H5 / "test.list").read_text(encoding="utf-8").split()
    train = (LA_H5 / "train.list").read_text(encoding="utf-8").split()[:2]
    assert sorted(p.stem for p in out.glob("*.h5")) == sorted(test + train)
    for case in test + train:
        img, lab, attrs = read_case(out / f"{case}.h5")
        with h5py.File(LA_H5 / case / "mri_norm2.h5", "r") as f:
            assert np.array_equal(img, f["image"][...]) and np.array_equal(lab, f["label"][...])
        assert img.shape[2] == 88 and attrs["spacing"] == [0.625] * 3 and 0.02 < lab.mean() < 0.25
    split = json.loads((wd / "results" / "splits" / "lareal" / "1lab" / "split.json").read_text(encoding="utf-8"))
    assert split["test"] == test and split["labelled"] == train[:1] and split["unlabelled"] == train[1:]


def test_community_h5_bad_input(tmp_path):
    bad = tmp_path / "c1" / "mri_norm2.h5"
    bad.parent.mkdir()
    with h5py.File(bad, "w") as f:
        f.create_dataset("image", data=np.zeros((8, 8, 8), np.float32))
        f.create_dataset("label", data=np.full((8, 8, 8), 255, np.uint8))
    with pytest.raises(CaseError, match=r"^case c1: \S*mri_norm2.h5: label values \{255\} are not among"):
        convert_community_case("c1", bad, tmp_path / "o.h5", (0.625,) * 3)
    convert_community_case("c1", bad, tmp_path / "o.h5", (0.625,) * 3, label_map={0: 0, 255: 1})
    assert read_case(tmp_path / "o.h5")[1].max() == 1
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(CaseError, match="cannot read image"):
        convert_community_case("c1", bad, tmp_path / "o2.h5", (0.625,) * 3)
    assert not (tmp_path / "o2.h5").exists()


def test_community_format_needs_a_spacing():
    cfg = micro_config()
    cfg["datasets"]["x"] = block({"dir": "d", "image": "{case}/mri_norm2.h5", "format": "community_h5"})
    with pytest.raises(ConfigError, match="datasets.x.raw.spacing: None is not of type 'array'"):
        validate_config(cfg)


def test_clean_protocol_is_refused_for_community_files(tmp_path):
    cfg = micro_config()
    cfg["evaluation"]["protocol"] = "clean"
    cfg["datasets"] = {"lah5": write_community(tmp_path / "raw")}
    write_config(tmp_path, cfg)
    res = smk(tmp_path, "-n", "results/preprocessed/lah5/summary.tsv")
    assert res.returncode != 0
    assert "already cropped around the label, so evaluation.protocol 'clean' cannot apply" in res.stdout + res.stderr
