"""Model files: what a trained ``model.pt`` holds, and loading it, without the training code.

A model file is a ``torch.save`` dict of tensors and plain containers (it loads with
``weights_only=True``, so loading never runs code):

- ``format``: :data:`MODEL_FORMAT` (``semiseg-model-2``); files of the older
  ``semiseg-model-1`` format load for their weights but carry no deployment record;
- ``stage``, ``method``, ``iterations``, ``config`` (every training hyperparameter of the run,
  seed included), ``network`` (the network's constructor arguments), ``student`` and
  ``teacher`` (state dicts; ``teacher`` None for methods without one), ``prototypes``;
- ``deployment`` (format 2): what a scan needs to be predicted as the training data was
  (:func:`deployment_record`): the data set, class names, label map, the preprocessing
  record of the training cases, patch size, the data set's sliding-window stride, and the
  data set's configuration block when the model was trained.

The prediction path (:mod:`semiseg.inference`, :mod:`semiseg.predict`, ``semiseg predict``)
reads models through this module and imports neither the training engine nor
:mod:`semiseg.pseudo`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from semiseg.networks import SegmentationNet

#: The format written today.
MODEL_FORMAT = "semiseg-model-2"
#: Formats that still load (weights only; no deployment record).
LEGACY_FORMATS = ("semiseg-model-1",)
#: Keys of the deployment record (:func:`deployment_record`).
DEPLOYMENT_KEYS = ("dataset", "classes", "label_map", "preprocessing", "patch_size", "stride", "dataset_config")


class ModelFileError(ValueError):
    """A model file that cannot serve the request; the message is one line naming the file."""


def read_torch_file(path: str | Path, device: str | torch.device = "cpu", what: str = "model") -> dict[str, Any]:
    """Read a semiseg model, checkpoint or snapshot file with ``torch.load(weights_only=True)``.

    Such a file holds tensors and plain containers only, so loading it never runs code. A
    file that is not one (another pickle, an older format with NumPy objects, not a PyTorch
    file at all) raises ``ValueError`` with one line naming the file; a missing file raises
    ``FileNotFoundError``.
    """
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip archive), EOFError, ...
        raise ModelFileError(
            f"{path}: not a semiseg {what} file (it is not a PyTorch file of tensors and plain containers: "
            f"{type(exc).__name__})"
        ) from None
    if not isinstance(blob, dict):
        raise ModelFileError(f"{path}: not a semiseg {what} file (it holds a {type(blob).__name__}, not a dict)")
    return blob


def read_model_file(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A model file's dict (:func:`read_torch_file`), checked to be of a semiseg model format."""
    blob = read_torch_file(path, device, "model")
    if blob.get("format") not in (MODEL_FORMAT, *LEGACY_FORMATS):
        raise ModelFileError(f"{path}: not a semiseg model file (no 'format: {MODEL_FORMAT}' entry)")
    return blob


def network_from_blob(blob: Mapping[str, Any], weights: str = "student", path: str | Path = "model") -> SegmentationNet:
    """The network of a model file's dict with ``weights`` (``student`` / ``teacher``) loaded, strict."""
    if weights not in ("student", "teacher"):
        raise ValueError(f"weights must be 'student' or 'teacher', got {weights!r}")
    state = blob[weights]
    if state is None:
        raise ModelFileError(f"{path}: has no {weights} weights (method {blob['method']})")
    net = SegmentationNet(**blob["network"])
    net.load_state_dict(state, strict=True)
    return net


def load_model(path: str | Path, weights: str = "student", device: str | torch.device = "cpu") -> SegmentationNet:
    """Load a trained model file's network; ``weights``: ``student`` or ``teacher``. Strict key matching.

    The file is read with ``weights_only=True`` (:func:`read_torch_file`): it never runs code.
    Both the current and the older model format load.
    """
    blob = read_model_file(path, device)
    return network_from_blob(blob, weights, path).to(device)


