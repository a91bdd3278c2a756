"""One prepared GPU check: every training step, checkpoint/resume, inference and a short real-data run.

The first command to run whenever a GPU machine is lent (the device tool gives short windows:
15 minutes a session, the machine's start included). It needs only Python, PyTorch, NumPy,
h5py and SciPy (no SimpleITK, Snakemake, pandas or medpy) and ends in about 4 minutes on one
NVIDIA H200 by estimate, not yet measured there (``--deadline-s``: the real-data run gets what
is left of it, at most 2.5 min). The JSON and Markdown are rewritten after every section, so a
run stopped by the device tool's time limit still returns what it measured.

Sections (each records its numbers and pass/fail checks; an exception in one is recorded
with its traceback and the others still run; the exit code is 1 if any enforced check failed):

1. ``steps``: one training iteration of every method (``supervised``, ``fully_supervised``,
   ``aua``, ``aua_bcl``, stage-2 ``aua_bcl_pl`` and ``full``, and the baselines ``mt``, ``uamt``, ``bcp``) with AMP (float16 autocast +
   GradScaler on CUDA, as ``train()``) and without, at the paper's LA patch 112 x 112 x 80,
   2 labelled + 2 unlabelled crops (fully supervised: 4 labelled), width 16, on real LA crops
   held on the device: finite loss, gradients and weights; seconds per iteration (median after
   warm-up) and the ratio to the bare V-Net doing the same passes (``bench_stage1.py``'s
   definition; target <= 1.3 for stage 1, ``aua_bcl`` with AMP). Stage 2 takes the ground truth
   of the unlabelled crops as pseudo labels and prototypes estimated from a few crops' features.
2. ``resume``: ``train()`` for N iterations, interrupted after k (the callback raises) and
   resumed, against an uninterrupted run (``aua_bcl`` and ``full``, AMP): final weights and
   loss history within the stated tolerance (CUDA is not bit-deterministic).
3. ``inference``: one real LA test case at stride 18 x 18 x 4, ``sliding_window_predict``
   (float32 and AMP) against the field's one-window loop (``bench_inference.naive_predict``):
   time ratio and argmax agreement.
4. ``real_data``: ``aua_bcl`` (lambda_c 0.09) through ``train()`` on the prepared LA training
   cases (20 % labelled, rounded up), as many iterations as fit in the budget (speed measured
   first by a short calibration run; the learning-rate step scaled to 2500/6000 of the run),
   then Dice of class 1 on the test cases (sliding window, argmax).
5. ``projection``: the time of the paper's LA 20 % schedule (both stages, 6000 iterations
   each, pseudo labels of 64 unlabelled cases, prototype pass over 80 cases, inference of 20
   test cases) from the measured speeds; the formula is written in the summary.

Commands (from the repository root):

Here, once (copies 12 training + 4 test LA cases, about 33 MiB, into the git-ignored
``device_data/la``; the source is ``$SEMISEG_LA_H5`` or ``../shared/data/la2018_h5``)::

    PYTHONPATH=src python benchmarks/device_check.py --prepare-data

On the GPU machine, through the device tool's ``run`` (the checkout travels without
``../shared``, so the prepared cases travel with ``carry``; 300 s leaves room for one rerun)::

    command:   PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/device_check.py --data device_data/la --out $OUT
    carry:     ["device_data"]
    timeout_s: 300

It writes ``device_check.json``, ``device_check.md`` and ``real_data_losses.csv`` to ``--out``
(work files go to a temporary folder) and prints the Markdown.

On a CPU, the same code paths at tiny sizes (patch 32 x 32 x 16, width 2, a few
iterations, a few real LA cases cropped to 48 x 40 x 24 around the atrium; float16
autocast emulates CUDA's AMP, without a GradScaler; ``AMP_DTYPE`` says why not bfloat16)::

    PYTHONPATH=src python benchmarks/device_check.py --smoke --out /tmp/device_check
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from semiseg.inference import sliding_window_predict, window_starts
from semiseg.networks.vnet import SegmentationNet
from semiseg.precision import autocast, cpu_model
from semiseg.prototypes import PrototypeStatistics
from semiseg.training.data import PatchBatches
from semiseg.training.engine import (
    STAGE2_METHODS,
    TrainConfig,
    build_model,
    ema_alpha,
    ema_update,
    load_model,
    make_step,
    optimizer_step,
    resolve_device,
    train,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import naive_predict  # noqa: E402  (the field's one-window loop)

REPO = Path(__file__).resolve().parents[1]
#: Where the real LA cases are read from here (as tests/conftest.py's LA_H5).
LA_SOURCE = Path(os.environ.get("SEMISEG_LA_H5", REPO.parent / "shared" / "data" / "la2018_h5"))
#: Where ``--prepare-data`` copies them (git-ignored; travels with the device tool's carry).
PREPARED = REPO / "device_data" / "la"
CASE_FILE = "mri_norm2.h5"

# The paper's LA 20 % setting (config.yaml, datasets.la_h5; tests/test_device_check.py checks them).
LA_PATCH = (112, 112, 80)
LA_STRIDE = (18, 18, 4)
LA_LAMBDA_C = 0.09
LAMBDA_R = 0.1
LABELLED_PERCENT = 20
PAPER_LABELLED, PAPER_UNLABELLED, PAPER_TEST = 16, 64, 20
PAPER_ITERATIONS, PAPER_LR_STEP = 6000, 2500
PIPELINE_INFER_BATCH = 2  # config.yaml: evaluation.batch_size and between_stages.batch_size

METHOD_ORDER = ("supervised", "fully_supervised", "aua", "aua_bcl", "aua_bcl_pl", "full", "mt", "uamt", "bcp")
SECTIONS = ("steps", "resume", "inference", "real_data", "projection")
TITLES = {
    "steps": "1. Training step of every method",
    "resume": "2. Checkpoint and resume",
    "inference": "3. Sliding-window inference vs the one-window loop",
    "real_data": "4. Short real-data run (aua_bcl)",
    "projection": "5. Projected time of the paper's LA 20 % schedule",
}

# Thresholds (each check names its own in the summary).
STAGE1_RATIO_TARGET = 1.3  # aua_bcl step / bare V-Net, AMP (issue 3)
INFER_SPEEDUP_TARGET = 3.0  # float32 sliding window vs naive loop (issue 5)
AGREE_FLOAT32 = 0.999  # argmax agreement with the naive loop: TF32 convolutions and BN folding round differently
AGREE_AMP = 0.995
RESUME_REL_TOL = 1e-2  # ||w_resumed - w_uninterrupted|| / ||w_uninterrupted - w_init||
RESUME_LOSS_TOL = 1e-3  # max |loss_resumed - loss_uninterrupted| over the logged iterations
DICE_TARGET = 0.5  # mean test Dice after the short run: the GPU path learns

#: The autocast dtype of every AMP run here: CUDA's (``train()``'s) float16, also on the CPU. On
#: the CPU bfloat16 would be faster, but oneDNN's bfloat16 Conv3d weight gradient (PyTorch 2.13)
#: is nondeterministic and sometimes NaN on the smoke run's tiny bottleneck (2 x 2 x 1 voxels):
#: a plain ``nn.Conv3d(32, 32, 3, padding=1)`` on finite (6, 32, 2, 2, 2) inputs, 10 of 200 tries.
AMP_DTYPE = torch.float16


@dataclass(frozen=True)
class Settings:
    """Sizes of one check run: the GPU check's (:func:`gpu_settings`) or the CPU smoke's."""

    smoke: bool
    patch: tuple[int, int, int]  # training and inference crop (X, Y, Z), voxels
    stride: tuple[int, int, int]  # sliding-window stride, voxels
    width: int  # V-Net base filters
    labelled_batch: int
    unlabelled_batch: int
    bcl_max_samples: int
    warmup: int  # step iterations not timed
    repeats: int  # step iterations timed (median)
    resume_iterations: int  # N
    resume_interrupt: int  # k (also the checkpoint interval)
    infer_batch_sizes: tuple[int, ...]
    infer_repeats: int
    train_cases: int  # training cases taken from the data folder (labelled: 20 %, rounded up)
    test_cases: int
    train_budget_s: float  # real-data training time, seconds (cut to what the deadline leaves)
    min_iterations: int
    max_iterations: int
    calibration_iterations: int
    num_workers: int  # DataLoader workers of the real-data run
    deadline_s: float  # whole script, seconds
    reserve_s: float  # kept for what follows the real-data training (evaluation, projection)
    case_crop: tuple[int, int, int] | None  # smoke: cases cropped to this size around the label


def gpu_settings() -> Settings:
    """The paper's LA sizes, sized to end in about 4 minutes on one H200."""
    return Settings(
        smoke=False,
        patch=LA_PATCH,
        stride=LA_STRIDE,
        width=16,
        labelled_batch=2,
        unlabelled_batch=2,
        bcl_max_samples=9000,
        warmup=3,
        repeats=5,
        resume_iterations=6,
        resume_interrupt=3,
        infer_batch_sizes=(PIPELINE_INFER_BATCH, 8),
        infer_repeats=3,
        train_cases=12,
        test_cases=4,
        train_budget_s=150.0,
        min_iterations=20,
        max_iterations=6000,
        calibration_iterations=8,
        num_workers=4,
        deadline_s=235.0,
        reserve_s=25.0,
        case_crop=None,
    )


