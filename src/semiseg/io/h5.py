"""The project's HDF5 case format (one file per preprocessed case).

Datasets (array order x, y, z, like the community's ``mri_norm2.h5`` files, which read
unchanged with :func:`read_case`):

- ``image``: float32, normalised intensities;
- ``label``: uint8 class indices (absent for an unlabelled case).

Both are chunked (at most 32^3 voxels a chunk) and gzip-compressed, so a random
training crop reads only the chunks it overlaps. Attributes (written by
:func:`write_case`) hold the geometry of the stored grid (``spacing``, ``origin``,
``direction``), the raw image's geometry (``raw_size``, ``raw_spacing``, ``raw_origin``,
``raw_direction``), the crop box in the resampled grid (``crop_start``, ``crop_stop``,
``resampled_size``) and the preprocessing parameters used; see :class:`CaseGeometry`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from semiseg.io.atomic import atomic_path
from semiseg.io.readers import Geometry

FORMAT_VERSION = 1
CHUNK = 32


def chunk_shape(shape: tuple[int, ...], chunk: int = CHUNK) -> tuple[int, ...]:
    """Chunk shape for a volume: ``min(side, chunk)`` per axis."""
    return tuple(max(1, min(int(s), chunk)) for s in shape)


def _attr_value(value: Any) -> Any:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return json.dumps(list(value))
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    return value


def write_case(
    path: str | Path,
    image: np.ndarray,
    label: np.ndarray | None,
    attrs: dict[str, Any],
    compression_level: int = 1,
) -> None:
    """Write one case atomically (temporary file in the same folder, then rename).

    ``image`` (X, Y, Z) float32, ``label`` (X, Y, Z) uint8 or None. ``attrs`` values may
    be numbers, strings, sequences or dicts (stored as JSON strings).
    """
    if image.ndim != 3:
        raise ValueError(f"image must be 3D (x, y, z), got shape {image.shape}")
    if label is not None and label.shape != image.shape:
        raise ValueError(f"label shape {label.shape} differs from image shape {image.shape}")
    chunks = chunk_shape(image.shape)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(
                "image", data=image.astype(np.float32, copy=False), chunks=chunks,
                compression="gzip", compression_opts=compression_level, shuffle=True,
            )
            if label is not None:
                f.create_dataset(
                    "label", data=label.astype(np.uint8, copy=False), chunks=chunks,
                    compression="gzip", compression_opts=compression_level, shuffle=True,
                )
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["axis_order"] = "xyz"
            for key, value in attrs.items():
                f.attrs[key] = _attr_value(value)


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        if value == "null":
            return None
        if value[:1] in "[{":
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attrs(path: str | Path) -> dict[str, Any]:
    """All attributes of a case file as plain Python values (empty for community files)."""
    with h5py.File(path, "r") as f:
        return {k: _decode(v) for k, v in f.attrs.items()}


def read_case(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Read ``(image (X, Y, Z) float32, label (X, Y, Z) uint8 or None, attrs)``."""
    with h5py.File(path, "r") as f:
        image = f["image"][...].astype(np.float32, copy=False)
        label = f["label"][...].astype(np.uint8, copy=False) if "label" in f else None
        attrs = {k: _decode(v) for k, v in f.attrs.items()}
    return image, label, attrs


@dataclass(frozen=True)
class CaseGeometry:
    """Where a preprocessed case sits in the raw image's physical space.

    ``stored`` is the grid of the HDF5 arrays (voxel (0, 0, 0) of ``image``);
    ``resampled`` the whole raw extent at the target spacing, of which ``stored`` is the
    part ``[crop_start, crop_stop)``; ``raw`` the raw image's grid.
    """

    stored: Geometry
    resampled: Geometry
    raw: Geometry
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> CaseGeometry:
        try:
            direction = tuple(float(v) for v in np.ravel(attrs["direction"]))
            stored = Geometry(
                tuple(int(v) for v in attrs["shape"]), tuple(float(v) for v in attrs["spacing"]),
                tuple(float(v) for v in attrs["origin"]), direction,
            )
            resampled = Geometry(
                tuple(int(v) for v in attrs["resampled_size"]), stored.spacing,
                tuple(float(v) for v in attrs["resampled_origin"]), direction,
            )
            raw = Geometry(
                tuple(int(v) for v in attrs["raw_size"]), tuple(float(v) for v in attrs["raw_spacing"]),
                tuple(float(v) for v in attrs["raw_origin"]),
                tuple(float(v) for v in np.ravel(attrs["raw_direction"])),
            )
        except KeyError as exc:
            raise KeyError(f"case file has no geometry attribute {exc}; was it written by semiseg?") from exc
        return cls(
            stored, resampled, raw,
            tuple(int(v) for v in attrs["crop_start"]), tuple(int(v) for v in attrs["crop_stop"]),
        )

    def stored_to_raw_index(self, index: np.ndarray) -> np.ndarray:
        """Map stored voxel indices (..., 3) to continuous raw-image indices (..., 3)."""
        return self.raw.physical_to_index(self.stored.index_to_physical(index))
