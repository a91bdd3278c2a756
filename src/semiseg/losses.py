"""Loss functions of both stages, as pure, typed functions.

Shapes: ``B`` batch, ``C`` classes, ``S`` Monte-Carlo samples, ``(X, Y, Z)`` a crop, ``V``
its voxel count, ``N`` sampled voxels, ``F`` feature channels. Every loss is finite on crops
with no foreground or no boundary voxel (the released code divided by zero there).
Equation numbers are the paper's.

Mixed precision: every loss runs with autocast off and its inputs cast up to float32
(:mod:`semiseg.precision`), so its sums over voxels, samples and anchors never run in
float16 (a crop of the paper's patch has ~10^6 voxels; float16 ends at 65504).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from semiseg.precision import at_least_float32, full_precision, full_precision_op

DICE_EPS = 1e-5


@full_precision_op
def mc_integral_nll(logit_samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo integral negative log-likelihood (Eq. 3-4), per voxel.

    ``logit_samples`` (S, B, C, X, Y, Z) logit samples; ``target`` (B, X, Y, Z) int64 class
    indices. Returns the batch mean of
    ``[-logsumexp_s(sum_v log_softmax(g_s)[v, y_v]) + log S] / V`` (scalar).
    """
    if logit_samples.ndim != 6:
        raise ValueError(f"logit_samples must be (S, B, C, X, Y, Z), got {tuple(logit_samples.shape)}")
    s, b = logit_samples.shape[:2]
    if target.shape != (b, *logit_samples.shape[3:]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match logit samples {tuple(logit_samples.shape)}")
    logp = F.log_softmax(logit_samples, dim=2)
    index = target.long().unsqueeze(0).unsqueeze(2).expand(s, b, 1, *target.shape[1:])
    per_sample = logp.gather(2, index).flatten(2).sum(-1)  # (S, B): log p(y | g_s)
    voxels = math.prod(target.shape[1:])
    nll = -torch.logsumexp(per_sample, dim=0) + math.log(s)  # (B,)
    return (nll / voxels).mean()


def _pairwise_dice_distance(p: torch.Tensor, q: torch.Tensor, eps: float = DICE_EPS) -> torch.Tensor:
    """Class-mean soft Dice distance between every sample of ``p`` and of ``q``.

    ``p`` (S, B, C, V), ``q`` (T, B, C, V) -> (S, T, B):
    ``1 - mean_c (2 sum_v p_c q_c + eps) / (sum_v p_c^2 + sum_v q_c^2 + eps)``.
    """
    inner = torch.einsum("sbcv,tbcv->stbc", p, q)
    pp = (p * p).sum(-1)  # (S, B, C)
    qq = (q * q).sum(-1)  # (T, B, C)
    ratio = (2 * inner + eps) / (pp[:, None] + qq[None] + eps)
    return 1 - ratio.mean(-1)


@full_precision_op
def generalized_energy_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor, eps: float = DICE_EPS) -> torch.Tensor:
    """Generalised energy distance between student and teacher samples (Eq. 6-7).

    ``student_probs``, ``teacher_probs``: (S, B, C, X, Y, Z) softmax probabilities of S
    samples each. Returns (B,): ``2 mean d(s, t) - mean d(s, s') - mean d(t, t')`` over all
    S x S pairs (diagonal included), with ``d`` the class-mean soft Dice distance
    (background included, eps 1e-5).
    """
    if student_probs.ndim != 6 or teacher_probs.shape[1:] != student_probs.shape[1:]:
        raise ValueError(f"expected two (S, B, C, X, Y, Z) tensors, got {tuple(student_probs.shape)} and {tuple(teacher_probs.shape)}")
    p = student_probs.flatten(3)
    q = teacher_probs.flatten(3)
    cross = _pairwise_dice_distance(p, q, eps).mean((0, 1))
    ss = _pairwise_dice_distance(p, p, eps).mean((0, 1))
    tt = _pairwise_dice_distance(q, q, eps).mean((0, 1))
    return 2 * cross - ss - tt


