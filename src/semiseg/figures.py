"""The paper's figures: a Fig. 3-style qualitative panel, training curves, pseudo-label
quality and the sweep plots (matplotlib, written atomically as PNG).

Arrays are (X, Y, Z) as everywhere in the package; an axial slice ``[:, :, z]`` is drawn
with x to the right and y downwards (anterior at the top for the usual LPS/RAS
orientation of the preprocessed grid).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import to_rgb
from matplotlib.patches import Patch

from semiseg.io.atomic import atomic_path

#: The paper's colours (Fig. 3 and 4): true positives red, false negatives green,
#: false positives blue.
DEFAULT_COLOURS = {"tp": "red", "fn": "green", "fp": "blue"}

#: Columns of a losses.csv that are not loss terms (schedules, weights, counts, timings).
NOT_LOSS_TERMS = frozenset({"iteration", "lr", "lambda_g", "lambda_c", "lambda_r", "anchors", "anchors_labelled",
                            "anchors_pseudo", "data_wait_s", "step_s", "bcp_phase", "pseudo_foreground"})


def _save(fig: plt.Figure, path: str | Path, dpi: int) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)


def _grey(image2d: np.ndarray) -> np.ndarray:
    """A 2-D image scaled to [0, 1] between its 1st and 99th percentiles."""
    lo, hi = np.percentile(image2d, [1, 99])
    return np.clip((image2d - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def overlay(
    image2d: np.ndarray,
    pred2d: np.ndarray,
    ref2d: np.ndarray,
    colours: Mapping[str, str] = DEFAULT_COLOURS,
    alpha: float = 0.7,
) -> np.ndarray:
    """RGB overlay (H, W, 3) in [0, 1] of one slice: ``image2d`` (H, W) in grey, true
    positives (pred and ref), false negatives (ref only) and false positives (pred only)
    blended in ``colours["tp" | "fn" | "fp"]`` (matplotlib colour names or hex)."""
    if not (image2d.shape == pred2d.shape == ref2d.shape) or image2d.ndim != 2:
        raise ValueError(f"overlay needs three 2-D arrays of one shape, got {image2d.shape}, {pred2d.shape}, {ref2d.shape}")
    missing = {"tp", "fn", "fp"} - set(colours)
    if missing:
        raise ValueError(f"overlay colours lack {sorted(missing)}")
    rgb = np.repeat(_grey(image2d.astype(np.float64))[..., None], 3, axis=-1)
    pred, ref = pred2d.astype(bool), ref2d.astype(bool)
    for key, mask in (("tp", pred & ref), ("fn", ref & ~pred), ("fp", pred & ~ref)):
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(to_rgb(colours[key]))
    return rgb


def pick_slice(reference: np.ndarray) -> int:
    """The axial index (last axis) with the most reference foreground; the middle slice
    when the reference is empty."""
    area = reference.astype(bool).sum(axis=(0, 1))
    return int(np.argmax(area)) if area.any() else reference.shape[2] // 2


def qualitative_panel(
    image: np.ndarray,
    reference: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    out_path: str | Path,
    slice_index: int | None = None,
    colours: Mapping[str, str] = DEFAULT_COLOURS,
    size: Sequence[float] = (15.0, 3.2),
    dpi: int = 150,
    title: str | None = None,
) -> int:
    """Fig. 3-style panel: the image with the reference, then one panel per method
    (``predictions``: row label -> (X, Y, Z) label map, foreground = 1) on the same axial
    slice, with that slice's Dice in each title; ``{z}`` in ``title`` becomes the slice
    index. ``slice_index`` None: the slice with the most reference foreground. Returns
    the slice index drawn."""
    for name, pred in predictions.items():
        if pred.shape != reference.shape:
            raise ValueError(f"prediction of {name!r} has shape {pred.shape}, reference {reference.shape}")
    if image.shape != reference.shape:
        raise ValueError(f"image shape {image.shape} != reference shape {reference.shape}")
    z = pick_slice(reference == 1) if slice_index is None else int(slice_index)
    if not 0 <= z < reference.shape[2]:
        raise ValueError(f"slice {z} outside the volume's {reference.shape[2]} axial slices")
    img, ref = image[:, :, z], reference[:, :, z] == 1
    n = 1 + len(predictions)
    fig, axes = plt.subplots(1, n, figsize=tuple(size), squeeze=False)
    axes = axes[0]
    axes[0].imshow(overlay(img, ref, ref, colours).transpose(1, 0, 2), interpolation="nearest")
    axes[0].set_title("Ground truth", fontsize=9)
    for ax, (name, pred) in zip(axes[1:], predictions.items()):
        p = pred[:, :, z] == 1
        denom = p.sum() + ref.sum()
        d = 2.0 * (p & ref).sum() / denom if denom else 1.0
        ax.imshow(overlay(img, p, ref, colours).transpose(1, 0, 2), interpolation="nearest")
        ax.set_title(f"{textwrap.fill(name, 20)}\nslice Dice {100 * d:.1f}%", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    handles = [Patch(color=colours[k], label=lab) for k, lab in (("tp", "true positive"), ("fn", "false negative"), ("fp", "false positive"))]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=9)
    fig.suptitle((title or "axial slice {z}").replace("{z}", str(z)), fontsize=10)
    _save(fig, out_path, dpi)
    return z


def loss_terms(history: pd.DataFrame) -> list[str]:
    """The loss-term columns of one run's losses.csv (not schedules, weights or timings)."""
    return [c for c in history.columns if c not in NOT_LOSS_TERMS]


