"""The ``mt`` and ``uamt`` baselines: losses against loop references, steps, and short training runs.

The references below are written from the released code's formulas (UA-MT's
``train_LA_meanteacher_certainty_unlabel.py`` / ``utils/losses.py``, SSL4MIS's
``train_mean_teacher_3D.py``, the ``sigmoid_rampup`` of ``utils/ramps.py``) with explicit
loops over voxels and classes on Python floats, not as vectorised copies of the code under test.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.io.h5 import write_case
from semiseg.losses import (
    ce_dice_loss,
    masked_mse_loss,
    predictive_entropy,
    softmax_mse,
    softmax_mse_loss,
    uncertainty_threshold,
)
from semiseg.training.baselines import BASELINE_STEPS, MeanTeacherStep, UAMTStep
from semiseg.training.engine import STAGE1_METHODS, TrainConfig, build_model, ema_alpha, ema_update, load_model, train

CLOSE = dict(rtol=1e-5, atol=1e-7)
SHAPE = (3, 4, 2)


def voxels(shape):
    for x in range(shape[0]):
        for y in range(shape[1]):
            for z in range(shape[2]):
                yield x, y, z


def ref_softmax(values: list[float]) -> list[float]:
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [v / sum(e) for v in e]


def ref_sigmoid_rampup(current: float, length: float) -> float:
    """``utils/ramps.py``'s ``sigmoid_rampup``."""
    if length == 0:
        return 1.0
    phase = 1.0 - float(np.clip(current, 0.0, length)) / length
    return float(np.exp(-5.0 * phase * phase))


def ref_softmax_mse(s: torch.Tensor, t: torch.Tensor) -> list:
    """[B][C][voxel] (p - q)^2, voxel in ``voxels`` order."""
    b_n, c_n = s.shape[:2]
    out = []
    for b in range(b_n):
        per_class = [[] for _ in range(c_n)]
        for x, y, z in voxels(tuple(s.shape[2:])):
            p = ref_softmax([float(s[b, c, x, y, z]) for c in range(c_n)])
            q = ref_softmax([float(t[b, c, x, y, z]) for c in range(c_n)])
            for c in range(c_n):
                per_class[c].append((p[c] - q[c]) ** 2)
        out.append(per_class)
    return out


