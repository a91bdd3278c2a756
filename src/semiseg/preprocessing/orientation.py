"""Put a label array on its image's voxel grid when the label's axes may be permuted or flipped.

NIH Pancreas-CT (TCIA) ships DICOM series with labels as NIfTI files whose header does not
describe the DICOM series' grid, and whose array may be stored in another axis order (the
slices reversed, or x and y swapped) than the one SimpleITK reads the series in. Then only
the voxel array can be trusted, not the header, and the question is which of the label's
axis orders puts it on the anatomy.

Criterion (``label_orientation: auto``):

1. Candidates: the 48 signed axis permutations (6 axis orders x 8 flips) of the label array
   whose permuted shape equals the image's. Candidates that give the same placement (a
   label symmetric under a flip) count once; the stored order is listed first.
2. Score: how well the placed mask separates intensities from those just outside it: the
   mutual information (nats) between "inside the mask" and the image intensity over the
   mask and a shell of ``SHELL`` voxels around it, intensities in 16 quantile bins of those
   voxels. A label on the organ it outlines has its boundary on the organ's edge, so the
   inside and the shell differ (pancreas against fat and vessels); the same mask moved
   elsewhere cuts through tissue, and the inside looks like the shell (score near 0).
3. Decision: the best-scoring placement is used when its score is at least ``ratio`` times
   that of every other placement (default 1.1; measured in ``docs/method-choices.md``
   and ``benchmarks/bench_label_orientation.py``: on the 24 real LA 2018 cases and on
   synthetic abdominal CT the true placement beats every other one by a wide margin).
   It is "as stored" or a fix (reported). Otherwise the orientation is ambiguous and the
   case fails with a :class:`~semiseg.errors.CaseError` naming both placements.

Arrays are in (x, y, z) order (see :mod:`semiseg.io.readers`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from semiseg.errors import CaseError
from semiseg.preprocessing.cropping import bounding_box

AXES = "xyz"
#: Quantile bins of the intensities in the mask and its shell.
INTENSITY_BINS = 16
#: Shell thickness (voxels, 6-connected dilation) around the placed mask.
SHELL = 3
#: Default factor by which the chosen placement must beat every other one.
DEFAULT_RATIO = 1.1


@dataclass(frozen=True)
class Orientation:
    """A signed axis permutation of an (x, y, z) array.

    Output axis ``i`` is input axis ``perm[i]``, reversed when ``flip[i]``.
    """

    perm: tuple[int, int, int] = (0, 1, 2)
    flip: tuple[bool, bool, bool] = (False, False, False)

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    def output_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """Shape of the array after this orientation is applied to an array of ``shape``."""
        return tuple(int(shape[p]) for p in self.perm)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Re-index an (X, Y, Z) array (a contiguous copy)."""
        out = np.transpose(array, self.perm)
        axes = tuple(i for i in range(3) if self.flip[i])
        if axes:
            out = np.flip(out, axis=axes)
        return np.ascontiguousarray(out)

    def describe(self) -> str:
        """Human-readable form: ``as stored`` or e.g. ``label axes (y, x, z), reversed along z``."""
        if self.is_identity:
            return "as stored"
        parts = []
        if self.perm != (0, 1, 2):
            parts.append("label axes (" + ", ".join(AXES[p] for p in self.perm) + ") as image (x, y, z)")
        flipped = [AXES[i] for i in range(3) if self.flip[i]]
        if flipped:
            parts.append("reversed along image " + " and ".join(flipped))
        return ", ".join(parts)


def candidate_orientations(label_shape: Sequence[int], image_shape: Sequence[int]) -> list[Orientation]:
    """Signed axis permutations that turn ``label_shape`` into ``image_shape`` (identity first)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for flip in itertools.product((False, True), repeat=3):
            o = Orientation(tuple(perm), tuple(flip))
            if o.output_shape(label_shape) == tuple(int(s) for s in image_shape):
                out.append(o)
    return out  # itertools order: the identity, when it fits, comes first


def mutual_information(foreground_per_bin: np.ndarray, voxels_per_bin: np.ndarray) -> float:
    """Mutual information (nats) of a binary mask and a binned image, from counts per bin.

    ``foreground_per_bin[b]``: mask voxels in bin ``b``; ``voxels_per_bin[b]``: all voxels in it.
    """
    f = np.asarray(foreground_per_bin, dtype=np.float64)
    n = np.asarray(voxels_per_bin, dtype=np.float64)
    total, fg = n.sum(), f.sum()
    if total <= 0 or fg <= 0 or fg >= total:
        return 0.0
    mi = 0.0
    for joint, marginal in ((f, fg), (n - f, total - fg)):
        nz = joint > 0
        p = joint[nz] / total
        mi += float(np.sum(p * np.log(p * total * total / (n[nz] * marginal))))
    return max(mi, 0.0)


@dataclass(frozen=True)
class OrientationCheck:
    """Outcome of :func:`choose_label_orientation`.

    ``scores``: (orientation, :func:`boundary_score` in nats) of each distinct placement, best first.
    """

    chosen: Orientation
    scores: tuple[tuple[Orientation, float], ...]

    @property
    def fixed(self) -> bool:
        """True when the label was re-oriented (the stored axis order was not the best fit)."""
        return not self.chosen.is_identity

    @property
    def ratio(self) -> float | None:
        """Best score over the runner-up's (None with a single distinct placement)."""
        if len(self.scores) < 2:
            return None
        second = self.scores[1][1]
        return float("inf") if second == 0 else self.scores[0][1] / second

    def record(self) -> dict:
        """Plain values for the HDF5 attributes and the preprocessing summary."""
        return {
            "label_orientation": self.chosen.describe(),
            "label_orientation_fixed": self.fixed,
            "label_orientation_scores": [round(s, 6) for _, s in self.scores[:2]],
        }


