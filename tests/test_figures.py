"""Figures: overlay colours, slice choice, and each figure written as a real PNG."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from semiseg.figures import (
    comparison_figure,
    loss_terms,
    overlay,
    pick_slice,
    paired_case_scatter,
    pseudo_quality_plot,
    qualitative_panel,
    sweep_plot,
    training_curves,
)


def test_overlay_colours_tp_fn_fp():
    image = np.zeros((4, 4))
    image[0, 0] = 1.0  # grey range 0..1
    ref = np.zeros((4, 4), bool)
    pred = np.zeros((4, 4), bool)
    ref[1, 1] = pred[1, 1] = True  # TP
    ref[2, 2] = True  # FN
    pred[3, 3] = True  # FP
    rgb = overlay(image, pred, ref, alpha=1.0)
    assert rgb.shape == (4, 4, 3)
    np.testing.assert_allclose(rgb[1, 1], [1, 0, 0])  # red
    np.testing.assert_allclose(rgb[2, 2], [0, 128 / 255, 0])  # matplotlib "green"
    np.testing.assert_allclose(rgb[3, 3], [0, 0, 1])  # blue
    np.testing.assert_allclose(rgb[0, 1], [0, 0, 0])  # untouched background stays grey
    custom = overlay(image, pred, ref, {"tp": "#ffff00", "fn": "cyan", "fp": "magenta"}, alpha=1.0)
    np.testing.assert_allclose(custom[1, 1], [1, 1, 0])


def test_overlay_rejects_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        overlay(np.zeros((3, 3)), np.zeros((3, 4)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="lack"):
        overlay(np.zeros((3, 3)), np.zeros((3, 3)), np.zeros((3, 3)), {"tp": "red"})


def test_pick_slice_most_foreground_and_empty():
    ref = np.zeros((5, 5, 6), np.uint8)
    ref[:2, :2, 1] = 1
    ref[:, :, 4] = 1
    assert pick_slice(ref) == 4
    assert pick_slice(np.zeros((5, 5, 6))) == 3


def _volume():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(24, 20, 10)).astype(np.float32)
    ref = np.zeros(image.shape, np.uint8)
    ref[8:16, 6:14, 3:7] = 1
    return image, ref


def test_qualitative_panel_writes_png(tmp_path):
    image, ref = _volume()
    shifted = np.roll(ref, 2, axis=0)
    out = tmp_path / "q.png"
    z = qualitative_panel(image, ref, {"A": ref, "B": shifted}, out, dpi=60, title="case x, slice {z}")
    assert z == 3  # first of the equally full slices
    img = mpimg.imread(out)
    assert img.shape[1] > img.shape[0] > 50
    # red (TP), green (FN) and blue (FP) pixels are all drawn
    rgb = img[..., :3]
    assert ((rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)).any()
    assert ((rgb[..., 2] > 0.8) & (rgb[..., 0] < 0.3) & (rgb[..., 1] < 0.3)).any()
    assert ((rgb[..., 1] > 0.35) & (rgb[..., 0] < 0.3) & (rgb[..., 2] < 0.3)).any()
    assert not list(tmp_path.glob("*.tmp*")), "no temporary file left behind"
    with pytest.raises(ValueError, match="slice 10 outside"):
        qualitative_panel(image, ref, {"A": ref}, tmp_path / "bad.png", slice_index=10)
    with pytest.raises(ValueError, match="prediction of 'A'"):
        qualitative_panel(image, ref, {"A": ref[:-1]}, tmp_path / "bad.png")


def test_training_curves_draws_every_loss_term(tmp_path):
    it = np.arange(30)
    a = pd.DataFrame({"iteration": it, "lr": 0.01, "loss": 1 / (it + 1), "ce_dice": 1 / (it + 1), "data_wait_s": 0.0, "step_s": 0.1})
    b = pd.DataFrame({"iteration": it, "lr": 0.01, "sup_nll": 0.5, "bcl": 0.3, "lambda_c": 0.01, "loss": 0.8, "step_s": 0.1})
    assert loss_terms(b) == ["sup_nll", "bcl", "loss"]
    terms = training_curves({"A": a, "B": b}, tmp_path / "c.png", smoothing=5, dpi=50)
    assert terms == ["loss", "ce_dice", "sup_nll", "bcl"]
    assert mpimg.imread(tmp_path / "c.png").ndim == 3
    with pytest.raises(ValueError, match="smoothing"):
        training_curves({"A": a}, tmp_path / "d.png", smoothing=0)


def test_pseudo_quality_and_sweep_plots(tmp_path):
    q = pd.DataFrame({"case": ["a", "b", "c"], "dice": [0.5, 0.7, 0.6]})
    pseudo_quality_plot(q, tmp_path / "p.png", dpi=50)
    assert mpimg.imread(tmp_path / "p.png").ndim == 3
    # The quality file's summary row and cases without a reference are not drawn as cases.
    with_mean = pd.DataFrame({"case": ["a", "b", "c", "d", "mean"], "dice": [0.5, 0.7, 0.6, float("nan"), 0.6]})
    drawn = pseudo_quality_plot(with_mean, tmp_path / "m.png", dpi=50)
    assert list(drawn["case"]) == ["a", "c", "b"]
    with pytest.raises(ValueError, match="case, dice"):
        pseudo_quality_plot(pd.DataFrame({"case": []}), tmp_path / "e.png")
    table = pd.DataFrame({"lambda_c": [0.03, 0.09], "Dice[%]": ["79.26 ± 6.10", "79.81 ± 5.00"]})
    sweep_plot(table, "lambda_c", tmp_path / "s.png", dpi=50)
    assert mpimg.imread(tmp_path / "s.png").ndim == 3
    with pytest.raises(ValueError, match="needs columns"):
        sweep_plot(table, "#Unlabeled", tmp_path / "s2.png")


def test_training_curves_one_colour_per_run_in_every_panel(tmp_path, monkeypatch):
    from semiseg import figures

    saved = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path, dpi: saved.setdefault("fig", fig))
    it = np.arange(5)
    a = pd.DataFrame({"iteration": it, "loss": 1.0, "ce_dice": 1.0})
    b = pd.DataFrame({"iteration": it, "sup_nll": 0.5, "loss": 0.8})
    training_curves({"A": a, "B": b}, tmp_path / "c.png")
    colours = {}
    for ax in saved["fig"].axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colours) == {"A", "B"} and all(len(c) == 1 for c in colours.values())
    assert colours["A"] != colours["B"]


def test_comparison_figure_writes_png(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)

    def seed_metrics(centre):
        return pd.DataFrame({"case": [f"c{i}" for i in range(8)], "dice": np.clip(rng.normal(centre, 0.05, 8), 0, 1)})

    seed_metrics(0.7).to_csv(tmp_path / "s0.csv", index=False)
    files = {"supervised": {0: tmp_path / "s0.csv", 1: seed_metrics(0.65), 2: seed_metrics(0.72)},
             "full": {0: seed_metrics(0.85), 1: seed_metrics(0.8), 2: seed_metrics(0.88)}}
    out = tmp_path / "cmp.png"
    names = comparison_figure(files, {"full": "Ours (full)"}, out, size=(5, 3), dpi=60, title="LA, 5 %")
    assert names == ["supervised", "Ours (full)"]
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[1] > img.shape[0] > 50
    assert img[..., :3].std() > 0.05  # not a blank canvas
    assert not list(tmp_path.glob("*.part*")), "no temporary file left behind"
    # One colour per seed, the same in both methods; a diamond (per-seed mean) per method and seed.
    from semiseg import figures

    saved = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path, dpi: saved.setdefault("fig", fig))
    comparison_figure(files, None, tmp_path / "x.png")
    ax = saved["fig"].axes[0]
    diamonds = [c for c in ax.collections if hasattr(c, "get_sizes") and c.get_sizes().size and c.get_sizes()[0] == 55]
    assert len(diamonds) == 6
    colours = [tuple(np.round(c.get_facecolor()[0], 3)) for c in diamonds]
    assert colours[:3] == colours[3:] and len(set(colours[:3])) == 3
    with pytest.raises(ValueError, match="no seeds"):
        comparison_figure({"full": {}}, None, tmp_path / "e.png")
    with pytest.raises(ValueError, match="column 'dice'"):
        comparison_figure({"full": {0: pd.DataFrame({"case": ["a"]})}}, None, tmp_path / "e.png")


def test_paired_case_scatter(tmp_path):
    rows = [("ref", 1, "a", 0.4, "labelled only"), ("ref", 1, "b", 0.9, "labelled only"),
            ("m", 1, "a", 0.8, "no"), ("m", 1, "b", 0.9, "images"),
            ("n", 1, "a", 0.5, "images"), ("n", 1, "b", 0.85, "images")]
    scores = pd.DataFrame(rows, columns=["model", "seed", "case", "dice", "seen"])
    assert paired_case_scatter(scores, "ref", tmp_path / "s.png", dpi=50) == ["m", "n"]
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="lacks 1 .* of 'm'"):
        paired_case_scatter(pd.concat([scores, pd.DataFrame([("m", 2, "a", 0.5, "no")], columns=scores.columns)]),
                            "ref", tmp_path / "x.png")
    with pytest.raises(ValueError, match="reference model 'other'"):
        paired_case_scatter(scores, "other", tmp_path / "x.png")
    with pytest.raises(ValueError, match="columns"):
        paired_case_scatter(scores.drop(columns="seen"), "ref", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
