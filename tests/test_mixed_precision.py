"""Mixed precision, emulated on the CPU: what ``training.amp`` does on a GPU.

On CUDA, AMP runs the network under ``torch.autocast(dtype=float16)``. No GPU runs in the
suite, so these tests run the same code under ``torch.autocast("cpu", dtype=float16)``
(and bfloat16) at the voxel count of the paper's patches (96 x 96 x 96 = 884,736 and
112 x 112 x 80 = 1,003,520 voxels a crop), where a float16 sum over a crop overflows
(float16 ends at 65504). A narrow network (width 1 or 2, one labelled + one unlabelled crop)
keeps them fast (the bfloat16 step cases are marked slow); the losses' sums run over the same number of voxels as at width 16.

Tolerances (stated here, and in docs/method-choices.md): a loss under float16 autocast is
within 2e-2 absolute + 2e-2 relative of float32 (float16 has a 10-bit mantissa, ~1e-3
relative per op, through ~20 layers); bfloat16 (7-bit mantissa) within 5e-2 + 5e-2.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from semiseg.inference import sliding_window_predict
from semiseg.losses import (
    boundary_contrastive_loss,
    ce_dice_loss,
    generalized_energy_distance,
    mc_integral_nll,
    prototype_contrastive_loss,
    soft_dice_loss,
    supervised_contrastive_loss,
)
from semiseg.networks import SegmentationNet
from semiseg.prototypes import PrototypeStatistics
from semiseg.losses import masked_mse_loss, predictive_entropy, softmax_mse, softmax_mse_loss
from semiseg.training.bcp import masked_cross_entropy, masked_dice_loss, mix_loss
from semiseg.training.engine import TrainConfig, build_model, make_step

P96 = (96, 96, 96)
P112 = (112, 112, 80)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2}


def sphere(patch, radius_fraction=0.25, shift=0):
    """(X, Y, Z) int64 label: a ball in the middle of the patch."""
    g = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) - n / 2 - shift for n in patch), indexing="ij")
    return (sum(a * a for a in g).sqrt() < radius_fraction * min(patch)).long()


def close(a: float, b: float, dtype: torch.dtype) -> bool:
    return math.isfinite(a) and abs(a - b) <= TOL[dtype] * (1 + abs(b))


# ---------------------------------------------------------------- every public loss


@pytest.fixture(scope="module")
def probs_pair():
    """Softmax probabilities of 6 samples, 2 crops, 2 classes at 96^3: the issue's example."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, 2, 2, *P96, generator=g), 2)
    q = torch.softmax(torch.randn(6, 2, 2, *P96, generator=g), 2)
    return p, q


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_ged_at_the_paper_patch(probs_pair, dtype):
    p, q = probs_pair
    ref = generalized_energy_distance(p, q)
    with torch.autocast("cpu", dtype=dtype):
        got = generalized_energy_distance(p, q)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)  # the inputs are float32: same math
    with torch.autocast("cpu", dtype=dtype):  # half-precision inputs, as a float16 network gives
        got = generalized_energy_distance(p.to(dtype), q.to(dtype))
    assert torch.isfinite(got).all() and (got - ref).abs().max() < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_voxel_sums_of_the_supervised_losses(dtype):
    torch.manual_seed(1)
    y = torch.stack([sphere(P112), sphere(P112, shift=5)])
    logits = (torch.randn(2, 2, *P112) + 2 * torch.nn.functional.one_hot(y, 2).movedim(-1, 1)).requires_grad_()
    samples = (logits[None] + 0.3 * torch.randn(6, *logits.shape))
    refs = {
        "ce_dice": ce_dice_loss(logits, y),
        "dice": soft_dice_loss(torch.softmax(logits, 1), y),
        "nll": mc_integral_nll(samples, y),
    }
    with torch.autocast("cpu", dtype=dtype):
        half = logits.to(dtype)  # as a reduced-precision network's output
        got = {
            "ce_dice": ce_dice_loss(half, y),
            "dice": soft_dice_loss(torch.softmax(half, 1), y),
            "nll": mc_integral_nll(samples.to(dtype), y),
        }
    for name, value in got.items():
        assert value.dtype == torch.float32, name
        assert close(value.item(), refs[name].item(), dtype), (name, value.item(), refs[name].item())
    (grad,) = torch.autograd.grad(sum(got.values()), logits)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_contrastive_losses_at_the_paper_sizes(dtype):
    torch.manual_seed(2)
    y = torch.stack([sphere(P96), sphere(P96, shift=4)])
    feats = (torch.randn(2, 16, *P96) + 3 * y[:, None].float()).requires_grad_()
    head = SegmentationNet(base_filters=16, aleatoric=False, projection=True).projection
    project = lambda rows: head(rows.T.reshape(1, 16, -1, 1, 1)).reshape(16, -1).T  # noqa: E731

    def losses():
        g = torch.Generator().manual_seed(3)
        bcl = boundary_contrastive_loss(feats, y, 2000, 0.07, generator=g, projection=project)
        rows = torch.nn.functional.normalize(feats[0].flatten(1).T[::443], dim=1)
        scl = supervised_contrastive_loss(rows, y[0].flatten()[::443])
        anchors = feats.movedim(1, -1).reshape(-1, 16)[y.flatten() > 0]
        stats = PrototypeStatistics(2, 16)  # a float16 chunk of 2 x 40,000 voxels' features
        voxel_rows = feats.detach()[0].flatten(1).T
        pick = torch.cat([torch.nonzero(y[0].flatten() == c).squeeze(1)[:40000] for c in (0, 1)])
        stats.update(torch.nn.functional.normalize(voxel_rows[pick], dim=1).half(), y[0].flatten()[pick])
        mu = torch.nn.functional.normalize(stats.mean.float(), dim=1)
        cov = torch.diag_embed(torch.nn.functional.normalize(torch.diagonal(stats.cov, dim1=1, dim2=2).float(), dim=1))
        pcl = prototype_contrastive_loss(torch.nn.functional.normalize(anchors, dim=1), y.flatten()[y.flatten() > 0], mu, cov)
        return {"bcl": bcl, "scl": scl, "pcl": pcl}, stats

    refs, ref_stats = losses()
    with torch.autocast("cpu", dtype=dtype):
        got, stats = losses()
    for name, value in got.items():
        assert value.dtype == torch.float32, name
        assert close(value.item(), refs[name].item(), dtype), (name, value.item(), refs[name].item())
    torch.testing.assert_close(stats.mean, ref_stats.mean)  # float64 whatever autocast says
    torch.testing.assert_close(stats.cov, ref_stats.cov)
    (grad,) = torch.autograd.grad(sum(got.values()), feats)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bcl_backward_runs_in_the_forward_precision():
    """The custom autograd Function's gradient is the float32 one also when autocast is on."""
    torch.manual_seed(4)
    f = torch.nn.functional.normalize(torch.randn(700, 16), dim=1).requires_grad_()
    y = torch.randint(0, 2, (700,))
    (ref,) = torch.autograd.grad(supervised_contrastive_loss(f, y), f)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = supervised_contrastive_loss(f, y)
        (got,) = torch.autograd.grad(loss, f)  # backward inside the autocast region, too
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)


