"""Where a data set's raw cases are, and which cases it has.

A data set's ``raw`` config block gives a folder and two path templates relative to it,
e.g. ``imagesTr/{case}.nii.gz`` (MSD layout) or ``{case}/lgemri.nrrd`` (LA). Templates may
use ``{case}`` and ``{case_digits}`` (the case ID's trailing digits, e.g. ``0001`` for
``PANCREAS_0001``, for label files named ``label0001.nii.gz``). An image template may name a
folder: it is then read as a DICOM series. An optional third template,
``unlabelled_image`` (e.g. MSD ``imagesTs/{case}.nii.gz``), names extra images without
labels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEMO_COMMAND = "snakemake --cores 2 all"


class RawDataMissing(FileNotFoundError):
    """The raw data of a data set is not where the config says it is."""


def case_digits(case: str) -> str:
    """Trailing digits of a case ID (``PANCREAS_0001`` -> ``0001``); the ID itself if none."""
    m = re.search(r"(\d+)$", case)
    return m.group(1) if m else case


def _fill(template: str, case: str) -> str:
    return template.format(case=case, case_digits=case_digits(case))


def raw_case_paths(
    ds: Mapping[str, Any], case: str, base: str | Path = ".", unlabelled: bool = False
) -> tuple[Path, Path | None]:
    """``(image path, label path or None)`` of ``case`` for a data set config ``ds``.

    ``unlabelled``: the case is one of the extra unlabelled images (``raw.unlabelled_image``,
    e.g. MSD ``imagesTs``): its image comes from that template and it has no label.
    """
    raw = ds["raw"]
    root = Path(base) / raw["dir"]
    if unlabelled:
        return root / _fill(raw["unlabelled_image"], case), None
    image = root / _fill(raw["image"], case)
    label = root / _fill(raw["label"], case) if raw.get("label") else None
    return image, label


def generated_cases(ds: Mapping[str, Any]) -> list[str]:
    """Case IDs of a generated (synthetic) data set, known before it is written."""
    from semiseg.data import case_id

    gen = ds["generate"]
    return [case_id(i, gen.get("prefix", "demo")) for i in range(int(gen["num_cases"]))]


def missing_data_message(name: str, ds: Mapping[str, Any], base: str | Path = ".") -> str:
    """One line: where the data set's raw files were expected (both templates), where to get
    them, the documentation section, and the demo to run without them."""
    raw = ds["raw"]
    root = Path(base) / raw["dir"]
    source = ds.get("source", "see docs/real-data.md")
    templates = f"images {raw['image']}" + (f", labels {raw['label']}" if raw.get("label") else "")
    if raw.get("unlabelled_image"):
        templates += f", unlabelled images {raw['unlabelled_image']}"
    return (
        f"data set '{name}': raw data not found at {root} ({root.resolve()}; config key datasets.{name}.raw.dir; "
        f"expected {templates}). Get it from: {source}; layouts: README.md, 'Real data' (docs/real-data.md). "
        f"To try the pipeline without it, run the synthetic demo: {DEMO_COMMAND}"
    )


def _match_cases(root: Path, template: str, what: str) -> set[str]:
    """Case IDs of every path under ``root`` matching ``template``.

    Hidden files are skipped. A template whose last part has no suffix (``Pancreas-CT/{case}``)
    names DICOM series folders: only folders match (not e.g. a ``LICENSE`` file beside them).
    """
    if "{case}" not in template:
        raise ValueError(f"{what} must contain '{{case}}', got {template!r}")
    pattern = template.replace("{case_digits}", "*").replace("{case}", "*")
    pre, post = template.split("{case}", 1)
    regex = re.compile(
        "^" + re.escape(pre).replace(re.escape("{case_digits}"), r"\d+") + r"(?P<case>[^/]+?)"
        + re.escape(post).replace(re.escape("{case_digits}"), r"\d+") + "$"
    )
    folders_only = "." not in template.rsplit("/", 1)[-1]
    cases = set()
    for path in root.glob(pattern):
        if folders_only and not path.is_dir():
            continue
        rel = path.relative_to(root).as_posix()
        # macOS metadata files (``._colon_001.nii.gz``, as in the MSD archives) and other hidden files
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        m = regex.match(rel)
        if m:
            cases.add(m.group("case"))
    return cases


def list_cases(name: str, ds: Mapping[str, Any], base: str | Path = ".") -> list[str]:
    """Case IDs of data set ``name``, sorted.

    Generated data sets: from the generator config. Otherwise an explicit ``cases`` list
    if given, else every match of the image template under the raw folder (hidden files,
    such as the ``._*`` files of the MSD archives, skipped). The extra unlabelled images
    (:func:`list_unlabelled_cases`) are not among them. Raises :class:`RawDataMissing` with
    a message saying where the data was expected, where to get it and how to run the
    demo instead.
    """
    if ds.get("generate"):
        return generated_cases(ds)
    if ds.get("cases"):
        return sorted(str(c) for c in ds["cases"])
    root = Path(base) / ds["raw"]["dir"]
    if not root.is_dir():
        raise RawDataMissing(missing_data_message(name, ds, base))
    cases = _match_cases(root, ds["raw"]["image"], f"datasets.{name}.raw.image")
    if not cases:
        raise RawDataMissing(missing_data_message(name, ds, base))
    return sorted(cases)


def list_unlabelled_cases(name: str, ds: Mapping[str, Any], base: str | Path = ".") -> list[str]:
    """Case IDs of the extra unlabelled images of data set ``name`` (sorted; empty if none configured).

    These are the matches of ``raw.unlabelled_image`` (e.g. ``imagesTs/{case}.nii.gz`` of an
    MSD task): images without a label, which join the unlabelled training pool of every
    split and never the test or labelled lists. Raises :class:`RawDataMissing` when the
    template is set but matches nothing.
    """
    template = ds["raw"].get("unlabelled_image")
    if not template or ds.get("generate"):
        return []
    root = Path(base) / ds["raw"]["dir"]
    cases = _match_cases(root, template, f"datasets.{name}.raw.unlabelled_image") if root.is_dir() else set()
    if not cases:
        raise RawDataMissing(
            f"data set '{name}': no unlabelled images match {root / template} (config key "
            f"datasets.{name}.raw.unlabelled_image); set it to null to use no extra unlabelled images"
        )
    return sorted(cases)