def boundary_band(labels: torch.Tensor) -> torch.Tensor:
    """Voxels with a voxel of another class in their 3 x 3 x 3 neighbourhood.

    ``labels`` (B, X, Y, Z) int -> bool (B, X, Y, Z): a one-voxel band on both sides of
    every label boundary. The volume's edge is not a boundary (edge-replicated padding).
    """
    if labels.ndim != 4:
        raise ValueError(f"labels must be (B, X, Y, Z), got {tuple(labels.shape)}")
    x = labels.float().unsqueeze(1)
    padded = F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")
    hi = F.max_pool3d(padded, 3, stride=1)
    lo = -F.max_pool3d(-padded, 3, stride=1)
    return ((hi != x) | (lo != x)).squeeze(1)


class _LogSumExpOthers(torch.autograd.Function):
    """``lse_i = log sum_{o != i} exp(f_i.f_o / t)`` for (N, F) features, in row blocks.

    Never holds the N x N similarity matrix: forward and backward recompute one block of
    rows at a time (the backward from the saved ``lse``), so memory is O(block x N) and
    the work stays in cache; the gradient is exact. Forward and backward both run with
    autocast off, in the dtype of ``f`` (float32 from :func:`supervised_contrastive_loss`):
    a float16 forward with a float32 backward would differentiate another function.
    """

    BLOCK = 256

    @staticmethod
    def forward(ctx, f: torch.Tensor, temperature: float) -> torch.Tensor:
        with full_precision():
            return _LogSumExpOthers._forward(ctx, f, temperature)

    @staticmethod
    def _forward(ctx, f: torch.Tensor, temperature: float) -> torch.Tensor:
        n = f.shape[0]
        lse = torch.empty(n, dtype=f.dtype, device=f.device)
        for i0 in range(0, n, _LogSumExpOthers.BLOCK):
            i1 = min(n, i0 + _LogSumExpOthers.BLOCK)
            block = (f[i0:i1] @ f.T) / temperature
            block[torch.arange(i1 - i0), torch.arange(i0, i1)] = float("-inf")
            lse[i0:i1] = torch.logsumexp(block, dim=1)
        ctx.save_for_backward(f, lse)
        ctx.temperature = temperature
        return lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with full_precision():
            return _LogSumExpOthers._backward(ctx, grad.to(ctx.saved_tensors[0].dtype))

    @staticmethod
    def _backward(ctx, grad: torch.Tensor):
        f, lse = ctx.saved_tensors
        t = ctx.temperature
        n = f.shape[0]
        grad_f = torch.zeros_like(f)
        for i0 in range(0, n, _LogSumExpOthers.BLOCK):
            i1 = min(n, i0 + _LogSumExpOthers.BLOCK)
            block = (f[i0:i1] @ f.T) / t
            block[torch.arange(i1 - i0), torch.arange(i0, i1)] = float("-inf")
            w = torch.exp(block - lse[i0:i1, None]) * (grad[i0:i1, None] / t)  # (b, N), softmax x upstream
            grad_f[i0:i1] += w @ f
            grad_f += w.T @ f[i0:i1]
        return grad_f, None


