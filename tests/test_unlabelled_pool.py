"""benchmarks/la_unlabelled_pool.py: scoring pipeline models on an unlabelled pool that has
ground truth, with the held-out / transductive label of every score and paired differences."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from semiseg.io.h5 import write_case
from semiseg.training.engine import TrainConfig, train
from tests.test_training import TINY

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("la_unlabelled_pool", REPO / "benchmarks" / "la_unlabelled_pool.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """A pipeline-shaped results folder: 6 cases with labels (2 labelled, a pool of 4), the
    split ``s`` (whole pool) and ``s-u2`` (first 2 of the pool), and one supervised and two
    semi-supervised models of 3 iterations for seed 5."""
    root = tmp_path_factory.mktemp("pool")
    results = root / "results"
    pre = results / "preprocessed" / "toy"
    pre.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"c{i}" for i in range(6)]
    for i, name in enumerate(names):
        shape = (18 + i, 18, 17)
        x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
        lab = (((x - shape[0] / 2) / 5) ** 2 + ((y - 9) / 4) ** 2 + ((z - 8.5) / 4) ** 2 <= 1).astype(np.uint8)
        write_case(pre / f"{name}.h5", (lab * 2.0 + rng.normal(0, 0.5, shape)).astype(np.float32), lab, {})
    cases = [pre / f"{n}.h5" for n in names]
    for split, pool in (("s", names[2:]), ("s-u2", names[2:4])):
        d = results / "splits" / "toy" / split
        d.mkdir(parents=True)
        (d / "unlabelled.txt").write_text("\n".join(pool) + "\n", encoding="utf-8")
    deployment = {"patch_size": (16, 16, 16), "stride": (8, 8, 8)}
    models = {}
    for key, split, method, unl in (("sup", "s", "supervised", []), ("semi", "s", "aua", cases[2:]),
                                    ("semi_u2", "s-u2", "aua", cases[2:4])):
        out = results / "models" / f"toy_{split}" / "seed5" / f"stage1_{method}"
        cfg = TrainConfig(method=method, **{**TINY, "iterations": 3, "seed": 5})
        models[key] = train(cfg, cases[:2], unl, out, device="cpu", progress=False, deployment=deployment)
        assert models[key] == out / "model.pt"
    return results, models


def _args(results, out, *extra):
    return ["--cases", str(results / "splits/toy/s/unlabelled.txt"), "--preprocessed", str(results / "preprocessed/toy"),
            "--seeds", "5", "--reference", "sup", "--out", str(out),
            "--model", f"sup={results}/models/toy_s/seed{{seed}}/stage1_supervised/model.pt",
            "--model", f"semi={results}/models/toy_s/seed{{seed}}/stage1_aua/model.pt",
            "--model", f"semi_u2={results}/models/toy_s-u2/seed{{seed}}/stage1_aua/model.pt", *extra]


def test_scores_mark_held_out_and_transductive_cases(layout, tmp_path):
    results, _ = layout
    script = _script()
    summary = script.main(_args(results, tmp_path / "all"))
    scores = pd.read_csv(tmp_path / "all" / "scores.csv")
    assert len(scores) == 3 * 4 and set(scores["case"]) == {"c2", "c3", "c4", "c5"}
    seen = scores.set_index(["model", "case"])["seen"]
    assert (seen["sup"] == "labelled only").all()
    assert (seen["semi"] == "images").all()
    assert list(seen["semi_u2"].sort_index()) == ["images", "images", "no", "no"]
    # Every score is the case's own Dice (paired by name), recomputed here by hand.
    import h5py

    for row in scores.itertuples():
        with h5py.File(tmp_path / "all" / "predictions" / row.model / "seed5" / f"{row.case}.h5", "r") as fp, \
                h5py.File(results / "preprocessed/toy" / f"{row.case}.h5", "r") as fc:
            a, b = fp["label"][...] > 0, fc["label"][...] > 0
        assert row.dice == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    # The paired differences in the summary are the per-case differences' mean.
    t = scores.pivot(index="case", columns="model", values="dice")
    assert f"| semi | {100 * (t['semi'] - t['sup']).mean():+.2f} |" in summary
    assert (tmp_path / "all" / "summary.md").read_text(encoding="utf-8") in summary
    assert (tmp_path / "all" / "scatter.png").stat().st_size > 0


def test_exclude_leaves_the_held_out_cases(layout, tmp_path):
    results, _ = layout
    script = _script()
    script.main(_args(results, tmp_path / "held", "--exclude", str(results / "splits/toy/s-u2/unlabelled.txt")))
    scores = pd.read_csv(tmp_path / "held" / "scores.csv")
    assert set(scores["case"]) == {"c4", "c5"}
    assert set(scores.loc[scores["model"] == "semi_u2", "seen"]) == {"no"}


def test_bad_input_is_named(layout, tmp_path):
    results, _ = layout
    script = _script()
    with pytest.raises(SystemExit, match="expected NAME=PATH"):
        script.main(_args(results, tmp_path / "x", "--model", "nothing"))
    with pytest.raises(SystemExit, match="not one of the --model names"):
        script.main([*_args(results, tmp_path / "x"), "--reference", "other"])
    with pytest.raises(SystemExit, match=r"model .*seed6.* does not exist"):
        script.main([*_args(results, tmp_path / "x"), "--seeds", "6"])
    with pytest.raises(SystemExit, match="no cases left"):
        script.main(_args(results, tmp_path / "x", "--exclude", str(results / "splits/toy/s/unlabelled.txt")))
    bad = results / "models" / "toy_s" / "seed7" / "stage1_supervised" / "model.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a model")
    with pytest.raises(SystemExit, match=r"model.pt: not a semiseg model file"):
        script.main([*_args(results, tmp_path / "x"), "--seeds", "7"])
    assert not (tmp_path / "x" / "scores.csv").exists()
