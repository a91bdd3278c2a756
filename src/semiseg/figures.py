"""The paper's figures: a Fig. 3-style qualitative panel, training curves, pseudo-label
quality, the sweep plots and the comparison of methods over seeds (matplotlib, written
atomically as PNG).

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
                            "anchors_pseudo", "data_wait_s", "step_s", "bcp_phase", "pseudo_foreground",
                            "consistency_weight", "uncertainty_threshold"})


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
) -> pd.DataFrame:
    """Per-case Dice of the pseudo labels (``quality``: columns case, dice, as
    :func:`semiseg.pseudo.pseudo_label_quality` writes it) as bars sorted ascending, with
    the mean over the cases as a line; returns the cases drawn.

    The table's summary row (case ``mean``, its last row) is not a case and is not drawn;
    cases without a reference (Dice NaN) are left out.
    """
    if not {"case", "dice"} <= set(quality.columns) or quality.empty:
        raise ValueError("pseudo-label quality needs a non-empty table with columns case, dice")
    q = quality
    if str(q["case"].iloc[-1]) == "mean":
        q = q.iloc[:-1]
    q = q[q["dice"].astype(float).notna()].sort_values("dice")
    if q.empty:
        raise ValueError("pseudo-label quality: no case with a reference label to draw")
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
    return q


#: ``seen`` values of a per-case score that the model did not train on (held-out scores).
HELD_OUT = frozenset({"no", "labelled only"})


def paired_case_scatter(
    scores: pd.DataFrame,
    reference: str,
    out_path: str | Path,
    fail: float = 0.8,
    size_per_panel: Sequence[float] = (3.5, 3.5),
    dpi: int = 150,
) -> list[str]:
    """Per-case Dice of each model against the same case's Dice under ``reference``: one
    panel per other model, one point per (seed, case) pair, both axes in % with the
    diagonal; returns the models drawn.

    ``scores``: columns model, seed, case, dice (0-1), seen (as
    ``benchmarks/la_unlabelled_pool.py`` writes them); a pair whose ``seen`` is in
    :data:`HELD_OUT` is drawn filled, a transductive one hollow. A dashed line marks
    ``fail`` on the reference axis, so the repairs of the reference's failed cases (left of
    it, above the diagonal) stand apart from the changes on the rest. Pairs must match: a
    (seed, case) of a model that the reference lacks is a ``ValueError``.
    """
    needed = {"model", "seed", "case", "dice", "seen"}
    if not needed <= set(scores.columns) or scores.empty:
        raise ValueError(f"paired case scatter needs a non-empty table with columns {sorted(needed)}")
    ref = scores[scores["model"] == reference].set_index(["seed", "case"])["dice"]
    if ref.empty:
        raise ValueError(f"paired case scatter: no scores of the reference model {reference!r}")
    models = [m for m in dict.fromkeys(scores["model"]) if m != reference]
    if not models:
        raise ValueError("paired case scatter: no model besides the reference")
    fig, axes = plt.subplots(1, len(models), figsize=(size_per_panel[0] * len(models), size_per_panel[1]), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        t = scores[scores["model"] == model].set_index(["seed", "case"])
        missing = t.index.difference(ref.index)
        if len(missing):
            raise ValueError(f"paired case scatter: {reference!r} lacks {len(missing)} (seed, case) pair(s) of {model!r}, "
                             f"e.g. {missing[0]}")
        x, y = 100 * ref.reindex(t.index).to_numpy(float), 100 * t["dice"].to_numpy(float)
        held = t["seen"].isin(HELD_OUT).to_numpy()
        if held.any():
            ax.scatter(x[held], y[held], s=14, color="tab:blue", label=f"held out ({held.sum()})")
        if (~held).any():
            ax.scatter(x[~held], y[~held], s=14, facecolors="none", edgecolors="tab:orange",
                       label=f"transductive ({(~held).sum()})")
        ax.plot([0, 100], [0, 100], color="black", linewidth=0.8)
        ax.axvline(100 * fail, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_xlabel(f"{reference} Dice [%]")
        ax.set_ylabel("Dice [%]")
        ax.set_title(f"{model} ({np.mean(y - x):+.2f} points)", fontsize=9)
        ax.legend(frameon=False, fontsize=7, loc="lower right")
        ax.set_aspect("equal")
    fig.tight_layout()
    _save(fig, out_path, dpi)
    return models


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


def _dice_percent(source: str | Path | pd.DataFrame, what: str) -> np.ndarray:
    """Per-case Dice [%] of one seed's per-case metrics (CSV path or frame, column ``dice``)."""
    frame = source if isinstance(source, pd.DataFrame) else pd.read_csv(source)
    if "dice" not in frame or frame.empty:
        raise ValueError(f"{what}: per-case metrics need a non-empty column 'dice'")
    return 100.0 * frame["dice"].to_numpy(dtype=np.float64)


