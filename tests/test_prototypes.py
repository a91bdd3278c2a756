"""Prototype statistics: streaming Eq. 13 updates equal the statistics of all features."""

import numpy as np
import pytest
import torch

from semiseg.prototypes import PrototypeStatistics


def test_streaming_equals_concatenated(tmp_path):
    rng = np.random.default_rng(0)
    stats = PrototypeStatistics(3, 5)
    feats, labs = [], []
    for _ in range(60):
        n = int(rng.integers(0, 40))
        f = rng.normal(loc=rng.normal(size=5) * 3, scale=rng.uniform(0.1, 2), size=(n, 5))
        y = rng.integers(0, 4, size=n)  # label 3 is outside the classes: ignored
        stats.update(torch.from_numpy(f).float(), torch.from_numpy(y))
        feats.append(f.astype(np.float32).astype(np.float64))
        labs.append(y)
    f, y = np.concatenate(feats), np.concatenate(labs)
    for c in range(3):
        fc = f[y == c]
        assert stats.count[c] == len(fc)
        assert np.allclose(stats.mean[c].numpy(), fc.mean(0), rtol=1e-6, atol=1e-9)
        assert np.allclose(stats.cov[c].numpy(), np.cov(fc.T, bias=True), rtol=1e-6, atol=1e-9)
    stats.save(tmp_path / "p.npz", model="abc")
    back = PrototypeStatistics.load(tmp_path / "p.npz")
    assert torch.equal(back.mean, stats.mean) and torch.equal(back.cov, stats.cov) and torch.equal(back.count, stats.count)


def test_large_offset_is_stable():
    """float64 accumulation: features far from zero keep their tiny variance."""
    stats = PrototypeStatistics(1, 2)
    rng = np.random.default_rng(1)
    chunks = [1e4 + rng.normal(scale=1e-3, size=(500, 2)) for _ in range(20)]
    for c in chunks:
        stats.update(torch.from_numpy(c), torch.zeros(500))
    allf = np.concatenate(chunks)
    assert np.allclose(stats.cov[0].numpy(), np.cov(allf.T, bias=True), rtol=1e-6)


def test_bad_shapes():
    stats = PrototypeStatistics(2, 4)
    with pytest.raises(ValueError, match="expected features"):
        stats.update(torch.zeros(3, 5), torch.zeros(3))
    with pytest.raises(ValueError):
        stats.load_state_dict({"count": torch.zeros(3), "mean": torch.zeros(3, 4), "cov": torch.zeros(3, 4, 4)})
