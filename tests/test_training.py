"""The training engine: EMA, deterministic batches, resume == uninterrupted, every variant end to end."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from semiseg.io.h5 import write_case
from semiseg.training.data import PatchBatches, pad_to
from semiseg.training.engine import (
    STAGE1_METHODS,
    Stage1Step,
    TrainConfig,
    build_model,
    ema_alpha,
    ema_update,
    load_model,
    train,
)

TINY = dict(patch_size=(16, 16, 16), base_filters=2, iterations=4, samples=2, rank=2, bcl_max_samples=64,
            labelled_batch=2, unlabelled_batch=2, projection_channels=4, seed=3)


@pytest.fixture(scope="module")
def tiny_cases(tmp_path_factory) -> tuple[list[Path], list[Path]]:
    """Small labelled / unlabelled HDF5 cases (one smaller than the patch, to exercise padding)."""
    root = tmp_path_factory.mktemp("cases")
    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(24, 20, 18), (20, 22, 16), (12, 20, 17), (22, 18, 20), (20, 20, 20)]):
        x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
        lab = (((x - shape[0] / 2) / 5) ** 2 + ((y - shape[1] / 2) / 4) ** 2 + ((z - shape[2] / 2) / 4) ** 2 <= 1).astype(np.uint8)
        img = (lab * 2.0 + rng.normal(0, 0.5, shape)).astype(np.float32)
        p = root / f"case{i}.h5"
        write_case(p, img, lab if i < 3 else None, {})
        paths.append(p)
    return paths[:3], paths[3:]


def test_ema_update_parameters_only():
    torch.manual_seed(0)
    s, t = build_model(TrainConfig(**TINY)), build_model(TrainConfig(**TINY))
    t_params = [p.clone() for p in t.parameters()]
    t_buffers = [b.clone() for b in t.buffers()]
    for b in s.buffers():
        b.add_(1)
    ema_update(t, s, 0.9)
    for new, old, sp in zip(t.parameters(), t_params, s.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * sp)
    for new, old in zip(t.buffers(), t_buffers):
        assert torch.equal(new, old)
    assert ema_alpha(1, 0.99) == 0.5 and ema_alpha(9, 0.99) == 0.9 and ema_alpha(10_000, 0.99) == 0.99


def test_batches_are_a_function_of_the_iteration(tiny_cases):
    lab, unl = tiny_cases
    a = PatchBatches(lab, unl, (16, 16, 16), 2, 2, seed=5, iterations=10)
    b = PatchBatches(lab, unl, (16, 16, 16), 2, 2, seed=5, iterations=10)
    for t in (0, 7, 3):
        x, y = a[t], b[t]
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert x["image_l"].shape == (2, 1, 16, 16, 16) and x["label_l"].dtype == torch.int64
    assert x["image_u"].shape == (2, 1, 16, 16, 16)
    assert not torch.equal(a[1]["image_l"], a[2]["image_l"])
    assert pad_to(np.ones((12, 20, 17)), (16, 16, 16)).shape == (16, 20, 17)


def test_labelled_case_without_label_is_an_error(tiny_cases):
    lab, unl = tiny_cases
    with pytest.raises(ValueError, match="no label"):
        PatchBatches(unl, [], (16, 16, 16), 2, 0, seed=0, iterations=1)


def test_step_is_finite_on_empty_foreground():
    torch.manual_seed(0)
    cfg = TrainConfig(method="aua_bcl", lambda_c=0.1, **TINY)
    student, teacher = build_model(cfg), build_model(cfg)
    batch = {"image_l": torch.randn(2, 1, 16, 16, 16), "label_l": torch.zeros(2, 16, 16, 16, dtype=torch.long),
             "image_u": torch.randn(2, 1, 16, 16, 16)}
    loss, terms = Stage1Step(cfg, student, teacher)(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and terms["bcl"] == 0.0
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


@pytest.mark.parametrize("which", ["after_dropout", "before_dropout"])
def test_bcl_takes_the_configured_features(which, monkeypatch):
    """BCL projects the features after the last Dropout3d (released code) or before it."""
    import semiseg.training.engine as engine

    cfg = TrainConfig(method="aua_bcl", lambda_c=0.1, dropout=0.5, bcl_features=which, **TINY)
    torch.manual_seed(0)
    student, teacher = build_model(cfg), build_model(cfg)
    seen = {}
    monkeypatch.setattr(engine, "boundary_contrastive_loss",
                        lambda f, *a, **k: seen.setdefault("features", f.detach().clone()).sum() * 0)
    captured = {}
    student.backbone.dec9.register_forward_hook(lambda m, i, o: captured.setdefault("dec9", o.detach().clone()))
    y = torch.zeros(2, 16, 16, 16, dtype=torch.long)
    y[:, 4:12, 4:12, 4:12] = 1
    batch = {"image_l": torch.randn(2, 1, 16, 16, 16), "label_l": y, "image_u": torch.randn(2, 1, 16, 16, 16)}
    Stage1Step(cfg, student, teacher)(batch, 0)
    before = captured["dec9"][:2]  # the labelled crops' decoder output, before the dropout
    assert torch.equal(seen["features"], before) == (which == "before_dropout")
    with pytest.raises(ValueError, match="bcl_features"):
        TrainConfig(method="aua_bcl", bcl_features="projection")


def _weights(path):
    blob = torch.load(path, weights_only=True)
    return blob["student"], blob["teacher"]


def _rows(path):
    with open(path, encoding="utf-8") as fh:
        return [{k: v for k, v in r.items() if k not in ("data_wait_s", "step_s")} for r in csv.DictReader(fh)]


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(tiny_cases, tmp_path):
    lab, unl = tiny_cases
    cfg = TrainConfig(method="aua_bcl", lambda_c=0.1, **{**TINY, "iterations": 6})
    train(cfg, lab, unl, tmp_path / "straight", device="cpu", checkpoint_every=3, progress=False)

    def stop(t):
        if t == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, lab, unl, tmp_path / "resumed", device="cpu", checkpoint_every=3, progress=False, callback=stop)
    assert not (tmp_path / "resumed" / "model.pt").exists()
    train(cfg, lab, unl, tmp_path / "resumed", device="cpu", checkpoint_every=3, progress=False)
    (s1, t1), (s2, t2) = _weights(tmp_path / "straight" / "model.pt"), _weights(tmp_path / "resumed" / "model.pt")
    for a, b in ((s1, s2), (t1, t2)):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(tmp_path / "straight" / "losses.csv") == _rows(tmp_path / "resumed" / "losses.csv")


def test_checkpoint_of_other_settings_is_not_resumed(tiny_cases, tmp_path):
    lab, unl = tiny_cases
    train(TrainConfig(method="supervised", **{**TINY, "iterations": 2}), lab, unl, tmp_path, device="cpu", checkpoint_every=1, progress=False)
    cfg = TrainConfig(method="supervised", **{**TINY, "iterations": 2, "lr": 0.02})
    train(cfg, lab, unl, tmp_path, device="cpu", checkpoint_every=1, progress=False)
    assert [r["lr"] for r in _rows(tmp_path / "losses.csv")] == ["0.02", "0.02"]


def test_checkpoint_of_other_inputs_is_not_resumed(tiny_cases, tmp_path, caplog):
    """Same settings, other training files (a rule rerun because an upstream file changed:
    new pseudo labels, a retrained stage 1, edited cases): the finished run's checkpoint in
    the folder must not stand in for the new run."""
    lab, unl = tiny_cases
    cfg = TrainConfig(method="supervised", **{**TINY, "iterations": 2})
    other = []  # the same cases, one of them with another image under its old name
    for i, case in enumerate(lab):
        other.append(tmp_path / "edited" / case.name)
        other[-1].parent.mkdir(exist_ok=True)
        shutil.copy(case, other[-1])
        if i == 0:
            with h5py.File(other[-1], "r+") as f:
                f["image"][...] = f["image"][...] * 0.5
    train(cfg, lab, unl, tmp_path / "run", device="cpu", checkpoint_every=1, progress=False)
    first = _weights(tmp_path / "run" / "model.pt")[0]
    with caplog.at_level("WARNING", logger="semiseg.training"):
        train(cfg, other, unl, tmp_path / "run", device="cpu", checkpoint_every=1, progress=False)
    assert "trained on other input files" in caplog.text
    train(cfg, other, unl, tmp_path / "fresh", device="cpu", checkpoint_every=1, progress=False)
    rerun, fresh = _weights(tmp_path / "run" / "model.pt")[0], _weights(tmp_path / "fresh" / "model.pt")[0]
    assert _same(rerun, fresh) and not _same(rerun, first)


@pytest.mark.parametrize("method", STAGE1_METHODS)
def test_every_variant_trains_end_to_end(tiny_cases, tmp_path, method):
    lab, unl = tiny_cases
    # bcp: 2 crops a forward pass (a 16^3 crop's bottleneck is 1 voxel) and both phases in 4 iterations
    extra = {"labelled_batch": 4, "unlabelled_batch": 4, "bcp_pretrain_iterations": 2} if method == "bcp" else {}
    cfg = TrainConfig(method=method, lambda_c=0.1 if method == "aua_bcl" else 0.0, **{**TINY, **extra})
    # fully_supervised takes every training case as labelled: here the labelled ones.
    model_path = train(cfg, lab, [] if method == "fully_supervised" else unl, tmp_path, device="cpu", checkpoint_every=2, progress=False)
    rows = _rows(tmp_path / "losses.csv")
    assert len(rows) == cfg.iterations
    expected = {"supervised": {"ce_dice"}, "fully_supervised": {"ce_dice"},
                "aua": {"sup_nll", "sup_dice", "consistency", "lambda_g"},
                "aua_bcl": {"sup_nll", "sup_dice", "consistency", "lambda_g", "bcl", "lambda_c"},
                "mt": {"ce_dice", "consistency", "consistency_weight"},
                "uamt": {"ce_dice", "consistency", "consistency_weight", "uncertainty_threshold", "mask_fraction"},
                "bcp": {"bcp_phase", "ce", "dice", "loss_l", "loss_u", "pseudo_foreground"}}[method]
    assert expected | {"iteration", "lr", "loss"} <= set(rows[0])
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    net = load_model(model_path, "student")
    assert net(torch.randn(2, 1, 16, 16, 16)).logits.shape == (2, 2, 16, 16, 16)
    if cfg.has_teacher:
        load_model(model_path, "teacher")
    else:
        with pytest.raises(ValueError, match="no teacher"):
            load_model(model_path, "teacher")


def test_load_model_is_strict(tiny_cases, tmp_path):
    lab, unl = tiny_cases
    path = train(TrainConfig(method="supervised", **{**TINY, "iterations": 1}), lab, unl, tmp_path, device="cpu", progress=False)
    blob = torch.load(path, weights_only=True)
    blob["student"].pop(next(iter(blob["student"])))
    torch.save(blob, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        load_model(tmp_path / "broken.pt")


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_snapshots(tiny_cases, tmp_path):
    """A requested snapshot is the model (student and teacher) after that many iterations, in
    model.pt's format, and leaves the final model as it was; it is also written when a run
    resumes exactly at its iteration, and a checkpoint past it is not resumed from (the run
    starts over). Every way gives the same weights."""
    lab, unl = tiny_cases
    cfg = TrainConfig(method="aua", **{**TINY, "iterations": 3})
    kw = dict(device="cpu", progress=False, checkpoint_every=1)
    ref = tmp_path / "ref"
    path = train(cfg, lab, unl, ref, snapshots={2: ref / "model_iter2.pt"}, **kw)
    snap = torch.load(ref / "model_iter2.pt", weights_only=True)
    assert snap["format"] == "semiseg-model-2" and snap["iterations"] == 2
    assert snap["config"] == torch.load(path, weights_only=True)["config"]
    assert not _same(snap["student"], _weights(path)[0])  # not the final weights
    load_model(ref / "model_iter2.pt", "teacher")

    def stop(t):
        if t == 1:  # after the second iteration
            raise Interrupt

    at = tmp_path / "at"  # stopped at iteration 2 (checkpoint there), resumed asking for the snapshot at 2
    with pytest.raises(Interrupt):
        train(cfg, lab, unl, at, callback=stop, **kw)
    ckpt = torch.load(at / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 2 and _same(snap["student"], ckpt["student"]) and _same(snap["teacher"], ckpt["teacher"])
    train(cfg, lab, unl, at, snapshots={2: at / "model_iter2.pt"}, **kw)
    past = tmp_path / "past"  # a finished run without snapshots (checkpoint at 3), then asked for one at 2
    train(cfg, lab, unl, past, **kw)
    assert _same(_weights(past / "model.pt")[0], _weights(path)[0])  # a snapshot does not change the run
    train(cfg, lab, unl, past, snapshots={2: past / "model_iter2.pt"}, **kw)
    for d in (at, past):
        again = torch.load(d / "model_iter2.pt", weights_only=True)
        assert _same(again["student"], snap["student"]) and _same(again["teacher"], snap["teacher"])
        assert all(_same(a, b) for a, b in zip(_weights(d / "model.pt"), _weights(path)))
        assert _rows(d / "losses.csv") == _rows(ref / "losses.csv")
    with pytest.raises(ValueError, match=r"outside this run's 1\.\.3"):
        train(cfg, lab, unl, tmp_path / "bad", snapshots={4: tmp_path / "x.pt"}, **kw)
