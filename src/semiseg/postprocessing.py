"""Post-processing of label maps: connected components.

One focused module below inference, so that the pseudo labels between the stages
(:mod:`semiseg.pseudo`) and the BCP baseline's teacher labels (:mod:`semiseg.training.bcp`)
use the same function.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

#: ``between_stages.pseudo_label_filter`` values.
LABEL_FILTERS = ("none", "largest_component")


def largest_component(labels: torch.Tensor | np.ndarray, num_classes: int = 2) -> torch.Tensor | np.ndarray:
    """Keep, per crop and per foreground class, only the largest connected component.

    ``labels`` (B, X, Y, Z) integer class indices (a tensor or array; returned as the same
    kind, dtype and device). For each crop and class ``c`` in 1..``num_classes`` - 1 the
    voxels of ``c`` are split into components with full (26-) connectivity, as the released
    ``skimage.measure.label`` default; all but the largest (the first in scan order on a
    tie) become background (0). A class with no voxel stays absent. Two classes: the
    released ``LargestCC_pancreas`` of the LA script; more: its per-class ACDC form.
    """
    is_tensor = isinstance(labels, torch.Tensor)
    arr = labels.detach().cpu().numpy() if is_tensor else np.asarray(labels)
    if arr.ndim < 2:
        raise ValueError(f"labels must be (B, ...) with spatial axes, got shape {arr.shape}")
    out = np.zeros_like(arr)
    structure = np.ones((3,) * (arr.ndim - 1), dtype=bool)
    for b in range(arr.shape[0]):
        for c in range(1, num_classes):
            comp, count = ndimage.label(arr[b] == c, structure=structure)
            if count == 0:
                continue
            sizes = np.bincount(comp.ravel())[1:]
            out[b][comp == int(np.argmax(sizes)) + 1] = c
    if is_tensor:
        return torch.from_numpy(out).to(device=labels.device, dtype=labels.dtype)
    return out


@torch.no_grad()


def filter_label(label: np.ndarray, label_filter: str, num_classes: int) -> np.ndarray:
    """One (X, Y, Z) label map of class indices through ``label_filter``: ``none`` (unchanged)
    or ``largest_component`` (per foreground class, its largest 26-connected component;
    :func:`largest_component`). Returns an array of the same shape and dtype."""
    if label_filter not in LABEL_FILTERS:
        raise ValueError(f"label filter must be one of {LABEL_FILTERS}, got {label_filter!r}")
    if label_filter == "none":
        return label
    return largest_component(np.asarray(label)[None], num_classes)[0]