def smoke_settings() -> Settings:
    """Tiny sizes for a CPU: the same code paths in well under a minute on 2 cores."""
    return Settings(
        smoke=True,
        patch=(32, 32, 16),
        stride=(8, 8, 4),
        width=2,
        labelled_batch=2,
        unlabelled_batch=2,
        bcl_max_samples=500,
        warmup=1,
        repeats=2,
        resume_iterations=4,
        resume_interrupt=2,
        infer_batch_sizes=(PIPELINE_INFER_BATCH,),
        infer_repeats=1,
        train_cases=4,
        test_cases=2,
        train_budget_s=2.0,
        min_iterations=3,
        max_iterations=3,
        calibration_iterations=2,
        num_workers=0,
        deadline_s=60.0,
        reserve_s=5.0,
        case_crop=(48, 40, 24),
    )


@dataclass
class Check:
    """One pass/fail criterion. ``kind``: ``correctness`` or ``target`` (a speed or quality goal).

    ``enforced=False`` (targets in the smoke run): recorded, not counted in the exit code.
    """

    name: str
    passed: bool
    detail: str
    kind: str = "correctness"
    enforced: bool = True


@dataclass(frozen=True)
class CaseSet:
    """Case files (``<case>/mri_norm2.h5``) of one check run."""

    labelled: list[Path]
    unlabelled: list[Path]
    test: list[Path]


@dataclass
class Context:
    """What every section gets: settings, device, cases, a work folder and earlier sections' results."""

    settings: Settings
    device: torch.device
    cases: CaseSet
    work: Path
    out: Path
    t_start: float
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def remaining_s(self) -> float:
        """Seconds left before the deadline."""
        return self.settings.deadline_s - (time.perf_counter() - self.t_start)


# ---------------------------------------------------------------- data


def read_list(path: Path) -> list[str]:
    """Case IDs of a list file, one a line (empty if the file is absent)."""
    return path.read_text(encoding="utf-8").split() if path.exists() else []


