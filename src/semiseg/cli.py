"""The ``semiseg`` command: the pipeline's stages for users, without Snakemake.

- ``semiseg predict -m MODEL -i INPUT -o OUTDIR``: segment new scans (:mod:`semiseg.predict`);
- ``semiseg info MODEL``: what a model file holds (:mod:`semiseg.models`);
- ``semiseg evaluate -p PRED_DIR -r REF_DIR -o metrics.csv``: Dice, Jaccard, ASD, 95HD of
  two folders of label maps (:func:`semiseg.evaluation.evaluate_folders`);
- ``semiseg export-model MODEL --case CASE.h5 --stride X Y Z -o NEW``: add the deployment
  record to a model file of the older format.

Errors are one line on stderr (``semiseg: error: ...``) and exit status 1; ``predict``
reports each bad scan on its own line, goes on with the others and exits 1 at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from semiseg.errors import CaseError


def _fail(message: str) -> int:
    print(f"semiseg: error: {message}", file=sys.stderr)
    return 1


def _predict(a: argparse.Namespace) -> int:
    from semiseg.predict import PredictOptions, predict_scans

    options = PredictOptions(crop=a.crop, weights=a.weights, weighting=a.weighting, device=a.device, amp=a.amp,
                             batch_size=a.batch_size, stride=a.stride, probabilities=a.probabilities)
    progress = None
    write = print
    if not a.quiet:
        from tqdm import tqdm

        write = tqdm.write  # a line of its own above the progress bar

        def progress(scans):
            return tqdm(scans, desc="scans", unit="scan", file=sys.stderr)

    def on_error(name: str, message: str) -> None:
        write(f"semiseg: error: {message}", file=sys.stderr)

    report = predict_scans(a.model, a.input, a.output, options, progress=progress, on_error=on_error)
    if not a.quiet:
        print(f"{len(report.done)} scan(s) written to {a.output}" + (f", {len(report.failed)} failed" if report.failed else ""),
              file=sys.stderr)
    return 1 if report.failed else 0


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " x ".join(_format_value(v) for v in value) if all(isinstance(v, (int, float)) for v in value) else \
            ", ".join(_format_value(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_format_value(v)}" for k, v in value.items())
    return str(value)


def format_info(info) -> str:
    """The text ``semiseg info`` prints for a :class:`semiseg.models.ModelInfo`."""
    lines = [
        f"model file:  {info.path}",
        f"format:      {info.format}",
        f"method:      {info.method} (stage {info.stage})",
        f"iterations:  {info.iterations}",
        f"seed:        {info.seed}",
        f"weights:     student" + (" and teacher" if info.has_teacher else ""),
        f"network:     {_format_value(info.network)}",
    ]
    d = info.deployment
    if d is None:
        lines.append("deployment:  none (older model format): 'semiseg export-model --help' says how to add it")
    else:
        lines += [
            f"data set:    {d['dataset']}",
            f"classes:     " + ", ".join(f"{i} = {c}" for i, c in enumerate(d["classes"])),
            f"label map:   {_format_value(d['label_map'])} (raw value: class index)",
            f"patch:       {_format_value(d['patch_size'])} voxels",
            f"stride:      {_format_value(d['stride'])} voxels",
            "preprocessing:",
            *[f"  {k}: {_format_value(v)}" for k, v in d["preprocessing"].items() if k not in ("classes", "label_map")],
        ]
    lines.append("training settings:")
    lines += [f"  {k}: {_format_value(v)}" for k, v in info.training.items()]
    if d is not None and d.get("dataset_config"):
        lines.append("data set configuration when trained:")
        lines += [f"  {k}: {_format_value(v)}" for k, v in d["dataset_config"].items()]
    return "\n".join(lines)


def _info(a: argparse.Namespace) -> int:
    from semiseg.models import read_model_info

    info = read_model_info(a.model)
    print(json.dumps(info.as_dict(), indent=2) if a.json else format_info(info))
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    from semiseg.evaluation import evaluate_folders

    table = evaluate_folders(a.pred, a.ref, unit=a.unit, empty_policy=a.empty_policy, ext=a.ext, out_path=a.output)
    means = table[["dice", "jaccard", "asd", "hd95"]].mean()
    print(f"{len(table)} case(s): Dice {100 * means['dice']:.2f} %, Jaccard {100 * means['jaccard']:.2f} %, "
          f"ASD {means['asd']:.2f} {a.unit}, 95HD {means['hd95']:.2f} {a.unit}; per case: {a.output}")
    unscored = table.attrs.get("unscored_references", 0)
    if unscored:
        print(f"{unscored} reference(s) without a prediction were not scored")
    return 0


def _export(a: argparse.Namespace) -> int:
    from semiseg.models import deployment_record, export_model, read_model_info

    info = read_model_info(a.model)
    patch = info.training.get("patch_size")
    if patch is None:
        return _fail(f"{a.model}: the training settings hold no patch_size")
    record = deployment_record(a.case, patch, a.stride, a.dataset or "", None)
    export_model(a.model, a.output, record)
    print(f"wrote {a.output} ({info.method}, stage {info.stage}) with the preprocessing of {a.case[0]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semiseg", description="Two-stage semi-supervised 3D segmentation: "
                                "predict, inspect and evaluate without Snakemake.")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("predict", help="segment new scans with a trained model file",
                        description="Preprocess each scan as the model's training data, predict it with the sliding "
                        "window and write <name>.nii.gz (class indices) in the scan's own geometry.")
    pr.add_argument("-m", "--model", required=True, help="model.pt written by the workflow")
    pr.add_argument("-i", "--input", required=True,
                    help="a scan (NIfTI, NRRD, MHA/MHD, or a DICOM series folder) or a folder of them")
    pr.add_argument("-o", "--output", required=True, help="output folder (created)")
    pr.add_argument("--crop", choices=("body", "none"), default=None,
                    help="label-free crop in place of the model's crop source (needed for models trained with "
                    "crop_source: label)")
    pr.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    pr.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on the CPU)")
    pr.add_argument("--batch-size", type=int, default=2, help="windows per forward pass (default 2)")
    pr.add_argument("--stride", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                    help="sliding-window stride in voxels (default: the model file's)")
    pr.add_argument("--weights", choices=("student", "teacher"), default="student")
    pr.add_argument("--weighting", choices=("uniform", "gaussian"), default="uniform")
    pr.add_argument("--probabilities", action="store_true",
                    help="also write <name>_prob_<class>.nii.gz for each foreground class")
    pr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(run=_predict)

    inf = sub.add_parser("info", help="what a model file holds")
    inf.add_argument("model")
    inf.add_argument("--json", action="store_true", help="as JSON")
    inf.set_defaults(run=_info)

    ev = sub.add_parser("evaluate", help="metrics of two folders of label maps matched by file name",
                        description="Dice, Jaccard, ASD and 95HD of every prediction against the reference of the same "
                        "name (foreground: every non-zero voxel). NIfTI, NRRD, MHA or semiseg HDF5 files.")
    ev.add_argument("-p", "--pred", required=True, help="folder of predicted label maps")
    ev.add_argument("-r", "--ref", required=True, help="folder of reference label maps")
    ev.add_argument("-o", "--output", required=True, help="per-case CSV to write")
    ev.add_argument("--unit", choices=("mm", "voxel"), default="mm", help="distance unit (default mm)")
    ev.add_argument("--empty-policy", choices=("worst", "nan", "zero"), default="worst",
                    help="ASD / 95HD when one mask is empty: the volume's diagonal (worst, default), NaN, or 0")
    ev.add_argument("--ext", default=None, help="only files with this ending (e.g. .nii.gz or .h5)")
    ev.set_defaults(run=_evaluate)

    ex = sub.add_parser("export-model", help="add the deployment record to a model file of the older format",
                        description="Write a copy of MODEL in the current format, with the preprocessing record of "
                        "its preprocessed training case files (HDF5, results/preprocessed/<dataset>/) and the stride.")
    ex.add_argument("model")
    ex.add_argument("--case", required=True, nargs="+", help="preprocessed training case file(s) (.h5) of the model")
    ex.add_argument("--stride", required=True, type=int, nargs=3, metavar=("X", "Y", "Z"))
    ex.add_argument("--dataset", default=None, help="data set name to record")
    ex.add_argument("-o", "--output", required=True)
    ex.set_defaults(run=_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CaseError, ValueError, FileNotFoundError) as exc:
        return _fail(" ".join(str(exc).split()))


if __name__ == "__main__":
    sys.exit(main())
