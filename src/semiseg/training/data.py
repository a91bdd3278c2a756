"""Random training crops read from HDF5 case files, with optional rotation / flip augmentation.

Batch ``t`` is a pure function of ``(seed, t)``: which cases, where to crop and how to
rotate or flip are drawn from ``numpy.random.default_rng([seed, t])``, so a resumed run sees
exactly the batches an uninterrupted one would, whatever the number of loader workers.

Augmentation (MSD Colon in the paper: "random rotation, random flip and random crop"; none
for Pancreas and LA): a random multiple of 90 degrees in the axial (x, y) plane and a random
flip of x and of y, each with probability 1/2. Together they draw each of the 8 symmetries of
the axial square uniformly (the identity included). The same transform is applied to a
crop's image and its label or pseudo label. With augmentation off no extra random number is
drawn, so the batches are exactly those of a run without this feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset


def random_crop_box(shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator) -> tuple[slice, ...]:
    """A uniformly random ``patch``-sized box inside ``shape`` (clamped where the volume is smaller)."""
    return tuple(slice(int(s), int(s) + min(p, n)) for s, p, n in
                 ((rng.integers(0, max(n - p, 0) + 1), p, n) for n, p in zip(shape, patch, strict=True)))


@dataclass(frozen=True)
class Augmentation:
    """Which random spatial augmentations training crops get.

    ``rotate``: a rotation by ``k`` x 90 degrees in the axial (x, y) plane, ``k`` uniform in
    0..3. ``flip``: reverse x with probability 1/2 and, independently, y with probability 1/2.
    """

    rotate: bool = False
    flip: bool = False

    @property
    def enabled(self) -> bool:
        return self.rotate or self.flip

    @classmethod
    def from_value(cls, value: Augmentation | dict | None) -> Augmentation:
        """From a config mapping ``{rotate: bool, flip: bool}`` (missing keys: False), or None (off)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        unknown = set(value) - {"rotate", "flip"}
        if unknown:
            raise ValueError(f"unknown augmentation settings: {sorted(unknown)} (known: flip, rotate)")
        return cls(rotate=bool(value.get("rotate", False)), flip=bool(value.get("flip", False)))


@dataclass(frozen=True)
class AxialTransform:
    """One drawn transform: flip (x then y), then rotate by ``quarter_turns`` x 90 degrees in the (x, y) plane."""

    quarter_turns: int = 0
    flip_x: bool = False
    flip_y: bool = False

    @property
    def swaps_xy(self) -> bool:
        """True when the rotation exchanges the x and y sizes (an odd number of quarter turns)."""
        return self.quarter_turns % 2 == 1


def draw_axial_transform(augmentation: Augmentation, rng: np.random.Generator) -> AxialTransform:
    """Draw a transform for ``augmentation`` (the rotation first, then the flips of x and y).

    Draws nothing when ``augmentation`` is off (returns the identity).
    """
    k = int(rng.integers(0, 4)) if augmentation.rotate else 0
    fx = fy = False
    if augmentation.flip:
        fx, fy = (bool(b) for b in rng.integers(0, 2, size=2))
    return AxialTransform(k, fx, fy)


def source_patch_size(patch: Sequence[int], transform: AxialTransform) -> tuple[int, int, int]:
    """Size of the crop to read so that it has size ``patch`` (X, Y, Z) after ``transform``."""
    px, py, pz = (int(p) for p in patch)
    return (py, px, pz) if transform.swaps_xy else (px, py, pz)


def apply_axial_transform(array: np.ndarray, transform: AxialTransform) -> np.ndarray:
    """Apply ``transform`` to an (X, Y, Z) array: flips, then ``np.rot90`` in axes (0, 1).

    Returns a contiguous array of shape (X, Y, Z), or (Y, X, Z) for an odd number of
    quarter turns. A pure re-indexing: values are kept exactly.
    """
    out = array
    if transform.flip_x:
        out = out[::-1]
    if transform.flip_y:
        out = out[:, ::-1]
    if transform.quarter_turns % 4:
        out = np.rot90(out, transform.quarter_turns, axes=(0, 1))
    return np.ascontiguousarray(out)


def pad_to(array: np.ndarray, patch: Sequence[int], value: float = 0.0) -> np.ndarray:
    """Pad an (X, Y, Z) array at the far end of each axis up to ``patch`` (no-op if big enough)."""
    pad = [(0, max(0, p - n)) for n, p in zip(array.shape, patch, strict=True)]
    if not any(b for _, b in pad):
        return array
    return np.pad(array, pad, mode="constant", constant_values=value)


