"""V-Net and its heads: size, shapes, antithetic reparameterised sampling, unit-norm projections."""

import pytest
import torch
from torch.distributions import LowRankMultivariateNormal

from semiseg.networks import SegmentationNet, VNet


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_vnet_size_matches_ua_mt_layout():
    plain = SegmentationNet(num_classes=2, base_filters=16, aleatoric=False, projection=False)
    assert abs(n_params(plain) - 9.45e6) < 0.01e6
    assert n_params(VNet(base_filters=8)) < n_params(VNet(base_filters=16)) / 3


def test_shapes_and_input_check():
    net = SegmentationNet(base_filters=4, num_classes=3, rank=2)
    out = net(torch.randn(2, 1, 32, 16, 48))
    assert out.logits.shape == (2, 3, 32, 16, 48) and out.features.shape == (2, 4, 32, 16, 48)
    assert out.cov_factor.shape == (2, 3 * 2, 32, 16, 48) and out.cov_diag.shape == (2, 3, 32, 16, 48)
    assert torch.all(out.cov_diag > 0)
    proj = net.project(out.features)
    assert proj.shape == (2, 16, 32, 16, 48)
    assert torch.allclose(proj.norm(dim=1), torch.ones(2, 32, 16, 48), atol=1e-5)
    z = net.projection.net(out.features)
    assert torch.allclose(proj, torch.nn.functional.normalize(z, dim=1), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 1, 32, 16, 20))
    plain = SegmentationNet(base_filters=4, aleatoric=False, projection=False)
    o = plain(torch.randn(2, 1, 16, 16, 16))
    assert o.cov_factor is None
    with pytest.raises(ValueError, match="no projection"):
        plain.project(o.features)


def test_decoder_features_are_taken_before_the_last_dropout():
    """``decoder_features`` is the last decoder block's output; ``features`` the same after the
    last Dropout3d (whole channels zeroed, the rest scaled by 1 / (1 - p)) in training, and
    equal to it in eval mode."""
    torch.manual_seed(0)
    net = SegmentationNet(base_filters=4, dropout=0.5, aleatoric=False, projection=False).train()
    seen = []
    net.backbone.dec9.register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    x = torch.randn(2, 1, 16, 16, 16)
    out = net(x)
    assert torch.equal(out.decoder_features, seen[-1])
    dropped = out.features.flatten(2).abs().amax(-1) == 0  # (B, w) channels zeroed by the dropout
    assert dropped.any() and not dropped.all()
    kept = (~dropped)[..., None, None, None].float()
    assert torch.allclose(out.features, 2 * out.decoder_features * kept)
    assert torch.allclose(out.logits, net.seg_head(out.features))  # the head sees the dropped-out features
    net.eval()
    with torch.no_grad():
        ev = net(x)
    assert torch.equal(ev.features, ev.decoder_features)


def test_antithetic_samples():
    torch.manual_seed(0)
    net = SegmentationNet(base_filters=4, rank=3)
    out = net(torch.randn(2, 1, 16, 16, 16))
    s = net.sample_logits(out, 6)
    assert s.shape == (6, 2, 2, 16, 16, 16)
    # Pairs (k, k + S/2) mirror about the mean.
    assert torch.allclose((s[:3] + s[3:]) / 2, out.logits.float().expand(3, -1, -1, -1, -1, -1), atol=1e-5)
    assert not torch.allclose(s[0], s[1])
    with pytest.raises(ValueError, match="even"):
        net.sample_logits(out, 3)


def test_samples_follow_the_low_rank_distribution():
    """The sampler draws exactly what LowRankMultivariateNormal.rsample draws (same RNG order)."""
    torch.manual_seed(1)
    net = SegmentationNet(base_filters=4, rank=2).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 16, 16, 16))
        dist = net.aleatoric.distribution(out.logits, out.cov_factor, out.cov_diag)
        assert isinstance(dist, LowRankMultivariateNormal)
        assert dist.event_shape == (2 * 16**3,) and torch.equal(dist.loc, out.logits.reshape(1, -1))
        torch.manual_seed(7)
        ref = dist.rsample((2,))
        torch.manual_seed(7)
        ours = net.sample_logits(out, 4)[:2]
    assert torch.allclose(ours.reshape(2, 1, -1), ref, atol=1e-5)
    # The covariance the factors describe: W W^T + D (checked on a few entries).
    w = dist.cov_factor[0]
    v = torch.tensor([0, 5, 4096 + 5])
    cov = w[v] @ w[v].T + torch.diag(dist.cov_diag[0][v])
    assert torch.allclose(dist.covariance_matrix[0][v][:, v], cov, atol=1e-5)


def test_sampling_is_reparameterised():
    net = SegmentationNet(base_filters=4, rank=2)
    out = net(torch.randn(2, 1, 16, 16, 16))
    net.sample_logits(out, 2).pow(2).mean().backward()
    g = net.aleatoric.branches.weight.grad.abs().sum(dim=(1, 2, 3, 4))  # (C * (r + 2),)
    assert torch.all(g[2:6] > 0), "covariance factor branch gets gradients"
    assert torch.all(g[6:] > 0), "diagonal branch gets gradients"


def test_project_rows_equals_volume_projection_in_eval_mode():
    torch.manual_seed(0)
    net = SegmentationNet(base_filters=4, rank=2)
    net.train()
    net(torch.randn(2, 1, 16, 16, 16))  # non-trivial BN running statistics
    net.eval()
    feats = torch.randn(1, 4, 16, 16, 16)
    vol = net.project(feats)
    idx = torch.tensor([0, 17, 300, 4095])
    rows = feats[0].flatten(1).T[idx]
    assert torch.allclose(net.project_rows(rows), vol[0].flatten(1).T[idx], atol=1e-6)