@full_precision_op
def supervised_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Eq. 10).

    ``features`` (N, F) unit-norm embeddings, ``labels`` (N,). For each anchor ``i``:
    ``-1/|P(i)| sum_{p in P(i)} log(exp(f_i.f_p / t) / sum_{o != i} exp(f_i.f_o / t))``,
    averaged over the anchors with at least one positive. Returns 0 (keeping the graph)
    when no anchor has a positive.
    """
    n = features.shape[0]
    if features.ndim != 2 or labels.shape != (n,):
        raise ValueError(f"expected features (N, F) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}")
    if n < 2:
        return features.sum() * 0.0
    f = features
    labels = labels.long()
    # Only the denominator needs the N x N similarities. The positives' numerator sums
    # through per-class feature sums: sum_{p in P(i)} f_i.f_p = f_i.(S_{y_i} - f_i).
    lse = _LogSumExpOthers.apply(f, temperature)  # (N,): log sum_{o != i} exp(f_i.f_o / t)
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    class_sums = torch.zeros(len(classes), f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, inverse, f)
    n_pos = counts[inverse] - 1
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return features.sum() * 0.0
    pos_dot = (f * (class_sums[inverse] - f)).sum(1) / temperature  # sum over P(i) of f_i.f_p / t
    per_anchor = lse[has_pos] - pos_dot[has_pos] / n_pos[has_pos]
    return per_anchor.mean()


def sample_band_voxels(labels: torch.Tensor, max_samples: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Per crop, flat indices (into X*Y*Z) of up to ``max_samples`` :func:`boundary_band` voxels.

    ``labels`` (B, X, Y, Z). Drawn without replacement with ``generator`` (all band voxels
    when there are at most ``max_samples``); an empty tensor for a crop without band voxels.
    """
    band = boundary_band(labels)
    picked = []
    for b in range(labels.shape[0]):
        idx = torch.nonzero(band[b].flatten(), as_tuple=False).squeeze(1)
        if idx.numel() > max_samples:
            pick = torch.randperm(idx.numel(), generator=generator, device=generator.device if generator is not None else "cpu")[:max_samples]
            idx = idx[pick.to(idx.device)]
        picked.append(idx)
    return picked


