"""Sliding-window inference over whole volumes (nnU-Net style small helpers).

Windows of the patch size start at ``min(i * stride, size - patch)`` per axis, so the last
window is flush with the volume's edge; a volume smaller than the patch is zero-padded
(symmetrically, as UA-MT) and the padding cropped off at the end. Overlapping class
probabilities are averaged, uniformly (the paper) or with Gaussian weights.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from semiseg.training.engine import resolve_device


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
) -> np.ndarray:
    """Class probabilities (C, X, Y, Z) float32 of a whole (X, Y, Z) volume.

    ``model`` maps (B, 1, *patch) to logits (B, C, *patch) (or an output with ``.logits``);
    it is put in eval mode. Windows run in batches of ``batch_size`` under
    ``torch.inference_mode``; probabilities and weights accumulate on ``device``, or on the
    CPU when the volume does not fit there.
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

    model.eval()
    acc_dev = dev
    probs = counts = None
    with torch.inference_mode():
        for k in range(0, len(boxes), batch_size):
            chunk = boxes[k : k + batch_size]
            x = torch.stack([img[a : a + patch[0], b : b + patch[1], c : c + patch[2]] for a, b, c in chunk])[:, None]
            p = torch.softmax(_logits(model, x.to(dev)).float(), dim=1)
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


def to_raw_geometry(label: np.ndarray, attrs: dict) -> sitk.Image:
    """Put a label map of the stored (preprocessed) grid back on the raw image's grid.

    ``label`` (X, Y, Z) in the HDF5 case's grid; ``attrs`` that case file's attributes. The
    crop is undone (zeros outside the crop box) and the resampling undone by nearest
    neighbour, so the result overlays on the original scan (ITK-SNAP, 3D Slicer): its size,
    spacing, origin and direction are the raw image's.
    """
    from semiseg.io.h5 import CaseGeometry
    from semiseg.io.readers import from_xyz_array

    cg = CaseGeometry.from_attrs(attrs)
    if tuple(label.shape) != cg.stored.size:
        raise ValueError(f"label shape {tuple(label.shape)} differs from the case's stored shape {cg.stored.size}")
    full = np.zeros(cg.resampled.size, dtype=np.uint8)
    full[tuple(slice(a, b) for a, b in zip(cg.crop_start, cg.crop_stop, strict=True))] = label
    raw = sitk.Image([int(s) for s in cg.raw.size], sitk.sitkUInt8)
    raw.SetSpacing(cg.raw.spacing)
    raw.SetOrigin(cg.raw.origin)
    raw.SetDirection(cg.raw.direction)
    return sitk.Resample(from_xyz_array(full, cg.resampled), raw, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def write_prediction_nifti(label: np.ndarray, attrs: dict, path) -> None:
    """Write a stored-grid label map as NIfTI in the raw image's geometry, atomically."""
    from semiseg.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        sitk.WriteImage(to_raw_geometry(label, attrs), str(tmp), useCompression=True)
