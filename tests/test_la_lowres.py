"""The reduced-resolution LA data set (`la_lowres`): resampling of the community's HDF5 cases
(raw.resample_to), its config block, the benchmark that calls it, and a dry run of its table
on the real cases in ../shared/data/la2018_h5."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from semiseg.config import validate_config
from semiseg.errors import CaseError, ConfigError
from semiseg.inference import to_raw_geometry
from semiseg.io.h5 import read_case
from semiseg.preprocessing import convert_community_case
from semiseg.preprocessing.resampling import (
    block_majority,
    block_mean,
    edge_aligned_grid,
    integer_factors,
    resample_arrays,
)
from semiseg.splits import split_from_config
from tests.test_workflow import job_counts, micro_config, smk, write_config

REPO = Path(__file__).resolve().parents[1]
LA = (0.625, 0.625, 0.625)
HALF = (1.25, 1.25, 1.25)


def repo_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))


def write_h5(path: Path, image: np.ndarray, label: np.ndarray | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        if label is not None:
            f.create_dataset("label", data=label)
    return path


# ---- the resampling functions ------------------------------------------------------------


def test_block_mean_is_exact_area_averaging():
    image = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)  # x odd: its last voxel is left out
    out = block_mean(image, (2, 2, 1))
    assert out.shape == (2, 2, 3) and out.dtype == np.float32
    for i, j, k in np.ndindex(out.shape):
        assert out[i, j, k] == image[2 * i : 2 * i + 2, 2 * j : 2 * j + 2, k].mean()
    assert out[0, 0, 0] == (0 + 3 + 12 + 15) / 4  # (x, y, z) order: y steps by 3, x by 12
    assert block_mean(np.full((4, 4, 4), 0.1, np.float32), (2, 2, 2)).tolist() == np.full((2, 2, 2), np.float32(0.1)).tolist()


def test_block_majority_ties_go_to_the_higher_class():
    label = np.zeros((4, 2, 2), np.uint8)
    label[0, :, :] = 1          # block 0: 4 of 8 foreground -> a tie -> foreground
    label[2, 0, 0] = 1          # block 1: 1 of 8 -> background
    out = block_majority(label, (2, 2, 2), num_classes=2)
    assert out.tolist() == [[[1]], [[0]]]
    three = np.array([0, 0, 1, 2, 2, 2, 1, 1, 2, 0, 0, 0], np.uint8).reshape(12, 1, 1)
    # blocks of 3 along x: {0,0,1} -> 0, {2,2,2} -> 2, {1,1,2} -> 1, {0,0,0} -> 0
    assert block_majority(three, (3, 1, 1), num_classes=3).ravel().tolist() == [0, 2, 1, 0]
    tie = np.array([0, 1, 2, 2, 1, 0], np.uint8).reshape(6, 1, 1)  # {0, 1}: tie -> 1; {2, 2}: 2; {1, 0}: 1
    assert block_majority(tie, (2, 1, 1), num_classes=3).ravel().tolist() == [1, 2, 1]


def test_grid_and_factors():
    assert integer_factors(LA, HALF) == (2, 2, 2) and integer_factors((0.8, 0.8, 2.5), (1.6, 0.8, 2.5)) == (2, 1, 1)
    assert integer_factors(LA, (1.0, 1.0, 1.0)) is None and integer_factors(HALF, LA) is None  # upsampling: no blocks
    assert edge_aligned_grid((175, 132, 88), LA, HALF) == ((87, 66, 44), (0.3125, 0.3125, 0.3125))
    assert edge_aligned_grid((175, 132, 88), LA, (1.0, 1.0, 1.0)) == ((109, 82, 55), (0.1875, 0.1875, 0.1875))


def test_integer_factor_gives_block_values_and_half_voxel_origin():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(8, 6, 4)).astype(np.float32)
    label = (rng.random((8, 6, 4)) > 0.5).astype(np.uint8)
    res = resample_arrays(image, label, LA, HALF, num_classes=2)
    assert np.array_equal(res.image, block_mean(image, (2, 2, 2)))
    assert np.array_equal(res.label, block_majority(label, (2, 2, 2), 2))
    # new voxel 0 is the block of old voxels 0 and 1 on each axis: its centre is half an old voxel on
    assert res.spacing == HALF and res.origin == (0.3125, 0.3125, 0.3125)
    assert "2x2x2 block mean" in res.method and "block majority" in res.method


def test_non_integer_factor_is_linear_and_nearest():
    """A linear ramp is reproduced exactly by linear interpolation at the new voxel centres."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in (16, 10, 8)), indexing="ij")
    ramp = (2.0 * x + 3.0 * y - z).astype(np.float32)  # value at old index (x, y, z)
    label = (x >= 8).astype(np.uint8)
    res = resample_arrays(ramp, label, LA, (1.0, 1.0, 1.0), num_classes=2)
    assert res.image.shape == (10, 6, 5) and res.origin == (0.1875, 0.1875, 0.1875)
    nx, ny, nz = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in res.image.shape), indexing="ij")
    old = [(o + i * 1.0) / 0.625 for o, i in zip(res.origin, (nx, ny, nz), strict=True)]  # continuous old index
    np.testing.assert_allclose(res.image, 2.0 * old[0] + 3.0 * old[1] - old[2], atol=1e-4)
    assert np.array_equal(res.label, (np.rint(old[0]) >= 8).astype(np.uint8))  # nearest neighbour: values kept
    assert res.method == "image: linear interpolation; label: nearest neighbour"


