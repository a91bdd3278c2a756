"""The BCP baseline (method ``bcp``): mask, mixing, largest component, mixed loss, step, engine runs."""

from __future__ import annotations

import copy
import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.io.h5 import write_case
from semiseg.training.bcp import (
    BCPStep,
    bidirectional_copy_paste,
    copy_paste,
    cuboid_mask,
    largest_component,
    masked_dice_loss,
    mix_loss,
    pretrain_iterations,
    pseudo_labels,
)
from semiseg.training.engine import TrainConfig, build_model, load_model, train

TINY = dict(method="bcp", patch_size=(16, 16, 16), base_filters=4, iterations=4, bcp_pretrain_iterations=2,
            labelled_batch=4, unlabelled_batch=4, seed=3)  # 2 crops a forward pass: a 16^3 bottleneck is 1 voxel


def _box(mask: torch.Tensor) -> tuple[slice, ...]:
    idx = torch.nonzero(mask == 0)
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(idx.min(0).values, idx.max(0).values))


# ------------------------------------------------------------------------------- mask


def test_cuboid_mask_size_values_and_position():
    rng = np.random.default_rng(0)
    m = cuboid_mask((16, 16, 16), 2 / 3, rng)
    assert m.shape == (16, 16, 16) and m.dtype == torch.int64
    assert set(m.unique().tolist()) == {0, 1}
    box = _box(m)
    assert [s.stop - s.start for s in box] == [10, 10, 10]  # int(16 * 2/3)
    assert (m[box] == 0).all() and int((m == 0).sum()) == 1000  # one solid cuboid of 0s
    # The released position rule: first voxel uniform in 0 .. n - side - 1 on each axis.
    assert [s.stop - s.start for s in _box(cuboid_mask((112, 112, 80), 2 / 3, rng))] == [74, 74, 53]  # the LA patch
    starts = np.array([[s.start for s in _box(cuboid_mask((12, 9, 7), 2 / 3, rng))] for _ in range(300)])
    assert starts.min(0).tolist() == [0, 0, 0]
    assert starts.max(0).tolist() == [12 - 8 - 1, 9 - 6 - 1, 7 - 4 - 1]
    a = cuboid_mask((16, 12, 8), 0.5, np.random.default_rng([1, 2]))
    assert torch.equal(a, cuboid_mask((16, 12, 8), 0.5, np.random.default_rng([1, 2])))
    assert [s.stop - s.start for s in _box(a)] == [8, 6, 4]
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            cuboid_mask((16, 16, 16), bad, rng)


def test_mask_of_an_iteration_is_a_function_of_seed_and_iteration():
    cfg = TrainConfig(**TINY)
    net = build_model(cfg)
    a, b = BCPStep(cfg, net, copy.deepcopy(net)), BCPStep(cfg, net, copy.deepcopy(net))
    assert torch.equal(a.mask(7, (16, 16, 16)), b.mask(7, (16, 16, 16)))
    assert any(not torch.equal(a.mask(t, (16, 16, 16)), a.mask(7, (16, 16, 16))) for t in range(7))


# ----------------------------------------------------------------------------- mixing


def test_bidirectional_copy_paste_takes_every_voxel_from_the_right_source():
    mask = cuboid_mask((8, 8, 8), 0.5, np.random.default_rng(0))
    inside = mask == 0
    # Crop i of each batch is filled with a value naming it; labels likewise.
    x_l = torch.arange(1, 5, dtype=torch.float32).view(4, 1, 1, 1, 1).expand(4, 1, 8, 8, 8).clone()
    x_u = 10 * x_l
    y_l = torch.arange(1, 5).view(4, 1, 1, 1).expand(4, 8, 8, 8).clone()
    y_u = 10 * y_l
    x_ml, y_ml, x_mu, y_mu = bidirectional_copy_paste(x_l, y_l, x_u, y_u, mask)
    assert x_ml.shape == (2, 1, 8, 8, 8) and y_ml.shape == (2, 8, 8, 8) and y_ml.dtype == torch.int64
    for j in range(2):  # mix_l: labelled a outside, unlabelled a inside; mix_u: unlabelled b outside, labelled b inside
        for got, out_val, in_val in ((x_ml[j, 0], j + 1, 10 * (j + 1)), (y_ml[j], j + 1, 10 * (j + 1)),
                                     (x_mu[j, 0], 10 * (j + 3), j + 3), (y_mu[j], 10 * (j + 3), j + 3)):
            assert (got[inside] == in_val).all() and (got[~inside] == out_val).all()
    # images and labels with one mask: the label map says where each image voxel came from
    assert torch.equal(x_ml[:, 0].long(), y_ml) and torch.equal(x_mu[:, 0].long(), y_mu)
    # values are copied, not blended
    x = torch.randn(2, 1, 8, 8, 8)
    assert torch.equal(copy_paste(x[:1], x[1:], mask)[0, 0][inside], x[1, 0][inside])
    with pytest.raises(ValueError, match="2k"):
        bidirectional_copy_paste(x_l[:3], y_l[:3], x_u[:3], y_u[:3], mask)


