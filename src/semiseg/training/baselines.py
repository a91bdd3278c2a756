"""Per-iteration losses of the semi-supervised baselines, as methods of the one engine.

- ``mt``: mean teacher (Tarvainen & Valpola 2017) as the field runs it in 3D.
- ``uamt``: UA-MT (Yu et al., MICCAI 2019), mean teacher with an uncertainty-masked consistency.

Both train a plain V-Net (no aleatoric head, no projection head) with an EMA teacher, which
:func:`semiseg.training.engine.train` creates and updates exactly as for ``aua``
(``ema_decay``, both networks in train mode). Each step class has :class:`Stage1Step`'s call
signature, ``(batch, iteration) -> (loss, logged terms)``; ``iteration`` counts from 0.

One iteration (``n_l`` labelled crops ``x_l`` with labels ``y_l``, ``n_u`` unlabelled ``x_u``):

- the student runs once on ``cat(x_l, x_u)`` (batch-norm statistics over all crops);
- supervised: ``ce_dice_loss`` (0.5 * (CE + soft Dice)) of the labelled crops;
- the teacher runs once, without gradients, on ``x_u + clamp(N(0, teacher_noise_sd),
  +-teacher_noise_clip)``: its softmax is the consistency target;
- consistency weight ``w(t) = mt_consistency * exp(-5 (1 - t / rampup)^2)``
  (:func:`consistency_weight`; ``rampup`` = ``consistency_rampup`` or the iterations);
- ``mt``: ``loss = sup + w(t) * mean over n_u x C x voxels of (softmax_s - softmax_t)^2``;
- ``uamt``: the teacher also runs ``uamt_passes`` (T) more times on ``x_u``, each pass with
  fresh input noise, as T / 2 forward calls on the unlabelled crops stacked twice (the
  released code's batching: dropout masks and batch statistics over 2 n_u crops); the
  predictive entropy of the mean softmax is each voxel's uncertainty U, and
  ``loss = sup + w(t) * sum(mask * mse) / (C * sum(mask) + 1e-16)`` with
  ``mask = U < (uamt_threshold_start + (1 - uamt_threshold_start) r(t)) ln C``, ``r`` the
  sigmoid ramp over all iterations.

The consistency terms cover the unlabelled crops only, as UA-MT's README script
(``train_LA_meanteacher_certainty_unlabel.py``) and SSL4MIS's 3D mean teacher do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from semiseg.losses import (
    ce_dice_loss,
    consistency_weight,
    masked_mse_loss,
    predictive_entropy,
    softmax_mse,
    softmax_mse_loss,
    uncertainty_threshold,
)
from semiseg.networks import SegmentationNet

if TYPE_CHECKING:  # engine imports this module
    from semiseg.training.engine import TrainConfig

BASELINE_METHODS = ("mt", "uamt")


def teacher_noise(x: torch.Tensor, sd: float, clip: float) -> torch.Tensor:
    """``clamp(N(0, sd), -clip, clip)`` of ``x``'s shape: the teacher's input perturbation."""
    return torch.clamp(torch.randn_like(x) * sd, -clip, clip)


class MeanTeacherStep:
    """``mt``: supervised 0.5 * (CE + Dice) + w(t) * softmax MSE to the EMA teacher on unlabelled crops.

    Logged: ``ce_dice``, ``consistency`` (the unweighted MSE), ``consistency_weight`` and ``loss``.
    """

    def __init__(self, cfg: TrainConfig, student: SegmentationNet, teacher: SegmentationNet) -> None:
        if teacher is None:
            raise ValueError(f"method {cfg.method!r} needs a teacher network")
        self.cfg, self.student, self.teacher = cfg, student, teacher

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(supervised loss, student logits of the unlabelled crops, teacher logits of them)."""
        cfg = self.cfg
        x_l, y_l, x_u = batch["image_l"], batch["label_l"], batch["image_u"]
        n_l = x_l.shape[0]
        logits = self.student(torch.cat([x_l, x_u])).logits
        sup = ce_dice_loss(logits[:n_l], y_l)
        with torch.no_grad():
            t_logits = self.teacher(x_u + teacher_noise(x_u, cfg.teacher_noise_sd, cfg.teacher_noise_clip)).logits
        return sup, logits[n_l:], t_logits

    def weight(self, iteration: int) -> float:
        cfg = self.cfg
        return consistency_weight(iteration, cfg.mt_consistency, cfg.consistency_rampup or cfg.iterations)

    def __call__(self, batch: dict[str, torch.Tensor], iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        sup, s_logits, t_logits = self._forward(batch)
        cons = softmax_mse_loss(s_logits, t_logits)
        w = self.weight(iteration)
        loss = sup + w * cons
        return loss, {"ce_dice": sup.item(), "consistency": cons.item(), "consistency_weight": w, "loss": loss.item()}


class UAMTStep(MeanTeacherStep):
    """``uamt``: :class:`MeanTeacherStep` with the MSE masked to voxels the teacher is certain of.

    Logged besides ``mt``'s terms: ``uncertainty_threshold`` (nats), ``uncertainty_mean``
    (the mean predictive entropy over the unlabelled crops' voxels) and ``mask_fraction``
    (the share of those voxels inside the mask).
    """

    @torch.no_grad()
    def uncertainty(self, x_u: torch.Tensor) -> torch.Tensor:
        """(n_u, X, Y, Z) predictive entropy of the teacher's mean softmax over ``uamt_passes`` passes."""
        cfg = self.cfg
        n_u = x_u.shape[0]
        stacked = x_u.repeat(2, 1, 1, 1, 1)  # [x_u; x_u]: two passes per forward call
        passes = []
        for _ in range(cfg.uamt_passes // 2):
            out = self.teacher(stacked + teacher_noise(stacked, cfg.teacher_noise_sd, cfg.teacher_noise_clip)).logits
            passes.append(out.reshape(2, n_u, *out.shape[1:]))
        return predictive_entropy(torch.cat(passes))  # (T, n_u, C, X, Y, Z) -> (n_u, X, Y, Z)

    def __call__(self, batch: dict[str, torch.Tensor], iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        sup, s_logits, t_logits = self._forward(batch)
        unc = self.uncertainty(batch["image_u"])
        threshold = uncertainty_threshold(iteration, cfg.iterations, s_logits.shape[1], cfg.uamt_threshold_start)
        mask = unc < threshold
        cons = masked_mse_loss(softmax_mse(s_logits, t_logits), mask)
        w = self.weight(iteration)
        loss = sup + w * cons
        return loss, {
            "ce_dice": sup.item(), "consistency": cons.item(), "consistency_weight": w,
            "uncertainty_threshold": threshold, "uncertainty_mean": unc.mean().item(),
            "mask_fraction": mask.float().mean().item(), "loss": loss.item(),
        }


BASELINE_STEPS = {"mt": MeanTeacherStep, "uamt": UAMTStep}
