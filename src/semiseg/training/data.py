"""Random training crops read from HDF5 case files.

Batch ``t`` is a pure function of ``(seed, t)``: which cases and where to crop are drawn
from ``numpy.random.default_rng([seed, t])``, so a resumed run sees exactly the batches an
uninterrupted one would, whatever the number of loader workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset


def random_crop_box(shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator) -> tuple[slice, ...]:
    """A uniformly random ``patch``-sized box inside ``shape`` (clamped where the volume is smaller)."""
    return tuple(slice(int(s), int(s) + min(p, n)) for s, p, n in
                 ((rng.integers(0, max(n - p, 0) + 1), p, n) for n, p in zip(shape, patch, strict=True)))


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

    def crop(self, i: int, patch: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """Random crop of case ``i``: image (X, Y, Z) float32 and label (or None), padded to ``patch``."""
        box = random_crop_box(self.shapes[i], patch, rng)
        image = pad_to(self._file(self.paths[i])["image"][box].astype(np.float32, copy=False), patch)
        label = pad_to(self._file(self.label_paths[i])["label"][box].astype(np.int64), patch) if self.need_label else None
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
    ) -> None:
        self.labelled = CaseFiles(labelled, need_label=True)
        self.unlabelled = None
        if unlabelled and unlabelled_batch:
            self.unlabelled = CaseFiles(unlabelled, need_label=pseudo is not None, label_paths=pseudo)
        self.patch = tuple(int(p) for p in patch_size)
        self.lb, self.ub = int(labelled_batch), int(unlabelled_batch)
        self.seed, self.iterations = int(seed), int(iterations)

    def __len__(self) -> int:
        return self.iterations

    def __getitem__(self, t: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(t)])
        imgs, labs = [], []
        for i in rng.integers(0, len(self.labelled), size=self.lb):
            im, lab = self.labelled.crop(int(i), self.patch, rng)
            imgs.append(im)
            labs.append(lab)
        batch = {
            "image_l": torch.from_numpy(np.stack(imgs)[:, None]),
            "label_l": torch.from_numpy(np.stack(labs)),
        }
        if self.unlabelled is not None:
            crops = [self.unlabelled.crop(int(i), self.patch, rng) for i in rng.integers(0, len(self.unlabelled), size=self.ub)]
            batch["image_u"] = torch.from_numpy(np.stack([im for im, _ in crops])[:, None])
            if self.unlabelled.need_label:
                batch["label_u"] = torch.from_numpy(np.stack([lab for _, lab in crops]))
        return batch