def boundary_contrastive_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    max_samples: int = 9000,
    temperature: float = 0.07,
    generator: torch.Generator | None = None,
    projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Boundary-aware contrastive loss (BCL, Eq. 10 on near-boundary voxels).

    ``features`` (B, F, X, Y, Z) projection-head embeddings, ``labels`` (B, X, Y, Z). Per
    crop, up to ``max_samples`` voxels of :func:`boundary_band` are drawn (without
    replacement, with ``generator``); each sampled row is one voxel's F-vector (indexing the
    channels-last tensor, not the released code's channel-mixing view). The supervised
    contrastive loss is averaged over the crops that have any band voxel; 0 (keeping the
    graph) when none has. Runs with autocast off: the sampled rows, the projection head on
    them and the loss are float32 whatever the features' dtype.

    ``projection``: optional map of (n, F) rows to (n, P) unit-norm embeddings, applied to
    the sampled rows of all crops together; ``features`` are then the pre-projection
    features (so a per-voxel projection head runs on the sampled voxels only).
    """
    if features.ndim != 5 or labels.shape != (features.shape[0], *features.shape[2:]):
        raise ValueError(f"expected features (B, F, X, Y, Z) and labels (B, X, Y, Z), got {tuple(features.shape)} and {tuple(labels.shape)}")
    picked = sample_band_voxels(labels, max_samples, generator)
    crops = [b for b, idx in enumerate(picked) if idx.numel() > 0]
    if not crops:
        return features.sum() * 0.0
    with full_precision():
        # (n, F) rows: voxel v's embedding is column v of the (F, X*Y*Z) view; only the
        # sampled rows are cast up to float32, not the whole feature map.
        rows = [at_least_float32(features[b].flatten(1).T[picked[b]]) for b in crops]
        if projection is not None:
            sizes = [r.shape[0] for r in rows]
            rows = list(torch.split(at_least_float32(projection(torch.cat(rows))), sizes))
        losses = [supervised_contrastive_loss(r, labels[b].flatten()[picked[b]], temperature) for b, r in zip(crops, rows, strict=True)]
        return torch.stack(losses).mean()


@full_precision_op
def prototype_contrastive_loss(
    features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor, covs: torch.Tensor, tau: float = 100.0
) -> torch.Tensor:
    """Prototype-aware contrastive loss (PCL, Eq. 12 in its multi-class form).

    ``features`` (N, F) anchors, ``labels`` (N,) int class of each anchor, ``means`` (C, F),
    ``covs`` (C, F, F). Returns the mean over anchors of
    ``-f.mu_y / tau + log sum_c exp(f.mu_c / tau + f^T Sigma_c f / (2 tau^2))``, computed on
    the inputs as given (normalisation, anchor selection and ignore labels are the caller's).
    0 (keeping the graph) when there are no anchors.
    """
    n = features.shape[0]
    c, fdim = means.shape
    if features.ndim != 2 or labels.shape != (n,) or features.shape[1] != fdim or covs.shape != (c, fdim, fdim):
        raise ValueError(
            f"expected features (N, F), labels (N,), means (C, F), covs (C, F, F); got {tuple(features.shape)}, "
            f"{tuple(labels.shape)}, {tuple(means.shape)}, {tuple(covs.shape)}"
        )
    if n == 0:
        return features.sum() * 0.0
    f = features
    mu = means.to(f.dtype)
    sigma = covs.to(f.dtype)
    lin = f @ mu.T / tau  # (N, C)
    quad = torch.einsum("nf,cfg,ng->nc", f, sigma, f) / (2 * tau**2)  # (N, C)
    logits = lin + quad
    own = lin.gather(1, labels.long().view(-1, 1)).squeeze(1)
    return (torch.logsumexp(logits, dim=1) - own).mean()


@full_precision_op
def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = DICE_EPS, include_background: bool = False) -> torch.Tensor:
    """Soft Dice loss (V-Net form), ``1 - mean_c (2 sum p_c y_c + eps) / (sum p_c^2 + sum y_c^2 + eps)``.

    ``probs`` (B, C, X, Y, Z) softmax probabilities, ``target`` (B, X, Y, Z) int64. Sums run
    over the whole batch (as UA-MT's ``dice_loss``); classes 1.. by default. Finite (and 0
    for a perfect empty prediction) on crops with no foreground.
    """
    c = probs.shape[1]
    onehot = F.one_hot(target.long(), c).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    denom = (probs * probs).sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    if not include_background:
        dice = dice[1:]
    return 1 - dice.mean()


@full_precision_op
def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Average of cross-entropy and soft Dice (Eq. 15's L_sup_ced); logits (B, C, X, Y, Z)."""
    return 0.5 * (F.cross_entropy(logits, target.long()) + soft_dice_loss(torch.softmax(logits, 1), target))


def consistency_weight(iteration: int, max_weight: float = 0.15, rampup: int = 6000) -> float:
    """lambda_g(t) = max_weight * exp(-5 (1 - t / rampup)^2), constant after ``rampup``."""
    if rampup <= 0:
        return max_weight
    t = min(max(iteration, 0), rampup) / rampup
    return max_weight * math.exp(-5.0 * (1.0 - t) ** 2)


# ---------------------------------------------------------------- baselines (issue 13)
# Mean teacher (Tarvainen & Valpola 2017) and UA-MT (Yu et al. 2019) as the field runs them
# in 3D: UA-MT's released ``train_LA_meanteacher_certainty_unlabel.py`` and ``utils/losses.py``
# (``softmax_mse_loss`` there returns the element-wise map, no reduction, whatever its
# docstring says) and SSL4MIS's ``train_mean_teacher_3D.py``. See docs/method-choices.md.

#: Added to the probabilities inside the log of the predictive entropy (UA-MT's released code).
ENTROPY_EPS = 1e-6
#: Added to the masked MSE's denominator (UA-MT's released code).
MASKED_MSE_EPS = 1e-16


@full_precision_op
def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Element-wise squared difference of the softmax probabilities (UA-MT's ``softmax_mse_loss``).

    ``student_logits``, ``teacher_logits``: (B, C, X, Y, Z). Returns (B, C, X, Y, Z)
    ``(softmax(student)_c - softmax(teacher)_c)^2`` per voxel and class, no reduction. The
    gradient flows into the student only (the teacher side is detached).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim < 3:
        raise ValueError(
            f"expected two (B, C, X, Y, Z) logit tensors of one shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    p = torch.softmax(student_logits, dim=1)
    q = torch.softmax(teacher_logits.detach(), dim=1)
    return (p - q) ** 2


@full_precision_op
def softmax_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean-teacher consistency: the mean of :func:`softmax_mse` over B x C x X x Y x Z (scalar).

    ``student_logits``, ``teacher_logits``: (B, C, X, Y, Z). ``mean_{b,c,v} (p_bcv - q_bcv)^2``
    with ``p``, ``q`` the student's and teacher's softmax, as SSL4MIS's
    ``train_mean_teacher_3D.py`` (``torch.mean((outputs_soft - ema_output_soft) ** 2)``); for
    two classes it equals UA-MT's masked form with every voxel kept. Teacher side detached.
    """
    return softmax_mse(student_logits, teacher_logits).mean()


@full_precision_op
def predictive_entropy(logit_passes: torch.Tensor, eps: float = ENTROPY_EPS) -> torch.Tensor:
    """Predictive entropy (nats) of the mean softmax of T stochastic passes (UA-MT's uncertainty).

    ``logit_passes``: (T, B, C, X, Y, Z) logits of T passes. With ``pbar = mean_t softmax_c``,
    returns (B, X, Y, Z) ``-sum_c pbar_c log(pbar_c + eps)``, eps 1e-6 as released (so a
    certain voxel gives ~ -1e-6, not exactly 0). Not divided by ``log C``.
    """
    if logit_passes.ndim != 6:
        raise ValueError(f"logit_passes must be (T, B, C, X, Y, Z), got {tuple(logit_passes.shape)}")
    mean = torch.softmax(logit_passes, dim=2).mean(0)
    return -(mean * torch.log(mean + eps)).sum(1)


def uncertainty_threshold(iteration: int, iterations: int, num_classes: int = 2, start: float = 0.75) -> float:
    """UA-MT's entropy threshold H(t) = (start + (1 - start) * r(t)) * ln C, in nats.

    ``r(t) = exp(-5 (1 - t / iterations)^2)`` is the sigmoid ramp of :func:`consistency_weight`
    (``iteration`` clipped to 0..``iterations``), so H goes from ``start * ln C`` (~0.0067 of
    the way above it at t = 0: ``r(0) = e^-5``) to ``ln C`` at t = ``iterations``. Released:
    ``(0.75 + 0.25 * sigmoid_rampup(iter_num, max_iterations)) * np.log(2)``.
    """
    return (start + (1.0 - start) * consistency_weight(iteration, 1.0, iterations)) * math.log(num_classes)


@full_precision_op
def masked_mse_loss(mse: torch.Tensor, mask: torch.Tensor, eps: float = MASKED_MSE_EPS) -> torch.Tensor:
    """UA-MT's masked consistency: ``sum(mask * mse) / (C * sum(mask) + eps)`` (scalar).

    ``mse``: (B, C, X, Y, Z) element-wise squared differences (:func:`softmax_mse`); ``mask``:
    (B, X, Y, Z) bool or 0/1, the voxels that count (the same mask for every class). The mean
    over the kept voxels and the classes; 0 (keeping the graph) when no voxel is kept. The
    released code divides by ``2 * sum(mask)`` with a (B, 1, X, Y, Z) mask broadcast over its
    two classes: the same for C = 2.
    """
    if mse.ndim < 3 or mask.shape != (mse.shape[0], *mse.shape[2:]):
        raise ValueError(f"expected mse (B, C, X, Y, Z) and mask (B, X, Y, Z), got {tuple(mse.shape)} and {tuple(mask.shape)}")
    m = mask.to(mse.dtype).unsqueeze(1)
    return (m * mse).sum() / (mse.shape[1] * m.sum() + eps)
