"""Tests of ``semiseg.losses`` against slow, loop-based references written here.

Every reference below works on plain Python floats with explicit loops over samples,
voxels, pairs and anchors (no vectorised copy of the implementation), so a test fails when
the implementation's formula differs from the specification.

Tolerances: the implementation may compute in float32 internally (``.float()``), so value
comparisons of those losses use a float32-sized tolerance (``CLOSE32``); the soft Dice loss
keeps the input dtype and is compared in float64 (``CLOSE64``). Both are tight enough to
catch any formula error (a missing ``log S``, a dropped diagonal, a wrong normalisation ...).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from semiseg import losses
from semiseg.losses import (
    boundary_band,
    boundary_contrastive_loss,
    ce_dice_loss,
    consistency_weight,
    generalized_energy_distance,
    mc_integral_nll,
    sample_band_voxels,
    soft_dice_loss,
    supervised_contrastive_loss,
)

EPS = 1e-5
CLOSE64 = dict(rtol=1e-6, atol=1e-8)
CLOSE32 = dict(rtol=1e-5, atol=1e-6)
SHAPE = (4, 5, 6)


def as64(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def assert_close(actual: torch.Tensor, expected, tol=CLOSE32):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = actual.detach().to(torch.float64)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.allclose(actual, expected, **tol), f"implementation {actual.tolist()} != reference {expected.tolist()}"


# --------------------------------------------------------------------------------------
# Loop-based references (Python floats)
# --------------------------------------------------------------------------------------


def voxels(shape):
    x_n, y_n, z_n = shape
    for x in range(x_n):
        for y in range(y_n):
            for z in range(z_n):
                yield x, y, z


def ref_logsumexp(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def ref_log_softmax(values):
    lse = ref_logsumexp(values)
    return [v - lse for v in values]


def ref_mc_integral_nll(logit_samples: torch.Tensor, target: torch.Tensor) -> float:
    g = logit_samples.tolist()
    y = target.tolist()
    s_n, b_n, c_n = logit_samples.shape[:3]
    shape = tuple(logit_samples.shape[3:])
    v_n = shape[0] * shape[1] * shape[2]
    total = 0.0
    for b in range(b_n):
        per_sample = []
        for s in range(s_n):
            log_lik = 0.0
            for x, yy, z in voxels(shape):
                logp = ref_log_softmax([g[s][b][c][x][yy][z] for c in range(c_n)])
                log_lik += logp[y[b][x][yy][z]]
            per_sample.append(log_lik)
        total += (-ref_logsumexp(per_sample) + math.log(s_n)) / v_n
    return total / b_n


def ref_cross_entropy_sum(logits_b, target_b, c_n, shape) -> float:
    """Sum over the voxels of one volume of -log softmax(logits)[target]."""
    total = 0.0
    for x, y, z in voxels(shape):
        logp = ref_log_softmax([logits_b[c][x][y][z] for c in range(c_n)])
        total -= logp[target_b[x][y][z]]
    return total


def ref_dice_distance(p, q, c_n, shape, eps=EPS) -> float:
    """d(p, q) for one volume; p, q nested lists [C][X][Y][Z]."""
    ratios = []
    for c in range(c_n):
        inner = pp = qq = 0.0
        for x, y, z in voxels(shape):
            a, b = p[c][x][y][z], q[c][x][y][z]
            inner += a * b
            pp += a * a
            qq += b * b
        ratios.append((2 * inner + eps) / (pp + qq + eps))
    return 1 - sum(ratios) / c_n


def ref_ged(student: torch.Tensor, teacher: torch.Tensor, eps=EPS) -> list[float]:
    p, q = student.tolist(), teacher.tolist()
    s_n, b_n, c_n = student.shape[:3]
    t_n = teacher.shape[0]
    shape = tuple(student.shape[3:])
    out = []
    for b in range(b_n):
        cross = ss = tt = 0.0
        for i in range(s_n):
            for j in range(t_n):
                cross += ref_dice_distance(p[i][b], q[j][b], c_n, shape, eps)
        for i in range(s_n):
            for j in range(s_n):
                ss += ref_dice_distance(p[i][b], p[j][b], c_n, shape, eps)
        for i in range(t_n):
            for j in range(t_n):
                tt += ref_dice_distance(q[i][b], q[j][b], c_n, shape, eps)
        out.append(2 * cross / (s_n * t_n) - ss / (s_n * s_n) - tt / (t_n * t_n))
    return out


def ref_boundary_band(labels: torch.Tensor) -> torch.Tensor:
    lab = labels.tolist()
    b_n = labels.shape[0]
    shape = tuple(labels.shape[1:])
    out = torch.zeros(labels.shape, dtype=torch.bool)
    for b in range(b_n):
        for x, y, z in voxels(shape):
            here = lab[b][x][y][z]
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    for dz in (-1, 0, 1):
                        nx, ny, nz = x + dx, y + dy, z + dz
                        inside = 0 <= nx < shape[0] and 0 <= ny < shape[1] and 0 <= nz < shape[2]
                        if inside and lab[b][nx][ny][nz] != here:
                            out[b, x, y, z] = True
    return out


def ref_supcon(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    f = features.tolist()
    lab = labels.tolist()
    n = len(f)

    def dot(i, j):
        return sum(a * b for a, b in zip(f[i], f[j]))

    per_anchor = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and lab[p] == lab[i]]
        if not positives:
            continue
        denom = 0.0
        for o in range(n):
            if o != i:
                denom += math.exp(dot(i, o) / temperature)
        acc = 0.0
        for p in positives:
            acc += math.log(math.exp(dot(i, p) / temperature) / denom)
        per_anchor.append(-acc / len(positives))
    if not per_anchor:
        return 0.0
    return sum(per_anchor) / len(per_anchor)


def ref_band_rows(features: torch.Tensor, labels: torch.Tensor, b: int):
    """All band voxels of crop b: (rows (n, F) float64, labels (n,)), from the loop band."""
    band = ref_boundary_band(labels[b : b + 1])[0]
    rows, labs = [], []
    for x, y, z in voxels(tuple(labels.shape[1:])):
        if band[x, y, z]:
            rows.append([float(features[b, c, x, y, z]) for c in range(features.shape[1])])
            labs.append(int(labels[b, x, y, z]))
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), features.shape[1]), torch.tensor(labs, dtype=torch.int64)


def ref_soft_dice(probs: torch.Tensor, target: torch.Tensor, eps=EPS) -> float:
    p = probs.tolist()
    y = target.tolist()
    b_n, c_n = probs.shape[:2]
    shape = tuple(probs.shape[2:])
    ratios = []
    for c in range(1, c_n):
        inner = pp = yy = 0.0
        for b in range(b_n):
            for x, y_, z in voxels(shape):
                one = 1.0 if y[b][x][y_][z] == c else 0.0
                v = p[b][c][x][y_][z]
                inner += v * one
                pp += v * v
                yy += one * one
        ratios.append((2 * inner + eps) / (pp + yy + eps))
    return 1 - sum(ratios) / len(ratios)


def ref_softmax_probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 of (B, C, X, Y, Z), voxel by voxel."""
    g = logits.tolist()
    b_n, c_n = logits.shape[:2]
    shape = tuple(logits.shape[2:])
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for b in range(b_n):
        for x, y, z in voxels(shape):
            logp = ref_log_softmax([g[b][c][x][y][z] for c in range(c_n)])
            for c in range(c_n):
                out[b, c, x, y, z] = math.exp(logp[c])
    return out


