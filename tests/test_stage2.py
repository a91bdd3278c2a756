"""Between the stages and stage 2: pseudo-label artifacts, prototypes, PCL training, resume."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semiseg.prototypes import PrototypeStatistics
from semiseg.pseudo import (
    accumulate_features,
    estimate_prototypes,
    overlap_scores,
    pseudo_label_is_current,
    pseudo_label_quality,
    write_pseudo_label,
)
from semiseg.training import engine
from semiseg.training.engine import Stage2Step, TrainConfig, build_model, load_model, train
from tests.test_training import TINY, tiny_cases  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def stage1(tiny_cases, tmp_path_factory):  # noqa: F811
    lab, unl = tiny_cases
    out = tmp_path_factory.mktemp("stage1")
    cfg = TrainConfig(method="aua_bcl", lambda_c=0.1, **{**TINY, "iterations": 3})
    return train(cfg, lab, unl, out, device="cpu", progress=False)


@pytest.fixture(scope="module")
def artifacts(tiny_cases, stage1, tmp_path_factory):  # noqa: F811
    lab, unl = tiny_cases
    out = tmp_path_factory.mktemp("pseudo")
    pseudo = []
    for case in unl:
        p = out / f"{case.stem}.h5"
        write_pseudo_label(case, stage1, p, (16, 16, 16), (8, 8, 8), device="cpu")
        pseudo.append(p)
    stats = estimate_prototypes(stage1, lab, unl, pseudo, (16, 16, 16), device="cpu")
    stats.save(out / "prototypes.npz")
    return pseudo, out / "prototypes.npz"


def test_pseudo_label_artifact(tiny_cases, stage1, artifacts, tmp_path):  # noqa: F811
    _, unl = tiny_cases
    pseudo, _ = artifacts
    with h5py.File(pseudo[0], "r") as f, h5py.File(unl[0], "r") as c:
        assert f["label"].shape == c["image"].shape and f["label"].dtype == np.uint8
        prob = f["probability"][...]
        assert prob.dtype == np.float32 and prob.min() >= 0 and prob.max() <= 1
        assert np.mean(f["label"][...] == (prob > 0.5)) > 0.999  # hard label = argmax (ties aside)
        assert len(f.attrs["model_sha256"]) == 64 and f.attrs["weights"] == "student"
    assert pseudo_label_is_current(pseudo[0], stage1)
    # Same model, same prediction (round trip is deterministic).
    again = tmp_path / "again.h5"
    write_pseudo_label(unl[0], stage1, again, (16, 16, 16), (8, 8, 8), device="cpu")
    with h5py.File(pseudo[0], "r") as a, h5py.File(again, "r") as b:
        assert np.array_equal(a["label"][...], b["label"][...])
    # between_stages.pseudo_label_filter: largest_component: the argmax through the filter.
    from semiseg.postprocessing import filter_label

    filtered = tmp_path / "lcc.h5"
    summary = write_pseudo_label(unl[0], stage1, filtered, (16, 16, 16), (8, 8, 8), device="cpu", label_filter="largest_component")
    with h5py.File(pseudo[0], "r") as a, h5py.File(filtered, "r") as b:
        assert np.array_equal(b["label"][...], filter_label(a["label"][...], "largest_component", 2))
        assert np.array_equal(a["probability"][...], b["probability"][...]) and b.attrs["label_filter"] == "largest_component"
        assert summary["filtered_voxels"] == int(np.count_nonzero(a["label"][...]) - np.count_nonzero(b["label"][...]))
    # A changed model invalidates it.
    blob = torch.load(stage1, weights_only=True)
    first = next(iter(blob["student"]))
    blob["student"][first] = blob["student"][first] + 1
    changed = tmp_path / "changed.pt"
    torch.save(blob, changed)
    assert not pseudo_label_is_current(pseudo[0], changed)


def test_pseudo_label_quality_table(tiny_cases, stage1, artifacts, tmp_path):  # noqa: F811
    lab, unl = tiny_cases
    pseudo, _ = artifacts
    table = pseudo_label_quality(pseudo, unl, tmp_path / "q.csv")
    assert list(table["case"]) == [p.stem for p in unl] + ["mean"]
    assert table["dice"].isna().all()  # these "unlabelled" cases have no ground truth
    # Cases with ground truth are scored: Dice of the pseudo label against it.
    scored = []
    for case in lab[:2]:
        p = tmp_path / f"{case.stem}.h5"
        write_pseudo_label(case, stage1, p, (16, 16, 16), (8, 8, 8), device="cpu")
        scored.append(p)
    table = pseudo_label_quality(scored, lab[:2], tmp_path / "q2.csv")
    for p, c, d in zip(scored, lab[:2], table["dice"][:2]):
        with h5py.File(p, "r") as fp, h5py.File(c, "r") as fc:
            a, b = fp["label"][...] > 0, fc["label"][...] > 0
        assert np.isclose(d, 2 * (a & b).sum() / (a.sum() + b.sum()))
    assert np.isclose(table["dice"].iloc[-1], table["dice"][:2].mean())
    rows = list(csv.DictReader(open(tmp_path / "q2.csv", encoding="utf-8")))
    assert rows[-1]["case"] == "mean" and float(rows[-1]["dice"]) == pytest.approx(table["dice"].iloc[-1])
    assert list(rows[0]) == ["case", "dice", "precision", "recall", "volume_ratio"]
    for p, c, row in zip(scored, lab[:2], rows, strict=False):
        with h5py.File(p, "r") as fp, h5py.File(c, "r") as fc:
            a, b = fp["label"][...] > 0, fc["label"][...] > 0
        assert float(row["volume_ratio"]) == pytest.approx(a.sum() / b.sum())
        if a.any():
            assert float(row["precision"]) == pytest.approx((a & b).sum() / a.sum())
        assert float(row["recall"]) == pytest.approx((a & b).sum() / b.sum())


def test_pseudo_label_quality_pairs_by_case_name(tiny_cases, artifacts, tmp_path):  # noqa: F811
    # Files listed in different orders (a sorted glob against a split's list) must not be
    # scored against each other's ground truth.
    lab, unl = tiny_cases
    pseudo, _ = artifacts
    with pytest.raises(ValueError, match=rf"case {unl[0].stem}: .*belongs to case {unl[1].stem}"):
        pseudo_label_quality([pseudo[1], pseudo[0], *pseudo[2:]], unl, tmp_path / "q.csv")
    with pytest.raises(ValueError, match="pseudo-label files for"):
        pseudo_label_quality(pseudo[:1], unl[:2])
    assert not (tmp_path / "q.csv").exists()


def test_overlap_scores_by_hand():
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[:2] = 1  # 32 voxels
    pred = np.zeros_like(ref)
    pred[1:4] = 1  # 48 voxels, 16 of them in ref: an over-segmentation
    s = overlap_scores(pred, ref)
    assert s["dice"] == pytest.approx(2 * 16 / 80)
    assert s["precision"] == pytest.approx(16 / 48) and s["recall"] == pytest.approx(16 / 32)
    assert s["volume_ratio"] == pytest.approx(1.5)
    # Labels > 1 are foreground too; empty masks give NaN where a score is undefined.
    assert overlap_scores(pred * 2, ref)["volume_ratio"] == pytest.approx(1.5)
    empty = overlap_scores(np.zeros_like(ref), ref)
    assert empty["dice"] == 0.0 and np.isnan(empty["precision"]) and empty["recall"] == 0.0 and empty["volume_ratio"] == 0.0
    no_ref = overlap_scores(pred, np.zeros_like(ref))
    assert no_ref["precision"] == 0.0 and np.isnan(no_ref["recall"]) and np.isnan(no_ref["volume_ratio"])
    assert overlap_scores(np.zeros_like(ref), np.zeros_like(ref))["dice"] == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        overlap_scores(pred, ref[:3])


def test_prototypes_count_every_voxel_once(tiny_cases, stage1):  # noqa: F811
    lab, _ = tiny_cases
    model = load_model(stage1)
    with h5py.File(lab[0], "r") as f:
        image, label = f["image"][...], f["label"][...]
    stats = PrototypeStatistics(2, model.config["base_filters"])
    accumulate_features(stats, model, image, label, (16, 16, 16), torch.device("cpu"))
    assert stats.count.tolist() == [float((label == 0).sum()), float((label == 1).sum())]
    small = PrototypeStatistics(2, model.config["base_filters"])
    accumulate_features(small, model, image[:10, :9, :8], label[:10, :9, :8], (16, 16, 16), torch.device("cpu"))
    assert small.count.sum() == 10 * 9 * 8  # padding not counted
    assert torch.all(stats.mean.norm(dim=1) <= 1 + 1e-6)  # means of unit-norm features
    assert torch.isfinite(stats.cov).all()


@pytest.mark.parametrize("method", ["aua_bcl_pl", "full"])
def test_stage2_trains(tiny_cases, artifacts, tmp_path, method):  # noqa: F811
    lab, unl = tiny_cases
    pseudo, protos = artifacts
    cfg = TrainConfig(method=method, lambda_r=0.1 if method == "full" else 0.0, **TINY)
    path = train(cfg, lab, unl, tmp_path, device="cpu", progress=False, pseudo=pseudo,
                 prototypes=protos if method == "full" else None, checkpoint_every=2)
    blob = torch.load(path, weights_only=True)
    assert blob["stage"] == 2 and blob["teacher"] is None
    rows = list(csv.DictReader(open(tmp_path / "losses.csv", encoding="utf-8")))
    assert len(rows) == cfg.iterations and all(np.isfinite(float(r["loss"])) for r in rows)
    assert {"ce_dice", "ce_dice_labelled", "ce_dice_pseudo"} <= set(rows[0])  # both groups' terms
    if method == "full":
        assert {"pcl", "pcl_labelled", "pcl_pseudo", "anchors_labelled", "anchors_pseudo", "lambda_r"} <= set(rows[0])
        start = PrototypeStatistics.load(protos)
        assert torch.all(blob["prototypes"]["count"] > start.count)  # updated in stage 2
    else:
        assert "pcl" not in rows[0] and blob["prototypes"] is None


def test_stage2_resume_equals_uninterrupted(tiny_cases, artifacts, tmp_path):  # noqa: F811
    lab, unl = tiny_cases
    pseudo, protos = artifacts
    cfg = TrainConfig(method="full", lambda_r=0.1, **{**TINY, "iterations": 4})
    kw = dict(device="cpu", progress=False, pseudo=pseudo, prototypes=protos, checkpoint_every=2)
    train(cfg, lab, unl, tmp_path / "a", **kw)

    def stop(t):
        if t == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, lab, unl, tmp_path / "b", callback=stop, **kw)
    train(cfg, lab, unl, tmp_path / "b", **kw)
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    assert all(torch.equal(a["prototypes"][k], b["prototypes"][k]) for k in a["prototypes"])


def test_stage2_needs_its_artifacts(tiny_cases, tmp_path):  # noqa: F811
    lab, unl = tiny_cases
    with pytest.raises(ValueError, match="pseudo-label file per unlabelled case"):
        train(TrainConfig(method="aua_bcl_pl", **TINY), lab, unl, tmp_path, device="cpu", progress=False)
    with pytest.raises(ValueError, match="prototype file"):
        train(TrainConfig(method="full", lambda_r=0.1, **TINY), lab, unl, tmp_path, device="cpu", progress=False, pseudo=unl)


def test_projection_layer_prototypes(tiny_cases, stage1, artifacts):  # noqa: F811
    lab, unl = tiny_cases
    pseudo, _ = artifacts
    stats = estimate_prototypes(stage1, lab[:1], [], [], (16, 16, 16), device="cpu", layer="projection")
    assert stats.feature_dim == TINY["projection_channels"]
    with pytest.raises(ValueError, match="feature layer"):
        estimate_prototypes(stage1, lab[:1], [], [], (16, 16, 16), device="cpu", layer="bottleneck")


def test_stage2_initialised_from_stage1(tiny_cases, stage1, artifacts, tmp_path):  # noqa: F811
    from semiseg.training.engine import build_model, init_from_stage1

    lab, unl = tiny_cases
    cfg = TrainConfig(method="aua_bcl_pl", stage2_init="stage1", **{**TINY, "iterations": 1})
    net = build_model(cfg)
    init_from_stage1(net, stage1)
    src = load_model(stage1)
    assert all(torch.equal(a, b) for a, b in zip(net.backbone.state_dict().values(), src.backbone.state_dict().values()))
    x = torch.randn(2, 1, 16, 16, 16)
    net.eval(), src.eval()
    assert torch.allclose(net(x).logits, src(x, heads=False).logits, atol=1e-6)
    with pytest.raises(ValueError, match="init_from"):
        train(cfg, lab, unl, tmp_path, device="cpu", progress=False, pseudo=artifacts[0])
    train(cfg, lab, unl, tmp_path, device="cpu", progress=False, pseudo=artifacts[0], init_from=stage1)


def test_prototype_dimension_must_fit_stage2(tiny_cases, artifacts, tmp_path):  # noqa: F811
    lab, unl = tiny_cases
    pseudo, protos = artifacts
    cfg = TrainConfig(method="full", lambda_r=0.1, **{**TINY, "base_filters": 4})
    with pytest.raises(ValueError, match="do not fit"):
        train(cfg, lab, unl, tmp_path, device="cpu", progress=False, pseudo=pseudo, prototypes=protos)


def stage2_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two labelled and two pseudo-labelled 16^3 crops; the last pseudo label is empty."""
    g = torch.Generator().manual_seed(seed)
    x, y, z = torch.meshgrid(*(torch.arange(16),) * 3, indexing="ij")
    ball = (((x - 8) ** 2 + (y - 7) ** 2 + (z - 8) ** 2) <= 16).long()
    label_l = torch.stack([ball, torch.roll(ball, 3, 0)])
    label_u = torch.stack([torch.roll(ball, -2, 1), torch.zeros_like(ball)])

    def image(lab):
        return (2.0 * lab + torch.randn(lab.shape, generator=g))[:, None]

    return {"image_l": image(label_l), "label_l": label_l, "image_u": image(label_u), "label_u": label_u}