def boundary_score(image: np.ndarray, mask: np.ndarray, shell: int = SHELL, bins: int = INTENSITY_BINS) -> float:
    """Mutual information (nats) between ``mask`` and the intensity of ``image`` near its boundary.

    ``image`` and ``mask`` (bool) are arrays of one shape (typically a box around the mask
    with ``shell`` voxels to spare). Voxels considered: the mask and its ``shell``-voxel
    6-connected dilation; intensities quantised into ``bins`` quantile bins of those voxels.
    0 when the inside and the shell have the same intensity distribution.
    """
    mask = np.asarray(mask, dtype=bool)
    ring = ndimage.binary_dilation(mask, iterations=shell) & ~mask
    inside, outside = np.asarray(image)[mask], np.asarray(image)[ring]
    if inside.size == 0 or outside.size == 0:
        return 0.0
    both = np.concatenate([inside, outside]).astype(np.float64)
    edges = np.unique(np.quantile(both, np.linspace(0, 1, bins + 1)[1:-1]))
    fg = np.bincount(np.digitize(inside, edges), minlength=edges.size + 1)
    bg = np.bincount(np.digitize(outside, edges), minlength=edges.size + 1)
    return mutual_information(fg, fg + bg)


def _placed_box(
    o: Orientation, start: Sequence[int], stop: Sequence[int], label_shape: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where the label's box ``[start, stop)`` lands (image indices) under orientation ``o``."""
    new_start, new_stop = [], []
    for i in range(3):
        p = o.perm[i]
        if o.flip[i]:
            new_start.append(int(label_shape[p]) - int(stop[p]))
            new_stop.append(int(label_shape[p]) - int(start[p]))
        else:
            new_start.append(int(start[p]))
            new_stop.append(int(stop[p]))
    return tuple(new_start), tuple(new_stop)


def choose_label_orientation(
    case: str,
    label_path: str | Path,
    image: np.ndarray,
    label: np.ndarray,
    ratio: float = DEFAULT_RATIO,
) -> OrientationCheck:
    """Choose the axis order and flips that put ``label`` on ``image`` (see the module docstring).

    ``image`` (X, Y, Z) intensities; ``label`` an integer array (any shape that is a
    permutation of the image's); its foreground is every non-zero voxel. Raises
    :class:`CaseError` naming the case and label file when no axis order fits the image's
    size, or when two placements fit the intensities about equally well (ambiguous).
    Cost: one dilation of a box around the foreground per candidate, not of the volume.
    """
    candidates = candidate_orientations(label.shape, image.shape)
    if not candidates:
        raise CaseError(
            case, label_path,
            f"label size {tuple(label.shape)} matches the image's {tuple(image.shape)} under no axis order",
        )
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    box = bounding_box(label)
    if box is None:
        raise CaseError(case, label_path, "label is empty (no foreground voxel) in a labelled case")
    crop = np.asarray(label[tuple(slice(a, b) for a, b in zip(*box, strict=True))]) != 0
    seen: set[tuple] = set()  # (placed start, mask bytes): identical placements
    scored: list[tuple[Orientation, float]] = []
    for o in candidates:
        start, stop = _placed_box(o, *box, label.shape)
        mask = o.apply(crop)
        key = (start, mask.tobytes())
        if key in seen:  # the same placement as an earlier candidate (a symmetric label)
            continue
        seen.add(key)
        lo = [max(0, a - SHELL) for a in start]
        hi = [min(n, b + SHELL) for b, n in zip(stop, image.shape, strict=True)]
        region = np.zeros([b - a for a, b in zip(lo, hi, strict=True)], dtype=bool)
        region[tuple(slice(a - c, b - c) for a, b, c in zip(start, stop, lo, strict=True))] = mask
        window = image[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        scored.append((o, boundary_score(window, region)))
    # Stable sort: among equal scores the earlier candidate (the stored order first) wins.
    scored.sort(key=lambda item: -item[1])
    if len(scored) > 1:
        (best, s1), (second, s2) = scored[0], scored[1]
        if s1 <= 0 or s1 < ratio * s2:
            raise CaseError(
                case, label_path,
                f"ambiguous label orientation: {best.describe()} (boundary score {s1:.4f} nats) and "
                f"{second.describe()} ({s2:.4f} nats) fit the image about equally well (the best must "
                f"score {ratio:g} times the next); check the label, or set the data set's "
                "preprocessing.label_orientation to 'header' to use the label file's own geometry",
            )
    return OrientationCheck(chosen=scored[0][0], scores=tuple(scored))