def ref_ce_dice(logits: torch.Tensor, target: torch.Tensor) -> float:
    g = logits.tolist()
    y = target.tolist()
    b_n, c_n = logits.shape[:2]
    shape = tuple(logits.shape[2:])
    ce = sum(ref_cross_entropy_sum(g[b], y[b], c_n, shape) for b in range(b_n)) / (b_n * math.prod(shape))
    return 0.5 * (ce + ref_soft_dice(ref_softmax_probs(logits), target))


def fd_grad(fn, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central finite differences of a float64 scalar function, element by element."""
    grad = torch.zeros_like(x)
    flat = grad.view(-1)
    for i in range(x.numel()):
        plus, minus = x.clone(), x.clone()
        plus.view(-1)[i] += h
        minus.view(-1)[i] -= h
        flat[i] = (fn(plus) - fn(minus)) / (2 * h)
    return grad


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def blob_labels(b_n: int, shape=SHAPE, n_classes: int = 2, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    """Boxes of classes 1..n_classes-1 on background, plus a few random voxels."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.zeros((b_n, *shape), dtype=torch.int64)
    for b in range(b_n):
        for k in range(1, n_classes):
            lo = [int(torch.randint(0, n - 1, (1,), generator=g)) for n in shape]
            hi = [min(n, l + 1 + int(torch.randint(1, n, (1,), generator=g))) for l, n in zip(lo, shape)]
            lab[b, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = k
        flip = torch.rand(shape, generator=g) < noise
        lab[b][flip] = torch.randint(0, n_classes, shape, generator=g)[flip]
    return lab


def random_probs(*shape, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64), dim=dim)


def unit_features(*shape, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=dim)


# --------------------------------------------------------------------------------------
# 1. MC integral NLL
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("s_n,c_n,scale", [(3, 2, 1.0), (4, 3, 1.0), (3, 3, 8.0)])
def test_mc_integral_nll_matches_loop_reference(s_n, c_n, scale):
    torch.manual_seed(1)
    logits = scale * torch.randn(s_n, 2, c_n, *SHAPE, dtype=torch.float64)
    target = torch.randint(0, c_n, (2, *SHAPE))
    out = mc_integral_nll(logits, target)
    assert out.ndim == 0
    assert_close(out, ref_mc_integral_nll(logits, target))


def test_mc_integral_nll_single_sample_is_mean_voxel_cross_entropy():
    torch.manual_seed(2)
    logits = torch.randn(1, 2, 3, *SHAPE, dtype=torch.float64)
    target = torch.randint(0, 3, (2, *SHAPE))
    g, y = logits[0].tolist(), target.tolist()
    v_n = math.prod(SHAPE)
    expected = sum(ref_cross_entropy_sum(g[b], y[b], 3, SHAPE) / v_n for b in range(2)) / 2
    assert_close(mc_integral_nll(logits, target), expected)
    assert_close(mc_integral_nll(logits, target), F.cross_entropy(logits[0], target))


def test_mc_integral_nll_identical_samples_equal_single_sample():
    """logsumexp of S equal terms is x + log S: the + log S term must cancel it exactly."""
    torch.manual_seed(3)
    one = torch.randn(1, 2, 2, *SHAPE, dtype=torch.float64)
    target = torch.randint(0, 2, (2, *SHAPE))
    assert_close(mc_integral_nll(one.expand(4, *one.shape[1:]).clone(), target), mc_integral_nll(one, target).double())


# --------------------------------------------------------------------------------------
# 2. Generalised energy distance
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("s_n,c_n,seed", [(3, 2, 0), (4, 3, 1), (3, 3, 2)])
def test_ged_matches_loop_reference(s_n, c_n, seed):
    student = random_probs(s_n, 2, c_n, *SHAPE, dim=2, seed=seed)
    teacher = random_probs(s_n, 2, c_n, *SHAPE, dim=2, seed=seed + 100)
    out = generalized_energy_distance(student, teacher)
    assert out.shape == (2,)
    assert_close(out, ref_ged(student, teacher))


def test_ged_on_sharp_probabilities_matches_reference():
    """Near one-hot samples: large pairwise distances, where a dropped diagonal matters most."""
    torch.manual_seed(4)
    student = torch.softmax(6 * torch.randn(3, 2, 2, *SHAPE, dtype=torch.float64), dim=2)
    teacher = torch.softmax(6 * torch.randn(3, 2, 2, *SHAPE, dtype=torch.float64), dim=2)
    assert_close(generalized_energy_distance(student, teacher), ref_ged(student, teacher))


def test_ged_identical_single_sample_is_zero_and_batch_shaped():
    p = random_probs(1, 3, 2, *SHAPE, dim=2, seed=5)
    out = generalized_energy_distance(p, p.clone())
    assert out.shape == (3,)
    assert torch.allclose(out.double(), torch.zeros(3, dtype=torch.float64), atol=1e-6)


def test_ged_is_symmetric():
    p = random_probs(3, 2, 2, *SHAPE, dim=2, seed=6)
    q = random_probs(3, 2, 2, *SHAPE, dim=2, seed=7)
    assert_close(generalized_energy_distance(p, q), generalized_energy_distance(q, p).double())


def test_ged_gradient_matches_finite_differences_of_reference():
    p = random_probs(2, 1, 2, 2, 2, 2, dim=2, seed=8)
    q = random_probs(2, 1, 2, 2, 2, 2, dim=2, seed=9)
    pg, qg = p.clone().requires_grad_(), q.clone().requires_grad_()
    generalized_energy_distance(pg, qg).sum().backward()
    fd_p = fd_grad(lambda x: ref_ged(x, q)[0], p)
    fd_q = fd_grad(lambda x: ref_ged(p, x)[0], q)
    assert torch.allclose(pg.grad.double(), fd_p, rtol=1e-4, atol=1e-5), (pg.grad, fd_p)
    assert torch.allclose(qg.grad.double(), fd_q, rtol=1e-4, atol=1e-5), (qg.grad, fd_q)


def test_ged_gradcheck_float64():
    p = random_probs(2, 1, 2, 2, 2, 2, dim=2, seed=10).requires_grad_()
    q = random_probs(2, 1, 2, 2, 2, 2, dim=2, seed=11).requires_grad_()
    assert torch.autograd.gradcheck(generalized_energy_distance, (p, q))


# --------------------------------------------------------------------------------------
# 3. Boundary band
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [
        blob_labels(2, n_classes=2, seed=0),
        blob_labels(2, n_classes=3, seed=1),
        blob_labels(3, n_classes=3, seed=2, noise=0.0),
        torch.randint(0, 3, (2, *SHAPE), generator=torch.Generator().manual_seed(3)),
    ],
    ids=["two-class", "three-class", "three-class-boxes", "three-class-random"],
)
def test_boundary_band_matches_loop_reference(labels):
    out = boundary_band(labels)
    assert out.dtype == torch.bool
    assert out.shape == labels.shape
    ref = ref_boundary_band(labels)
    assert torch.equal(out, ref), f"differs at {torch.nonzero(out != ref).tolist()}"