def n_labelled(n_train: int) -> int:
    """Labelled cases among ``n_train``: 20 % rounded up, at least 1 (16 of 80 in the paper); integer arithmetic."""
    return max(1, -(-n_train * LABELLED_PERCENT // 100))


def prepare_data(source: Path, dest: Path, n_train: int = 12, n_test: int = 4) -> dict[str, Any]:
    """Copy real LA cases from ``source`` into ``dest`` for the GPU machine; return a summary.

    Training cases: the first ``n_labelled(n_train)`` of the community's training list (its
    first 16 are the paper's labelled set), then the unlabelled pool's first (list positions
    17 on). ``dest/train.list`` lists them labelled first; ``dest/test.list`` the first
    ``n_test`` test cases. Files are copied byte for byte (gzip HDF5, about 2.1 MiB each).
    """
    train_ids = read_list(source / "train.list") or read_list(REPO / "workflow/resources/splits/LA_train.list")
    test_ids = read_list(source / "test.list") or read_list(REPO / "workflow/resources/splits/LA_test.list")
    have = {p.name for p in source.iterdir() if (p / CASE_FILE).exists()} if source.is_dir() else set()
    if not have:
        raise FileNotFoundError(f"no LA cases ({CASE_FILE}) in {source}; set SEMISEG_LA_H5 or --source")
    k = n_labelled(n_train)
    if k > PAPER_LABELLED:
        raise ValueError(
            f"{n_train} training cases need {k} labelled ones; the paper's labelled set has {PAPER_LABELLED}"
        )
    labelled = [c for c in train_ids[:PAPER_LABELLED] if c in have][:k]
    unlabelled = [c for c in train_ids[PAPER_LABELLED:] if c in have][: n_train - k]
    test = [c for c in test_ids if c in have][:n_test]
    if len(labelled) < k or len(labelled) + len(unlabelled) < n_train or len(test) < n_test:
        raise ValueError(f"{source} holds too few of the listed cases for {n_train} training and {n_test} test cases")
    dest.mkdir(parents=True, exist_ok=True)
    size = 0
    for case in labelled + unlabelled + test:
        target = dest / case / CASE_FILE
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(source / case / CASE_FILE, target)  # copyfile: not the read-only mode bits
        size += target.stat().st_size
    (dest / "train.list").write_text("\n".join(labelled + unlabelled) + "\n", encoding="utf-8")
    (dest / "test.list").write_text("\n".join(test) + "\n", encoding="utf-8")
    (dest / "README.md").write_text(
        f"Real LA cases copied from {source} by `benchmarks/device_check.py --prepare-data` for the GPU check.\n"
        f"train.list: {len(labelled)} labelled (the first of the paper's 16) then {len(unlabelled)} unlabelled cases; "
        f"test.list: {len(test)} test cases. Not for committing.\n",
        encoding="utf-8",
    )
    return {"dest": str(dest), "labelled": labelled, "unlabelled": unlabelled, "test": test, "mib": size / 2**20}


def load_cases(data: Path, n_train: int, n_test: int) -> CaseSet:
    """The first ``n_train`` training and ``n_test`` test cases of ``data``'s lists (20 % labelled)."""
    train_ids = [c for c in read_list(data / "train.list") if (data / c / CASE_FILE).exists()][:n_train]
    test_ids = [c for c in read_list(data / "test.list") if (data / c / CASE_FILE).exists()][:n_test]
    if len(train_ids) < n_train or len(test_ids) < n_test:
        raise FileNotFoundError(
            f"{data}: found {len(train_ids)} training and {len(test_ids)} test cases of {n_train} and {n_test} "
            f"(run --prepare-data here, and carry its folder to the GPU machine)"
        )
    k = n_labelled(n_train)
    paths = [data / c / CASE_FILE for c in train_ids]
    return CaseSet(paths[:k], paths[k:], [data / c / CASE_FILE for c in test_ids])


def crop_around_label(path: Path, dest: Path, size: Sequence[int]) -> Path:
    """Write a ``size`` crop of a case (centred on its label's bounding box) to ``dest``; return it."""
    with h5py.File(path, "r") as f:
        label = f["label"][...]
        idx = np.argwhere(label > 0)
        centre = (idx.min(0) + idx.max(0)) // 2 if len(idx) else np.array(label.shape) // 2
        box = tuple(
            slice(max(0, min(int(c) - s // 2, n - s)), max(0, min(int(c) - s // 2, n - s)) + s)
            for c, s, n in zip(centre, size, label.shape, strict=True)
        )
        image = f["image"][box].astype(np.float32)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(dest, "w") as g:
        g.create_dataset("image", data=image)
        g.create_dataset("label", data=label[box].astype(np.uint8))
    return dest


def smoke_cases(cases: CaseSet, work: Path, size: Sequence[int]) -> CaseSet:
    """The same cases cropped to ``size`` (so that whole-volume inference stays tiny)."""

    def crop(paths: list[Path]) -> list[Path]:
        return [crop_around_label(p, work / "cases" / p.parent.name / CASE_FILE, size) for p in paths]

    return CaseSet(crop(cases.labelled), crop(cases.unlabelled), crop(cases.test))


def read_case(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8) of a case file, both (X, Y, Z)."""
    with h5py.File(path, "r") as f:
        return f["image"][...].astype(np.float32), f["label"][...].astype(np.uint8)


def case_shape(path: Path) -> tuple[int, int, int]:
    """The (X, Y, Z) shape of a case's image."""
    with h5py.File(path, "r") as f:
        return tuple(int(n) for n in f["image"].shape)


def n_windows(shape: Sequence[int], patch: Sequence[int], stride: Sequence[int]) -> int:
    """Sliding windows over a volume of ``shape`` (padded up to the patch, as the pipeline does)."""
    return math.prod(len(window_starts(max(n, p), p, s)) for n, p, s in zip(shape, patch, stride, strict=True))


# ---------------------------------------------------------------- helpers


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``, the device synchronised before and after."""
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t0, out


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def read_history(path: Path) -> list[dict[str, float]]:
    """``losses.csv`` of a run as a list of rows of floats (empty cells: NaN)."""
    with open(path, encoding="utf-8") as fh:
        return [
            {k: float(v) if v not in ("", None) else math.nan for k, v in row.items()} for row in csv.DictReader(fh)
        ]


def train_config(method: str, s: Settings, **overrides: Any) -> TrainConfig:
    """The paper's LA hyperparameters for ``method`` at the run's sizes (AMP on, as ``train()``'s default)."""
    values: dict[str, Any] = dict(
        method=method,
        patch_size=s.patch,
        base_filters=s.width,
        bcl_max_samples=s.bcl_max_samples,
        labelled_batch=s.labelled_batch,
        unlabelled_batch=s.unlabelled_batch,
        lambda_c=LA_LAMBDA_C if method == "aua_bcl" else 0.0,
        lambda_r=LAMBDA_R if method == "full" else 0.0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def crop_counts(method: str, s: Settings) -> tuple[int, int]:
    """(labelled, unlabelled) crops an iteration of ``method`` takes."""
    if method == "fully_supervised":
        return s.labelled_batch + s.unlabelled_batch, 0
    if method == "supervised":
        return s.labelled_batch, 0
    return s.labelled_batch, s.unlabelled_batch


def method_batch(raw: dict[str, torch.Tensor], method: str, s: Settings) -> dict[str, torch.Tensor]:
    """The batch ``method`` sees, cut from a raw batch of labelled and ground-truth-labelled unlabelled crops."""
    n_l, n_u = crop_counts(method, s)
    batch = {"image_l": raw["image_l"][:n_l], "label_l": raw["label_l"][:n_l]}
    if n_u:
        batch["image_u"] = raw["image_u"][:n_u]
        if method in STAGE2_METHODS:  # the ground truth stands in for pseudo labels
            batch["label_u"] = raw["label_u"][:n_u]
    return batch


def step_prototypes(
    model: SegmentationNet, batches: list[dict[str, torch.Tensor]], num_classes: int
) -> PrototypeStatistics:
    """Prototype statistics from the unit-norm features of the labelled crops of ``batches`` (eval mode)."""
    was_training = model.training
    model.eval()
    stats = None
    with torch.no_grad():  # not inference_mode: the statistics are updated again in training
        for b in batches:
            feats = model(b["image_l"], heads=False).features.float()  # (B, F, X, Y, Z)
            if stats is None:
                stats = PrototypeStatistics(num_classes, feats.shape[1])
            rows = F.normalize(feats.movedim(1, -1).reshape(-1, feats.shape[1]), dim=1)
            stats.update(rows, b["label_l"].reshape(-1))
    model.train(was_training)
    return stats


# ---------------------------------------------------------------- 1. steps


def time_method(ctx: Context, method: str, amp: bool, raws: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Time ``method``'s iteration and the bare V-Net's same passes, alternately; check finiteness."""
    s, dev = ctx.settings, ctx.device
    cfg = train_config(method, s, amp=amp)
    torch.manual_seed(cfg.seed)
    student = build_model(cfg).to(dev)
    teacher = None
    if cfg.has_teacher:
        teacher = copy.deepcopy(student)
        for p in teacher.parameters():
            p.requires_grad_(False)
    batches = [method_batch(r, method, s) for r in raws]
    stats = step_prototypes(student, batches[:2], cfg.num_classes) if cfg.lambda_r else None
    step = make_step(cfg, student, teacher, stats)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    use_scaler = amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    n_l, n_u = crop_counts(method, s)
    bare = build_model(train_config("supervised", s)).to(dev)
    bare_t = copy.deepcopy(bare) if cfg.has_teacher else None
    opt_b = torch.optim.SGD(bare.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler_b = torch.amp.GradScaler("cuda", enabled=use_scaler)
    bare_x = [torch.cat([r["image_l"][:n_l], r["image_u"][:n_u]]) for r in raws]
    bare_y = [torch.cat([r["label_l"][:n_l], r["label_u"][:n_u]]) for r in raws]
    student.train()
    bare.train()

    losses: list[float] = []
    skipped = 0
    terms: dict[str, float] = {}

    def method_iter(t: int) -> None:
        nonlocal terms
        with autocast(dev, enabled=amp, dtype=AMP_DTYPE):
            loss, terms = step(batches[t % len(batches)], t)
        optimizer_step(loss, opt, scaler)
        if method == "bcp":
            step.update_teacher(t)
        elif teacher is not None:
            ema_update(teacher, student, ema_alpha(t + 1, cfg.ema_decay))

    def bare_iter(t: int) -> None:
        i = t % len(raws)
        with autocast(dev, enabled=amp, dtype=AMP_DTYPE):
            loss = F.cross_entropy(bare(bare_x[i]).logits.float(), bare_y[i])
            if bare_t is not None:
                with torch.no_grad():
                    bare_t(raws[i]["image_u"][:n_u])
        optimizer_step(loss, opt_b, scaler_b)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times: dict[str, list[float]] = {"method": [], "bare": []}
    grads_finite = True
    for t in range(s.warmup + s.repeats):
        scale = scaler.get_scale() if use_scaler else None
        dt, _ = timed(dev, lambda t=t: method_iter(t))
        if use_scaler and scaler.get_scale() < scale:
            skipped += 1
        losses.append(float(terms["loss"]))
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in student.parameters() if p.grad is not None)
        db, _ = timed(dev, lambda t=t: bare_iter(t))
        if t >= s.warmup:
            times["method"].append(dt)
            times["bare"].append(db)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    weights_finite = all(bool(torch.isfinite(p).all()) for p in student.parameters())
    m, b = statistics.median(times["method"]), statistics.median(times["bare"])
    out = {
        "method": method,
        "amp": amp,
        "s_per_iteration": m,
        "bare_s_per_iteration": b,
        "ratio_to_bare": m / b,
        "bare_passes": {"forward_backward_crops": n_l + n_u, "forward_only_crops": n_u if cfg.has_teacher else 0},
        "losses": losses,
        "losses_finite": all(math.isfinite(x) for x in losses),
        "grads_finite_last": grads_finite,
        "weights_finite": weights_finite,
        "scaler_skipped_steps": skipped,
        "peak_gib": peak,
        "last_terms": {k: float(v) for k, v in terms.items()},
    }
    return out


def section_steps(ctx: Context) -> tuple[dict[str, Any], list[Check]]:
    """Section 1: every method's iteration, with AMP and without, against the bare V-Net."""
    s, dev = ctx.settings, ctx.device
    n_batches = min(4, s.warmup + s.repeats)
    pb = PatchBatches(
        ctx.cases.labelled,
        ctx.cases.unlabelled,
        s.patch,
        s.labelled_batch + s.unlabelled_batch,
        s.unlabelled_batch,
        seed=0,
        iterations=n_batches,
        pseudo=ctx.cases.unlabelled,
    )
    raws = [{k: v.to(dev) for k, v in pb[t].items()} for t in range(n_batches)]
    runs: list[dict[str, Any]] = []
    checks: list[Check] = []
    for method in METHOD_ORDER:
        for amp in (False, True):
            r = time_method(ctx, method, amp, raws)
            if dev.type == "cuda":
                torch.cuda.empty_cache()  # the method's models are gone: give their memory back
            runs.append(r)
            tag = f"{method}, {'AMP' if amp else 'float32'}"
            ok = r["losses_finite"] and r["grads_finite_last"] and r["weights_finite"]
            checks.append(
                Check(
                    f"{tag}: finite",
                    ok,
                    f"loss finite {r['losses_finite']}, gradients of the last iteration finite "
                    f"{r['grads_finite_last']}, weights finite {r['weights_finite']}, "
                    f"GradScaler skipped {r['scaler_skipped_steps']} of {len(r['losses'])} steps",
                )
            )
            if method == "aua_bcl" and amp:
                checks.append(
                    Check(
                        f"{tag}: step / bare V-Net <= {STAGE1_RATIO_TARGET}",
                        r["ratio_to_bare"] <= STAGE1_RATIO_TARGET,
                        f"{r['ratio_to_bare']:.3f}x ({r['s_per_iteration']:.4f} s / {r['bare_s_per_iteration']:.4f} s)",
                        kind="target",
                        enforced=not s.smoke,
                    )
                )
    return {
        "runs": runs,
        "amp_dtype": str(AMP_DTYPE).replace("torch.", ""),
        "grad_scaler": dev.type == "cuda",
        "timed_iterations": s.repeats,
        "warmup_iterations": s.warmup,
        "distinct_batches": n_batches,
    }, checks


# ---------------------------------------------------------------- 2. resume


class Interrupt(Exception):
    """Raised from ``train()``'s callback to stop a run after k iterations."""


def float_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point entries of a module's state dict, on the CPU in float64."""
    return {k: v.detach().cpu().double() for k, v in net.state_dict().items() if v.is_floating_point()}


def state_difference(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], init: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Max abs difference of ``a`` and ``b``, and ||a - b|| / ||b - init|| (apart, relative to how far trained)."""
    diff = torch.cat([(a[k] - b[k]).reshape(-1) for k in b])
    moved = torch.cat([(b[k] - init[k]).reshape(-1) for k in b])
    return {
        "max_abs": float(diff.abs().max()),
        "relative": float(diff.norm() / moved.norm().clamp_min(1e-30)),
        "moved_norm": float(moved.norm()),
    }


def resume_once(ctx: Context, method: str) -> dict[str, Any]:
    """Uninterrupted vs interrupted-after-k-and-resumed ``train()`` of ``method``; differences of the results."""
    s, dev, cases = ctx.settings, ctx.device, ctx.cases
    n, k = s.resume_iterations, s.resume_interrupt
    cfg = train_config(method, s, iterations=n, lr_step=max(1, n // 2))  # the step inside the run: scheduler state
    extra: dict[str, Any] = {}
    root = ctx.work / "resume" / method
    if cfg.stage == 2:
        extra["pseudo"] = cases.unlabelled  # the ground truth stands in for pseudo labels
        if cfg.lambda_r:
            torch.manual_seed(0)
            net = build_model(cfg).to(dev)
            pb = PatchBatches(cases.labelled, [], s.patch, s.labelled_batch, 0, seed=1, iterations=2)
            stats = step_prototypes(
                net, [{k2: v.to(dev) for k2, v in pb[t].items()} for t in range(2)], cfg.num_classes
            )
            extra["prototypes"] = root / "prototypes.npz"
            stats.save(extra["prototypes"])
    common = dict(device=str(dev), checkpoint_every=k, num_workers=0, progress=False, **extra)
    t0 = time.perf_counter()
    whole = train(cfg, cases.labelled, cases.unlabelled, root / "uninterrupted", **common)

    def stop(t: int) -> None:
        if t == k - 1:
            raise Interrupt

    part = root / "interrupted"
    try:
        train(cfg, cases.labelled, cases.unlabelled, part, callback=stop, **common)
        raise RuntimeError("the run was not interrupted")
    except Interrupt:
        pass
    if (part / "model.pt").exists() or not (part / "checkpoint.pt").exists():
        raise RuntimeError("the interrupted run left no checkpoint, or finished")
    rows_at_interrupt = len(read_history(part / "losses.csv"))
    resumed_iterations: list[int] = []
    resumed = train(cfg, cases.labelled, cases.unlabelled, part, callback=resumed_iterations.append, **common)
    wall = time.perf_counter() - t0

    torch.manual_seed(cfg.seed)  # train()'s initialisation: the seed, then the model built on the CPU
    init = float_state(build_model(cfg))
    out: dict[str, Any] = {
        "method": method,
        "iterations": n,
        "interrupted_after": k,
        "wall_s": wall,
        "rows_at_interrupt": rows_at_interrupt,
        "resumed_iterations": len(resumed_iterations),
        "first_resumed_iteration": resumed_iterations[0] if resumed_iterations else None,
    }
    for weights in ("student", "teacher") if cfg.mean_teacher else ("student",):
        a, b = load_model(resumed, weights), load_model(whole, weights)
        out[weights] = state_difference(float_state(a), float_state(b), init)
        out[weights]["integer_buffers_equal"] = all(
            torch.equal(va, b.state_dict()[key]) for key, va in a.state_dict().items() if not va.is_floating_point()
        )
    la = [r["loss"] for r in read_history(part / "losses.csv")]
    lb = [r["loss"] for r in read_history(root / "uninterrupted" / "losses.csv")]
    if len(la) != n or len(lb) != n:
        raise RuntimeError(f"loss histories of {len(la)} and {len(lb)} rows, expected {n}")
    d = [abs(x - y) for x, y in zip(la, lb, strict=True)]
    out["loss_max_abs_diff_before_interrupt"] = max(d[:k])  # the same code twice: the device's own nondeterminism
    out["loss_max_abs_diff_after_resume"] = max(d[k:])
    out["losses_finite"] = all(map(math.isfinite, la + lb))
    return out


def section_resume(ctx: Context) -> tuple[dict[str, Any], list[Check]]:
    """Section 2: checkpoint and resume through ``train()`` for a stage-1 and a stage-2 method."""
    runs, checks = [], []
    for method in ("aua_bcl", "full"):
        r = resume_once(ctx, method)
        runs.append(r)
        k, n = r["interrupted_after"], r["iterations"]
        checks.append(
            Check(
                f"{method}: resumed from the checkpoint",
                r["rows_at_interrupt"] == k and r["resumed_iterations"] == n - k and r["first_resumed_iteration"] == k,
                f"{r['rows_at_interrupt']} iterations logged at the interruption, {r['resumed_iterations']} "
                f"run after the restart, starting at iteration {r['first_resumed_iteration']}",
            )
        )
        for w in ("student", "teacher"):
            if w in r:
                checks.append(
                    Check(
                        f"{method} {w}: weights within tolerance",
                        r[w]["relative"] <= RESUME_REL_TOL and r[w]["integer_buffers_equal"],
                        f"||resumed - uninterrupted|| / ||uninterrupted - init|| = {r[w]['relative']:.2e} "
                        f"(tolerance {RESUME_REL_TOL:g}); max abs difference {r[w]['max_abs']:.2e}; "
                        f"integer buffers equal {r[w]['integer_buffers_equal']}",
                    )
                )
        checks.append(
            Check(
                f"{method}: loss history within tolerance",
                r["losses_finite"] and r["loss_max_abs_diff_after_resume"] <= RESUME_LOSS_TOL,
                f"max |loss difference| {r['loss_max_abs_diff_after_resume']:.2e} after the resume, "
                f"{r['loss_max_abs_diff_before_interrupt']:.2e} before it (tolerance {RESUME_LOSS_TOL:g})",
            )
        )
        if ctx.device.type == "cpu":  # the engine's promise: bit-identical on the CPU
            exact = r["student"]["max_abs"] == 0.0 and r["loss_max_abs_diff_after_resume"] == 0.0
            checks.append(
                Check(
                    f"{method}: bit-identical on the CPU",
                    exact,
                    f"max abs weight difference {r['student']['max_abs']:.1e}",
                )
            )
    return {"runs": runs, "relative_tolerance": RESUME_REL_TOL, "loss_tolerance": RESUME_LOSS_TOL}, checks


# ---------------------------------------------------------------- 3. inference


def section_inference(ctx: Context) -> tuple[dict[str, Any], list[Check]]:
    """Section 3: batched sliding window (float32, AMP) vs the naive loop on one real test case."""
    s, dev = ctx.settings, ctx.device
    case = ctx.cases.test[0]
    image, _ = read_case(case)
    torch.manual_seed(0)
    net = SegmentationNet(in_channels=1, num_classes=2, base_filters=s.width).to(dev).eval()
    runs: dict[str, Callable[[], np.ndarray]] = {"naive": lambda: naive_predict(net, image, s.patch, s.stride, dev)}
    for bs in s.infer_batch_sizes:
        for amp in (False, True):
            runs[f"{'amp' if amp else 'float32'}_batch{bs}"] = lambda bs=bs, amp=amp: sliding_window_predict(
                net, image, s.patch, s.stride, batch_size=bs, device=dev, amp=amp, amp_dtype=AMP_DTYPE
            )
    for fn in runs.values():  # warm-up: cuDNN handles, kernel choice, BN folding
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    probs: dict[str, np.ndarray] = {}
    for _ in range(s.infer_repeats):
        for name, fn in runs.items():
            dt, probs[name] = timed(dev, fn)
            times[name].append(dt)
    ref = probs["naive"].argmax(0)
    naive_s = statistics.median(times["naive"])
    res: dict[str, Any] = {
        "case": case.parent.name,
        "shape": list(image.shape),
        "windows": n_windows(image.shape, s.patch, s.stride),
        "naive_s": naive_s,
        "runs": {},
    }
    checks = []
    for name in runs:
        if name == "naive":
            continue
        lab = probs[name].argmax(0)
        agree = float((lab == ref).mean())
        t = statistics.median(times[name])
        res["runs"][name] = {
            "s": t,
            "speedup": naive_s / t,
            "argmax_agreement": agree,
            "voxels_differing": int((lab != ref).sum()),
            "max_abs_prob_diff": float(np.abs(probs[name] - probs["naive"]).max()),
        }
        need = AGREE_AMP if name.startswith("amp") else AGREE_FLOAT32
        checks.append(
            Check(f"{name}: argmax agreement >= {need:.1%}", agree >= need, f"{agree:.4%} of {ref.size} voxels")
        )
    r = res["runs"][f"float32_batch{PIPELINE_INFER_BATCH}"]
    checks.append(
        Check(
            f"float32 batch {PIPELINE_INFER_BATCH}: speed-up >= {INFER_SPEEDUP_TARGET:g}x",
            r["speedup"] >= INFER_SPEEDUP_TARGET,
            f"{r['speedup']:.2f}x ({r['s']:.3f} s vs {naive_s:.3f} s)",
            kind="target",
            enforced=not s.smoke,
        )
    )
    return res, checks


# ---------------------------------------------------------------- 4. real data


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of class 1 (1.0 when both are empty)."""
    a, b = pred == 1, ref == 1
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(a, b).sum()) / denom


def window_mean(values: list[float], first: bool) -> float:
    """Mean of the first (or last) tenth of ``values`` (at least one)."""
    n = max(1, len(values) // 10)
    return float(np.mean(values[:n] if first else values[-n:]))


def section_real_data(ctx: Context) -> tuple[dict[str, Any], list[Check]]:
    """Section 4: ``aua_bcl`` on the prepared LA cases for the time budget, then Dice on the test cases."""
    s, dev, cases = ctx.settings, ctx.device, ctx.cases
    common = dict(device=str(dev), num_workers=s.num_workers, progress=False)
    calib = train_config("aua_bcl", s, iterations=s.calibration_iterations)
    train(calib, cases.labelled, cases.unlabelled, ctx.work / "calibration", checkpoint_every=10**9, **common)
    calib_rows = read_history(ctx.work / "calibration" / "losses.csv")
    s_it = statistics.median(r["step_s"] for r in calib_rows[1:] or calib_rows)  # the first includes the workers' start
    budget = max(0.0, min(s.train_budget_s, ctx.remaining_s() - s.reserve_s))
    iterations = int(min(s.max_iterations, max(s.min_iterations, budget // s_it)))
    lr_step = max(1, round(iterations * PAPER_LR_STEP / PAPER_ITERATIONS))
    cfg = train_config("aua_bcl", s, iterations=iterations, lr_step=lr_step)
    t0 = time.perf_counter()
    model_path = train(cfg, cases.labelled, cases.unlabelled, ctx.work / "run", checkpoint_every=500, **common)
    wall = time.perf_counter() - t0
    rows = read_history(ctx.work / "run" / "losses.csv")
    shutil.copyfile(ctx.work / "run" / "losses.csv", ctx.out / "real_data_losses.csv")
    steady = rows[1:] or rows
    loss = [r["loss"] for r in rows]
    sup = [r["sup_dice"] for r in rows]

    model = load_model(model_path, "student", str(dev))
    per_case, infer_s, windows = [], 0.0, 0
    for path in cases.test:
        image, label = read_case(path)
        dt, probs = timed(
            dev,
            lambda image=image: sliding_window_predict(
                model, image, s.patch, s.stride, batch_size=PIPELINE_INFER_BATCH, device=dev
            ),
        )
        w = n_windows(image.shape, s.patch, s.stride)
        infer_s, windows = infer_s + dt, windows + w
        per_case.append({"case": path.parent.name, "dice": dice(probs.argmax(0), label), "s": dt, "windows": w})
    mean_dice = float(np.mean([c["dice"] for c in per_case]))
    res = {
        "labelled_cases": len(cases.labelled),
        "unlabelled_cases": len(cases.unlabelled),
        "test_cases": len(cases.test),
        "lambda_c": cfg.lambda_c,
        "calibration_s_per_iteration": s_it,
        "budget_s": budget,
        "iterations": iterations,
        "lr_step": lr_step,
        "wall_s": wall,
        "engine_s_per_iteration": statistics.median(r["step_s"] for r in steady),
        "data_wait_percent": 100 * sum(r["data_wait_s"] for r in steady) / sum(r["step_s"] for r in steady),
        "num_workers": s.num_workers,
        "loss_start": window_mean(loss, True),
        "loss_end": window_mean(loss, False),
        "sup_dice_start": window_mean(sup, True),
        "sup_dice_end": window_mean(sup, False),
        "dice": per_case,
        "mean_dice": mean_dice,
        "inference_s_per_window": infer_s / windows,
        "model_path": str(model_path),
    }
    checks = [
        Check("losses finite", all(map(math.isfinite, loss)), f"{len(loss)} iterations"),
        Check(
            "supervised Dice loss falls",
            res["sup_dice_end"] < res["sup_dice_start"],
            f"{res['sup_dice_start']:.3f} (first tenth) -> {res['sup_dice_end']:.3f} (last tenth)",
            kind="target",
            enforced=not s.smoke,
        ),
        Check(
            f"mean test Dice >= {DICE_TARGET}",
            mean_dice >= DICE_TARGET,
            f"{mean_dice:.3f}",
            kind="target",
            enforced=not s.smoke,
        ),
    ]
    return res, checks


# ---------------------------------------------------------------- 5. projection


PROJECTION_FORMULA = (
    "T = 6000 t1 + 6000 t2 + 64 w_train t_pseudo + 80 v_train t_proto + 20 w_test t_test, "
    "t2 = t_full,step x t1 / t_aua_bcl,step"
)


def section_projection(ctx: Context) -> tuple[dict[str, Any], list[Check]]:
    """Section 5: the paper's LA 20 % schedule's time from the measured speeds (needs sections 1 and 4)."""
    from semiseg.pseudo import estimate_prototypes, write_pseudo_label  # pandas-free since the pseudo labels' fix

    s, dev, cases = ctx.settings, ctx.device, ctx.cases
    steps, real = ctx.results.get("steps"), ctx.results.get("real_data")
    if not steps or not real:
        raise RuntimeError("needs the results of sections 1 (steps) and 4 (real_data)")
    step_s = {(r["method"], r["amp"]): r["s_per_iteration"] for r in steps["runs"]}
    amp = dev.type == "cuda"  # the precision train() runs in: AMP on CUDA only
    model = Path(real["model_path"])
    u_case, l_case = cases.unlabelled[0], cases.labelled[0]
    write_pseudo_label(u_case, model, ctx.work / "pseudo" / "warmup.h5", s.patch, s.stride, device=str(dev))
    t_p, _ = timed(
        dev,
        lambda: write_pseudo_label(
            u_case,
            model,
            ctx.work / "pseudo" / "case.h5",
            s.patch,
            s.stride,
            device=str(dev),
            batch_size=PIPELINE_INFER_BATCH,
        ),
    )
    t_v, _ = timed(dev, lambda: estimate_prototypes(model, [l_case], [], [], s.patch, device=str(dev)))
    train_shapes = [case_shape(p) for p in cases.labelled + cases.unlabelled]
    test_shapes = [case_shape(p) for p in cases.test]
    w_train = float(np.mean([n_windows(sh, s.patch, s.stride) for sh in train_shapes]))
    w_test = float(np.mean([n_windows(sh, s.patch, s.stride) for sh in test_shapes]))
    v_train = float(np.mean([math.prod(sh) for sh in train_shapes]))
    t_pseudo = t_p / n_windows(case_shape(u_case), s.patch, s.stride)
    t_proto = t_v / math.prod(case_shape(l_case))
    t1 = real["engine_s_per_iteration"]
    t2 = step_s[("full", amp)] * t1 / step_s[("aua_bcl", amp)]
    parts = {
        "stage1_s": PAPER_ITERATIONS * t1,
        "stage2_s": PAPER_ITERATIONS * t2,
        "pseudo_labels_s": PAPER_UNLABELLED * w_train * t_pseudo,
        "prototypes_s": (PAPER_LABELLED + PAPER_UNLABELLED) * v_train * t_proto,
        "test_inference_s": PAPER_TEST * w_test * real["inference_s_per_window"],
    }
    total = sum(parts.values())
    res = {
        "formula": PROJECTION_FORMULA,
        "t1_s": t1,
        "t2_s": t2,
        "t_full_step_s": step_s[("full", amp)],
        "t_aua_bcl_step_s": step_s[("aua_bcl", amp)],
        "step_precision": "AMP" if amp else "float32",
        "t_pseudo_s_per_window": t_pseudo,
        "t_proto_s_per_voxel": t_proto,
        "t_test_s_per_window": real["inference_s_per_window"],
        "w_train_windows": w_train,
        "w_test_windows": w_test,
        "v_train_voxels": v_train,
        "pseudo_case_s": t_p,
        "prototype_case_s": t_v,
        "parts": parts,
        "total_s": total,
        "total_h": total / 3600,
    }
    values = [v for v in res.values() if isinstance(v, float)] + list(parts.values())
    checks = [
        Check(
            "every input measured, finite and positive",
            all(finite(v) and v > 0 for v in values),
            f"projected {total / 3600:.2f} h",
        )
    ]
    return res, checks


# ---------------------------------------------------------------- report


def environment(dev: torch.device, s: Settings, data: Path) -> dict[str, Any]:
    """Machine, versions and the run's settings for the summary's header."""
    info: dict[str, Any] = {
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "mode": "smoke run (CPU, tiny sizes)" if s.smoke else "paper's LA sizes",
        "device": str(dev),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_convolutions": torch.backends.cudnn.allow_tf32,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "amp_dtype": str(AMP_DTYPE).replace("torch.", ""),
        "data": str(data),
        "git": git_commit(),
        "settings": dataclasses.asdict(s),
    }
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(
            gpu=p.name,
            gpu_memory_gib=p.total_memory / 2**30,
            compute_capability=f"{p.major}.{p.minor}",
            cudnn=torch.backends.cudnn.version(),
            driver=nvidia_driver(),
        )
    return info


def command_output(cmd: Sequence[str], timeout: float) -> str | None:
    """A command's stripped standard output, or None when it fails, is missing or says nothing."""
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def git_commit() -> str | None:
    """The checkout's commit, when git and the repository are there."""
    return command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], timeout=10)


def nvidia_driver() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, when it answers."""
    return command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], timeout=20)


def fmt(value: Any, spec: str) -> str:
    """``format(value, spec)`` for numbers; anything else (None, "nan" from the JSON) as text."""
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def markdown(report: dict[str, Any]) -> str:
    """The human summary of a report: header, one part per section, every figure with its unit."""
    env, st = report["environment"], report["environment"]["settings"]
    verdict = "PASS" if report["passed"] else "FAIL" if report["complete"] else "INCOMPLETE (still running or stopped)"
    lines = [f"# GPU device check: {env['mode']}", ""]
    if "gpu" in env:
        lines.append(
            f"- GPU: {env['gpu']} ({env['gpu_memory_gib']:.0f} GiB, compute capability "
            f"{env['compute_capability']}), driver {env['driver']}"
        )
    lines += [
        f"- torch {env['torch']}, CUDA runtime {env['cuda_runtime']}, cuDNN {env.get('cudnn')}, "
        f"Python {env['python']}, NumPy {env['numpy']}, h5py {env['h5py']}; device `{env['device']}`; CPU {env['cpu']} "
        f"({env['cpu_count']} logical CPUs, {env['torch_threads']} torch threads)",
        f"- cuDNN benchmark {env['cudnn_benchmark']}, TF32 convolutions {env['tf32_convolutions']}, TF32 matmul "
        f"{env['tf32_matmul']}; AMP dtype {env['amp_dtype']}",
        f"- Settings: patch {tuple(st['patch'])} voxels, stride {tuple(st['stride'])} voxels, "
        f"V-Net width {st['width']}, {st['labelled_batch']} labelled + {st['unlabelled_batch']} unlabelled crops, "
        f"BCL up to {st['bcl_max_samples']} voxels a crop; data `{env['data']}`; commit {env['git']}; {env['utc']} UTC",
        f"- Result: **{verdict}** in {report['wall_s']:.1f} s"
        + (f"; failed: {', '.join(report['failed'])}" if report["failed"] else ""),
        "",
    ]
    for name in SECTIONS:
        sec = report["sections"].get(name)
        if sec is None:
            continue
        lines += [f"## {TITLES[name]}: {sec['status'].upper()} ({sec['wall_s']:.1f} s)", ""]
        if sec["status"] == "error":
            lines += ["```", sec["error"].rstrip(), "```", ""]
        elif sec.get("results"):
            try:
                lines += SECTION_TABLES[name](sec["results"]) + [""]
            except Exception as exc:  # noqa: BLE001  (the JSON has every number)
                lines += [f"(table not formatted: {exc!r}; see device_check.json)", ""]
        for c in sec["checks"]:
            mark = "pass" if c["passed"] else ("FAIL" if c["enforced"] else "not met (not enforced)")
            lines.append(f"- [{mark}] {c['name']} ({c['kind']}): {c['detail']}")
        lines.append("")
    return "\n".join(lines)


def _md_steps(r: dict[str, Any]) -> list[str]:
    out = [
        f"Median of {r['timed_iterations']} iterations after {r['warmup_iterations']} warm-up, {r['distinct_batches']} "
        f"real LA batches on the device; AMP = {r['amp_dtype']} autocast"
        + (" + GradScaler" if r["grad_scaler"] else " (no GradScaler)")
        + ".",
        "",
        "| method | precision | s / iteration | bare V-Net s / iteration | ratio | bare passes (fwd+bwd / fwd crops) "
        "| peak GPU memory GiB | first / last loss | scaler skips |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["runs"]:
        peak = f"{x['peak_gib']:.2f}" if x["peak_gib"] is not None else "—"
        bp = x["bare_passes"]
        out.append(
            f"| {x['method']} | {'AMP' if x['amp'] else 'float32'} | {x['s_per_iteration']:.4f} | "
            f"{x['bare_s_per_iteration']:.4f} | {x['ratio_to_bare']:.3f}x | {bp['forward_backward_crops']} / "
            f"{bp['forward_only_crops']} | {peak} | {fmt(x['losses'][0], '.4f')} / {fmt(x['losses'][-1], '.4f')} | "
            f"{x['scaler_skipped_steps']} |"
        )
    return out


def _md_resume(r: dict[str, Any]) -> list[str]:
    out = [
        f"Tolerance: ||w_resumed - w_uninterrupted|| / ||w_uninterrupted - w_init|| <= {r['relative_tolerance']:g} and "
        f"|loss difference| <= {r['loss_tolerance']:g} at every iteration (CUDA is not bit-deterministic).",
        "",
        "| method | iterations (interrupted after) | weights | relative difference | max abs difference | "
        "max abs loss difference before / after the interruption | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["runs"]:
        for w in ("student", "teacher"):
            if w in x:
                out.append(
                    f"| {x['method']} | {x['iterations']} ({x['interrupted_after']}) | {w} | {x[w]['relative']:.2e} | "
                    f"{x[w]['max_abs']:.2e} | {x['loss_max_abs_diff_before_interrupt']:.2e} / "
                    f"{x['loss_max_abs_diff_after_resume']:.2e} | {x['wall_s']:.1f} |"
                )
    return out


def _md_inference(r: dict[str, Any]) -> list[str]:
    out = [
        f"Case {r['case']}, {tuple(r['shape'])} voxels, {r['windows']} windows; seeded random weights; median time.",
        "",
        "| run | seconds | speed-up vs naive | argmax agreement | voxels differing | max abs probability difference |",
        "|---|---|---|---|---|---|",
        f"| naive loop (one window at a time) | {r['naive_s']:.3f} | 1.00x | — | — | — |",
    ]
    for name, x in r["runs"].items():
        out.append(
            f"| `sliding_window_predict` {name} | {x['s']:.3f} | {x['speedup']:.2f}x | {x['argmax_agreement']:.4%} | "
            f"{x['voxels_differing']} | {x['max_abs_prob_diff']:.1e} |"
        )
    return out


def _md_real_data(r: dict[str, Any]) -> list[str]:
    out = [
        f"{r['labelled_cases']} labelled + {r['unlabelled_cases']} unlabelled LA cases, lambda_c {r['lambda_c']}; "
        f"calibration {r['calibration_s_per_iteration']:.3f} s / iteration, budget {r['budget_s']:.0f} s -> "
        f"{r['iterations']} iterations (lr x0.1 every {r['lr_step']}); {r['wall_s']:.1f} s wall-clock, "
        f"{r['engine_s_per_iteration']:.3f} s / iteration (median), data wait {r['data_wait_percent']:.1f} % of "
        f"step time ({r['num_workers']} loader workers).",
        f"Loss {fmt(r['loss_start'], '.4f')} -> {fmt(r['loss_end'], '.4f')}, supervised soft-Dice loss "
        f"{fmt(r['sup_dice_start'], '.4f')} -> {fmt(r['sup_dice_end'], '.4f')} "
        "(mean of the first / last tenth of the iterations).",
        "",
        "| test case | Dice (class 1) | inference s | windows |",
        "|---|---|---|---|",
    ]
    out += [f"| {c['case']} | {c['dice']:.4f} | {c['s']:.2f} | {c['windows']} |" for c in r["dice"]]
    out.append(f"| mean | {r['mean_dice']:.4f} | | |")
    return out


def _md_projection(r: dict[str, Any]) -> list[str]:
    p = r["parts"]
    return [
        f"`{r['formula']}`",
        "",
        f"- t1 = {r['t1_s']:.4f} s / iteration (section 4, `train()` with data loading); t_full,step = "
        f"{r['t_full_step_s']:.4f} s and t_aua_bcl,step = {r['t_aua_bcl_step_s']:.4f} s (section 1, "
        f"{r['step_precision']}, as `train()` runs), so t2 = "
        f"{r['t2_s']:.4f} s / iteration",
        f"- t_pseudo = {r['t_pseudo_s_per_window']:.2e} s / window (`write_pseudo_label`, one case, "
        f"{r['pseudo_case_s']:.2f} s), "
        f"w_train = {r['w_train_windows']:.1f} windows a case (mean of the prepared training cases)",
        f"- t_proto = {r['t_proto_s_per_voxel']:.2e} s / voxel (`estimate_prototypes`, one case, "
        f"{r['prototype_case_s']:.2f} s), "
        f"v_train = {r['v_train_voxels']:.0f} voxels a case",
        f"- t_test = {r['t_test_s_per_window']:.2e} s / window (section 4's test inference), w_test = "
        f"{r['w_test_windows']:.1f} windows a case",
        "",
        "| part | seconds | minutes |",
        "|---|---|---|",
        *[f"| {k.removesuffix('_s').replace('_', ' ')} | {v:.0f} | {v / 60:.1f} |" for k, v in p.items()],
        f"| **total** | {r['total_s']:.0f} | {r['total_s'] / 60:.1f} ({r['total_h']:.2f} h) |",
        "",
        "Not included: process and Snakemake start-up, file transfers, the other methods of the ablation table.",
    ]


SECTION_TABLES: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "steps": _md_steps,
    "resume": _md_resume,
    "inference": _md_inference,
    "real_data": _md_real_data,
    "projection": _md_projection,
}
SECTION_FUNCTIONS: dict[str, Callable[[Context], tuple[dict[str, Any], list[Check]]]] = {
    "steps": section_steps,
    "resume": section_resume,
    "inference": section_inference,
    "real_data": section_real_data,
    "projection": section_projection,
}


def run_section(ctx: Context, name: str) -> dict[str, Any]:
    """Run one section; an exception becomes status ``error`` with its traceback."""
    t0 = time.perf_counter()
    print(f"[device_check] {name} ...", file=sys.stderr, flush=True)
    try:
        results, checks = SECTION_FUNCTIONS[name](ctx)
        ctx.results[name] = results
        failed = [c for c in checks if c.enforced and not c.passed]
        sec = {
            "status": "fail" if failed else "pass",
            "results": results,
            "checks": [dataclasses.asdict(c) for c in checks],
            "error": None,
        }
    except Exception:  # noqa: BLE001  (recorded; the other sections still run)
        sec = {"status": "error", "results": None, "checks": [], "error": traceback.format_exc()}
    sec["wall_s"] = time.perf_counter() - t0
    print(f"[device_check] {name}: {sec['status']} ({sec['wall_s']:.1f} s)", file=sys.stderr, flush=True)
    return sec


def json_safe(x: Any) -> Any:
    """Tuples to lists and non-finite floats to strings, so the JSON is standard."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def write_report(report: dict[str, Any], out: Path, t_start: float, complete: bool) -> dict[str, Any]:
    """Summarise pass/fail, write ``device_check.json`` and ``.md`` to ``out``; return the JSON-safe report.

    Called after every section, so that a run stopped by the device tool's time limit still
    leaves what it measured (``complete`` false: the header says so).
    """
    report["failed"] = [f"{name} (error)" for name, sec in report["sections"].items() if sec["status"] == "error"] + [
        f"{name}: {c['name']}"
        for name, sec in report["sections"].items()
        for c in sec["checks"]
        if c["enforced"] and not c["passed"]
    ]
    report["complete"] = complete
    report["passed"] = complete and not report["failed"]
    report["wall_s"] = time.perf_counter() - t_start
    safe = json_safe(report)
    (out / "device_check.json").write_text(json.dumps(safe, indent=1) + "\n", encoding="utf-8")
    (out / "device_check.md").write_text(markdown(safe) + "\n", encoding="utf-8")
    return safe


def run_check(
    s: Settings, data: Path, out: Path, device: str, sections: Sequence[str], work: Path | None
) -> dict[str, Any]:
    """Run the sections, write ``device_check.json`` and ``device_check.md`` to ``out``; return the report."""
    t_start = time.perf_counter()
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        work_dir = work or Path(tmp)
        cases = load_cases(data, s.train_cases, s.test_cases)
        if s.case_crop is not None:
            cases = smoke_cases(cases, work_dir, s.case_crop)
        ctx = Context(s, dev, cases, work_dir, out, t_start)
        report: dict[str, Any] = {"environment": environment(dev, s, data), "sections": {}}
        for name in SECTIONS:
            if name in sections:
                report["sections"][name] = run_section(ctx, name)
                write_report(report, out, t_start, complete=False)
    return write_report(report, out, t_start, complete=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare-data", action="store_true", help="copy real LA cases into --data (run here) and stop")
    ap.add_argument("--source", type=Path, default=LA_SOURCE, help="where --prepare-data reads the LA cases")
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"LA case folder with train.list / test.list (default: {PREPARED.relative_to(REPO)} if present, "
        "else the source)",
    )
    ap.add_argument("--out", type=Path, help="folder for device_check.json / .md")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (no GPU needed)")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset (projection needs steps, real_data)"
    )
    ap.add_argument("--deadline-s", type=float, default=None, help="whole-run time the real-data run is cut to fit")
    ap.add_argument("--work", type=Path, default=None, help="keep work files (checkpoints, models) here")
    a = ap.parse_args(argv)
    if a.prepare_data:
        summary = prepare_data(a.source, a.data or PREPARED)
        print(
            f"copied {len(summary['labelled'])} labelled + {len(summary['unlabelled'])} unlabelled training and "
            f"{len(summary['test'])} test cases ({summary['mib']:.1f} MiB) to {summary['dest']}"
        )
        return 0
    if a.out is None:
        ap.error("--out is required")
    sections = [x.strip() for x in a.sections.split(",") if x.strip()]
    if unknown := set(sections) - set(SECTIONS):
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    s = smoke_settings() if a.smoke else gpu_settings()
    if a.deadline_s is not None:
        s = dataclasses.replace(s, deadline_s=a.deadline_s)
    dev = resolve_device("cpu" if a.smoke and a.device == "auto" else a.device)
    if not a.smoke and dev.type != "cuda":
        ap.error(f"the GPU check needs a CUDA device (got {dev}); on a CPU run --smoke")
    data = a.data or (PREPARED if (PREPARED / "train.list").exists() else LA_SOURCE)
    report = run_check(s, data, a.out, str(dev), sections, a.work)
    print(markdown(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