# --------------------------------------------------------------------- largest component


def test_largest_component_keeps_the_largest_only():
    lab = torch.zeros(2, 10, 10, 10, dtype=torch.long)
    lab[0, 0:3, 0:3, 0:3] = 1  # 27 voxels
    lab[0, 6:8, 6:8, 6:8] = 1  # 8 voxels: removed
    lab[0, 3, 3, 3] = 1  # touches the big block at a corner only: joined under 26-connectivity
    out = largest_component(lab)
    assert out.dtype == lab.dtype and out.shape == lab.shape
    assert int(out[0].sum()) == 28 and out[0, 3, 3, 3] == 1 and out[0, 6:8, 6:8, 6:8].sum() == 0
    assert out[1].sum() == 0  # empty stays empty
    assert largest_component(torch.zeros(1, 4, 4, 4, dtype=torch.long)).sum() == 0
    arr = largest_component(lab.numpy())
    assert isinstance(arr, np.ndarray) and np.array_equal(arr, out.numpy())


def test_largest_component_per_class():
    lab = np.zeros((1, 12, 12, 12), dtype=np.int64)
    lab[0, 0:4, 0:4, 0:4] = 1  # class 1: 64 voxels (kept)
    lab[0, 8:10, 0:2, 0:2] = 1  # class 1: 8 voxels (removed)
    lab[0, 0:2, 8:10, 8:10] = 2  # class 2: 8 voxels, its largest: kept although class 1 has a larger one
    lab[0, 8, 8, 8] = 2  # class 2: 1 voxel (removed)
    lab[0, 11, 11, 0] = 2  # class 2: 1 voxel (removed)
    out = largest_component(lab, num_classes=3)
    assert (out == 1).sum() == 64 and (out == 2).sum() == 8
    assert out[0, 8:10, 0:2, 0:2].sum() == 0 and out[0, 8, 8, 8] == 0 and out[0, 11, 11, 0] == 0
    # two classes only: class 2 is not a foreground class and is dropped to background
    assert (largest_component(lab, num_classes=2) == 2).sum() == 0


def test_pseudo_labels_threshold_then_largest_component():
    logits = torch.zeros(1, 2, 6, 6, 6)
    logits[0, 0] = 1.0  # background favoured everywhere but
    logits[0, 1, 0:3, 0:3, 0:3] = 3.0  # a foreground blob
    logits[0, 1, 5, 5, 5] = 3.0  # a speck: removed by the largest component
    logits[0, 0, 0, 0, 0] = 3.0  # p_fg = 0.5 exactly: foreground (released: probs >= 0.5)
    out = pseudo_labels(logits)
    assert out.dtype == torch.int64 and out.shape == (1, 6, 6, 6)
    assert out[0, 0:3, 0:3, 0:3].all() and out[0, 5, 5, 5] == 0 and out.sum() == 27
    multi = torch.zeros(1, 3, 4, 4, 4)
    multi[0, 2, :2] = 2.0
    multi[0, 1, 2:] = 2.0
    assert torch.equal(pseudo_labels(multi)[0], torch.cat([torch.full((2, 4, 4), 2), torch.ones(2, 4, 4, dtype=torch.long)]))


# ------------------------------------------------------------------------------- loss