def test_boundary_band_is_false_without_boundary():
    assert not boundary_band(torch.zeros(2, *SHAPE, dtype=torch.int64)).any()
    assert not boundary_band(torch.full((2, *SHAPE), 2, dtype=torch.int64)).any()


def test_boundary_band_single_voxel_cube_and_volume_edge():
    lab = torch.zeros(2, *SHAPE, dtype=torch.int64)
    lab[0, 2, 2, 3] = 1  # interior voxel: the full 3x3x3 cube around it
    lab[1, 0, 0, 0] = 2  # corner voxel: only the 2x2x2 cube inside the volume
    expected = torch.zeros_like(lab, dtype=torch.bool)
    expected[0, 1:4, 1:4, 2:5] = True
    expected[1, 0:2, 0:2, 0:2] = True
    assert torch.equal(boundary_band(lab), expected)


def test_boundary_band_half_space_edge_is_not_boundary():
    lab = torch.zeros(1, *SHAPE, dtype=torch.int64)
    lab[0, :2] = 1  # x in {0, 1} foreground: band is x in {1, 2}; x = 0 touches only the edge
    expected = torch.zeros_like(lab, dtype=torch.bool)
    expected[0, 1:3] = True
    assert torch.equal(boundary_band(lab), expected)


# --------------------------------------------------------------------------------------
# 4. Supervised contrastive loss
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels,temperature",
    [
        ([0, 0, 1, 1, 0, 1, 1, 0], 0.07),
        ([0, 0, 1, 2, 2, 3, 0, 4], 0.1),  # anchors 1-labelled, 3 and 4 have no positive
        ([2, 2, 2, 2, 2, 2], 0.5),
        ([0, 1, 0, 1, 2, 2, 2, 0, 1, 1], 1.0),
    ],
)
def test_supcon_matches_loop_reference(labels, temperature):
    labels = torch.tensor(labels)
    features = unit_features(len(labels), 4, dim=1, seed=len(labels))
    out = supervised_contrastive_loss(features, labels, temperature)
    assert out.ndim == 0
    assert_close(out, ref_supcon(features, labels, temperature))