def comparison_figure(
    metric_files: Mapping[str, Mapping[int | str, str | Path | pd.DataFrame]],
    labels: Mapping[str, str] | None,
    out_path: str | Path,
    size: Sequence[float] = (8.0, 4.0),
    dpi: int = 150,
    title: str | None = None,
) -> list[str]:
    """Dice [%] per method, with its spread over seeds and test cases: for each method
    (``metric_files``: method -> {seed: per-case metrics CSV or frame}, drawn left to
    right in that order) a box of all (seed, case) Dice values, the per-case points
    coloured by seed (the same colour for a seed in every method, side by side per seed),
    each seed's test-set mean as a diamond, and the mean over seeds as a black bar.
    ``labels``: method -> x-axis label (missing: the key). Returns the labels drawn."""
    if not metric_files:
        raise ValueError("comparison figure: no methods")
    data: dict[str, dict[int | str, np.ndarray]] = {}
    for method, seeds in metric_files.items():
        if not seeds:
            raise ValueError(f"comparison figure: method {method!r} has no seeds")
        data[method] = {seed: _dice_percent(src, f"{method}, seed {seed}") for seed, src in seeds.items()}
    seed_order: list[int | str] = []
    for seeds in data.values():
        seed_order += [s for s in seeds if s not in seed_order]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {s: cycle[i % len(cycle)] for i, s in enumerate(seed_order)}
    width = 0.6
    offset = {s: (k - (len(seed_order) - 1) / 2) * width / max(len(seed_order), 1) for k, s in enumerate(seed_order)}
    rng = np.random.default_rng(0)  # the same jitter on every run
    names = [(labels or {}).get(m, m) for m in data]
    fig, ax = plt.subplots(figsize=tuple(size))
    ax.boxplot([np.concatenate(list(seeds.values())) for seeds in data.values()], positions=range(len(data)),
               widths=width, showfliers=False, patch_artist=True,
               boxprops={"facecolor": "0.92", "edgecolor": "0.5"}, medianprops={"color": "0.4"},
               whiskerprops={"color": "0.5"}, capprops={"color": "0.5"})
    for i, seeds in enumerate(data.values()):
        means = []
        for seed, dice in seeds.items():
            x = i + offset[seed]
            jitter = rng.uniform(-0.25, 0.25, dice.size) * width / max(len(seed_order), 1)
            ax.scatter(x + jitter, dice, s=10, color=colour[seed], alpha=0.55, linewidths=0, zorder=3)
            ax.scatter([x], [dice.mean()], s=55, marker="D", color=colour[seed], edgecolors="black", linewidths=0.8, zorder=4)
            means.append(dice.mean())
        ax.hlines(np.mean(means), i - width / 2, i + width / 2, colors="black", linewidth=1.8, zorder=5)
    ax.set_xticks(range(len(data)))
    ax.set_xticklabels([textwrap.fill(n, 14) for n in names], fontsize=8)
    ax.set_ylabel("Dice [%]")
    ax.set_xlim(-0.6, len(data) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colour[s], label=f"seed {s}") for s in seed_order]
    handles += [
        plt.Line2D([], [], marker="D", linestyle="", color="white", markeredgecolor="black", label="per-seed mean"),
        plt.Line2D([], [], color="black", linewidth=1.8, label="mean over seeds"),
        Patch(facecolor="0.92", edgecolor="0.5", label="all (seed, case) values"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    _save(fig, out_path, dpi)
    return names
