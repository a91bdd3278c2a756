"""Segment new scans with a trained model file (``semiseg predict``).

Each scan (NIfTI, NRRD, MHA / MHD file, or a folder holding one DICOM series) is
preprocessed exactly as the model's training cases were (the preprocessing record in the
model file, :mod:`semiseg.models`; :func:`semiseg.preprocessing.preprocess_case` itself),
predicted with the sliding window (:func:`semiseg.inference.sliding_window_predict`) and
written as a label map (uint8 NIfTI, class indices ``0 .. C-1`` as the model file's class
names list them) in the scan's own geometry: its size, spacing, origin and direction, so it
overlays on the scan in any viewer. Voxels outside the crop box are background.

Crop: a model trained with ``crop_source: label`` (the paper's protocol) has only seen crops
around the ground truth, which a new scan does not have; such a model predicts new scans only
with a label-free crop chosen by the user (``crop="body"``: the body mask's box with the
training margin; ``crop="none"``: the whole scan), and the predictions then come from an
input distribution the model was not trained on. Train with ``crop_source: body`` for
deployment.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.errors import CaseError
from semiseg.inference import sliding_window_predict, to_raw_geometry
from semiseg.io.atomic import atomic_path
from semiseg.io.h5 import read_case
from semiseg.io.readers import IMAGE_SUFFIXES, image_stem
from semiseg.models import ModelFileError, read_model_file, info_from_blob, network_from_blob
from semiseg.precision import resolve_device
from semiseg.preprocessing.pipeline import CROP_SOURCES, PreprocessingParams, preprocess_case

#: File name endings read as one scan each.
SCAN_SUFFIXES = IMAGE_SUFFIXES
#: File name endings of DICOM slices (a folder of them is one series; files without an
#: ending are accepted too, as many scanners write them).
DICOM_SUFFIXES = (".dcm", ".ima")


class PredictError(ValueError):
    """A request ``semiseg predict`` cannot serve (not a problem of one scan); one line."""


def scan_name(path: Path) -> str:
    """The scan's name: the file name without its image ending, or the DICOM folder's name."""
    return image_stem(path)


def _is_dicom_folder(folder: Path) -> bool:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return bool(files) and all(p.suffix.lower() in DICOM_SUFFIXES or p.suffix == "" for p in files)


def find_scans(input_path: str | Path) -> list[Path]:
    """The scans of ``input_path``: itself if it is a file or a DICOM series folder; else
    the image files in it and its sub-folders that hold DICOM series, sorted by name.

    Raises :class:`PredictError` when the path is missing or holds no scan, or when two
    scans would write the same output name.
    """
    path = Path(input_path)
    if not path.exists():
        raise PredictError(f"{path}: input does not exist")
    if path.is_file():
        return [path]
    if _is_dicom_folder(path):
        return [path]
    scans = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(SCAN_SUFFIXES))
    scans += sorted(p for p in path.iterdir() if p.is_dir() and _is_dicom_folder(p))
    if not scans:
        raise PredictError(f"{path}: no scans in this folder (NIfTI, NRRD, MHA/MHD files or DICOM series folders)")
    names: dict[str, Path] = {}
    for s in scans:
        if scan_name(s) in names:
            raise PredictError(f"{s} and {names[scan_name(s)]} would both be written as {scan_name(s)}.nii.gz")
        names[scan_name(s)] = s
    return sorted(scans, key=scan_name)


def preprocessing_for(deployment: dict[str, Any], crop: str | None, model_path: str | Path = "model") -> PreprocessingParams:
    """The preprocessing of new scans: the model's training preprocessing, with ``crop``
    (``body`` / ``none``) in place of its crop source when given.

    Raises :class:`PredictError` for a model trained on crops around the label without a
    label-free ``crop``, and for models of data sets that were not preprocessed from scans.
    """
    record = dict(deployment["preprocessing"])
    if record.get("format") is not None:
        raise PredictError(
            f"{model_path}: trained on {record['format']} case files (already preprocessed elsewhere, without scan "
            "geometry); semiseg predict needs a model trained from raw scans (NIfTI, NRRD, MHA or DICOM)"
        )
    params = PreprocessingParams.from_record(record)
    if crop is not None:
        if crop not in CROP_SOURCES or crop == "label":
            raise PredictError(f"crop must be 'body' or 'none' (a new scan has no label), got {crop!r}")
        return dataclasses.replace(params, crop_source=crop)
    if params.crop_source == "label":
        raise PredictError(
            f"{model_path}: this model was trained with crop_source 'label' (crops around the ground truth, which a new "
            "scan does not have); choose a label-free crop with --crop body or --crop none (the model has not seen "
            "such crops), or train the model with crop_source: body for deployment"
        )
    return params


@dataclass
class PredictOptions:
    """How scans are predicted. ``stride``: None uses the model file's; ``weights``:
    ``student`` or ``teacher`` (mean-teacher models); ``probabilities``: also write each
    foreground class's probability map (float32 NIfTI, linear interpolation to the scan's grid)."""

    crop: str | None = None
    weights: str = "student"
    weighting: str = "uniform"
    device: str = "auto"
    amp: bool = False
    batch_size: int = 2
    stride: Sequence[int] | None = None
    probabilities: bool = False


@dataclass
class PredictReport:
    """Per scan: the output files written (``done``) or the one-line error (``failed``)."""

    done: dict[str, list[Path]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


class Predictor:
    """A model file ready to predict scans: its network (on the device, in eval mode), the
    preprocessing of new scans, patch and stride.

    ``Predictor(path, options)`` raises :class:`semiseg.models.ModelFileError` for a file
    that is not a model or lacks the deployment record, :class:`PredictError` for a crop the
    model cannot be used with.
    """

    def __init__(self, model_path: str | Path, options: PredictOptions | None = None) -> None:
        self.model_path = Path(model_path)
        self.options = options or PredictOptions()
        blob = read_model_file(self.model_path)
        self.info = info_from_blob(blob, self.model_path)
        self.deployment = self.info.require_deployment()
        self.params = preprocessing_for(self.deployment, self.options.crop, self.model_path)
        weights = self.options.weights
        if weights == "teacher" and not self.info.has_teacher:
            raise ModelFileError(f"{self.model_path}: method {self.info.method} has no teacher weights; use the student")
        self.device = resolve_device(self.options.device)
        self.net = network_from_blob(blob, weights, self.model_path).to(self.device).eval()
        self.classes = list(self.deployment["classes"])
        self.patch = [int(p) for p in self.deployment["patch_size"]]
        stride = self.options.stride if self.options.stride is not None else self.deployment["stride"]
        self.stride = [int(s) for s in stride]
        if len(self.stride) != 3 or min(self.stride) < 1:
            raise PredictError(f"stride must be three integers >= 1, got {list(stride)}")

    def probabilities(self, scan: Path, name: str) -> tuple[np.ndarray, dict[str, Any]]:
        """(C, X, Y, Z) class probabilities on the preprocessed grid and that case's attributes."""
        with tempfile.TemporaryDirectory(prefix="semiseg-predict-") as tmp:
            case_file = Path(tmp) / f"{name}.h5"
            preprocess_case(name, scan, None, case_file, self.params, dataset=self.deployment.get("dataset", ""))
            image, _, attrs = read_case(case_file)
        o = self.options
        probs = sliding_window_predict(self.net, image, self.patch, self.stride, batch_size=o.batch_size,
                                       weighting=o.weighting, device=self.device, amp=o.amp)
        return probs, attrs

    def predict(self, scan: str | Path, out_dir: str | Path) -> list[Path]:
        """Predict one scan; write ``<name>.nii.gz`` (and probability maps) in ``out_dir``, atomically.

        Raises :class:`semiseg.errors.CaseError` (one line naming the scan and the problem)
        for a scan that cannot be read or preprocessed; nothing is written for it then.
        """
        import SimpleITK as sitk

        scan = Path(scan)
        name = scan_name(scan)
        out = Path(out_dir)
        probs, attrs = self.probabilities(scan, name)
        label = probs.argmax(0).astype(np.uint8)
        images = {out / f"{name}.nii.gz": to_raw_geometry(label, attrs, "nearest")}
        if self.options.probabilities:
            for c in range(1, probs.shape[0]):
                images[out / f"{name}_prob_{self.classes[c]}.nii.gz"] = to_raw_geometry(probs[c], attrs, "linear")
        out.mkdir(parents=True, exist_ok=True)
        for path, img in images.items():
            with atomic_path(path) as tmp:
                sitk.WriteImage(img, str(tmp), useCompression=True)
        return list(images)


def predict_scans(
    model_path: str | Path,
    input_path: str | Path,
    out_dir: str | Path,
    options: PredictOptions | None = None,
    progress: Callable | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> PredictReport:
    """Predict every scan of ``input_path`` (a scan or a folder of them) into ``out_dir``.

    A scan that fails (unreadable, not 3-D, no body found, ...) is reported in
    ``PredictReport.failed`` with its one-line error (and passed to ``on_error(name,
    message)``), and the other scans go on. ``progress`` wraps the scan list (e.g.
    ``tqdm.tqdm``). Problems of the request itself (model file, crop, empty input) raise.
    """
    scans = find_scans(input_path)
    predictor = Predictor(model_path, options)
    report = PredictReport()
    for scan in progress(scans) if progress is not None else scans:
        name = scan_name(scan)
        try:
            report.done[name] = predictor.predict(scan, out_dir)
        except (CaseError, ValueError, RuntimeError, OSError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not isinstance(exc, CaseError):
                message = f"case {name}: {scan}: {message}"
            report.failed[name] = message
            if on_error is not None:
                on_error(name, message)
    return report
