"""Sliding-window inference over whole volumes (nnU-Net style small helpers).

Windows of the patch size start at ``min(i * stride, size - patch)`` per axis, so the last
window is flush with the volume's edge; a volume smaller than the patch is zero-padded
(symmetrically, as UA-MT) and the padding cropped off at the end. Overlapping class
probabilities are averaged, uniformly (the paper) or with Gaussian weights.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from semiseg.models import load_model
from semiseg.precision import autocast as amp_autocast
from semiseg.precision import resolve_device

if TYPE_CHECKING:  # SimpleITK is imported where it is used: GPU machines may lack it
    import SimpleITK as sitk


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start offsets along one axis: ``min(i * stride, size - patch)`` for ``i = 0 .. ceil((size - patch) / stride)``."""
    if patch > size:
        raise ValueError(f"patch {patch} is larger than the (padded) size {size}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    n = math.ceil((size - patch) / stride) + 1
    return sorted({min(i * stride, size - patch) for i in range(n)})


def padding_for(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """Symmetric (before, after) zero padding that brings every axis up to the patch."""
    pads = []
    for n, p in zip(shape, patch, strict=True):
        total = max(0, p - n)
        pads.append((total // 2, total - total // 2))
    return pads


def gaussian_weights(patch: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """nnU-Net's Gaussian importance map (patch,), sigma = patch * sigma_scale, min > 0."""
    axes = []
    for p in patch:
        x = torch.arange(p, dtype=torch.float64) - (p - 1) / 2
        axes.append(torch.exp(-0.5 * (x / (p * sigma_scale)) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = w / w.max()
    return torch.clamp(w, min=w[w > 0].min().item()).float()


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of ``model`` with every batch norm folded into the convolution before it.

    A ``Conv3d`` or ``ConvTranspose3d`` directly followed by a ``BatchNorm3d`` in the same
    ``nn.Sequential`` becomes one convolution with rescaled weights and bias (the batch
    norm's running statistics and affine parameters, i.e. its eval-mode behaviour), and the
    batch norm an ``Identity``. The copy computes the same function up to float rounding
    (about 1e-7 relative); the model passed in is not changed. Other modules are kept.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    out = copy.deepcopy(model).eval()
    for seq in [m for m in out.modules() if isinstance(m, torch.nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(bn, torch.nn.BatchNorm3d) and bn.track_running_stats and isinstance(conv, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
                seq[i] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, torch.nn.ConvTranspose3d))
                seq[i + 1] = torch.nn.Identity()
    return out


def inference_model(model: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, torch.memory_format]:
    """The copy of ``model`` that :func:`sliding_window_predict` runs, and its input memory format.

    Batch norms folded into their convolutions (:func:`fold_batchnorm`), on ``device``, in
    eval mode. On the CPU the copy is also put in the channels-last 3-D memory format, which
    oneDNN's convolutions run faster (``benchmarks/bench_inference.py``); on CUDA the
    memory format is left as it is (not measured there).
    """
    fmt = torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format
    return fold_batchnorm(model).to(device=device, memory_format=fmt), fmt


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x, heads=False) if _accepts_heads(model) else model(x)
    return out.logits if hasattr(out, "logits") else out


def _accepts_heads(model) -> bool:
    import inspect

    try:
        return "heads" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def sliding_window_predict(
    model: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    patch_size: Sequence[int],
    stride: Sequence[int],
    batch_size: int = 4,
    weighting: str = "uniform",
    device: str | torch.device = "auto",
    amp: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Class probabilities (C, X, Y, Z) float32 of a whole (X, Y, Z) volume.

    ``model`` maps (B, 1, *patch) to logits (B, C, *patch) (or an output with ``.logits``).
    It runs as an eval-mode copy with batch norms folded into the convolutions (channels-last
    on the CPU; :func:`inference_model`), so the model passed in is left as it was. Windows
    run in batches of ``batch_size`` under ``torch.inference_mode``; probabilities and
    weights accumulate on ``device``, or on the CPU when the volume does not fit there.
    ``amp=True`` runs the network under autocast (bfloat16 on the CPU, float16 on CUDA):
    faster, but probabilities differ from float32 by about 1e-2 and voxels near p = 0.5 may
    change class, so the pipeline's evaluation leaves it off by default. ``amp_dtype``
    overrides the autocast dtype (the tests run float16 on the CPU to emulate CUDA).
    Whatever the network's precision, the softmax and the accumulators (probability sums
    and weights, (C, X, Y, Z) and (X, Y, Z)) are float32.
    """
    if weighting not in ("uniform", "gaussian"):
        raise ValueError(f"weighting must be 'uniform' or 'gaussian', got {weighting!r}")
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    img = torch.as_tensor(np.asarray(image, dtype=np.float32) if not torch.is_tensor(image) else image.float())
    if img.ndim != 3:
        raise ValueError(f"image must be (X, Y, Z), got shape {tuple(img.shape)}")
    patch = [int(p) for p in patch_size]
    pads = padding_for(img.shape, patch)
    if any(a or b for a, b in pads):
        img = torch.nn.functional.pad(img, [v for a, b in reversed(pads) for v in (a, b)])
    shape = img.shape
    starts = [window_starts(n, p, s) for n, p, s in zip(shape, patch, stride, strict=True)]
    boxes = list(itertools.product(*starts))
    weight = gaussian_weights(patch) if weighting == "gaussian" else torch.ones(patch)

    net, fmt = inference_model(model, dev)
    autocast = amp_autocast(dev, enabled=amp, dtype=amp_dtype)
    acc_dev = dev
    probs = counts = None
    with torch.inference_mode():
        for k in range(0, len(boxes), batch_size):
            chunk = boxes[k : k + batch_size]
            x = torch.stack([img[a : a + patch[0], b : b + patch[1], c : c + patch[2]] for a, b, c in chunk])[:, None]
            with autocast:
                logits = _logits(net, x.to(dev).contiguous(memory_format=fmt))
            p = torch.softmax(logits.float(), dim=1)
            if probs is None:
                try:
                    probs = torch.zeros((p.shape[1], *shape), dtype=torch.float32, device=acc_dev)
                    counts = torch.zeros(shape, dtype=torch.float32, device=acc_dev)
                except torch.OutOfMemoryError:
                    acc_dev = torch.device("cpu")
                    probs = torch.zeros((p.shape[1], *shape), dtype=torch.float32)
                    counts = torch.zeros(shape, dtype=torch.float32)
                w = weight.to(acc_dev)
            p = p.to(acc_dev) * w
            for (a, b, c), pw in zip(chunk, p, strict=True):
                probs[:, a : a + patch[0], b : b + patch[1], c : c + patch[2]] += pw
                counts[a : a + patch[0], b : b + patch[1], c : c + patch[2]] += w
        probs /= counts
    sl = tuple(slice(a, n - b) for (a, b), n in zip(pads, shape, strict=True))
    return probs[(slice(None), *sl)].cpu().numpy()


def predict_probabilities(
    model_path: str | Path | torch.nn.Module,
    case_path: str | Path,
    patch_size: Sequence[int],
    stride: Sequence[int],
    weights: str = "student",
    weighting: str = "uniform",
    device: str = "auto",
    batch_size: int = 2,
    amp: bool = False,
) -> np.ndarray:
    """Class probabilities (C, X, Y, Z) float32 of one preprocessed HDF5 case under a trained
    model file (:func:`sliding_window_predict`).

    ``model_path`` may also be a network already loaded (on ``device``), as a job that
    predicts many cases passes it; ``weights`` is then not used.
    """
    import h5py

    dev = resolve_device(device)
    if isinstance(model_path, torch.nn.Module):
        model = model_path
    else:
        model = load_model(model_path, weights, str(dev))
    with h5py.File(case_path, "r") as f:
        image = f["image"][...]
    return sliding_window_predict(model, image, patch_size, stride, batch_size=batch_size, weighting=weighting, device=dev, amp=amp)


def to_raw_geometry(values: np.ndarray, attrs: dict, interpolation: str = "nearest") -> sitk.Image:
    """Put a volume of the stored (preprocessed) grid back on the raw image's grid.

    ``values`` (X, Y, Z) in the HDF5 case's grid: a label map (uint8, ``interpolation``
    ``nearest``; the result is uint8) or a probability map (float, ``linear``; the result is
    float32); ``attrs`` that case file's attributes. The crop is undone (zeros outside the
    crop box) and the resampling undone by the interpolator, so the result overlays on the
    original scan (ITK-SNAP, 3D Slicer): its size, spacing, origin and direction are the
    raw image's.
    """
    import SimpleITK as sitk

    from semiseg.io.h5 import CaseGeometry
    from semiseg.io.readers import from_xyz_array

    if interpolation not in ("nearest", "linear"):
        raise ValueError(f"interpolation must be 'nearest' or 'linear', got {interpolation!r}")
    cg = CaseGeometry.from_attrs(attrs)
    if tuple(values.shape) != cg.stored.size:
        raise ValueError(f"volume shape {tuple(values.shape)} differs from the case's stored shape {cg.stored.size}")
    label = interpolation == "nearest"
    dtype, pixel = (np.uint8, sitk.sitkUInt8) if label else (np.float32, sitk.sitkFloat32)
    full = np.zeros(cg.resampled.size, dtype=dtype)
    full[tuple(slice(a, b) for a, b in zip(cg.crop_start, cg.crop_stop, strict=True))] = values
    raw = sitk.Image([int(s) for s in cg.raw.size], pixel)
    raw.SetSpacing(cg.raw.spacing)
    raw.SetOrigin(cg.raw.origin)
    raw.SetDirection(cg.raw.direction)
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    return sitk.Resample(from_xyz_array(full, cg.resampled), raw, sitk.Transform(), interp, 0, pixel)


def write_prediction_nifti(label: np.ndarray, attrs: dict, path) -> None:
    """Write a stored-grid label map as NIfTI in the raw image's geometry, atomically."""
    import SimpleITK as sitk

    from semiseg.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        sitk.WriteImage(to_raw_geometry(label, attrs), str(tmp), useCompression=True)