# ------------------------------------------------- one training step of every method

# Every method once under float16 (both patch sizes covered); bfloat16 (float32's range,
# so no overflow to find) and the other two mean-teacher cases are marked slow: float16
# convolutions are emulated, slowly, on a CPU.
CASES = [
    ("supervised", P112), ("fully_supervised", P96), ("aua", P112), ("aua_bcl", P96),
    ("aua_bcl_pl", P96), ("full", P112), ("mt", P96), ("uamt", P112), ("bcp", P96),
]
SLOW_CASES = [("aua", P96), ("aua_bcl", P112), ("mt", P112), ("uamt", P96)]
STEP_PARAMS = [pytest.param(m, p, torch.float16, id=f"{m}-{'x'.join(map(str, p))}-float16") for m, p in CASES] + [
    pytest.param(m, p, dt, id=f"{m}-{'x'.join(map(str, p))}-{name}", marks=pytest.mark.slow)
    for m, p in CASES + SLOW_CASES for name, dt in DTYPES.items() if (m, p, dt) not in [(*c, torch.float16) for c in CASES]
]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_baseline_losses_at_the_paper_patch(dtype):
    """The baselines' losses (MT, UA-MT, BCP) on half-precision logits under autocast, at LA's
    patch 112 x 112 x 80 with large logits (softmax saturates, exp overflows float16): finite,
    float32, and equal to the float32 computation on the same values (the sums over about
    2 million voxels run in float32)."""
    torch.manual_seed(21)
    n, c = 2, 2
    y = torch.stack([sphere(P112), sphere(P112, shift=4)])
    s32 = (torch.randn(n, c, *P112) * 12).to(dtype).float()  # values representable in dtype
    t32 = (torch.randn(n, c, *P112) * 12).to(dtype).float()
    mask = torch.ones(P112)
    mask[20:90, 20:90, 10:60] = 0  # the pasted cuboid
    passes32 = torch.stack([s32, t32, s32.flip(2)])

    def losses(s, t, passes):
        mse = softmax_mse(s, t)
        return {
            "softmax_mse": softmax_mse_loss(s, t),
            "masked_mse": masked_mse_loss(mse, predictive_entropy(passes) < 0.6),
            "masked_dice": masked_dice_loss(s, y, mask.expand(y.shape)),
            "masked_ce": masked_cross_entropy(s, y, 1 - mask.expand(y.shape)),
            "mix_loss": mix_loss(s, y, y.flip(1), mask, 0.5, 1.0),
        }

    ref = losses(s32, t32, passes32)
    with torch.autocast("cpu", dtype=dtype):
        half = losses(s32.to(dtype), t32.to(dtype), passes32.to(dtype))
    for name, value in half.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        assert abs(value.item() - ref[name].item()) <= 1e-5 * (1 + abs(ref[name].item())), name


