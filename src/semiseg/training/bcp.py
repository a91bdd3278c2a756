"""BCP baseline: bidirectional copy-paste (Bai et al., CVPR 2023) as a method of the one engine.

One run of ``cfg.iterations`` iterations in two phases (``bcp`` in
:mod:`semiseg.training.engine`):

1. **Pre-training** (the first :func:`pretrain_iterations` iterations): the student only. The
   labelled crops are split into halves ``a`` and ``b``; ``b`` is pasted into ``a`` inside one
   cuboid (:func:`cuboid_mask`, :func:`copy_paste`) and the student is trained on the mixed
   crop against the identically mixed labels, ``(CE + masked_dice_loss) / 2`` over every
   voxel.
2. **Self-training** (the rest): at the first self-training iteration the teacher becomes a
   copy of the student (parameters and buffers, as the released script loads the pre-trained
   model into both). Each iteration the teacher's pseudo labels of the unlabelled crops
   (:func:`pseudo_labels`: foreground probability >= 0.5, then the largest connected
   component) are mixed bidirectionally with the labelled crops
   (:func:`bidirectional_copy_paste`): an unlabelled cuboid in a labelled crop and a
   labelled cuboid in an unlabelled crop. The student's loss is :func:`mix_loss` of each
   mixed crop, the pseudo-labelled voxels weighted by ``bcp_u_weight`` (0.5), the
   ground-truth voxels by 1. After every optimiser step the teacher is the EMA of the
   student with the constant coefficient ``ema_decay`` (0.99).

The mask of iteration ``t`` is drawn from ``numpy.random.default_rng([seed, t, MASK_STREAM])``:
a pure function of the seed and the iteration, so a resumed run draws the masks an
uninterrupted one would. The losses run in float32 with autocast off.

What follows the released code (``code/LA_BCP_train.py`` and ``code/LA&ACDC/utils/BCP_utils.py``,
``utils/losses.py`` of github.com/DeepMed-Lab-ECNU/BCP) and what does not is listed in
``docs/method-choices.md``, "BCP baseline (issue 13)".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from semiseg.postprocessing import largest_component  # noqa: F401 (re-exported: BCP's filter)
from semiseg.precision import full_precision_op

if TYPE_CHECKING:  # the engine imports this module; no import back at run time
    from semiseg.networks import SegmentationNet
    from semiseg.training.engine import TrainConfig

log = logging.getLogger("semiseg.training")

#: The released LA schedule: ``--pre_max_iteration 2000`` and ``--self_max_iteration 15000``.
RELEASED_PRETRAIN_ITERATIONS = 2000
RELEASED_SELFTRAIN_ITERATIONS = 15000
#: Third entry of the mask generator's seed (keeps its stream apart from other per-iteration draws).
MASK_STREAM = 0xBC9
#: The released ``mask_DiceLoss`` smoothing term.
DICE_SMOOTH = 1e-5


def pretrain_iterations(cfg: TrainConfig) -> int:
    """The number of pre-training iterations: ``bcp_pretrain_iterations``, or when that is None
    the released LA ratio 2000 / (2000 + 15000) of ``iterations``, rounded (706 of 6000)."""
    if cfg.bcp_pretrain_iterations is not None:
        return int(cfg.bcp_pretrain_iterations)
    share = RELEASED_PRETRAIN_ITERATIONS / (RELEASED_PRETRAIN_ITERATIONS + RELEASED_SELFTRAIN_ITERATIONS)
    return round(cfg.iterations * share)


def validate_bcp_settings(cfg: TrainConfig) -> None:
    """Check the ``bcp_`` settings (any method) and, for ``bcp``, the batch layout; one-line errors."""
    ratio = cfg.bcp_mask_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"bcp_mask_ratio must be a number in (0, 1) (the cuboid's side / the patch's side), got {ratio!r}")
    w = cfg.bcp_u_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ValueError(f"bcp_u_weight must be a finite number >= 0, got {w!r}")
    p = cfg.bcp_pretrain_iterations
    if p is not None and (isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= cfg.iterations):
        raise ValueError(
            f"bcp_pretrain_iterations must be null (the released 2000:15000 share of iterations) or an integer in "
            f"0..iterations ({cfg.iterations}), got {p!r}"
        )
    if cfg.method == "bcp":
        lb, ub = cfg.labelled_batch, cfg.unlabelled_batch
        if lb < 2 or lb % 2:
            raise ValueError(f"method 'bcp' mixes two halves of the labelled crops: labelled_batch must be even and >= 2, got {lb}")
        if ub != lb:
            raise ValueError(
                f"method 'bcp' pairs each labelled crop with one unlabelled crop: unlabelled_batch ({ub}) must equal "
                f"labelled_batch ({lb})"
            )


# ---------------------------------------------------------------- masks and mixing


def cuboid_mask(shape: Sequence[int], ratio: float, rng: np.random.Generator) -> torch.Tensor:
    """(X, Y, Z) int64 mask: 1 everywhere except a cuboid of 0s.

    The cuboid's side on an axis of ``n`` voxels is ``int(n * ratio)``; its first voxel on
    that axis is uniform in ``0 .. n - side - 1`` (``rng.integers(0, n - side)``, the
    released ``np.random.randint(0, n - side)``, so the cuboid never touches an axis's far
    end). Axes are drawn in the order x, y, z. ``ratio`` in (0, 1).
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    mask = torch.ones(tuple(int(n) for n in shape), dtype=torch.int64)
    box = []
    for n in shape:
        side = int(int(n) * ratio)
        start = int(rng.integers(0, int(n) - side))
        box.append(slice(start, start + side))
    mask[tuple(box)] = 0
    return mask


