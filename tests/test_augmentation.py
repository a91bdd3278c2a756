"""Training-crop augmentation (MSD Colon: random rotation and flip): pure transforms, the same
transform on image / label / pseudo label, determinism, and the per-data-set defaults."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from semiseg.config import validate_config
from semiseg.io.h5 import write_case
from semiseg.training.data import (
    Augmentation,
    AxialTransform,
    CaseFiles,
    PatchBatches,
    apply_axial_transform,
    draw_axial_transform,
    source_patch_size,
)
from semiseg.training.engine import TrainConfig

REPO = Path(__file__).resolve().parents[1]
BOTH = Augmentation(rotate=True, flip=True)


def test_transform_is_flips_then_rot90_in_the_axial_plane():
    a = np.arange(3 * 4 * 2).reshape(3, 4, 2)
    t = AxialTransform(quarter_turns=1, flip_x=True, flip_y=False)
    out = apply_axial_transform(a, t)
    assert np.array_equal(out, np.rot90(a[::-1], 1, axes=(0, 1))) and out.shape == (4, 3, 2)
    assert out.flags["C_CONTIGUOUS"] and sorted(out.ravel()) == sorted(a.ravel())  # values only moved
    assert np.array_equal(apply_axial_transform(a, AxialTransform()), a)
    assert np.array_equal(apply_axial_transform(a, AxialTransform(2, True, True)), a)  # 180 deg = both flips
    assert source_patch_size((8, 12, 4), t) == (12, 8, 4) and source_patch_size((8, 12, 4), AxialTransform(2)) == (8, 12, 4)


def test_off_draws_nothing_and_both_draw_the_8_axial_symmetries_uniformly():
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert draw_axial_transform(Augmentation(), rng) == AxialTransform()
    assert rng.bit_generator.state == state
    square = np.arange(9).reshape(3, 3, 1)
    seen = Counter(apply_axial_transform(square, draw_axial_transform(BOTH, rng)).tobytes() for _ in range(8000))
    assert len(seen) == 8 and square.tobytes() in seen  # the unrotated, unflipped crop too
    assert all(0.11 < n / 8000 < 0.14 for n in seen.values())
    flips_only = Counter(apply_axial_transform(square, draw_axial_transform(Augmentation(flip=True), rng)).tobytes() for _ in range(400))
    assert len(flips_only) == 4


@pytest.fixture
def coded_cases(tmp_path) -> tuple[list[Path], list[Path], list[Path]]:
    """Cases whose label is a function of the image (label = image > 5), plus pseudo-label files."""
    rng = np.random.default_rng(0)
    lab, unl, pseudo = [], [], []
    for i, shape in enumerate([(20, 18, 12), (18, 22, 10), (9, 10, 6)]):  # the last one smaller than the patch
        x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
        image = (0.3 * x + 0.1 * y + 0.05 * z) % 4 + rng.uniform(0, 0.5, shape).astype(np.float32)
        mask = (x + 2 * y) % 7 < 3  # an asymmetric pattern
        image[mask] += 6
        label = (image > 5).astype(np.uint8)
        write_case(tmp_path / f"l{i}.h5", image, label, {})
        write_case(tmp_path / f"u{i}.h5", image, None, {})
        write_case(tmp_path / f"p{i}.h5", np.zeros_like(image), label, {})
        lab.append(tmp_path / f"l{i}.h5")
        unl.append(tmp_path / f"u{i}.h5")
        pseudo.append(tmp_path / f"p{i}.h5")
    return lab, unl, pseudo


def test_image_label_and_pseudo_label_get_the_same_transform(coded_cases):
    lab, unl, pseudo = coded_cases
    patch = (8, 12, 4)  # not square: odd quarter turns read a 12 x 8 crop
    data = PatchBatches(lab, unl, patch, 2, 2, seed=3, iterations=40, pseudo=pseudo, augmentation={"rotate": True, "flip": True})
    for t in range(40):
        b = data[t]
        assert b["image_l"].shape == (2, 1, *patch) and b["image_u"].shape == (2, 1, *patch)
        for img, label in ((b["image_l"], b["label_l"]), (b["image_u"], b["label_u"])):
            assert torch.equal((img[:, 0] > 5).long(), label)  # padding: image 0, label 0
    again = PatchBatches(lab, unl, patch, 2, 2, seed=3, iterations=40, pseudo=pseudo, augmentation=BOTH)
    assert all(torch.equal(data[7][k], again[7][k]) for k in data[7])


def test_augmented_crop_is_a_crop_of_the_transformed_volume(coded_cases):
    lab, _, _ = coded_cases
    files = CaseFiles(lab[:1], need_label=True)
    with h5py.File(lab[0], "r") as f:
        volume = f["image"][...]
    patch = (8, 12, 4)
    rng = np.random.default_rng(11)
    kinds = set()
    for _ in range(30):
        probe = np.random.default_rng()
        probe.bit_generator.state = rng.bit_generator.state
        t = draw_axial_transform(BOTH, probe)  # the transform crop() will draw
        kinds.add(t)
        image, _ = files.crop(0, patch, rng, BOTH)
        whole = apply_axial_transform(volume, t)
        hits = [
            (i, j, k)
            for i in range(whole.shape[0] - patch[0] + 1)
            for j in range(whole.shape[1] - patch[1] + 1)
            for k in range(whole.shape[2] - patch[2] + 1)
            if np.array_equal(whole[i:i + patch[0], j:j + patch[1], k:k + patch[2]], image)
        ]
        assert hits, t
    assert len(kinds) > 4


def test_augmentation_off_gives_the_batches_of_a_run_without_it(coded_cases):
    lab, unl, _ = coded_cases
    plain = PatchBatches(lab, unl, (8, 8, 4), 2, 2, seed=1, iterations=5)
    off = PatchBatches(lab, unl, (8, 8, 4), 2, 2, seed=1, iterations=5, augmentation={"rotate": False, "flip": False})
    on = PatchBatches(lab, unl, (8, 8, 4), 2, 2, seed=1, iterations=5, augmentation=BOTH)
    assert all(torch.equal(plain[t][k], off[t][k]) for t in range(5) for k in plain[t])
    assert any(not torch.equal(plain[t]["image_l"], on[t]["image_l"]) for t in range(5))


def test_train_config_takes_the_config_mapping():
    cfg = TrainConfig.from_dict({"method": "supervised", "augmentation": {"rotate": True, "flip": True}})
    assert cfg.augmentation == BOTH
    assert cfg.fingerprint() != TrainConfig(method="supervised").fingerprint()
    assert TrainConfig().augmentation == Augmentation() and not Augmentation().enabled
    with pytest.raises(ValueError, match="unknown augmentation settings"):
        Augmentation.from_value({"rotate": True, "scale": True})


def test_per_dataset_defaults_follow_the_paper():
    cfg = validate_config(yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8")))
    merged = {name: {**cfg["training"], **ds.get("training", {})} for name, ds in cfg["datasets"].items()}
    assert merged["colon"]["augmentation"] == {"rotate": True, "flip": True}
    for name in ("pancreas", "la", "la_h5", "demo"):
        assert merged[name]["augmentation"] == {"rotate": False, "flip": False}, name