def training_curves(
    histories: Mapping[str, pd.DataFrame],
    out_path: str | Path,
    smoothing: int = 10,
    size: Sequence[float] = (12.0, 7.0),
    dpi: int = 150,
) -> list[str]:
    """One subplot per loss term, one line per run (``histories``: label -> losses.csv
    frame), smoothed with a centred moving average of ``smoothing`` iterations (1: raw).
    Returns the terms drawn."""
    if smoothing < 1:
        raise ValueError(f"smoothing must be >= 1 iterations, got {smoothing}")
    terms: list[str] = []
    for hist in histories.values():
        terms += [t for t in loss_terms(hist) if t not in terms]
    if not terms:
        raise ValueError("no loss terms in the given histories")
    cols = min(3, len(terms))
    rows = -(-len(terms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=tuple(size), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {label: cycle[i % len(cycle)] for i, label in enumerate(histories)}  # one per run, in every panel
    for ax, term in zip(axes.flat, terms):
        for label, hist in histories.items():
            if term in hist:
                y = hist[term].astype(float).rolling(smoothing, min_periods=1, center=True).mean()
                ax.plot(hist["iteration"], y, label=label, linewidth=1.2, color=colour[label])
        ax.set_title(term, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(terms):]:
        ax.set_axis_off()
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(fig, out_path, dpi)
    return terms


def pseudo_quality_plot(
    quality: pd.DataFrame,
    out_path: str | Path,
    size: Sequence[float] = (7.0, 3.5),
    dpi: int = 150,
) -> None:
    """Per-case Dice of the pseudo labels (``quality``: columns case, dice; sorted
    ascending) as bars, with the mean as a line."""
    if not {"case", "dice"} <= set(quality.columns) or quality.empty:
        raise ValueError("pseudo-label quality needs a non-empty table with columns case, dice")
    q = quality.sort_values("dice")
    fig, ax = plt.subplots(figsize=tuple(size))
    ax.bar(range(len(q)), 100 * q["dice"].astype(float), color="tab:blue")
    mean = 100 * q["dice"].astype(float).mean()
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.1f}%")
    ax.set_xticks(range(len(q)))
    ax.set_xticklabels(q["case"], rotation=90, fontsize=6)
    ax.set_ylabel("pseudo-label Dice [%]")
    ax.set_ylim(0, 100)
    ax.legend(frameon=False)
    _save(fig, out_path, dpi)


def sweep_plot(
    table: pd.DataFrame,
    value_column: str,
    out_path: str | Path,
    size: Sequence[float] = (5.0, 3.5),
    dpi: int = 150,
) -> None:
    """Dice (mean ± std) against the swept value of a sweep table (columns
    ``value_column`` and ``Dice[%]`` as ``"mean ± std"``)."""
    if value_column not in table or "Dice[%]" not in table:
        raise ValueError(f"sweep table needs columns {value_column!r} and 'Dice[%]', has {list(table.columns)}")
    parts = table["Dice[%]"].astype(str).str.split("±", expand=True).astype(float)
    x = table[value_column].astype(float)
    fig, ax = plt.subplots(figsize=tuple(size))
    ax.errorbar(x, parts[0], yerr=parts[1], marker="o", capsize=3)
    ax.set_xlabel(value_column)
    ax.set_ylabel("Dice [%] (full method)")
    ax.grid(alpha=0.3)
    _save(fig, out_path, dpi)