def logits(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("c_n", [2, 3])
def test_softmax_mse_and_its_mean_against_loops(c_n):
    s, t = logits(2, c_n, *SHAPE, seed=1), logits(2, c_n, *SHAPE, seed=2)
    ref = ref_softmax_mse(s, t)
    got = softmax_mse(s, t)
    assert got.shape == s.shape
    for b in range(2):
        for c in range(c_n):
            flat = [float(got[b, c, x, y, z]) for x, y, z in voxels(SHAPE)]
            np.testing.assert_allclose(flat, ref[b][c], **CLOSE)
    values = [v for per_b in ref for per_c in per_b for v in per_c]  # SSL4MIS: torch.mean over B, C, voxels
    np.testing.assert_allclose(softmax_mse_loss(s, t).item(), sum(values) / len(values), **CLOSE)


def test_softmax_mse_sends_gradients_to_the_student_only():
    s = logits(1, 2, *SHAPE, seed=3).requires_grad_()
    t = logits(1, 2, *SHAPE, seed=4).requires_grad_()
    softmax_mse_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_predictive_entropy_against_loops():
    t_n, b_n, c_n = 4, 2, 3
    x = logits(t_n, b_n, c_n, *SHAPE, seed=5)
    got = predictive_entropy(x)
    assert got.shape == (b_n, *SHAPE)
    for b in range(b_n):
        for v in voxels(SHAPE):
            probs = [ref_softmax([float(x[(t, b, c, *v)]) for c in range(c_n)]) for t in range(t_n)]
            mean = [sum(p[c] for p in probs) / t_n for c in range(c_n)]
            ref = -sum(m * math.log(m + 1e-6) for m in mean)  # released: log(p + 1e-6), nats
            assert got[(b, *v)].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_predictive_entropy_limits():
    """Certain passes: ~0; passes split evenly between two classes: ln 2."""
    certain = torch.zeros(4, 1, 2, 1, 1, 1)
    certain[:, :, 0] = 50.0
    assert predictive_entropy(certain).abs().max() < 1e-5
    split = torch.zeros(4, 1, 2, 1, 1, 1)
    split[:2, :, 0] = 50.0
    split[2:, :, 1] = 50.0
    assert predictive_entropy(split).item() == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("iteration, phase", [(0, 1.0), (1500, 0.75), (3000, 0.5), (6000, 0.0), (9000, 0.0), (-5, 1.0)])
def test_uncertainty_threshold_ramp(iteration, phase):
    """Released: (0.75 + 0.25 * sigmoid_rampup(iter_num, max_iterations)) * ln 2."""
    expected = (0.75 + 0.25 * ref_sigmoid_rampup(iteration, 6000)) * np.log(2)
    assert uncertainty_threshold(iteration, 6000) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx((0.75 + 0.25 * math.exp(-5 * phase**2)) * math.log(2), rel=1e-12)


def test_uncertainty_threshold_values_and_options():
    assert uncertainty_threshold(0, 6000) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))  # 0.52103
    assert uncertainty_threshold(3000, 6000) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * math.log(2))  # 0.56951
    assert uncertainty_threshold(6000, 6000) == pytest.approx(math.log(2))
    assert uncertainty_threshold(6000, 6000, num_classes=3) == pytest.approx(math.log(3))
    assert uncertainty_threshold(0, 100, num_classes=4, start=0.5) == pytest.approx((0.5 + 0.5 * math.exp(-5)) * math.log(4))
    values = [uncertainty_threshold(t, 100) for t in range(0, 101, 5)]
    assert all(a < b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("c_n", [2, 3])
def test_masked_mse_against_loops(c_n):
    s, t = logits(2, c_n, *SHAPE, seed=6), logits(2, c_n, *SHAPE, seed=7)
    mask = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(8)) < 0.4
    ref_map = ref_softmax_mse(s, t)
    total, kept = 0.0, 0
    for b in range(2):
        for i, v in enumerate(voxels(SHAPE)):
            if mask[(b, *v)]:
                kept += 1
                total += sum(ref_map[b][c][i] for c in range(c_n))
    assert 0 < kept < mask.numel()
    ref = total / (c_n * kept + 1e-16)  # released: sum(mask * mse) / (2 * sum(mask) + 1e-16), C = 2
    got = masked_mse_loss(softmax_mse(s, t), mask)
    assert got.item() == pytest.approx(ref, rel=1e-5)
    assert masked_mse_loss(softmax_mse(s, t), mask.float()).item() == pytest.approx(ref, rel=1e-6)  # 0/1 mask
    everything = masked_mse_loss(softmax_mse(s, t), torch.ones_like(mask))
    assert everything.item() == pytest.approx(softmax_mse_loss(s, t).item(), rel=1e-6)  # no mask: mt's mean


def test_masked_mse_mask_behaviour():
    s = logits(1, 2, *SHAPE, seed=9).requires_grad_()
    t = logits(1, 2, *SHAPE, seed=10)
    mask = torch.zeros(1, *SHAPE, dtype=torch.bool)
    mask[0, 0] = True  # only x = 0 counts
    masked_mse_loss(softmax_mse(s, t), mask).backward()
    assert s.grad[:, :, 0].abs().sum() > 0 and s.grad[:, :, 1:].abs().sum() == 0  # excluded voxels get no gradient
    s.grad = None
    empty = masked_mse_loss(softmax_mse(s, t), torch.zeros_like(mask))
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(s.grad).all() and s.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="mask"):
        masked_mse_loss(softmax_mse(s, t), mask[:, 0])


def test_losses_run_in_float32_under_autocast():
    s, t = logits(2, 2, *SHAPE, seed=11).half(), logits(2, 2, *SHAPE, seed=12).half()
    with torch.autocast("cpu", dtype=torch.float16):
        mse = softmax_mse(s, t)
        ent = predictive_entropy(torch.stack([s, t]))
        loss = masked_mse_loss(mse, ent < 0.5)
    assert mse.dtype == ent.dtype == loss.dtype == torch.float32


# ------------------------------------------------------------------------- config, weight