def test_supcon_is_permutation_invariant():
    labels = torch.tensor([0, 1, 1, 0, 2, 2, 0])
    features = unit_features(7, 3, dim=1, seed=12)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    a = supervised_contrastive_loss(features, labels, 0.1)
    b = supervised_contrastive_loss(features[perm], labels[perm], 0.1)
    assert_close(a, b.double())


@pytest.mark.parametrize("n", [1, 6])
def test_supcon_without_positives_is_zero_with_graph(n):
    features = unit_features(n, 3, dim=1, seed=13).requires_grad_()
    out = supervised_contrastive_loss(features, torch.arange(n), 0.07)
    assert out.ndim == 0
    assert out.item() == 0.0
    assert out.requires_grad
    out.backward()
    assert features.grad is not None
    assert torch.equal(features.grad, torch.zeros_like(features))


def _normalised_supcon(labels, temperature):
    def fn(x):
        return supervised_contrastive_loss(F.normalize(x, dim=1), labels, temperature)

    return fn


def test_supcon_gradient_matches_finite_differences_of_reference():
    labels = torch.tensor([0, 0, 1, 1, 0])
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    xg = x.clone().requires_grad_()
    _normalised_supcon(labels, 0.5)(xg).backward()
    fd = fd_grad(lambda v: ref_supcon(F.normalize(v, dim=1), labels, 0.5), x)
    assert torch.allclose(xg.grad.double(), fd, rtol=1e-4, atol=1e-5), (xg.grad, fd)


def test_supcon_gradcheck_float64():
    labels = torch.tensor([0, 0, 1, 1, 0])
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(14)).requires_grad_()
    assert torch.autograd.gradcheck(_normalised_supcon(labels, 0.5), (x,))