def some_prototypes(dim: int, seed: int = 0) -> PrototypeStatistics:
    g = torch.Generator().manual_seed(seed)
    stats = PrototypeStatistics(2, dim)
    stats.update(F.normalize(torch.rand(200, dim, generator=g), dim=1), torch.arange(200) % 2)
    return stats


def test_pcl_anchors_and_prototype_update_use_the_features_before_dropout(monkeypatch):
    """In training mode (dropout on) PCL's anchors and the prototype update take the last
    decoder block's output before the last Dropout3d, the kind of feature the prototypes
    were estimated from (eval mode, no dropout), not the dropped-out features the head sees."""
    torch.manual_seed(0)
    cfg = TrainConfig(method="full", lambda_r=0.1, **{**TINY, "base_filters": 4, "dropout": 0.5})
    student = build_model(cfg).train()
    stats = some_prototypes(4)
    decoded, head_input, anchors, updates = [], [], [], []
    student.backbone.dec9.register_forward_hook(lambda m, args, out: decoded.append(out.detach().clone()))
    student.seg_head.register_forward_hook(lambda m, args, out: head_input.append(args[0].detach().clone()))
    pcl = engine.prototype_contrastive_loss
    monkeypatch.setattr(engine, "prototype_contrastive_loss", lambda f, *a, **k: anchors.append(f.detach()) or pcl(f, *a, **k))
    update = stats.update
    monkeypatch.setattr(stats, "update", lambda f, y: updates.append(f.detach()) or update(f, y))
    batch = stage2_batch()
    Stage2Step(cfg, student, stats)(batch, 0)

    y = torch.cat([batch["label_l"], batch["label_u"]])
    dec = decoded[-1].movedim(1, -1)  # (B, X, Y, Z, F), before the last dropout
    assert torch.allclose(torch.cat(anchors), F.normalize(dec[y > 0], dim=1), atol=1e-6)
    assert len(updates) == 1 and torch.allclose(updates[0], F.normalize(dec[:2].reshape(-1, 4), dim=1), atol=1e-6)
    dropped_out = head_input[-1].movedim(1, -1)
    assert not torch.allclose(torch.cat(anchors), F.normalize(dropped_out[y > 0], dim=1), atol=1e-3)


