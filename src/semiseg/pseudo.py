"""Between the stages: pseudo labels and prototype statistics as artifacts.

Pseudo labels: whole-volume sliding-window inference of the stage-1 model, one HDF5 file
per unlabelled case (``label`` uint8 hard label, ``probability`` float32 foreground
probability), with the model file's SHA-256 as an attribute. Prototypes: stage-1 decoder
features streamed over labelled volumes (with their labels) and unlabelled volumes (with
their pseudo labels) into :class:`semiseg.prototypes.PrototypeStatistics`.
"""

from __future__ import annotations

import logging
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from semiseg.inference import padding_for, predict_probabilities, sliding_window_predict, window_starts  # noqa: F401
from semiseg.io.atomic import atomic_path
from semiseg.io.digest import file_sha256  # noqa: F401 (re-exported: the digest in pseudo-label files)
from semiseg.prototypes import PrototypeStatistics
from semiseg.models import load_model
from semiseg.postprocessing import filter_label
from semiseg.precision import resolve_device

_log = logging.getLogger("semiseg.pseudo")

if TYPE_CHECKING:  # pandas is imported where it is used: GPU machines may lack it
    import pandas as pd


def write_pseudo_label(
    case_path: str | Path,
    model_path: str | Path,
    out_path: str | Path,
    patch_size: Sequence[int],
    stride: Sequence[int],
    weights: str = "student",
    device: str = "auto",
    batch_size: int = 2,
    label_filter: str = "none",
    network: torch.nn.Module | None = None,
    model_sha256: str | None = None,
) -> dict:
    """Predict one preprocessed case with a stage-1 model and write its pseudo-label file atomically.

    ``label_filter`` (``between_stages.pseudo_label_filter``): ``none`` keeps the argmax;
    ``largest_component`` keeps, per foreground class, only its largest 26-connected
    component (:func:`semiseg.postprocessing.filter_label`). The ``probability`` dataset is
    the model's foreground probability either way. ``network`` and ``model_sha256``: the
    model file's network (on ``device``) and digest, when the caller has them already
    (:func:`write_pseudo_labels`).
    """
    model = network if network is not None else model_path
    probs = predict_probabilities(model, case_path, patch_size, stride, weights, "uniform", device, batch_size)
    raw_label = probs.argmax(0).astype(np.uint8)
    label = filter_label(raw_label, label_filter, probs.shape[0])
    fg = (1.0 - probs[0]).astype(np.float32)
    digest = model_sha256 or file_sha256(model_path)
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as f:
        kw = {"chunks": tuple(min(32, n) for n in label.shape), "compression": "gzip", "compression_opts": 1}
        f.create_dataset("label", data=label, **kw)
        f.create_dataset("probability", data=fg, **kw)
        f.attrs.update({"case_path": str(case_path), "model_path": str(model_path), "model_sha256": digest,
                        "weights": weights, "patch_size": list(patch_size), "stride": list(stride), "axis_order": "xyz",
                        "label_filter": label_filter})
    removed = int(np.count_nonzero(raw_label) - np.count_nonzero(label))
    return {"case": Path(case_path).stem, "foreground_fraction": float((label > 0).mean()), "filtered_voxels": removed}


def write_pseudo_labels(
    case_paths: Sequence[str | Path],
    model_path: str | Path,
    out_dir: str | Path,
    patch_size: Sequence[int],
    stride: Sequence[int],
    weights: str = "student",
    device: str = "auto",
    batch_size: int = 2,
    label_filter: str = "none",
    log_dir: str | Path | None = None,
) -> list[dict]:
    """The pseudo labels of every case of ``case_paths`` with one stage-1 model, loaded once
    (the rule ``pseudo_labels``): ``out_dir/<case>.h5`` per case (:func:`write_pseudo_label`),
    and with ``log_dir`` one log per case. Returns the per-case summaries.
    """
    from semiseg.jobs import case_files_in, case_log

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    network = load_model(model_path, weights, str(dev))
    digest = file_sha256(model_path)
    summaries = []
    for case_path, out_path in zip(case_paths, case_files_in(out, case_paths), strict=True):
        with case_log(log_dir, Path(case_path).stem):
            summary = write_pseudo_label(case_path, model_path, out_path, patch_size, stride, weights, str(dev), batch_size,
                                         label_filter, network=network, model_sha256=digest)
            _log.info("%s", summary)
        summaries.append(summary)
    return summaries