class CaseFiles:
    """Lazily opened HDF5 case files (one handle per process)."""

    def __init__(self, paths: Sequence[str | Path], need_label: bool, label_paths: Sequence[str | Path] | None = None) -> None:
        if not paths:
            raise ValueError("no case files given")
        self.paths = [str(p) for p in paths]
        # Where each case's label comes from: its own file, or e.g. a pseudo-label file.
        self.label_paths = [str(p) for p in label_paths] if label_paths is not None else list(self.paths)
        if len(self.label_paths) != len(self.paths):
            raise ValueError(f"{len(self.label_paths)} label files for {len(self.paths)} cases")
        self.need_label = need_label
        self._handles: dict[str, h5py.File] = {}
        self.shapes = []
        for p, lp in zip(self.paths, self.label_paths, strict=True):
            with h5py.File(p, "r") as f:
                self.shapes.append(tuple(f["image"].shape))
            if need_label:
                with h5py.File(lp, "r") as f:
                    if "label" not in f:
                        raise ValueError(f"{lp}: case file has no label, but this case is used as labelled")
                    if tuple(f["label"].shape) != self.shapes[-1]:
                        raise ValueError(f"{lp}: label shape {tuple(f['label'].shape)} differs from the image's {self.shapes[-1]} ({p})")

    def __len__(self) -> int:
        return len(self.paths)

    def _file(self, path: str) -> h5py.File:
        if path not in self._handles:
            self._handles[path] = h5py.File(path, "r")
        return self._handles[path]

    def crop(
        self, i: int, patch: Sequence[int], rng: np.random.Generator, augmentation: Augmentation | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Random crop of case ``i``: image (X, Y, Z) float32 and label (or None), padded to ``patch``.

        With ``augmentation`` on, the transform is drawn first, a crop of
        :func:`source_patch_size` is read, and image and label get the same transform.
        """
        transform = draw_axial_transform(augmentation, rng) if augmentation is not None else None
        size = source_patch_size(patch, transform) if transform is not None else tuple(patch)
        box = random_crop_box(self.shapes[i], size, rng)
        image = pad_to(self._file(self.paths[i])["image"][box].astype(np.float32, copy=False), size)
        label = pad_to(self._file(self.label_paths[i])["label"][box].astype(np.int64), size) if self.need_label else None
        if transform is not None:
            image = apply_axial_transform(image, transform)
            label = apply_axial_transform(label, transform) if label is not None else None
        return image, label

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


class PatchBatches(Dataset):
    """Item ``t`` = the training batch of iteration ``t``.

    ``labelled`` cases give ``labelled_batch`` crops with labels; ``unlabelled`` cases (may
    be empty) give ``unlabelled_batch`` crops, with their ``pseudo`` labels (one label file
    per unlabelled case) when given. Returns a dict of tensors: ``image_l`` (L, 1, X, Y, Z),
    ``label_l`` (L, X, Y, Z) int64 and, if any, ``image_u`` (U, 1, X, Y, Z) and ``label_u``.
    ``augmentation``: random rotation / flip of every crop (labelled and unlabelled alike).
    """

    def __init__(
        self,
        labelled: Sequence[str | Path],
        unlabelled: Sequence[str | Path],
        patch_size: Sequence[int],
        labelled_batch: int,
        unlabelled_batch: int,
        seed: int,
        iterations: int,
        pseudo: Sequence[str | Path] | None = None,
        augmentation: Augmentation | dict | None = None,
    ) -> None:
        self.labelled = CaseFiles(labelled, need_label=True)
        self.unlabelled = None
        if unlabelled and unlabelled_batch:
            self.unlabelled = CaseFiles(unlabelled, need_label=pseudo is not None, label_paths=pseudo)
        self.patch = tuple(int(p) for p in patch_size)
        self.lb, self.ub = int(labelled_batch), int(unlabelled_batch)
        self.seed, self.iterations = int(seed), int(iterations)
        aug = Augmentation.from_value(augmentation)
        self.augmentation = aug if aug.enabled else None

    def __len__(self) -> int:
        return self.iterations

    def __getitem__(self, t: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(t)])
        imgs, labs = [], []
        for i in rng.integers(0, len(self.labelled), size=self.lb):
            im, lab = self.labelled.crop(int(i), self.patch, rng, self.augmentation)
            imgs.append(im)
            labs.append(lab)
        batch = {
            "image_l": torch.from_numpy(np.stack(imgs)[:, None]),
            "label_l": torch.from_numpy(np.stack(labs)),
        }
        if self.unlabelled is not None:
            crops = [
                self.unlabelled.crop(int(i), self.patch, rng, self.augmentation)
                for i in rng.integers(0, len(self.unlabelled), size=self.ub)
            ]
            batch["image_u"] = torch.from_numpy(np.stack([im for im, _ in crops])[:, None])
            if self.unlabelled.need_label:
                batch["label_u"] = torch.from_numpy(np.stack([lab for _, lab in crops]))
        return batch