# --------------------------------------------------------------------------------------
# 5. Boundary contrastive loss
# --------------------------------------------------------------------------------------


def position_features(b_n: int, shape=SHAPE) -> torch.Tensor:
    """(B, 5, X, Y, Z): voxel (b, x, y, z) holds normalise([1, x+1, y+1, z+1, b+1]).

    The leading 1 makes the normalised vectors pairwise distinct, so a row identifies its
    voxel; no two channels of one voxel are equal-valued in general, so a channel-mixing view
    gives rows that are not any voxel's vector.
    """
    out = torch.zeros((b_n, 5, *shape), dtype=torch.float64)
    for b in range(b_n):
        for x, y, z in voxels(shape):
            out[b, :, x, y, z] = torch.tensor([1.0, x + 1.0, y + 1.0, z + 1.0, b + 1.0], dtype=torch.float64)
    return F.normalize(out, dim=1)


class Capture:
    """Wraps supervised_contrastive_loss, recording the rows and labels it receives."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.original = losses.supervised_contrastive_loss
        monkeypatch.setattr(losses, "supervised_contrastive_loss", self)

    def __call__(self, features, labels, temperature=0.07):
        self.calls.append((features.detach().clone(), labels.detach().clone()))
        return self.original(features, labels, temperature)


def bcl_labels():
    """Three crops: two with boundaries (3 classes), the middle one constant (no band)."""
    lab = blob_labels(3, n_classes=3, seed=21, noise=0.0)
    lab[1] = 1
    return lab


@pytest.mark.parametrize("max_samples", [1, 7, "band-of-crop-0", "band-of-crop-2", 10_000])
def test_bcl_samples_rows_that_are_band_voxel_embeddings(monkeypatch, max_samples):
    labels = bcl_labels()
    features = position_features(3)
    band = ref_boundary_band(labels)
    if isinstance(max_samples, str):  # exactly one crop's band size (the crops' sizes differ)
        max_samples = int(band[int(max_samples[-1])].sum())
    lookup = {}
    for b in range(3):
        for x, y, z in voxels(SHAPE):
            lookup[tuple(features[b, :, x, y, z].tolist())] = (b, x, y, z)
    assert len(lookup) == 3 * math.prod(SHAPE)

    capture = Capture(monkeypatch)
    out = boundary_contrastive_loss(features, labels, max_samples=max_samples, temperature=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out)

    band_crops = [b for b in range(3) if band[b].any()]
    assert band_crops == [0, 2]
    assert len(capture.calls) == len(band_crops)
    for b, (rows, labs) in zip(band_crops, capture.calls):
        assert rows.ndim == 2 and rows.shape[1] == 5
        found = []
        for row, lab in zip(rows, labs):
            key = tuple(row.to(torch.float64).tolist())
            assert key in lookup, f"row {key} is not any voxel's feature vector"
            vb, x, y, z = lookup[key]
            assert vb == b, f"row of crop {vb} passed with crop {b}"
            assert band[b, x, y, z], f"voxel {(x, y, z)} of crop {b} is not in the band"
            assert int(lab) == int(labels[b, x, y, z]), f"label {int(lab)} != {int(labels[b, x, y, z])} at {(b, x, y, z)}"
            found.append((x, y, z))
        assert len(set(found)) == len(found), "a voxel was sampled twice"
        assert len(found) == min(max_samples, int(band[b].sum()))


def test_bcl_generator_drives_sampling(monkeypatch):
    labels = bcl_labels()
    features = position_features(3)
    capture = Capture(monkeypatch)
    values = [boundary_contrastive_loss(features, labels, 5, 0.1, torch.Generator().manual_seed(seed)) for seed in (3, 3, 4, 5, 6)]
    picks = [[tuple(map(tuple, rows.tolist())) for rows, _ in capture.calls[2 * i : 2 * i + 2]] for i in range(5)]
    assert torch.equal(values[0], values[1])
    assert picks[0] == picks[1]
    assert any(p != picks[0] for p in picks[2:]), "different seeds never changed the sampled voxels"


def test_bcl_same_seed_same_value():
    labels = blob_labels(2, n_classes=3, seed=22)
    features = unit_features(2, 4, *SHAPE, dim=1, seed=23)
    a = boundary_contrastive_loss(features, labels, 6, 0.07, torch.Generator().manual_seed(11))
    b = boundary_contrastive_loss(features, labels, 6, 0.07, torch.Generator().manual_seed(11))
    assert torch.equal(a, b)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_bcl_with_all_band_voxels_is_mean_of_per_crop_supcon(temperature):
    labels = blob_labels(2, n_classes=3, seed=24)
    features = unit_features(2, 4, *SHAPE, dim=1, seed=25)
    per_crop = []
    for b in range(2):
        rows, labs = ref_band_rows(features, labels, b)
        assert len(rows) > 0
        per_crop.append(ref_supcon(rows, labs, temperature))
    out = boundary_contrastive_loss(features, labels, max_samples=10_000, temperature=temperature)
    assert out.ndim == 0
    assert_close(out, sum(per_crop) / len(per_crop))


def test_bcl_skips_crops_without_band():
    labels = bcl_labels()  # crop 1 is constant
    features = unit_features(3, 4, *SHAPE, dim=1, seed=26)
    per_crop = [ref_supcon(*ref_band_rows(features, labels, b), 0.1) for b in (0, 2)]
    out = boundary_contrastive_loss(features, labels, max_samples=10_000, temperature=0.1)
    assert_close(out, sum(per_crop) / 2)


@pytest.mark.parametrize("value", [0, 2])
def test_bcl_without_band_anywhere_is_zero_with_graph(value):
    labels = torch.full((2, *SHAPE), value, dtype=torch.int64)
    features = unit_features(2, 4, *SHAPE, dim=1, seed=27).requires_grad_()
    out = boundary_contrastive_loss(features, labels, max_samples=10, temperature=0.07)
    assert out.ndim == 0
    assert out.item() == 0.0
    assert out.requires_grad
    out.backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


# --------------------------------------------------------------------------------------
# 6. Soft Dice and CE + Dice
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("c_n,seed", [(2, 30), (3, 31)])
def test_soft_dice_matches_loop_reference(c_n, seed):
    probs = random_probs(2, c_n, *SHAPE, dim=1, seed=seed)
    target = blob_labels(2, n_classes=c_n, seed=seed)
    out = soft_dice_loss(probs, target)
    assert out.ndim == 0
    assert_close(out, ref_soft_dice(probs, target), CLOSE64)


def test_soft_dice_sums_over_the_whole_batch():
    """Batch-wide sums differ from a mean of per-volume Dice when volumes differ in size."""
    probs = random_probs(2, 2, *SHAPE, dim=1, seed=32)
    target = torch.zeros(2, *SHAPE, dtype=torch.int64)
    target[0, :3, :4, :5] = 1
    target[1, 1, 1, 1] = 1
    batch = ref_soft_dice(probs, target)
    per_volume = sum(ref_soft_dice(probs[b : b + 1], target[b : b + 1]) for b in range(2)) / 2
    assert abs(batch - per_volume) > 1e-3
    assert_close(soft_dice_loss(probs, target), batch, CLOSE64)


def test_soft_dice_perfect_empty_prediction_is_zero():
    target = torch.zeros(2, *SHAPE, dtype=torch.int64)
    probs = F.one_hot(target, 3).movedim(-1, 1).to(torch.float64)
    out = soft_dice_loss(probs, target)
    assert torch.isfinite(out)
    assert_close(out, 0.0, CLOSE64)


@pytest.mark.parametrize("c_n,seed", [(2, 33), (3, 34)])
def test_ce_dice_matches_loop_reference(c_n, seed):
    torch.manual_seed(seed)
    logits = 2 * torch.randn(2, c_n, *SHAPE, dtype=torch.float64)
    target = blob_labels(2, n_classes=c_n, seed=seed)
    out = ce_dice_loss(logits, target)
    assert out.ndim == 0
    assert_close(out, ref_ce_dice(logits, target))


# --------------------------------------------------------------------------------------
# 7. Consistency weight
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "iteration,expected",
    [
        (0, 0.15 * math.exp(-5.0)),
        (3000, 0.15 * math.exp(-5.0 * 0.25)),
        (1500, 0.15 * math.exp(-5.0 * 0.75**2)),
        (6000, 0.15),
        (12000, 0.15),
        (-100, 0.15 * math.exp(-5.0)),
    ],
)
def test_consistency_weight_defaults(iteration, expected):
    assert consistency_weight(iteration) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("iteration", [0, 50, 100, 200])
def test_consistency_weight_custom(iteration):
    t = min(max(iteration, 0), 100)
    expected = 1.0 * math.exp(-5.0 * (1 - t / 100) ** 2)
    assert consistency_weight(iteration, max_weight=1.0, rampup=100) == pytest.approx(expected, rel=1e-12)


def test_consistency_weight_is_monotone_until_rampup():
    values = [consistency_weight(i) for i in range(0, 6001, 250)]
    assert all(a < b for a, b in zip(values, values[1:]))


# --------------------------------------------------------------------------------------
# 8. Finiteness on crops with no foreground / no boundary
# --------------------------------------------------------------------------------------


def _finite_grad(*tensors):
    for t in tensors:
        assert t.grad is not None
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("value", [0, 1], ids=["all-background", "constant-foreground"])
def test_every_loss_is_finite_on_constant_labels(value):
    torch.manual_seed(40)
    target = torch.full((2, *SHAPE), value, dtype=torch.int64)

    logit_samples = torch.randn(3, 2, 2, *SHAPE, dtype=torch.float64, requires_grad=True)
    out = mc_integral_nll(logit_samples, target)
    assert torch.isfinite(out)
    out.backward()
    _finite_grad(logit_samples)

    # GED on exact one-hot probabilities of the constant label: a class with no mass.
    onehot = F.one_hot(target, 2).movedim(-1, 1).to(torch.float64)
    student = onehot.unsqueeze(0).expand(2, -1, -1, -1, -1, -1).clone().requires_grad_()
    teacher = onehot.unsqueeze(0).expand(2, -1, -1, -1, -1, -1).clone().requires_grad_()
    out = generalized_energy_distance(student, teacher)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), torch.zeros(2, dtype=torch.float64), atol=1e-6)
    out.sum().backward()
    _finite_grad(student, teacher)

    assert not boundary_band(target).any()

    features = unit_features(2, 4, *SHAPE, dim=1, seed=41).requires_grad_()
    out = boundary_contrastive_loss(features, target, max_samples=10, temperature=0.07)
    assert torch.isfinite(out)
    out.backward()
    _finite_grad(features)

    rows = unit_features(6, 4, dim=1, seed=42).requires_grad_()
    out = supervised_contrastive_loss(rows, torch.full((6,), value), 0.07)
    assert torch.isfinite(out)
    out.backward()
    _finite_grad(rows)

    probs = onehot.clone().requires_grad_()
    out = soft_dice_loss(probs, target)
    assert torch.isfinite(out)
    out.backward()
    _finite_grad(probs)

    logits = torch.randn(2, 2, *SHAPE, dtype=torch.float64, requires_grad=True)
    out = ce_dice_loss(logits, target)
    assert torch.isfinite(out)
    out.backward()
    _finite_grad(logits)


def test_soft_dice_and_ce_dice_finite_when_prediction_and_target_are_empty():
    target = torch.zeros(1, *SHAPE, dtype=torch.int64)
    logits = torch.zeros(1, 2, *SHAPE, dtype=torch.float64)
    logits[:, 0] = 50.0  # foreground probability ~ e^-50
    logits.requires_grad_()
    out = ce_dice_loss(logits, target)
    assert torch.isfinite(out)
    out.backward()
    _finite_grad(logits)
    assert_close(out, ref_ce_dice(logits.detach(), target))


# --------------------------------------------------------------------------------------
# Precision (not part of the API text): float64 in, float64 out
# --------------------------------------------------------------------------------------


def test_losses_keep_float64_precision():
    """A float64 caller (gradcheck, reference checks) should not be silently cut to float32."""
    torch.manual_seed(50)
    target = blob_labels(2, n_classes=2, seed=50)
    p = random_probs(2, 2, 2, *SHAPE, dim=2, seed=51)
    results = {
        "mc_integral_nll": mc_integral_nll(torch.randn(2, 2, 2, *SHAPE, dtype=torch.float64), target),
        "generalized_energy_distance": generalized_energy_distance(p, p),
        "supervised_contrastive_loss": supervised_contrastive_loss(unit_features(5, 3, dim=1), torch.tensor([0, 0, 1, 1, 0]), 0.1),
        "boundary_contrastive_loss": boundary_contrastive_loss(unit_features(2, 3, *SHAPE, dim=1), target, 10, 0.1),
        "soft_dice_loss": soft_dice_loss(p[0], target),
        "ce_dice_loss": ce_dice_loss(torch.randn(2, 2, *SHAPE, dtype=torch.float64), target),
    }
    downcast = {name: str(v.dtype) for name, v in results.items() if v.dtype != torch.float64}
    assert not downcast, f"float64 inputs computed in lower precision by: {downcast}"


# ---- BCL with the projection applied to the sampled rows ------------------------


def test_projection_on_sampled_rows_matches_projected_volume():
    torch.manual_seed(0)
    feats = torch.randn(2, 5, 8, 9, 7, dtype=torch.float64)
    labels = torch.zeros(2, 8, 9, 7, dtype=torch.long)
    labels[0, 2:6, 3:7, 2:5] = 1
    labels[1, 1:3, 1:3, 1:3] = 1
    weight = torch.randn(4, 5, dtype=torch.float64)

    def project_rows(rows):  # a per-voxel map, no batch statistics
        return F.normalize(rows @ weight.T, dim=1)

    projected = F.normalize(torch.einsum("pf,bfxyz->bpxyz", weight, feats), dim=1)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = boundary_contrastive_loss(projected, labels, 20, 0.1, generator=g1)
    b = boundary_contrastive_loss(feats, labels, 20, 0.1, generator=g2, projection=project_rows)
    assert torch.allclose(a, b)
    picked = sample_band_voxels(labels, 20, torch.Generator().manual_seed(3))
    assert [p.numel() for p in picked] == [20, 20]
    assert sample_band_voxels(torch.zeros(1, 4, 4, 4, dtype=torch.long), 5)[0].numel() == 0


# ---- PCL (Eq. 12, multi-class form) ----------------------------------------------


def _pcl_naive(f, y, mu, cov, tau):
    total = 0.0
    for i in range(f.shape[0]):
        fi = [float(v) for v in f[i]]
        terms = []
        for c in range(mu.shape[0]):
            lin = sum(fi[k] * float(mu[c, k]) for k in range(len(fi))) / tau
            quad = sum(fi[a] * float(cov[c, a, b]) * fi[b] for a in range(len(fi)) for b in range(len(fi))) / (2 * tau**2)
            terms.append(lin + quad)
        own = sum(fi[k] * float(mu[int(y[i]), k]) for k in range(len(fi))) / tau
        m = max(terms)
        total += -own + m + math.log(sum(math.exp(t - m) for t in terms))
    return total / f.shape[0]


@pytest.mark.parametrize("tau", [100.0, 0.5])
def test_pcl_equals_naive_loop(tau):
    from semiseg.losses import prototype_contrastive_loss

    torch.manual_seed(0)
    f = F.normalize(torch.randn(7, 4, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 1, 2, 1, 1, 0, 2])
    mu = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    a = torch.randn(3, 4, 4, dtype=torch.float64)
    cov = a @ a.transpose(1, 2) / 4
    got = prototype_contrastive_loss(f, y, mu, cov, tau)
    assert torch.allclose(got, torch.tensor(_pcl_naive(f, y, mu, cov, tau), dtype=torch.float64), **CLOSE64)


def test_pcl_finite_edge_cases():
    from semiseg.losses import prototype_contrastive_loss

    f = F.normalize(torch.randn(6, 3), dim=1).requires_grad_()
    mu, cov = torch.zeros(2, 3), torch.zeros(2, 3, 3)
    one_class = prototype_contrastive_loss(f, torch.ones(6, dtype=torch.long), mu, cov, 100.0)
    assert torch.isfinite(one_class) and torch.isclose(one_class, torch.tensor(math.log(2.0)))
    none = prototype_contrastive_loss(f[:0], torch.zeros(0, dtype=torch.long), mu, cov, 100.0)
    none.backward()
    assert none.item() == 0.0 and torch.all(f.grad == 0)


@pytest.mark.parametrize("tau", [100.0, 1.0])
def test_pcl_scale_is_set_by_tau_on_normalised_features(tau):
    """With unit anchors and pcl_prototypes' normalisation (unit means, unit-norm variance
    vectors) every PCL logit lies in [-1/tau, 1/tau + 1/(2 tau^2)], so PCL stays within
    2/tau + 1/(2 tau^2) of ln C and the gradient on each anchor is at most (2/tau + 1/tau^2)/N.
    At the paper's tau_2 = 100 that is 0.02 of ln 2 (docs/benchmarks.md: PCL barely moves a
    stage-2 network)."""
    from semiseg.losses import prototype_contrastive_loss
    from semiseg.prototypes import PrototypeStatistics
    from semiseg.training.engine import pcl_prototypes

    torch.manual_seed(1)
    stats = PrototypeStatistics(2, 8)
    stats.update(F.normalize(torch.randn(500, 8), dim=1), torch.randint(0, 2, (500,)))
    means, covs = pcl_prototypes(stats, normalise=True)
    f = F.normalize(torch.randn(300, 8) * 3 + 1, dim=1).requires_grad_()
    y = torch.randint(0, 2, (300,))
    loss = prototype_contrastive_loss(f, y, means, covs, tau)
    loss.backward()
    bound = 2 / tau + 1 / (2 * tau**2)
    assert abs(loss.item() - math.log(2)) <= bound
    assert f.grad.norm(dim=1).max().item() <= (2 / tau + 1 / tau**2) / f.shape[0] + 1e-9