def pseudo_label_is_current(pseudo_path: str | Path, model_path: str | Path) -> bool:
    """Whether a pseudo-label file was made by (a byte-identical copy of) ``model_path``."""
    with h5py.File(pseudo_path, "r") as f:
        return f.attrs.get("model_sha256") == file_sha256(model_path)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Foreground Dice of two label maps (1.0 when both are empty)."""
    a, b = a > 0, b > 0
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(a, b).sum() / denom)


def overlap_scores(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Foreground overlap of a label map ``pred`` with a reference ``ref`` (same shape, any
    integer labels; foreground = label > 0), as fractions.

    Returns ``dice``; ``precision`` (share of ``pred``'s foreground voxels that are
    foreground in ``ref``); ``recall`` (share of ``ref``'s foreground found by ``pred``);
    ``volume_ratio`` (``pred``'s foreground voxel count over ``ref``'s: above 1 an
    over-segmentation, below 1 an under-segmentation, whatever the overlap). Empty masks:
    Dice is 1.0 when both are empty (:func:`dice`); precision is NaN when ``pred`` is empty,
    recall and volume ratio are NaN when ``ref`` is empty (undefined, never a made-up value).
    """
    a, b = np.asarray(pred) > 0, np.asarray(ref) > 0
    if a.shape != b.shape:
        raise ValueError(f"overlap_scores: shapes differ, {a.shape} (pred) vs {b.shape} (ref)")
    n_a, n_b, tp = int(a.sum()), int(b.sum()), int(np.logical_and(a, b).sum())
    return {
        "dice": dice(a, b),
        "precision": tp / n_a if n_a else float("nan"),
        "recall": tp / n_b if n_b else float("nan"),
        "volume_ratio": n_a / n_b if n_b else float("nan"),
    }


QUALITY_COLUMNS = ("dice", "precision", "recall", "volume_ratio")


def pseudo_label_quality(pseudo_paths: Sequence[str | Path], case_paths: Sequence[str | Path], out_path: str | Path | None = None) -> pd.DataFrame:
    """Overlap of each pseudo label with the case's ground truth, plus a ``mean`` row.

    Columns: ``case`` and :data:`QUALITY_COLUMNS` (:func:`overlap_scores`: Dice, precision,
    recall, volume ratio, fractions). The volume ratio tells a biased stage-1 model (pseudo
    labels systematically too large or too small) from a noisy one, which Dice alone does
    not. Cases without ground truth are listed with empty scores; the ``mean`` row averages
    each column over the cases where it is defined. Written as CSV when ``out_path``.

    The two lists pair by position, and each pair must name the same case (equal file stems,
    as :func:`write_pseudo_labels` writes them): a pseudo label scored against another case's
    ground truth would give a plausible but wrong number, so a mismatch is an error.
    """
    import pandas as pd

    pseudo_paths, case_paths = list(pseudo_paths), list(case_paths)
    if len(pseudo_paths) != len(case_paths):
        raise ValueError(f"pseudo-label quality: {len(pseudo_paths)} pseudo-label files for {len(case_paths)} cases")
    rows = []
    for pp, cp in zip(pseudo_paths, case_paths, strict=True):
        if Path(pp).stem != Path(cp).stem:
            raise ValueError(
                f"pseudo-label quality of case {Path(cp).stem}: the pseudo label at the same position, {pp}, "
                f"belongs to case {Path(pp).stem} (pair the files by case name)"
            )
        with h5py.File(pp, "r") as fp, h5py.File(cp, "r") as fc:
            if "label" in fc:
                try:
                    scores = overlap_scores(fp["label"][...], fc["label"][...])
                except ValueError as err:
                    raise ValueError(f"pseudo-label quality of case {Path(cp).stem}: {pp} against {cp}: {err}") from None
            else:
                scores = dict.fromkeys(QUALITY_COLUMNS)
        rows.append({"case": Path(cp).stem, **scores})
    table = pd.DataFrame(rows, columns=["case", *QUALITY_COLUMNS]).astype({c: float for c in QUALITY_COLUMNS})
    mean = {"case": "mean", **{c: table[c].mean() if table[c].notna().any() else None for c in QUALITY_COLUMNS}}
    table = pd.concat([table, pd.DataFrame([mean])], ignore_index=True)
    if out_path is not None:
        with atomic_path(out_path, suffix=".csv") as tmp:
            table.to_csv(tmp, index=False)
    return table