@dataclass(frozen=True)
class ModelInfo:
    """What a model file says about itself (:func:`read_model_info`)."""

    path: str
    format: str
    method: str
    stage: int
    iterations: int
    seed: int | None
    has_teacher: bool
    training: dict[str, Any]
    network: dict[str, Any]
    deployment: dict[str, Any] | None

    def require_deployment(self) -> dict[str, Any]:
        """The deployment record; a :class:`ModelFileError` that says how to re-export if there is none."""
        if self.deployment is None:
            raise ModelFileError(
                f"{self.path}: model file of the older format {self.format!r} has no preprocessing, patch, stride or "
                f"class names; re-export it with 'semiseg export-model {self.path} --case <one of its preprocessed "
                f"training cases (.h5)> --stride X Y Z -o <new model.pt>', or retrain it with the current workflow"
            )
        return self.deployment

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "format": self.format, "method": self.method, "stage": self.stage,
            "iterations": self.iterations, "seed": self.seed, "has_teacher": self.has_teacher,
            "training": self.training, "network": self.network, "deployment": self.deployment,
        }


def info_from_blob(blob: Mapping[str, Any], path: str | Path) -> ModelInfo:
    training = dict(blob.get("config") or {})
    return ModelInfo(
        path=str(path), format=str(blob["format"]), method=str(blob["method"]), stage=int(blob["stage"]),
        iterations=int(blob["iterations"]), seed=training.get("seed"), has_teacher=blob.get("teacher") is not None,
        training=training, network=dict(blob["network"]),
        deployment=dict(blob["deployment"]) if blob.get("deployment") else None,
    )


def read_model_info(path: str | Path) -> ModelInfo:
    """The description a model file carries (no network is built)."""
    return info_from_blob(read_model_file(path), path)


def deployment_record(
    case_paths: Sequence[str | Path],
    patch_size: Sequence[int],
    stride: Sequence[int],
    dataset: str = "",
    dataset_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The deployment record of a model trained on the HDF5 case files ``case_paths``.

    Classes, label map and preprocessing come from the case files' own ``preprocessing``
    attribute (what was done to the training data, not what the configuration says now);
    every case must have the same record, or a ``ValueError`` names the first that differs.
    ``patch_size`` (voxels, the network's input) and ``stride`` (voxels, the data set's
    sliding-window stride) are recorded as given; ``dataset_config`` (the data set's
    configuration block) is kept for ``semiseg info``.
    """
    from semiseg.io.h5 import read_attrs

    if not case_paths:
        raise ValueError("a deployment record needs at least one training case file")
    record = None
    first = None
    for path in case_paths:
        attrs = read_attrs(path)
        rec = attrs.get("preprocessing")
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: case file has no preprocessing record (not written by semiseg's preprocessing)")
        if record is None:
            record, first = rec, path
        elif rec != record:
            differing = sorted(k for k in set(rec) | set(record) if rec.get(k) != record.get(k))
            raise ValueError(f"{path}: preprocessed differently from {first} ({', '.join(differing)}); "
                             "a model's training cases must share one preprocessing")
    classes = list(record.get("classes") or [])
    return {
        "dataset": str(dataset),
        "classes": classes,
        "label_map": record.get("label_map"),
        "preprocessing": record,
        "patch_size": [int(p) for p in patch_size],
        "stride": [int(s) for s in stride],
        "dataset_config": _plain(dataset_config) if dataset_config is not None else None,
    }


def _plain(value: Any) -> Any:
    """A copy made of dicts, lists, str, int, float, bool and None only (``weights_only`` loads it)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def export_model(path: str | Path, out_path: str | Path, deployment: Mapping[str, Any]) -> None:
    """Write a copy of the model file ``path`` in the current format with ``deployment`` added, atomically.

    For model files of the older format (no deployment record): the weights, training
    settings and prototypes are copied unchanged.
    """
    from semiseg.io.atomic import atomic_path

    blob = dict(read_model_file(path))
    missing = [k for k in DEPLOYMENT_KEYS if k not in deployment]
    if missing:
        raise ValueError(f"deployment record lacks {missing}")
    blob["format"] = MODEL_FORMAT
    blob["deployment"] = _plain(dict(deployment))
    with atomic_path(out_path) as tmp:
        torch.save(blob, tmp)