def test_config_fields_and_validation():
    cfg = TrainConfig(method="uamt")
    assert (cfg.mt_consistency, cfg.uamt_passes, cfg.uamt_threshold_start) == (0.1, 8, 0.75)
    assert {"mt", "uamt"} <= set(STAGE1_METHODS) and cfg.has_teacher and not cfg.mean_teacher and cfg.stage == 1
    assert TrainConfig(method="mt").has_teacher and not TrainConfig(method="supervised").has_teacher
    for bad, match in [({"uamt_passes": 7}, "uamt_passes"), ({"uamt_passes": 0}, "uamt_passes"),
                       ({"uamt_passes": True}, "uamt_passes"), ({"uamt_passes": 8.0}, "uamt_passes"),
                       ({"uamt_threshold_start": 1.5}, "uamt_threshold_start"),
                       ({"uamt_threshold_start": float("nan")}, "uamt_threshold_start"),
                       ({"mt_consistency": -0.1}, "mt_consistency"), ({"mt_consistency": float("inf")}, "mt_consistency"),
                       ({"lambda_c": 0.1}, "no BCL"), ({"lambda_r": 0.1}, "no BCL")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(method="uamt", **bad)
    with pytest.raises(ValueError, match="no BCL"):
        TrainConfig(method="mt", lambda_c=0.1)


def test_plain_vnet():
    net = build_model(TrainConfig(method="mt", base_filters=4))
    assert net.aleatoric is None and net.projection is None


@pytest.mark.parametrize("rampup, iteration", [(None, 0), (None, 3000), (None, 6000), (None, 8000), (100, 50), (100, 150)])
def test_consistency_weight_ramp(rampup, iteration):
    """w(t) = mt_consistency * sigmoid_rampup(t, rampup); rampup = the iterations when null."""
    cfg = TrainConfig(method="mt", iterations=6000, consistency_rampup=rampup)
    step = MeanTeacherStep(cfg, torch.nn.Identity(), torch.nn.Identity())  # type: ignore[arg-type]
    assert step.weight(iteration) == pytest.approx(0.1 * ref_sigmoid_rampup(iteration, rampup or 6000), rel=1e-12)


# --------------------------------------------------------------------------------- steps

TINY = dict(patch_size=(16, 16, 16), base_filters=4, labelled_batch=2, unlabelled_batch=2, iterations=10, seed=3)


def tiny_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(2, 16, 16, 16, dtype=torch.long)
    y[:, 4:12, 5:11, 4:12] = 1
    return {"image_l": torch.randn(2, 1, 16, 16, 16, generator=g) + 2 * y[:, None], "label_l": y,
            "image_u": torch.randn(2, 1, 16, 16, 16, generator=g)}


def nets(cfg):
    torch.manual_seed(0)
    student = build_model(cfg)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    teacher.train()
    return student, teacher


@pytest.mark.parametrize("method", ["mt", "uamt"])
def test_one_step_then_ema(method):
    """Finite loss and gradients (student only); loss = sup + w * consistency; EMA as the engine's."""
    cfg = TrainConfig(method=method, dropout=0.0, **TINY)
    student, teacher = nets(cfg)
    batch = tiny_batch()
    step = BASELINE_STEPS[method](cfg, student, teacher)
    torch.manual_seed(1)
    loss, terms = step(batch, 4)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in terms.values())
    w = 0.1 * ref_sigmoid_rampup(4, 10)
    assert terms["consistency_weight"] == pytest.approx(w, rel=1e-9)
    assert terms["loss"] == pytest.approx(terms["ce_dice"] + w * terms["consistency"], rel=1e-5)
    with torch.no_grad():  # dropout 0 and batch statistics: the same student output again
        again = ce_dice_loss(student(torch.cat([batch["image_l"], batch["image_u"]])).logits[:2], batch["label_l"])
    assert terms["ce_dice"] == pytest.approx(again.item(), rel=1e-5)
    if method == "uamt":
        assert terms["uncertainty_threshold"] == pytest.approx(uncertainty_threshold(4, 10), rel=1e-12)
        assert 0.0 <= terms["mask_fraction"] <= 1.0
    loss.backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    before = [p.detach().clone() for p in teacher.parameters()]
    opt.step()
    alpha = ema_alpha(1, cfg.ema_decay)
    ema_update(teacher, student, alpha)
    for t, old, s in zip(teacher.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, alpha * old + (1 - alpha) * s)