def _step(method: str, patch, autocast_dtype, backward: bool = True):
    """Loss, logged terms and the student's gradients of one step, at a fixed seed."""
    extra = {"lambda_c": 0.1} if method == "aua_bcl" else {"lambda_r": 0.1} if method == "full" else {}
    # Width 1 (2 for PCL's prototypes) keeps the emulated float16 convolutions affordable.
    # bcp mixes two halves of each batch: 2 + 2 crops (step 50 of 100 is in its self-training phase).
    n = 2 if method == "bcp" else 1
    cfg = TrainConfig(method=method, patch_size=patch, base_filters=2 if method == "full" else 1, dropout=0.0,
                      labelled_batch=n, unlabelled_batch=n, iterations=100, bcl_max_samples=2000, **extra)
    torch.manual_seed(5)
    student = build_model(cfg)
    y = torch.stack([sphere(patch, shift=3 * i) for i in range(n)])
    batch = {"image_l": torch.randn(n, 1, *patch) + 2 * y[:, None], "label_l": y, "image_u": torch.randn(n, 1, *patch)}
    if method == "fully_supervised":
        batch = {"image_l": torch.cat([batch["image_l"], batch["image_u"]]), "label_l": torch.cat([y, y])}
    if cfg.stage == 2:
        batch["label_u"] = sphere(patch, shift=3)[None]
        stats = None
        if cfg.lambda_r:
            stats = PrototypeStatistics(2, cfg.base_filters)
            stats.update(torch.nn.functional.normalize(torch.randn(500, 2) + torch.tensor([2.0, 0.0]), dim=1),
                         torch.arange(500) % 2)
        step = make_step(cfg, student, None, stats)
    else:  # the engine's own choice of step class (bcp's teacher: a copy of the student)
        step = make_step(cfg, student, copy.deepcopy(student) if cfg.has_teacher else None)
    student.train()
    torch.manual_seed(6)
    with torch.set_grad_enabled(backward), torch.autocast("cpu", dtype=autocast_dtype or torch.float16,
                                                           enabled=autocast_dtype is not None):
        loss, terms = step(batch, 50)
    if not backward:
        return loss, terms, []
    loss.backward()
    return loss, terms, [p.grad for p in student.parameters() if p.grad is not None]


@pytest.mark.parametrize("method, patch, dtype", STEP_PARAMS)
def test_one_training_step_under_emulated_amp(method, patch, dtype):
    ref, ref_terms, _ = _step(method, patch, None, backward=False)  # the float32 loss
    loss, terms, grads = _step(method, patch, dtype)
    assert loss.dtype == torch.float32
    assert close(loss.item(), ref.item(), dtype), (terms, ref_terms)
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for key, value in terms.items():
        assert math.isfinite(value), (key, value)


# ------------------------------------------------------------- sliding-window inference


def test_sliding_window_under_float16_keeps_the_float32_argmax():
    torch.manual_seed(7)
    net = SegmentationNet(base_filters=2, aleatoric=False, projection=False, dropout=0.0)
    with torch.no_grad():  # a decisive head, as a trained network has (random init: logits ~ 0)
        net.seg_head.weight.mul_(20)
    vol = np.random.default_rng(0).normal(size=(120, 112, 80)).astype(np.float32)
    vol += 2 * sphere((120, 112, 80)).numpy()
    kw = {"patch_size": P112, "stride": (8, 4, 4), "batch_size": 2, "device": "cpu"}  # two overlapping windows
    ref = sliding_window_predict(net, vol, **kw)
    half = sliding_window_predict(net, vol, amp=True, amp_dtype=torch.float16, **kw)
    assert half.dtype == np.float32 and np.isfinite(half).all()
    np.testing.assert_allclose(half.sum(0), 1.0, atol=1e-5)
    agree = (half.argmax(0) == ref.argmax(0)).mean()
    assert agree >= 0.999, agree