# ---- conversion of a case ------------------------------------------------------------------


def test_convert_with_resample_to_writes_the_new_grid(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(21, 18, 12)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[4:14, 6:12, 2:10] = 1
    src = write_h5(tmp_path / "c1" / "mri_norm2.h5", image, label)
    summary = convert_community_case("c1", src, tmp_path / "c1.h5", LA, ("bg", "la"), resample_to=HALF)
    img, lab, attrs = read_case(tmp_path / "c1.h5")
    assert img.shape == lab.shape == (10, 9, 6) and summary["shape"] == (10, 9, 6) and summary["spacing"] == HALF
    assert np.array_equal(img, block_mean(image, (2, 2, 2))) and np.array_equal(lab, block_majority(label, (2, 2, 2), 2))
    assert attrs["spacing"] == list(HALF) and attrs["origin"] == [0.3125] * 3 and attrs["shape"] == [10, 9, 6]
    assert attrs["raw_size"] == [21, 18, 12] and attrs["raw_spacing"] == list(LA) and attrs["raw_origin"] == [0.0] * 3
    assert attrs["crop_start"] == [0, 0, 0] and attrs["crop_stop"] == [10, 9, 6] and attrs["resampled_size"] == [10, 9, 6]
    assert attrs["preprocessing"]["resample_to"] == list(HALF) and "block mean" in attrs["resampling"]
    # Predictions go back onto the community file's grid, on the same voxels (the box has even edges).
    back = sitk.GetArrayFromImage(to_raw_geometry(lab, attrs)).transpose(2, 1, 0)
    assert back.shape == image.shape and np.array_equal(back, label)
    convert_community_case("c1", src, tmp_path / "same.h5", LA, ("bg", "la"))  # resample_to None: as stored
    img0, _, attrs0 = read_case(tmp_path / "same.h5")
    assert np.array_equal(img0, image) and attrs0["resampling"] == "none (as stored)"
    assert attrs0["preprocessing"]["resample_to"] is None


def test_resampling_errors_name_the_case_and_file(tmp_path):
    label = np.zeros((8, 8, 4), np.uint8)
    label[2, 2, 1] = 1  # one voxel: 1 of a 2x2x2 block
    src = write_h5(tmp_path / "c2" / "mri_norm2.h5", np.zeros((8, 8, 4), np.float32), label)
    with pytest.raises(CaseError, match=r"^case c2: \S*c2/mri_norm2\.h5: label foreground vanishes when resampled to "
                                        r"\[1\.25, 1\.25, 1\.25\] mm \(raw\.resample_to\)$"):
        convert_community_case("c2", src, tmp_path / "o.h5", LA, resample_to=HALF)
    with pytest.raises(CaseError, match=r"^case c2: \S*mri_norm2\.h5: cannot resample to \[2\.5, 2\.5, 2\.5\] mm "
                                        r"\(raw\.resample_to\): resampling \(8, 8, 4\) voxels .*\(fewer than 2 on an axis\)$"):
        convert_community_case("c2", src, tmp_path / "o.h5", LA, resample_to=(2.5, 2.5, 2.5))
    assert not (tmp_path / "o.h5").exists()


def test_real_la_cases_at_half_resolution(la_h5_dir, tmp_path):
    """Two real cases to 1.25 mm: half the shape per axis, the new spacing, labels {0, 1} and
    the foreground volume (mm^3) within 5 % of the original's (ties go to the foreground:
    +2.5 to +3.4 % on 10 cases measured)."""
    cases = (la_h5_dir / "train.list").read_text(encoding="utf-8").split()[:1] + \
        (la_h5_dir / "test.list").read_text(encoding="utf-8").split()[:1]
    for case in cases:
        src = la_h5_dir / case / "mri_norm2.h5"
        with h5py.File(src, "r") as f:
            image, label = f["image"][...], f["label"][...]
        convert_community_case(case, src, tmp_path / f"{case}.h5", LA, ("background", "left_atrium"), resample_to=HALF)
        img, lab, attrs = read_case(tmp_path / f"{case}.h5")
        assert img.shape == lab.shape == tuple(n // 2 for n in image.shape) and img.shape[2] == 44
        assert attrs["spacing"] == [1.25] * 3 and attrs["raw_spacing"] == [0.625] * 3 and attrs["raw_size"] == list(image.shape)
        assert set(np.unique(lab).tolist()) == {0, 1} and img.dtype == np.float32
        ratio = lab.sum() * 1.25**3 / (label.sum() * 0.625**3)
        assert 0.95 < ratio < 1.05, (case, ratio)
        kept = image[tuple(slice(0, 2 * n) for n in img.shape)]
        assert abs(float(img.mean(dtype=np.float64)) - float(kept.mean(dtype=np.float64))) < 1e-5  # area averaging


# ---- configuration ------------------------------------------------------------------------


def test_la_lowres_block_scales_the_papers_la_setting():
    cfg = validate_config(repo_config())
    lo, h5 = cfg["datasets"]["la_lowres"], cfg["datasets"]["la_h5"]
    same = {k: v for k, v in lo["raw"].items() if k != "resample_to"}
    assert same == {k: v for k, v in h5["raw"].items() if k != "resample_to"} and h5["raw"]["resample_to"] is None
    assert lo["raw"]["resample_to"] == [1.25] * 3 and lo["split"] == h5["split"]
    # The patch covers the paper's 112 x 112 x 80 voxels of 0.625 mm (70 x 70 x 50 mm) with the
    # smallest multiples of 16; the stride is the paper's 18 x 18 x 4 in mm.
    paper_mm = np.array(h5["patch_size"]) * 0.625
    assert np.all(np.array(lo["patch_size"]) * 1.25 >= paper_mm) and np.all((np.array(lo["patch_size"]) - 16) * 1.25 < paper_mm)
    assert np.array_equal(np.array(lo["stride"]) * 1.25, np.array(h5["stride"]) * 0.625)
    merged = {**cfg["training"], **lo["training"]}
    assert merged["base_filters"] == 8 and merged["iterations"] == cfg["training"]["iterations"]
    counts = {}
    for name, s in lo["splits"].items():
        split = split_from_config([*Path(REPO / h5["split"]["train_list"]).read_text().split(),
                                   *Path(REPO / h5["split"]["test_list"]).read_text().split()], lo["split"], s, base=REPO)
        counts[name] = (len(split.labelled), len(split.unlabelled), len(split.test), s["lambda_c"])
    assert counts == {"10pct": (8, 72, 20, 0.09), "20pct": (16, 64, 20, 0.09)}
    assert lo["splits"]["20pct"]["lambda_c"] == h5["splits"]["20pct"]["lambda_c"]


def test_resample_to_is_for_community_files_only():
    cfg = micro_config()
    cfg["datasets"]["demo"]["raw"]["resample_to"] = [2.0, 2.0, 2.0]
    with pytest.raises(ConfigError, match=r"datasets\.demo\.raw\.resample_to: \[2\.0, 2\.0, 2\.0\] is not of type 'null'"):
        validate_config(cfg)
    cfg = repo_config()
    cfg["datasets"]["la_lowres"]["raw"]["resample_to"] = [1.25, 0, 1.25]
    with pytest.raises(ConfigError, match=r"datasets\.la_lowres\.raw\.resample_to"):
        validate_config(cfg)


def test_benchmark_runs_la_lowres(la_h5_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_la_cpu", REPO / "benchmarks" / "bench_la_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.write_config(tmp_path, la_h5_dir, 300, 8, 8, [1337])[0] == "10pct"
    cfg = validate_config(yaml.safe_load((tmp_path / "config.yaml").read_text(encoding="utf-8")))
    ds = cfg["datasets"]["la_lowres"]
    assert list(cfg["datasets"]) == ["la_lowres"] and ds["raw"]["resample_to"] == [1.25] * 3
    assert ds["raw"]["dir"] == str(la_h5_dir.resolve()) and list(ds["splits"]) == ["10pct"]
    assert ds["splits"]["10pct"]["labelled_percent"] == 10 and ds["splits"]["10pct"]["lambda_c"] == 0.09
    assert ds["patch_size"] == [64, 64, 48] and ds["training"]["iterations"] == 300 and ds["training"]["lr_step"] == 240
    assert ds["seeds"] == [1337]
    assert bench.write_config(tmp_path, la_h5_dir, 300, 4, 8, [1, 2])[0] == "4lab"
    assert yaml.safe_load((tmp_path / "config.yaml").read_text(encoding="utf-8"))["datasets"]["la_lowres"]["splits"] == {
        "4lab": {"labelled_number": 4, "lambda_c": 0.09}}


def test_dry_run_of_the_la_lowres_table(la_h5_dir, tmp_path):
    """The README's command on the shared folder (80 training, 4 test cases): the 10 % table plans
    with every case converted at 1.25 mm, 8 labelled and 72 unlabelled, for each of the 3 seeds."""
    write_config(tmp_path, repo_config())
    lists = f"test_list: {la_h5_dir / 'test.list'}, train_list: {la_h5_dir / 'train.list'}"
    res = smk(tmp_path, "-n", "results/tables/la_lowres_10pct.csv", "--config",
              f"datasets={{la_lowres: {{raw: {{dir: {la_h5_dir}}}, split: {{{lists}}}}}}}")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    # Every run once per seed (real data sets: three); conversion and split once.
    assert job_counts(out) == {"preprocess_case": 84, "make_split": 1, "train_stage1": 3 * 3, "train_fully_supervised": 3,
                               "pseudo_labels": 3, "prototypes": 3, "train_stage2": 2 * 3, "predict": 6 * 3,
                               "case_metrics": 6 * 3, "ablation_table": 1}
    first = (la_h5_dir / "train.list").read_text(encoding="utf-8").split()[0]
    assert f"input: {la_h5_dir / first / 'mri_norm2.h5'}\n    output: results/preprocessed/la_lowres/{first}.h5" in out