def _reference_mix_loss(logits, lab_out, lab_in, mask, w_out, w_in, smooth=1e-5):
    """The released mix_loss, voxel by voxel in float64 numpy loops."""
    z = logits.double().numpy()
    b_n, c_n = z.shape[:2]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    voxels = list(np.ndindex(*z.shape[2:]))

    def dice(lab, region):  # 1 - mean over crops and classes, background included
        terms = []
        for b in range(b_n):
            for c in range(c_n):
                inter = sum(region[v] * p[(b, c, *v)] * (lab[(b, *v)] == c) for v in voxels)
                union = sum(region[v] * (p[(b, c, *v)] + (lab[(b, *v)] == c)) for v in voxels)
                terms.append((2 * inter + smooth) / (union + smooth))
        return 1 - np.mean(terms)

    def ce(lab, region):  # sum of region-weighted -log p(label) over the batch / the region's voxel count
        total = sum(region[v] * -np.log(p[(b, lab[(b, *v)], *v)]) for b in range(b_n) for v in voxels)
        return total / (b_n * sum(region[v] for v in voxels) + 1e-16)

    m = mask.double().numpy()
    lo, li = lab_out.numpy(), lab_in.numpy()
    return 0.5 * (w_out * dice(lo, m) + w_in * dice(li, 1 - m) + w_out * ce(lo, m) + w_in * ce(li, 1 - m))


@pytest.mark.parametrize("c", [2, 3])
def test_mix_loss_matches_the_voxel_by_voxel_formula(c):
    g = torch.Generator().manual_seed(c)
    logits = torch.randn(2, c, 3, 4, 5, generator=g).requires_grad_()
    lab_out, lab_in = torch.randint(0, c, (2, 3, 4, 5), generator=g), torch.randint(0, c, (2, 3, 4, 5), generator=g)
    mask = cuboid_mask((3, 4, 5), 0.6, np.random.default_rng(c))
    for w_out, w_in in ((1.0, 0.5), (0.5, 1.0), (1.0, 0.0)):  # mix_l, mix_u (released unlab=True), no pseudo part
        got = mix_loss(logits, lab_out, lab_in, mask, w_out, w_in)
        ref = _reference_mix_loss(logits.detach(), lab_out, lab_in, mask, w_out, w_in)
        assert got.dtype == torch.float32
        assert abs(got.item() - ref) < 1e-5, (w_out, w_in, got.item(), ref)
    (grad,) = torch.autograd.grad(got, logits)
    assert torch.isfinite(grad).all()
    # one label, every voxel weighted 1: the whole-crop Dice (the pre-training loss's Dice)
    assert torch.allclose(masked_dice_loss(logits, lab_out, torch.ones(2, 3, 4, 5)), masked_dice_loss(logits, lab_out))


# ------------------------------------------------------------------------------- step


def _batch(n=4, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, side, side, side, dtype=torch.long)
    y[:, 4:12, 3:11, 5:13] = 1
    return {"image_l": torch.randn(n, 1, side, side, side, generator=g) + 2 * y[:, None], "label_l": y,
            "image_u": torch.randn(n, 1, side, side, side, generator=g) + 2 * y[:, None]}


@pytest.mark.parametrize("iteration, phase", [(0, 0.0), (3, 1.0)])
def test_one_step_in_each_phase(iteration, phase):
    cfg = TrainConfig(**TINY)
    torch.manual_seed(0)
    student = build_model(cfg)
    step = BCPStep(cfg, student, copy.deepcopy(student))
    loss, terms = step(_batch(), iteration)
    loss.backward()
    assert torch.isfinite(loss) and terms["bcp_phase"] == phase and terms["loss"] == loss.item()
    expected = {"ce", "dice"} if phase == 0 else {"loss_l", "loss_u", "pseudo_foreground"}
    assert expected <= set(terms) and all(isinstance(v, float) and np.isfinite(v) for v in terms.values())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in step.teacher.parameters())  # pseudo labels carry no gradient


def test_phase_switch_copies_the_student_and_ema_runs_in_self_training_only():
    cfg = TrainConfig(**TINY)
    torch.manual_seed(0)
    student = build_model(cfg)
    teacher = build_model(cfg)  # other weights than the student
    for p in teacher.parameters():
        p.requires_grad_(False)
    step = BCPStep(cfg, student, teacher)
    before = [p.clone() for p in teacher.parameters()]
    step(_batch(), 1)  # pre-training: the teacher is not touched
    step.update_teacher(1)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), before))
    assert not all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))
    step(_batch(), 2)  # the first self-training iteration: teacher := student, then its pseudo labels
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    old = [p.clone() for p in teacher.parameters()]
    step.update_teacher(2)  # constant coefficient ema_decay (0.99), as released
    for t, o, s in zip(teacher.parameters(), old, student.parameters()):
        assert torch.allclose(t, 0.99 * o + 0.01 * s)