def hand_ce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 * (cross-entropy + soft Dice of the foreground over the given crops), two classes, written out."""
    logp = torch.log_softmax(logits.double(), 1)
    ce = -logp.gather(1, target[:, None]).mean()
    p1, t1 = logp.exp()[:, 1], (target == 1).double()
    dice = 1 - (2 * (p1 * t1).sum() + 1e-5) / ((p1 * p1).sum() + t1.sum() + 1e-5)
    return 0.5 * (ce + dice)


def hand_pcl(features: torch.Tensor, labels: torch.Tensor, stats: PrototypeStatistics, tau: float) -> torch.Tensor:
    """Mean over foreground anchors of -f.mu_y / tau + log sum_c exp(f.mu_c / tau + sum_k f_k^2 var_ck / (2 tau^2)),
    features, means and variance vectors L2-normalised; features (B, F, X, Y, Z), labels (B, X, Y, Z)."""
    f = F.normalize(features.double().movedim(1, -1)[labels > 0], dim=1)
    y = labels[labels > 0]
    if len(y) == 0:
        return torch.zeros((), dtype=torch.float64)
    mu = F.normalize(stats.mean, dim=1)
    var = F.normalize(torch.diagonal(stats.cov, dim1=1, dim2=2), dim=1)
    logits = f @ mu.T / tau + (f * f) @ var.T / (2 * tau**2)
    return (torch.logsumexp(logits, 1) - (f @ mu.T / tau).gather(1, y[:, None]).squeeze(1)).mean()


def run_step(stage2_loss: str, batch: dict[str, torch.Tensor], lambda_r: float = 0.1):
    """One Stage2Step of an eval-mode student (dropout off, so forward passes repeat exactly)."""
    torch.manual_seed(0)
    method = "full" if lambda_r else "aua_bcl_pl"
    cfg = TrainConfig(method=method, lambda_r=lambda_r, stage2_loss=stage2_loss, prototype_update=False,
                      **{**TINY, "base_filters": 4})
    student = build_model(cfg).eval()
    stats = some_prototypes(4)
    loss, terms = Stage2Step(cfg, student, stats if lambda_r else None)(batch, 0)
    with torch.no_grad():
        out = student(torch.cat([batch["image_l"], batch["image_u"]]))
    return loss, terms, out, stats


@pytest.mark.parametrize("empty_pseudo", [False, True])
def test_authors_stage2_loss_is_the_sum_over_both_groups(empty_pseudo):
    """authors: 0.5 (CE + Dice) of the labelled crops + the same of the pseudo-labelled crops
    + 0.1 (PCL of the labelled anchors + PCL of the pseudo-labelled anchors), each written out."""
    batch = stage2_batch()
    if empty_pseudo:  # no pseudo-labelled foreground at all: that group's PCL is 0
        batch["label_u"] = torch.zeros_like(batch["label_u"])
    loss, terms, out, stats = run_step("authors", batch)
    logits, dec = out.logits, out.decoder_features
    yl, yu = batch["label_l"], batch["label_u"]
    sup_l, sup_u = hand_ce_dice(logits[:2], yl), hand_ce_dice(logits[2:], yu)
    pcl_l, pcl_u = hand_pcl(dec[:2], yl, stats, 100.0), hand_pcl(dec[2:], yu, stats, 100.0)
    expected = sup_l + sup_u + 0.1 * (pcl_l + pcl_u)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and terms["loss"] == pytest.approx(loss.item())
    for name, value in (("ce_dice_labelled", sup_l), ("ce_dice_pseudo", sup_u), ("ce_dice", sup_l + sup_u),
                        ("pcl_labelled", pcl_l), ("pcl_pseudo", pcl_u), ("pcl", pcl_l + pcl_u)):
        assert terms[name] == pytest.approx(value.item(), rel=1e-5, abs=1e-7), name
    assert terms["anchors_labelled"] == int((yl > 0).sum()) and terms["anchors_pseudo"] == int((yu > 0).sum())
    assert (terms["pcl_pseudo"] == 0) == empty_pseudo and np.isfinite(terms["loss"])
    loss.backward()


def test_pooled_stage2_loss_reproduces_the_previous_one():
    """pooled: one 0.5 (CE + Dice) over the four crops + 0.1 PCL over all their anchors (the
    loss before the authors' grouping became the default); about half the authors' supervised term."""
    from semiseg.losses import ce_dice_loss, prototype_contrastive_loss
    from semiseg.training.engine import pcl_prototypes

    batch = stage2_batch()
    loss, terms, out, stats = run_step("pooled", batch)
    y = torch.cat([batch["label_l"], batch["label_u"]])
    f = out.decoder_features.movedim(1, -1)[y > 0]
    means, covs = pcl_prototypes(stats, True)
    old = ce_dice_loss(out.logits, y) + 0.1 * prototype_contrastive_loss(F.normalize(f, dim=1), y[y > 0], means, covs, 100.0)
    assert loss.item() == pytest.approx(old.item(), rel=1e-5)
    assert terms["pcl"] == pytest.approx(hand_pcl(out.decoder_features, y, stats, 100.0).item(), rel=1e-5)
    _, authors, _, _ = run_step("authors", batch)
    for name in ("ce_dice_labelled", "ce_dice_pseudo", "pcl_labelled", "pcl_pseudo"):  # the same groups, logged alike
        assert terms[name] == pytest.approx(authors[name], rel=1e-6)
    assert 1.7 < authors["ce_dice"] / terms["ce_dice"] < 2.3
    # Without PCL (aua_bcl_pl) likewise.
    loss_pl, _, out_pl, _ = run_step("pooled", batch, lambda_r=0.0)
    assert loss_pl.item() == pytest.approx(ce_dice_loss(out_pl.logits, y).item(), rel=1e-6)
    loss_pl, _, out_pl, _ = run_step("authors", batch, lambda_r=0.0)
    assert loss_pl.item() == pytest.approx((hand_ce_dice(out_pl.logits[:2], y[:2]) + hand_ce_dice(out_pl.logits[2:], y[2:])).item(), rel=1e-5)


def test_stage2_loss_setting_is_checked():
    with pytest.raises(ValueError, match="stage2_loss"):
        TrainConfig(method="full", lambda_r=0.1, stage2_loss="mean")


def test_between_stages_model_follows_stage1_iteration():
    """between_stages.stage1_iteration picks the stage-1 file the pseudo-label and prototype
    rules read: null the final model, n the snapshot after n iterations; beyond the run it
    is a config error naming the key."""
    from semiseg.errors import ConfigError
    from semiseg.jobs import between_stages_model, check_stage1_iteration, stage1_snapshot_name

    run = "results/models/demo_5pct/stage1_aua_bcl"
    assert between_stages_model(run, None, 250, "demo") == f"{run}/model.pt"
    assert between_stages_model(run + "/", 125, 250, "demo") == f"{run}/model_iter125.pt" == f"{run}/{stage1_snapshot_name(125)}"
    assert between_stages_model(run, 250, 250, "demo") == f"{run}/model_iter250.pt"
    assert check_stage1_iteration(3000, 6000, "pancreas") == 3000 and check_stage1_iteration(None, 1, "demo") is None
    for bad in (3000, 0, True, 2.5):
        with pytest.raises(ConfigError, match=r"between_stages\.stage1_iteration: .*data set 'demo'.* 250 iterations"):
            between_stages_model(run, bad, 250, "demo")