@torch.inference_mode()
def accumulate_features(
    stats: PrototypeStatistics,
    model: torch.nn.Module,
    image: np.ndarray,
    label: np.ndarray,
    patch_size: Sequence[int],
    device: torch.device,
    normalise: bool = True,
    layer: str = "decoder",
) -> None:
    """Stream one volume's features (each voxel once) with its labels into ``stats``.

    ``layer``: ``decoder`` (the last decoder block, before the projection head: the method
    notes' choice) or ``projection`` (the projection-head embeddings of a BCL model).
    Decoder features are the network's ``decoder_features`` (before its last dropout), the
    kind of feature stage 2's PCL anchors and prototype updates use (in eval mode, as here,
    the dropout is off and both kinds are equal).

    Windows of the patch size tile the volume (the last one flush with the edge); a voxel
    already counted by an earlier window is skipped, so every voxel counts once.
    """
    pads = padding_for(image.shape, patch_size)
    img = np.pad(image.astype(np.float32), pads)
    lab = np.pad(label.astype(np.int64), pads, constant_values=-1)  # padding: ignored label
    seen = np.zeros(img.shape, dtype=bool)
    starts = [window_starts(n, p, p) for n, p in zip(img.shape, patch_size, strict=True)]
    model.eval()
    for a, b, c in itertools.product(*starts):
        sl = (slice(a, a + patch_size[0]), slice(b, b + patch_size[1]), slice(c, c + patch_size[2]))
        x = torch.from_numpy(img[sl])[None, None].to(device)
        feats = model(x, heads=False).decoder_features
        if layer == "projection":
            feats = model.project(feats)
        feats = feats[0].float()  # (F, *patch)
        if normalise:
            feats = F.normalize(feats, dim=0)
        new = ~seen[sl]
        seen[sl] = True
        mask = torch.from_numpy(new & (lab[sl] >= 0)).to(device)
        stats.update(feats[:, mask].T, torch.from_numpy(lab[sl]).to(device)[mask])


def estimate_prototypes(
    model_path: str | Path,
    labelled: Sequence[str | Path],
    unlabelled: Sequence[str | Path],
    pseudo: Sequence[str | Path],
    patch_size: Sequence[int],
    weights: str = "student",
    normalise: bool = True,
    device: str = "auto",
    layer: str = "decoder",
) -> PrototypeStatistics:
    """Per-class statistics of stage-1 features: labelled cases with their labels, unlabelled with pseudo labels."""
    if layer not in ("decoder", "projection"):
        raise ValueError(f"feature layer must be 'decoder' or 'projection', got {layer!r}")
    dev = resolve_device(device)
    model = load_model(model_path, weights, str(dev))
    num_classes = model.config["num_classes"]
    dim = model.config["projection_channels"] if layer == "projection" else model.config["base_filters"]
    stats = PrototypeStatistics(num_classes, dim)
    sources = [(p, p) for p in labelled] + list(zip(unlabelled, pseudo, strict=True))
    for image_path, label_path in sources:
        with h5py.File(image_path, "r") as fi, h5py.File(label_path, "r") as fl:
            accumulate_features(stats, model, fi["image"][...], fl["label"][...], patch_size, dev, normalise, layer)
    return stats
