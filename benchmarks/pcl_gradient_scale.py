"""How much does PCL move a stage-2 network? Its gradient against the supervised term's.

Stage 2 (Eq. 15) is ``sup + lambda_r * PCL``. With the method's settings (features, prototype
means and variances L2-normalised, tau_2 = 100, lambda_r = 0.1) every PCL logit
``f.mu_c / tau + f^T Sigma_c f / (2 tau^2)`` lies within about +-0.01 of 0, so PCL stays
within about 0.01 of ln C whatever the features are. This script measures what that means
for training: on real stage-2 batches it computes, with the engine's own stage-2 step
(:class:`semiseg.training.engine.Stage2Step`), the parameter gradient of the full loss and
of the same loss with lambda_r = 0 (same batch, same dropout masks), and reports

- PCL's value and its distance to ln C,
- the spread of the PCL logits over the anchors,
- ``|g_full - g_pl| / |g_pl|``: the gradient PCL adds, relative to the supervised gradient
  (L2 norms over all parameters; the cosine between the two gradients too),
- the same for ``--tau`` values other than the paper's, to show the scale is tau's.

Networks: a fresh stage-2 V-Net (iteration 0) with the stage-1 prototypes it starts from and,
if given, trained stage-2 model files with the prototypes they end with (PCL's running update
is saved in ``model.pt``).
Inputs are the files ``benchmarks/la_short_budget.py`` writes (cases, pseudo labels and
prototypes of its ``aua_bcl`` model):

    python benchmarks/pcl_gradient_scale.py --workdir /tmp/semiseg_la_short --tag it1000_w8_s1337 \
        [--models <workdir>/<tag>/s2_full_from_aua_bcl/model.pt] [--tau 100 1 0.1]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from semiseg.prototypes import PrototypeStatistics
from semiseg.training.data import PatchBatches
from semiseg.training.engine import TrainConfig, build_model, load_model, make_step, pcl_prototypes, read_torch_file

REPO = Path(__file__).resolve().parents[1]


def gradient(cfg: TrainConfig, net: torch.nn.Module, stats: PrototypeStatistics, batch: dict, seed: int):
    """(flattened parameter gradient, logged terms) of one stage-2 step, dropout masks fixed by ``seed``."""
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, terms = make_step(cfg, net, None, stats)(batch, 0)
    loss.backward()
    g = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])
    return g.detach().clone(), terms


def pcl_logit_spread(net: torch.nn.Module, stats: PrototypeStatistics, batch: dict, tau: float) -> float:
    """Largest minus smallest PCL logit over the batch's foreground anchors and the classes."""
    with torch.no_grad():
        x = torch.cat([batch["image_l"], batch["image_u"]])
        y = torch.cat([batch["label_l"], batch["label_u"]]).reshape(-1)
        dec = net(x).decoder_features
        f = torch.nn.functional.normalize(dec.float().movedim(1, -1).reshape(-1, dec.shape[1])[y > 0], dim=1)
        mu, cov = pcl_prototypes(stats, True)
        logits = f @ mu.T / tau + torch.einsum("nf,cfg,ng->nc", f, cov, f) / (2 * tau**2)
        return float(logits.max() - logits.min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--la", default=str(REPO.parent / "shared" / "data" / "la2018_h5"))
    ap.add_argument("--workdir", default="/tmp/semiseg_la_short")
    ap.add_argument("--tag", default="it1000_w8_s1337")
    ap.add_argument("--labelled", type=int, default=8)
    ap.add_argument("--holdout", type=int, default=16)
    ap.add_argument("--models", nargs="*", default=[], help="trained stage-2 model files to measure as well")
    ap.add_argument("--tau", type=float, nargs="+", default=[100.0, 1.0, 0.1])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--lambda-r", type=float, default=0.1)
    a = ap.parse_args()
    work = Path(a.workdir)
    train_ids = (Path(a.la) / "train.list").read_text(encoding="utf-8").split()
    cases = [work / "cases" / f"{c}.h5" for c in train_ids]
    labelled, unlabelled = cases[: a.labelled], cases[a.labelled: len(cases) - a.holdout]
    between = work / a.tag / "between_aua_bcl" / "pseudo_student"
    pseudo = [between / f"{c.stem}.h5" for c in unlabelled]
    proto_file = between / "prototypes.pt"
    base = TrainConfig(method="full", patch_size=(64, 64, 48), base_filters=8, lambda_r=a.lambda_r,
                       prototype_update=False, amp=False)
    data = PatchBatches(labelled, unlabelled, base.patch_size, 2, 2, seed=7, iterations=a.batches, pseudo=pseudo)
    torch.manual_seed(0)
    start = PrototypeStatistics.load(proto_file)
    nets = {"fresh (iteration 0)": (build_model(dataclasses.replace(base, method="aua_bcl_pl", lambda_r=0.0)), start)}
    for m in a.models:
        end = read_torch_file(m, "cpu", "model").get("prototypes")
        stats = start
        if end is not None:
            stats = PrototypeStatistics(start.num_classes, start.feature_dim)
            stats.load_state_dict(end)
        nets[m] = (load_model(m, "student"), stats)
    ln_c = math.log(base.num_classes)
    print("| network | tau_2 | PCL (ln C = %.4f) | PCL logit spread | abs(g_PCL) / abs(g_sup) | cos(g_PCL, g_sup) |" % ln_c)
    print("|---|---|---|---|---|---|")
    for label, (net, proto) in nets.items():
        net.train()
        for tau in a.tau:
            cfg_full = dataclasses.replace(base, pcl_tau=tau)
            cfg_pl = dataclasses.replace(base, method="aua_bcl_pl", lambda_r=0.0)
            ratios, cosines, pcls, spreads = [], [], [], []
            for t in range(a.batches):
                batch = data[t]
                stats = PrototypeStatistics(proto.num_classes, proto.feature_dim)
                stats.load_state_dict(proto.state_dict())  # a fresh copy: no update leaks between calls
                g_full, terms = gradient(cfg_full, net, stats, batch, seed=t)
                g_pl, _ = gradient(cfg_pl, net, stats, batch, seed=t)
                g_pcl = g_full - g_pl
                ratios.append(float(g_pcl.norm() / g_pl.norm()))
                cosines.append(float(torch.nn.functional.cosine_similarity(g_pcl, g_pl, dim=0)))
                pcls.append(terms["pcl"] / 2)  # authors' loss: the sum of two groups' PCL
                spreads.append(pcl_logit_spread(net, stats, batch, tau))
            print(f"| {Path(label).parent.name or label} | {tau:g} | {np.mean(pcls):.4f} | {np.mean(spreads):.4f} "
                  f"| {np.mean(ratios):.2e} | {np.mean(cosines):+.3f} |", flush=True)


if __name__ == "__main__":
    main()
