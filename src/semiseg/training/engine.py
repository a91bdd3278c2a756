"""The training engine: one loop for every method, which are config variants.

Methods (stage 1):

- ``supervised``: labelled crops only, plain V-Net, 0.5 * (CE + soft Dice).
- ``fully_supervised``: the same with every training case labelled (the upper bound).
- ``aua``: mean teacher; 0.5 * (MC-integral NLL / V + soft Dice of the mean logits) on
  labelled crops + lambda_g(t) * GED between student and teacher samples on unlabelled
  crops (Eq. 9); lambda_c = 0.
- ``aua_bcl``: ``aua`` + lambda_c * BCL on the labelled crops' projections (Eq. 14).
- ``mt``: mean teacher baseline; plain V-Net, 0.5 * (CE + soft Dice) on labelled crops +
  w(t) * MSE between student and teacher softmax on unlabelled crops.
- ``uamt``: UA-MT baseline; ``mt`` with the MSE masked to voxels whose predictive entropy
  over ``uamt_passes`` stochastic teacher passes is under a ramped threshold.
  Both: see :mod:`semiseg.training.baselines`.
- ``bcp``: the BCP baseline (bidirectional copy-paste, Bai et al. 2023), plain V-Net: labelled
  copy-paste pre-training of the student for ``bcp_pretrain_iterations``, then the teacher is
  the student's copy and self-training mixes labelled and unlabelled crops both ways against
  the teacher's pseudo labels (EMA teacher). See :mod:`semiseg.training.bcp`.

Methods (stage 2, a fresh plain V-Net on labelled crops with ground truth and unlabelled
crops with their stored pseudo labels):

- ``aua_bcl_pl``: 0.5 * (CE + Dice) of the labelled crops + the same of the pseudo-labelled
  crops (``stage2_loss: authors``; ``pooled``: one 0.5 * (CE + Dice) over all crops), i.e.
  pseudo labelling alone, lambda_r = 0.
- ``full``: the same + lambda_r * PCL (Eq. 12, 15) against prototypes loaded from the
  artifact (per group and summed, or pooled) and, with ``prototype_update``, updated with
  the labelled crops' features. See :class:`Stage2Step`.

Checkpoints (student, teacher, optimiser, scheduler, AMP scaler, RNG states, iteration,
loss history) are written atomically every ``checkpoint_every`` iterations; a restarted
run with the same settings resumes from the last one. On the CPU with a fixed seed an
interrupted-and-resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import torch.nn.functional as F

from semiseg.io.atomic import atomic_path
from semiseg.io.digest import files_digest
from semiseg.losses import (
    boundary_contrastive_loss,
    ce_dice_loss,
    consistency_weight,
    generalized_energy_distance,
    mc_integral_nll,
    prototype_contrastive_loss,
    soft_dice_loss,
)
from semiseg.models import MODEL_FORMAT, load_model, read_torch_file  # noqa: F401 (re-exported)
from semiseg.networks import SegmentationNet
from semiseg.precision import (  # noqa: F401
    CPU_AMP_CHOICES,
    autocast,
    check_bf16_convolutions,
    cpu_bf16_units,
    faulty_kernels,
    resolve_device,
    training_autocast_dtype,
)
from semiseg.prototypes import PrototypeStatistics
from semiseg.training.baselines import BASELINE_METHODS, BASELINE_STEPS
from semiseg.training.bcp import BCPStep, validate_bcp_settings
from semiseg.training.data import Augmentation, PatchBatches

STAGE1_METHODS = ("supervised", "fully_supervised", "aua", "aua_bcl") + BASELINE_METHODS + ("bcp",)
STAGE2_METHODS = ("aua_bcl_pl", "full")
METHODS = STAGE1_METHODS + STAGE2_METHODS
STAGE2_LOSSES = ("authors", "pooled")
BCL_FEATURES = ("after_dropout", "before_dropout")  # which decoder features BCL projects (Stage1Step)  # how stage 2 groups its crops (Stage2Step)
log = logging.getLogger("semiseg.training")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run (defaults: the paper / method notes)."""

    method: str = "aua_bcl"
    patch_size: tuple[int, int, int] = (96, 96, 96)
    num_classes: int = 2
    iterations: int = 6000
    lr: float = 0.01
    lr_step: int = 2500
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    labelled_batch: int = 2
    unlabelled_batch: int = 2
    base_filters: int = 16
    dropout: float = 0.5
    ema_decay: float = 0.99
    teacher_noise_sd: float = 0.1
    teacher_noise_clip: float = 0.2
    consistency_max: float = 0.15
    consistency_rampup: int | None = None  # None: the number of iterations
    mt_consistency: float = 0.1  # mt, uamt: maximum consistency weight (consistency_max is aua's)
    uamt_passes: int = 8  # uamt: stochastic teacher passes T for the uncertainty (even)
    uamt_threshold_start: float = 0.75  # uamt: entropy threshold at t = 0, as a fraction of ln C
    samples: int = 6
    rank: int = 8
    lambda_c: float = 0.0
    bcl_max_samples: int = 9000
    bcl_temperature: float = 0.07
    bcl_features: str = "after_dropout"
    projection_channels: int = 16
    lambda_r: float = 0.0
    pcl_tau: float = 100.0
    pcl_normalise: bool = True
    prototype_update: bool = True
    stage2_init: str = "fresh"
    stage2_loss: str = "authors"
    bcp_pretrain_iterations: int | None = None  # None: the released LA share 2000 / (2000 + 15000) of iterations
    bcp_mask_ratio: float = 2 / 3  # the cuboid's side / the patch's side (released --mask_ratio)
    bcp_u_weight: float = 0.5  # weight of the pseudo-labelled voxels in the mixed loss (released --u_weight)
    seed: int = 1337
    amp: bool = True  # CUDA: float16 autocast
    cpu_amp: str = "off"  # CPU: auto | bfloat16 | off (semiseg.precision.training_autocast_dtype)
    augmentation: Augmentation = field(default_factory=Augmentation)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.method == "aua" and self.lambda_c:
            raise ValueError("method 'aua' has lambda_c = 0; use 'aua_bcl' for BCL")
        if self.cpu_amp not in CPU_AMP_CHOICES:
            raise ValueError(f"cpu_amp must be one of {', '.join(CPU_AMP_CHOICES)}, got {self.cpu_amp!r}")
        if self.stage2_init not in ("fresh", "stage1"):
            raise ValueError(f"stage2_init must be 'fresh' or 'stage1', got {self.stage2_init!r}")
        if self.bcl_features not in BCL_FEATURES:
            raise ValueError(f"bcl_features must be one of {BCL_FEATURES}, got {self.bcl_features!r}")
        if self.stage2_loss not in STAGE2_LOSSES:
            raise ValueError(f"stage2_loss must be one of {STAGE2_LOSSES}, got {self.stage2_loss!r}")
        if self.method == "aua_bcl_pl" and self.lambda_r:
            raise ValueError("method 'aua_bcl_pl' has lambda_r = 0; use 'full' for PCL")
        if self.method in BASELINE_METHODS and (self.lambda_c or self.lambda_r):
            raise ValueError(f"method {self.method!r} has no BCL or PCL; set lambda_c and lambda_r to 0")
        if not (np.isfinite(self.mt_consistency) and self.mt_consistency >= 0):
            raise ValueError(f"mt_consistency must be a finite number >= 0, got {self.mt_consistency!r}")
        if isinstance(self.uamt_passes, bool) or not isinstance(self.uamt_passes, int) \
                or self.uamt_passes < 2 or self.uamt_passes % 2:
            raise ValueError(f"uamt_passes must be an even integer >= 2 (T / 2 forward calls of two passes each), "
                             f"got {self.uamt_passes!r}")
        if not 0.0 <= self.uamt_threshold_start <= 1.0:
            raise ValueError(f"uamt_threshold_start must be in [0, 1] (a fraction of ln C), got {self.uamt_threshold_start!r}")
        validate_bcp_settings(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        v = dict(values)
        if "patch_size" in v:
            v["patch_size"] = tuple(int(p) for p in v["patch_size"])
        if "augmentation" in v:
            v["augmentation"] = Augmentation.from_value(v["augmentation"])
        return cls(**v)

    @property
    def mean_teacher(self) -> bool:
        return self.method in ("aua", "aua_bcl")

    @property
    def has_teacher(self) -> bool:
        """Whether the method trains an EMA teacher: ``aua``, ``aua_bcl`` and the baselines
        (``bcp``: a copy of the student from its self-training phase on)."""
        return self.mean_teacher or self.method in BASELINE_METHODS or self.method == "bcp"

    @property
    def stage(self) -> int:
        return 2 if self.method in STAGE2_METHODS else 1

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def build_model(cfg: TrainConfig) -> SegmentationNet:
    return SegmentationNet(
        num_classes=cfg.num_classes, base_filters=cfg.base_filters, dropout=cfg.dropout,
        aleatoric=cfg.mean_teacher, rank=cfg.rank,
        projection=cfg.method == "aua_bcl", projection_channels=cfg.projection_channels,
    )


def ema_alpha(step: int, decay: float) -> float:
    """EMA coefficient after ``step`` optimiser steps: ``min(1 - 1/(step + 1), decay)``."""
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
    """teacher = alpha * teacher + (1 - alpha) * student, parameters only (BN buffers not averaged)."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)


def _rng_state() -> dict[str, Any]:
    """Every RNG state, as tensors and plain Python values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(), "python": random.getstate(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Backward pass and optimiser step through the AMP grad scaler (a no-op scaler on the CPU)."""
    backward(loss, opt, scaler)
    scaler.step(opt)
    scaler.update()


def backward(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Zero the gradients of ``opt``'s parameters, then backpropagate ``loss`` (scaled by ``scaler``)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()


def non_finite_gradients(module: torch.nn.Module) -> list[str]:
    """The names of ``module``'s parameters whose gradient holds a NaN or an infinity (empty: all finite)."""
    named = [(name, p.grad) for name, p in module.named_parameters() if p.grad is not None]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(g).all() for _, g in named]).cpu()  # one device sync
    return [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]