def copy_paste(outside: torch.Tensor, inside: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``outside`` where ``mask`` is 1, ``inside`` in the cuboid (where it is 0), values kept exactly.

    ``mask`` (X, Y, Z) broadcasts over images (B, 1, X, Y, Z) and labels (B, X, Y, Z) alike:
    the released ``outside * mask + inside * (1 - mask)``.
    """
    return torch.where(mask.to(device=outside.device, dtype=torch.bool), outside, inside)


def bidirectional_copy_paste(
    x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, y_u: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two mixed batches of BCP's self-training.

    ``x_l`` (2k, 1, X, Y, Z) labelled crops with labels ``y_l`` (2k, X, Y, Z); ``x_u``
    (2k, 1, X, Y, Z) unlabelled crops with pseudo labels ``y_u``. Halves: ``a`` = the first
    k, ``b`` = the last k. Returns ``(x_mix_l, y_mix_l, x_mix_u, y_mix_u)``:

    - ``mix_l``: labelled ``a`` outside the cuboid, unlabelled ``a`` inside it (an unlabelled
      foreground on a labelled background);
    - ``mix_u``: unlabelled ``b`` outside, labelled ``b`` inside (a labelled foreground on an
      unlabelled background);

    images and labels mixed with the same mask (the released ``mixl_img`` / ``mixu_img``).
    """
    n = x_l.shape[0]
    if n % 2 or x_u.shape[0] != n or y_l.shape[0] != n or y_u.shape[0] != n:
        raise ValueError(f"need 2k labelled and 2k unlabelled crops with labels, got {x_l.shape[0]}, {y_l.shape[0]}, "
                         f"{x_u.shape[0]}, {y_u.shape[0]}")
    k = n // 2
    x_mix_l = copy_paste(x_l[:k], x_u[:k], mask)
    y_mix_l = copy_paste(y_l[:k], y_u[:k], mask)
    x_mix_u = copy_paste(x_u[k:], x_l[k:], mask)
    y_mix_u = copy_paste(y_u[k:], y_l[k:], mask)
    return x_mix_l, y_mix_l, x_mix_u, y_mix_u


# ------------------------------------------------------------------- pseudo labels


def pseudo_labels(logits: torch.Tensor) -> torch.Tensor:
    """(B, X, Y, Z) int64 pseudo labels of teacher logits (B, C, X, Y, Z), then :func:`largest_component`.

    Two classes: foreground where its softmax probability is >= 0.5 (the released
    ``get_cut_mask``, ties to the foreground); more: the argmax (the released ACDC form).
    """
    probs = torch.softmax(logits.float(), dim=1)
    c = probs.shape[1]
    hard = (probs[:, 1] >= 0.5).long() if c == 2 else probs.argmax(1)
    return largest_component(hard, c)


# -------------------------------------------------------------------------- losses


@full_precision_op
def masked_dice_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                     smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """The released ``mask_DiceLoss``: ``1 - mean_{b, c} (2 I_bc + s) / (U_bc + s)``.

    ``logits`` (B, C, X, Y, Z), ``target`` (B, X, Y, Z), ``mask`` (B, X, Y, Z) 0/1 or None
    (every voxel). Per crop ``b`` and class ``c`` (background included):
    ``I_bc = sum_v m_v p_vc [y_v = c]``, ``U_bc = sum_v m_v (p_vc + [y_v = c])``, ``p`` the
    softmax; ``s`` = 1e-5. The denominator is linear, not squared (unlike :func:`soft_dice_loss`).
    """
    b, c = logits.shape[:2]
    p = torch.softmax(logits, 1).reshape(b, c, -1)
    onehot = F.one_hot(target.long().reshape(b, -1), c).movedim(-1, 1).to(p.dtype)
    inter, union = p * onehot, p + onehot
    if mask is not None:
        m = mask.to(p.dtype).reshape(b, 1, -1)
        inter, union = inter * m, union * m
    dice = (2 * inter.sum(-1) + smooth) / (union.sum(-1) + smooth)
    return 1 - dice.mean()


@full_precision_op
def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_v m_v CE_v / (sum_v m_v + 1e-16)`` over the batch: the released masked CE of ``mix_loss``."""
    ce = F.cross_entropy(logits, target.long(), reduction="none")
    m = mask.to(ce.dtype)
    return (ce * m).sum() / (m.sum() + 1e-16)


@full_precision_op
def mix_loss(logits: torch.Tensor, label_outside: torch.Tensor, label_inside: torch.Tensor, mask: torch.Tensor,
             weight_outside: float = 1.0, weight_inside: float = 0.5) -> torch.Tensor:
    """BCP's loss of one mixed batch: each voxel's loss weighted by the crop it came from.

    ``logits`` (B, C, X, Y, Z); ``label_outside`` / ``label_inside`` (B, X, Y, Z) the labels of
    the crops outside and inside the cuboid; ``mask`` (X, Y, Z) or (B, X, Y, Z), 1 outside
    the cuboid, 0 inside. With ``m`` the mask and ``w_o``, ``w_i`` the weights::

        ( w_o Dice(m; label_outside) + w_i Dice(1 - m; label_inside)
        + w_o CE(m; label_outside)   + w_i CE(1 - m; label_inside) ) / 2

    (:func:`masked_dice_loss`, :func:`masked_cross_entropy`), the released ``mix_loss``:
    ``w_o = 1, w_i = u_weight`` for the labelled-background batch and, with ``unlab=True``,
    ``w_o = u_weight, w_i = 1`` for the unlabelled-background one (the pseudo-labelled part
    weighted by ``u_weight`` in both).
    """
    m = mask.expand(label_outside.shape).to(logits.dtype)
    pm = 1 - m
    dice = weight_outside * masked_dice_loss(logits, label_outside, m) + weight_inside * masked_dice_loss(logits, label_inside, pm)
    ce = weight_outside * masked_cross_entropy(logits, label_outside, m) + weight_inside * masked_cross_entropy(logits, label_inside, pm)
    return 0.5 * (dice + ce)


# ---------------------------------------------------------------------------- step


class BCPStep:
    """Loss of one BCP iteration; the same call as :class:`~semiseg.training.engine.Stage1Step`.

    ``(batch, iteration) -> (loss, terms)``. Logged: ``bcp_phase`` (0 pre-training, 1
    self-training), ``loss`` and, pre-training, ``ce`` and ``dice`` of the mixed crops;
    self-training, ``loss_l`` / ``loss_u`` (the labelled- / unlabelled-background batches)
    and ``pseudo_foreground`` (the foreground fraction of the pseudo labels). The engine
    calls :meth:`update_teacher` after each optimiser step.
    """

    def __init__(self, cfg: TrainConfig, student: SegmentationNet, teacher: SegmentationNet) -> None:
        if teacher is None:
            raise ValueError("method 'bcp' needs a teacher network")
        self.cfg, self.student, self.teacher = cfg, student, teacher
        self.pretrain = pretrain_iterations(cfg)
        log.info("bcp: %d pre-training + %d self-training iterations (bcp_pretrain_iterations: %s)",
                 self.pretrain, cfg.iterations - self.pretrain, cfg.bcp_pretrain_iterations)

    def mask(self, iteration: int, shape: Sequence[int]) -> torch.Tensor:
        """The cuboid mask of ``iteration`` (a pure function of the seed and the iteration)."""
        return cuboid_mask(shape, self.cfg.bcp_mask_ratio, np.random.default_rng([self.cfg.seed, int(iteration), MASK_STREAM]))

    def phase(self, iteration: int) -> int:
        """0 in pre-training, 1 in self-training."""
        return int(iteration >= self.pretrain)

    @torch.no_grad()
    def start_self_training(self) -> None:
        """teacher := student, parameters and buffers (BCP's self-training starts both from the pre-trained model)."""
        self.teacher.load_state_dict(self.student.state_dict())

    @torch.no_grad()
    def update_teacher(self, iteration: int) -> None:
        """After the optimiser step of ``iteration``: the teacher's EMA, in the self-training phase only,
        with the constant coefficient ``ema_decay`` (the released ``update_ema_variables(.., 0.99)``)."""
        if self.phase(iteration):
            from semiseg.training.engine import ema_update  # the engine imports this module

            ema_update(self.teacher, self.student, self.cfg.ema_decay)

    def __call__(self, batch: dict[str, torch.Tensor], iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        x_l, y_l = batch["image_l"], batch["label_l"]
        mask = self.mask(iteration, x_l.shape[2:]).to(x_l.device)
        k = x_l.shape[0] // 2
        if not self.phase(iteration):
            x = copy_paste(x_l[:k], x_l[k:], mask)
            y = copy_paste(y_l[:k], y_l[k:], mask)
            logits = self.student(x).logits
            ce, dice = F.cross_entropy(logits.float(), y), masked_dice_loss(logits, y)
            loss = 0.5 * (ce + dice)
            return loss, {"bcp_phase": 0.0, "loss": loss.item(), "ce": ce.item(), "dice": dice.item()}
        if iteration == self.pretrain:
            self.start_self_training()
            log.info("iteration %d: bcp self-training starts (teacher = the pre-trained student)", iteration)
        x_u = batch["image_u"]
        with torch.no_grad():  # two teacher passes, as released (batch-norm statistics per pass)
            p_a = pseudo_labels(self.teacher(x_u[:k]).logits)
            p_b = pseudo_labels(self.teacher(x_u[k:]).logits)
        x_mix_l, y_mix_l, x_mix_u, y_mix_u = bidirectional_copy_paste(x_l, y_l, x_u, torch.cat([p_a, p_b]), mask)
        del y_mix_l, y_mix_u  # the losses take each source's labels with the mask
        u = self.cfg.bcp_u_weight
        out_l = self.student(x_mix_l).logits
        out_u = self.student(x_mix_u).logits
        loss_l = mix_loss(out_l, y_l[:k], p_a, mask, 1.0, u)
        loss_u = mix_loss(out_u, p_b, y_l[k:], mask, u, 1.0)
        loss = loss_l + loss_u
        fg = float(torch.cat([p_a, p_b]).gt(0).float().mean())
        return loss, {"bcp_phase": 1.0, "loss": loss.item(), "loss_l": loss_l.item(), "loss_u": loss_u.item(),
                      "pseudo_foreground": fg}