def test_uamt_teacher_passes(monkeypatch):
    """One target pass on the unlabelled crops, then T / 2 calls on them stacked twice, each with
    fresh noise; U is the entropy of the mean softmax of those T passes, the mask U < H(t)."""
    cfg = TrainConfig(method="uamt", uamt_passes=6, **TINY)
    student, teacher = nets(cfg)
    batch = tiny_batch()
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append((i[0].detach().clone(), o.logits.detach().clone())))
    seen = {}
    import semiseg.training.baselines as baselines

    real = baselines.masked_mse_loss

    def spy(mse, mask):
        seen["mask"] = mask
        return real(mse, mask)

    monkeypatch.setattr(baselines, "masked_mse_loss", spy)
    _, terms = UAMTStep(cfg, student, teacher)(batch, 7)
    x_u = batch["image_u"]
    assert [c[0].shape[0] for c in calls] == [2, 4, 4, 4]  # n_u, then 2 n_u per call
    for inputs, _ in calls:
        noise = inputs - x_u.repeat(inputs.shape[0] // 2, 1, 1, 1, 1)
        assert noise.abs().max() <= cfg.teacher_noise_clip + 1e-6 and noise.abs().max() > 0
    noises = [(inp - x_u.repeat(inp.shape[0] // 2, 1, 1, 1, 1)) for inp, _ in calls]
    flat = torch.cat(noises)  # 14 crops' noise: all different draws
    assert all(not torch.equal(flat[i], flat[j]) for i in range(len(flat)) for j in range(i))
    passes = torch.stack([out[k * 2:(k + 1) * 2] for _, out in calls[1:] for k in range(2)])  # (T, n_u, C, ...)
    unc = predictive_entropy(passes)
    threshold = uncertainty_threshold(7, cfg.iterations)
    assert torch.equal(seen["mask"], unc < threshold)
    assert terms["mask_fraction"] == pytest.approx((unc < threshold).float().mean().item())
    assert terms["uncertainty_mean"] == pytest.approx(unc.mean().item(), rel=1e-6)


# ---------------------------------------------------------------------------- train()


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[list[Path], list[Path]]:
    root = tmp_path_factory.mktemp("baseline_cases")
    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(20, 18, 18), (18, 20, 16), (20, 20, 20), (18, 18, 18)]):
        lab = np.zeros(shape, np.uint8)
        lab[5:13, 6:12, 5:12] = 1
        img = (lab * 2.0 + rng.normal(0, 0.5, shape)).astype(np.float32)
        p = root / f"case{i}.h5"
        write_case(p, img, lab if i < 2 else None, {})
        paths.append(p)
    return paths[:2], paths[2:]


@pytest.mark.parametrize("method", ["mt", "uamt"])
def test_train_writes_model_and_losses(cases, tmp_path, method):
    lab, unl = cases
    cfg = TrainConfig(method=method, **{**TINY, "iterations": 3})
    path = train(cfg, lab, unl, tmp_path, device="cpu", checkpoint_every=2, progress=False)
    with open(tmp_path / "losses.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    expected = {"iteration", "lr", "loss", "ce_dice", "consistency", "consistency_weight"}
    if method == "uamt":
        expected |= {"uncertainty_threshold", "uncertainty_mean", "mask_fraction"}
    assert len(rows) == 3 and expected <= set(rows[0])
    assert all(math.isfinite(float(r[k])) for r in rows for k in expected)
    assert [float(r["consistency_weight"]) for r in rows] == pytest.approx([0.1 * ref_sigmoid_rampup(t, 3) for t in range(3)])
    blob = torch.load(path, weights_only=True)
    assert blob["method"] == method and blob["network"]["aleatoric"] is False and blob["network"]["projection"] is False
    student, teacher = load_model(path, "student"), load_model(path, "teacher")
    torch.manual_seed(cfg.seed)
    init = build_model(cfg).state_dict()
    s, t = student.state_dict(), teacher.state_dict()
    params = [k for k, _ in student.named_parameters()]
    assert all(not torch.equal(t[k], s[k]) and not torch.equal(t[k], init[k]) for k in params if s[k].dtype.is_floating_point)