#: bfloat16 steps on the CPU that may be redone in float32 before the rest of the run trains in float32.
BF16_REDO_LIMIT = 3


class _StepState:
    """What one iteration's loss computation changes besides the gradients: the RNG streams,
    the networks' buffers (batch-norm statistics, in train mode) and the prototype
    statistics. Taken before a step and put back to compute the same step again."""

    def __init__(self, modules: Sequence[torch.nn.Module], stats: PrototypeStatistics | None) -> None:
        self.modules, self.stats = list(modules), stats
        self.rng = _rng_state()
        self.buffers = [[b.detach().clone() for b in m.buffers()] for m in self.modules]
        self.stats_state = stats.state_dict() if stats is not None else None  # copies

    @torch.no_grad()
    def restore(self) -> None:
        _set_rng_state(self.rng)
        for m, saved in zip(self.modules, self.buffers, strict=True):
            for b, v in zip(m.buffers(), saved, strict=True):
                b.copy_(v)
        if self.stats is not None:
            self.stats.load_state_dict(self.stats_state)


def cpu_kernels_agree(model: SegmentationNet, patch_size: Sequence[int], batch: int, dtype: torch.dtype,
                      device: torch.device) -> bool:
    """Whether the CPU's ``dtype`` convolution kernels agree with float32 at every shape that
    ``model`` trains at (``batch`` crops of ``patch_size``): True, logged; False, with a warning
    that names each faulty convolution and its errors (the run then trains in float32).

    See :func:`semiseg.precision.check_bf16_convolutions`: some CPU kernels give wrong weight
    gradients at some shapes only, NaN or finite, so the training checks before it starts.
    """
    x = torch.zeros(batch, model.config["in_channels"], *patch_size, device=device)

    def run() -> None:
        out = model(x)
        if model.projection is not None:
            model.project(out.features)

    checks = check_bf16_convolutions(model, run, dtype)
    bad = faulty_kernels(checks)
    if bad:
        log.warning("%s convolution kernels of this CPU disagree with float32 at %d of %d shapes of this network "
                    "(relative errors; a correct kernel is off by about 0.002): %s; this run trains in float32",
                    str(dtype).removeprefix("torch."), len(bad), len(checks), "; ".join(c.describe() for c in bad))
        return False
    log.info("%s convolution kernels checked at %d shapes of this network: within %.2g of float32",
             str(dtype).removeprefix("torch."), len(checks), max(c.worst for c in checks))
    return True