# ---------------------------------------------------------------------------- config


def test_settings_and_defaults():
    cfg = TrainConfig(method="bcp")
    assert (cfg.bcp_pretrain_iterations, cfg.bcp_mask_ratio, cfg.bcp_u_weight) == (None, 2 / 3, 0.5)
    assert pretrain_iterations(cfg) == 706  # round(6000 * 2000 / 17000)
    assert pretrain_iterations(TrainConfig(method="bcp", iterations=17000)) == 2000
    assert pretrain_iterations(TrainConfig(**TINY)) == 2
    net = build_model(cfg)
    assert net.aleatoric is None and net.projection is None  # plain V-Net
    for bad, match in (({"bcp_mask_ratio": 1.0}, "bcp_mask_ratio"), ({"bcp_mask_ratio": 0}, "bcp_mask_ratio"),
                       ({"bcp_u_weight": -0.5}, "bcp_u_weight"), ({"bcp_pretrain_iterations": 7000}, "bcp_pretrain_iterations"),
                       ({"bcp_pretrain_iterations": -1}, "bcp_pretrain_iterations"),
                       ({"labelled_batch": 3, "unlabelled_batch": 3}, "even"), ({"unlabelled_batch": 4}, "must equal")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(method="bcp", **bad)
    TrainConfig.from_dict({"method": "bcp", "bcp_pretrain_iterations": 0, "bcp_u_weight": 1.0})


# ------------------------------------------------------------------------- engine runs


@pytest.fixture(scope="module")
def tiny_cases(tmp_path_factory) -> tuple[list[Path], list[Path]]:
    root = tmp_path_factory.mktemp("bcp_cases")
    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(24, 20, 18), (20, 22, 16), (22, 18, 20), (20, 20, 20)]):
        x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
        lab = (((x - shape[0] / 2) / 5) ** 2 + ((y - shape[1] / 2) / 4) ** 2 + ((z - shape[2] / 2) / 4) ** 2 <= 1).astype(np.uint8)
        img = (lab * 2.0 + rng.normal(0, 0.5, shape)).astype(np.float32)
        write_case(root / f"case{i}.h5", img, lab if i < 2 else None, {})
        paths.append(root / f"case{i}.h5")
    return paths[:2], paths[2:]


def _rows(path):
    with open(path, encoding="utf-8") as fh:
        return [{k: v for k, v in r.items() if k not in ("data_wait_s", "step_s")} for r in csv.DictReader(fh)]


def test_train_writes_model_and_logs_the_phase(tiny_cases, tmp_path, caplog):
    lab, unl = tiny_cases
    with caplog.at_level(logging.INFO, logger="semiseg.training"):
        path = train(TrainConfig(**TINY), lab, unl, tmp_path, device="cpu", checkpoint_every=2, progress=False)
    assert "bcp: 2 pre-training + 2 self-training iterations" in caplog.text
    assert "iteration 2: bcp self-training starts" in caplog.text
    rows = _rows(tmp_path / "losses.csv")
    assert [r["bcp_phase"] for r in rows] == ["0.0", "0.0", "1.0", "1.0"]
    assert rows[0]["ce"] and rows[3]["loss_l"] and all(np.isfinite(float(r["loss"])) for r in rows)
    assert load_model(path, "student")(torch.randn(2, 1, 16, 16, 16)).logits.shape == (2, 2, 16, 16, 16)
    load_model(path, "teacher")


class Interrupt(Exception):
    pass


def test_resume_across_the_phase_switch_equals_uninterrupted(tiny_cases, tmp_path):
    lab, unl = tiny_cases
    cfg = TrainConfig(**TINY)
    kw = dict(device="cpu", checkpoint_every=2, progress=False)
    train(cfg, lab, unl, tmp_path / "straight", **kw)

    def stop(t):
        if t == 2:  # the checkpoint holds 2 iterations: the resumed run starts at the phase switch
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, lab, unl, tmp_path / "resumed", callback=stop, **kw)
    train(cfg, lab, unl, tmp_path / "resumed", **kw)
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    for key in ("student", "teacher"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert _rows(tmp_path / "straight" / "losses.csv") == _rows(tmp_path / "resumed" / "losses.csv")