def pcl_prototypes(stats: PrototypeStatistics, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(means (C, F), diagonal covariances (C, F, F)) for PCL, each L2-normalised when ``normalise``."""
    means = stats.mean.float()
    var = torch.diagonal(stats.cov, dim1=1, dim2=2).float()
    if normalise:
        means, var = F.normalize(means, dim=1), F.normalize(var, dim=1)
    return means, torch.diag_embed(var)


class Stage2Step:
    """Stage-2 loss (Eq. 15): supervised CE + Dice and lambda_r * PCL, grouped as ``cfg.stage2_loss`` says.

    The batch holds ``labelled_batch`` crops with ground truth and ``unlabelled_batch`` crops
    with pseudo labels, each (b, 1, X, Y, Z) with labels (b, X, Y, Z). ``ce_dice`` below is
    :func:`ce_dice_loss`, 0.5 * (CE + soft Dice) over the crops it is given (the released
    code's ``get_supervised_loss_no_uncertainty``), and ``pcl`` the mean of Eq. 12 over the
    foreground anchors it is given.

    - ``authors`` (the released stage-2 script): ``ce_dice(labelled) + ce_dice(pseudo) +
      lambda_r * (pcl(labelled anchors) + pcl(pseudo-labelled anchors))``.
    - ``pooled``: ``ce_dice(all crops) + lambda_r * pcl(all anchors)``, about half the
      authors' supervised gradient.

    Logged: the terms as they enter the loss (``ce_dice``, ``pcl``), each group's
    (``ce_dice_labelled``, ``ce_dice_pseudo``, ``pcl_labelled``, ``pcl_pseudo``) and the
    anchor counts. A group without foreground anchors contributes a PCL of 0.
    """

    def __init__(self, cfg: TrainConfig, student: SegmentationNet, prototypes: PrototypeStatistics | None) -> None:
        if cfg.lambda_r and prototypes is None:
            raise ValueError("PCL (lambda_r > 0) needs prototype statistics")
        self.cfg, self.student, self.prototypes = cfg, student, prototypes

    def __call__(self, batch: dict[str, torch.Tensor], iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        n_l = batch["image_l"].shape[0]
        x = torch.cat([batch["image_l"], batch["image_u"]])
        y = torch.cat([batch["label_l"], batch["label_u"]])
        out = self.student(x)
        if cfg.stage2_loss == "authors":
            sup_l, sup_u = ce_dice_loss(out.logits[:n_l], y[:n_l]), ce_dice_loss(out.logits[n_l:], y[n_l:])
            sup = sup_l + sup_u
        else:
            sup = ce_dice_loss(out.logits, y)
            with torch.no_grad():  # logged only
                sup_l, sup_u = ce_dice_loss(out.logits[:n_l], y[:n_l]), ce_dice_loss(out.logits[n_l:], y[n_l:])
        terms = {"ce_dice": sup.item(), "ce_dice_labelled": sup_l.item(), "ce_dice_pseudo": sup_u.item()}
        loss = sup
        if cfg.lambda_r:
            # Anchors and the prototype update use the features before the last dropout: the
            # kind of feature the prototypes were estimated from (eval mode, no dropout).
            dec = out.decoder_features
            feats = dec.float().movedim(1, -1).reshape(-1, dec.shape[1])  # (B*V, F)
            flat = y.reshape(-1)
            split = n_l * (flat.numel() // y.shape[0])  # rows of the labelled crops come first
            means, covs = pcl_prototypes(self.prototypes, cfg.pcl_normalise)
            means, covs = means.to(feats.device), covs.to(feats.device)
            group_pcl, counts = [], []
            for f, lab in ((feats[:split], flat[:split]), (feats[split:], flat[split:])):
                anchors = lab > 0  # foreground anchors; background is the ignore label
                fa = F.normalize(f[anchors], dim=1) if cfg.pcl_normalise else f[anchors]
                group_pcl.append(prototype_contrastive_loss(fa, lab[anchors], means, covs, cfg.pcl_tau))
                counts.append(int(anchors.sum()))
            pcl_l, pcl_u = group_pcl
            if cfg.stage2_loss == "authors" or not sum(counts):
                pcl = pcl_l + pcl_u
            else:  # the mean over all anchors together
                pcl = (counts[0] * pcl_l + counts[1] * pcl_u) / sum(counts)
            loss = loss + cfg.lambda_r * pcl
            terms.update(pcl=pcl.item(), pcl_labelled=pcl_l.item(), pcl_pseudo=pcl_u.item(), lambda_r=cfg.lambda_r,
                         anchors=sum(counts), anchors_labelled=counts[0], anchors_pseudo=counts[1])
            if cfg.prototype_update:
                lf = feats[:split].detach()
                self.prototypes.update(F.normalize(lf, dim=1) if cfg.pcl_normalise else lf, flat[:split])
        terms["loss"] = loss.item()
        return loss, terms


class Stage1Step:
    """Loss of one iteration for a stage-1 method; returns (loss, logged terms)."""

    def __init__(self, cfg: TrainConfig, student: SegmentationNet, teacher: SegmentationNet | None) -> None:
        self.cfg, self.student, self.teacher = cfg, student, teacher

    def __call__(self, batch: dict[str, torch.Tensor], iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        x_l, y_l = batch["image_l"], batch["label_l"]
        if not cfg.mean_teacher:  # supervised, fully_supervised: labelled crops only
            loss = ce_dice_loss(self.student(x_l).logits, y_l)
            return loss, {"loss": loss.item(), "ce_dice": loss.item()}
        x_u = batch["image_u"]
        n_l = x_l.shape[0]
        out = self.student(torch.cat([x_l, x_u]))
        samples = self.student.sample_logits(out, cfg.samples)
        nll = mc_integral_nll(samples[:, :n_l], y_l)
        dice = soft_dice_loss(torch.softmax(out.logits[:n_l].float(), 1), y_l)
        sup = 0.5 * (nll + dice)
        with torch.no_grad():
            noise = torch.clamp(torch.randn_like(x_u) * cfg.teacher_noise_sd, -cfg.teacher_noise_clip, cfg.teacher_noise_clip)
            t_out = self.teacher(x_u + noise)
            t_samples = self.teacher.sample_logits(t_out, cfg.samples)
        ged = generalized_energy_distance(torch.softmax(samples[:, n_l:], 2), torch.softmax(t_samples, 2)).mean()
        lam_g = consistency_weight(iteration, cfg.consistency_max, cfg.consistency_rampup or cfg.iterations)
        loss = sup + lam_g * ged
        terms = {"sup_nll": nll.item(), "sup_dice": dice.item(), "consistency": ged.item(), "lambda_g": lam_g}
        if cfg.method == "aua_bcl":
            # The projection head runs on the sampled band voxels only (BN statistics over those).
            # after_dropout: the features the heads see (the released code); before_dropout:
            # the last decoder block's output before its Dropout3d (as PCL's anchors).
            feats = out.features if cfg.bcl_features == "after_dropout" else out.decoder_features
            bcl = boundary_contrastive_loss(feats[:n_l], y_l, cfg.bcl_max_samples, cfg.bcl_temperature,
                                            projection=self.student.project_rows)
            loss = loss + cfg.lambda_c * bcl
            terms["bcl"] = bcl.item()
            terms["lambda_c"] = cfg.lambda_c
        terms["loss"] = loss.item()
        return loss, terms


def make_step(
    cfg: TrainConfig, student: SegmentationNet, teacher: SegmentationNet | None,
    prototypes: PrototypeStatistics | None = None,
):
    """The per-iteration loss of ``cfg.method``: a callable ``(batch, iteration) -> (loss, terms)``.

    ``teacher``: the EMA teacher for methods with one (``cfg.has_teacher``), else None;
    ``prototypes``: the statistics PCL needs (stage 2 with lambda_r > 0). ``bcp``'s step
    also updates its teacher (``update_teacher(iteration)``) instead of :func:`ema_update`.
    """
    if cfg.stage == 2:
        return Stage2Step(cfg, student, prototypes)
    if cfg.method == "bcp":
        return BCPStep(cfg, student, teacher)
    return BASELINE_STEPS.get(cfg.method, Stage1Step)(cfg, student, teacher)


def train(
    cfg: TrainConfig,
    labelled: Sequence[str | Path],
    unlabelled: Sequence[str | Path],
    out_dir: str | Path,
    device: str = "auto",
    checkpoint_every: int = 500,
    num_workers: int = 0,
    progress: bool = True,
    callback: Callable[[int], None] | None = None,
    pseudo: Sequence[str | Path] | None = None,
    prototypes: str | Path | None = None,
    init_from: str | Path | None = None,
    snapshots: Mapping[int, str | Path] | None = None,
    deployment: Mapping[str, Any] | None = None,
) -> Path:
    """Train one model; write ``model.pt`` and ``losses.csv`` in ``out_dir``; return the model path.

    ``labelled`` / ``unlabelled``: HDF5 case files. ``fully_supervised`` and ``supervised``
    treat ``unlabelled`` as extra labelled cases (fully) or ignore them (supervised).
    Stage 2 also takes ``pseudo`` (one pseudo-label file per unlabelled case) and, for PCL,
    ``prototypes`` (a :class:`PrototypeStatistics` file) and, with ``stage2_init: stage1``,
    ``init_from`` (the stage-1 model whose backbone and mean head start the network).
    ``snapshots`` ({iteration: path}) also writes the model after that many iterations, in
    ``model.pt``'s format, atomically (the between-stage rules may read one instead of the
    final model); each iteration must be within 1..``cfg.iterations``.
    ``checkpoint.pt`` in ``out_dir`` is resumed from when it matches ``cfg`` (and is not past
    a snapshot still to write: then training starts over).
    ``callback(iteration)`` runs after every iteration (progress hooks, tests).
    ``deployment``: the record :func:`semiseg.models.deployment_record` makes (class names,
    preprocessing, patch, stride), written into every model file so that it can predict
    new scans on its own (``semiseg predict``); None writes none.
    """
    snapshots = {int(k): Path(v) for k, v in (snapshots or {}).items()}
    outside = sorted(k for k in snapshots if not 1 <= k <= cfg.iterations)
    if outside:
        raise ValueError(f"snapshot iterations {outside} are outside this run's 1..{cfg.iterations} iterations")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    amp_dtype = training_autocast_dtype(dev, cfg.amp, cfg.cpu_amp)
    use_amp = amp_dtype is not None
    if dev.type == "cpu":
        log.info("training precision on the CPU: %s (cpu_amp %s; bfloat16 units: %s)",
                 "bfloat16 autocast" if use_amp else "float32", cfg.cpu_amp, ", ".join(cpu_bf16_units()) or "none")
    if cfg.method == "fully_supervised":
        labelled, unlabelled = list(labelled) + list(unlabelled), []
        lb, ub = cfg.labelled_batch + cfg.unlabelled_batch, 0
    elif cfg.method == "supervised":
        unlabelled, lb, ub = [], cfg.labelled_batch, 0
    else:
        lb, ub = cfg.labelled_batch, cfg.unlabelled_batch
        if not unlabelled:
            raise ValueError(f"method {cfg.method} needs unlabelled cases")
    if cfg.stage == 2:
        if pseudo is None or len(pseudo) != len(unlabelled):
            raise ValueError(f"stage 2 needs one pseudo-label file per unlabelled case ({len(unlabelled)})")
    else:
        pseudo = None
    stats = None
    if cfg.stage == 2 and cfg.lambda_r:
        if prototypes is None:
            raise ValueError("method 'full' (lambda_r > 0) needs the prototype file")
        stats = PrototypeStatistics.load(prototypes)
        if stats.feature_dim != cfg.base_filters or stats.num_classes != cfg.num_classes:
            raise ValueError(
                f"{prototypes}: prototypes of {stats.num_classes} classes x {stats.feature_dim} features do not fit a "
                f"stage-2 V-Net of {cfg.num_classes} classes x {cfg.base_filters} features"
            )

    # What the run learns from, by content: a checkpoint of the same settings but other cases,
    # pseudo labels, prototypes or initial weights (a rule rerun because an upstream file
    # changed) must not be resumed.
    inputs_digest = files_digest({
        "labelled": labelled, "unlabelled": unlabelled, "pseudo": pseudo,
        "prototypes": prototypes if stats is not None else None,
        "init_from": init_from if cfg.stage == 2 and cfg.stage2_init == "stage1" else None,
    })

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    student = build_model(cfg).to(dev)
    if cfg.stage == 2 and cfg.stage2_init == "stage1":
        if init_from is None:
            raise ValueError("stage2_init 'stage1' needs the stage-1 model (init_from)")
        init_from_stage1(student, init_from)
    teacher = None
    if cfg.has_teacher:
        teacher = copy.deepcopy(student)
        for p in teacher.parameters():
            p.requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    history: list[dict[str, float]] = []
    start = 0

    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        try:
            ckpt = read_torch_file(ckpt_path, dev, "checkpoint")
        except ValueError as exc:  # e.g. written by an older version (NumPy objects inside)
            log.warning("ignoring %s", exc)
            ckpt = {}
        same_settings = ckpt.get("fingerprint") == cfg.fingerprint()
        if same_settings and ckpt.get("inputs") != inputs_digest:
            log.warning("not resuming from %s: it was trained on other input files (cases, pseudo labels, prototypes "
                        "or initial weights) than this run's; training from the start", ckpt_path)
        elif same_settings and any(k < int(ckpt["iteration"]) for k in snapshots):
            log.warning("not resuming from %s: its iteration %d is past snapshot iteration(s) %s; training from the start",
                        ckpt_path, int(ckpt["iteration"]), sorted(k for k in snapshots if k < int(ckpt["iteration"])))
        elif same_settings:
            student.load_state_dict(ckpt["student"])
            if teacher is not None:
                teacher.load_state_dict(ckpt["teacher"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["rng"])
            history, start = ckpt["history"], int(ckpt["iteration"])
            if stats is not None:
                stats.load_state_dict(ckpt["prototypes"])
            log.info("resuming from %s at iteration %d", ckpt_path, start)
        elif ckpt:
            log.warning("ignoring %s: it was written with other settings", ckpt_path)

    if use_amp and dev.type == "cpu" and not cpu_kernels_agree(student, cfg.patch_size, lb + ub, amp_dtype, dev):
        use_amp, amp_dtype = False, None

    data = PatchBatches(
        labelled, unlabelled, cfg.patch_size, lb, ub, cfg.seed, cfg.iterations, pseudo=pseudo,
        augmentation=cfg.augmentation,
    )
    loader = DataLoader(
        data, batch_size=None, sampler=range(start, cfg.iterations), num_workers=num_workers,
        pin_memory=dev.type == "cuda", persistent_workers=False, prefetch_factor=4 if num_workers else None,
        generator=torch.Generator(),  # its own: creating the iterator must not draw from the global RNG
    )
    step_fn = make_step(cfg, student, teacher, stats)
    student.train()
    if teacher is not None:
        teacher.train()  # as the method notes: both in train mode (dropout, batch statistics)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, initial=start, file=sys.stderr, desc=f"{cfg.method}", dynamic_ncols=True)
    if start in snapshots:  # resumed exactly at a snapshot iteration
        _save_model(snapshots[start], cfg, start, student, teacher, stats, deployment)
    it = iter(loader)
    t_wait_total = t_step_total = 0.0
    cpu_bf16 = use_amp and dev.type == "cpu"
    bf16_redos = 0
    for t in range(start, cfg.iterations):
        t0 = time.perf_counter()
        batch = next(it)
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        t1 = time.perf_counter()
        state = _StepState([m for m in (student, teacher) if m is not None], stats) if use_amp and dev.type == "cpu" else None
        with autocast(dev, enabled=use_amp, dtype=amp_dtype):  # losses and statistics stay float32
            loss, terms = step_fn(batch, t)
        backward(loss, opt, scaler)
        # float16 on CUDA: the grad scaler skips a step with overflowed gradients by itself.
        bad = [] if scaler.is_enabled() else non_finite_gradients(student)
        if bad and state is not None:
            # bfloat16 has float32's range, so a non-finite gradient here that float32 does not
            # give is a CPU kernel's fault that cpu_kernels_agree did not catch (it checks the
            # convolutions only): the same step again, in float32, from the same RNG states
            # and statistics.
            bf16_redos += 1
            log.warning("iteration %d: non-finite gradients in bfloat16 (loss %s) in %d parameter(s): %s; "
                        "computing this step again in float32 (%d of %d such steps before the run goes on in float32)",
                        t, terms["loss"], len(bad), ", ".join(bad[:8]) + (", ..." if len(bad) > 8 else ""), bf16_redos,
                        BF16_REDO_LIMIT)
            state.restore()
            loss, terms = step_fn(batch, t)
            backward(loss, opt, scaler)
            bad = non_finite_gradients(student)
            redone = 1.0
        else:
            redone = 0.0
        if bad or not np.isfinite(terms["loss"]):
            raise FloatingPointError(
                f"non-finite {'gradients' if bad else 'loss'} at iteration {t} "
                f"({'float32' if not use_amp or redone else amp_dtype}): {terms}"
                + (f"; parameters: {', '.join(bad[:8])}" if bad else "")
            )
        if redone and bf16_redos >= BF16_REDO_LIMIT:
            use_amp = False
            log.warning("iteration %d: %d bfloat16 steps had non-finite gradients that float32 did not have; "
                        "the rest of this run trains in float32 (set training.cpu_amp: off to start in float32)",
                        t, bf16_redos)
        scaler.step(opt)
        scaler.update()
        lr = opt.param_groups[0]["lr"]
        sched.step()
        if cfg.method == "bcp":
            step_fn.update_teacher(t)  # EMA in the self-training phase only
        elif teacher is not None:
            ema_update(teacher, student, ema_alpha(t + 1, cfg.ema_decay))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        t_wait_total += t1 - t0
        t_step_total += t2 - t0
        row = {"iteration": t, "lr": lr, **terms, "data_wait_s": t1 - t0, "step_s": t2 - t0}
        if cpu_bf16:
            row["float32_redo"] = redone  # 1: this bfloat16 step was computed again in float32
        history.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.4f}")
        if t + 1 in snapshots:
            _save_model(snapshots[t + 1], cfg, t + 1, student, teacher, stats, deployment)
            log.info("iteration %d: model snapshot %s", t + 1, snapshots[t + 1])
        if (t + 1) % checkpoint_every == 0 or t + 1 == cfg.iterations:
            _save_checkpoint(ckpt_path, cfg, t + 1, student, teacher, opt, sched, scaler, history, stats, inputs_digest)
            write_history(history, out / "losses.csv")
            log.info("iteration %d/%d loss %.4f (data wait %.1f%% of step time)", t + 1, cfg.iterations,
                     terms["loss"], 100 * t_wait_total / max(t_step_total, 1e-9))
        if callback is not None:
            callback(t)
    if bar is not None:
        bar.close()

    model_path = out / "model.pt"
    _save_model(model_path, cfg, cfg.iterations, student, teacher, stats, deployment)
    write_history(history, out / "losses.csv")
    return model_path


def _save_model(path, cfg, iterations, student, teacher, stats, deployment=None) -> None:
    """The model file (:mod:`semiseg.models`' format) of the weights after ``iterations`` iterations, atomically."""
    with atomic_path(path) as tmp:
        torch.save({
            "format": MODEL_FORMAT, "deployment": dict(deployment) if deployment is not None else None, "stage": cfg.stage, "method": cfg.method, "config": asdict(cfg),
            "network": student.config, "student": student.state_dict(),
            "teacher": teacher.state_dict() if teacher is not None else None,
            "iterations": iterations,
            "prototypes": stats.state_dict() if stats is not None else None,
        }, tmp)


def init_from_stage1(net: SegmentationNet, model_path: str | Path) -> None:
    """Start a plain V-Net from a stage-1 model: its backbone (strict) and the aleatoric mean branch as the head."""
    source = load_model(model_path, "student")
    missing = net.backbone.load_state_dict(source.backbone.state_dict(), strict=True)
    del missing
    c = net.seg_head.out_channels
    if source.aleatoric is None:
        net.seg_head.load_state_dict(source.seg_head.state_dict(), strict=True)
    else:
        with torch.no_grad():
            net.seg_head.weight.copy_(source.aleatoric.branches.weight[:c])
            net.seg_head.bias.copy_(source.aleatoric.branches.bias[:c])


def _save_checkpoint(path, cfg, iteration, student, teacher, opt, sched, scaler, history, stats=None, inputs=None) -> None:
    with atomic_path(path) as tmp:
        torch.save({
            "fingerprint": cfg.fingerprint(), "inputs": inputs, "iteration": iteration, "student": student.state_dict(),
            "teacher": teacher.state_dict() if teacher is not None else None,
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
            "rng": _rng_state(), "history": history,
            "prototypes": stats.state_dict() if stats is not None else None,
        }, tmp)


def write_history(history: list[dict[str, float]], path: str | Path) -> None:
    """Per-iteration CSV of every logged term (columns: union of the keys, in first-seen order)."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(history)
