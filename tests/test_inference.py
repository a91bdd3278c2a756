"""Sliding-window inference equals a naive window-by-window loop."""

import itertools
import math

import numpy as np
import pytest
import torch

from semiseg.inference import gaussian_weights, sliding_window_predict, window_starts


class Toy(torch.nn.Module):
    """A position-dependent model, so that window placement matters."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x):
        ramp = torch.linspace(-1, 1, x.shape[2]).view(1, 1, -1, 1, 1)
        return self.conv(x) + ramp


def naive(model, image, patch, stride, weighting="uniform"):
    """The field's usual loop: one window at a time, NumPy accumulation."""
    pads = [(max(0, p - n) // 2, max(0, p - n) - max(0, p - n) // 2) for n, p in zip(image.shape, patch)]
    img = np.pad(image, pads)
    shape = img.shape
    w = gaussian_weights(patch).numpy() if weighting == "gaussian" else np.ones(patch, np.float32)
    probs, counts = None, np.zeros(shape, np.float64)
    ranges = [[min(i * s, n - p) for i in range(math.ceil((n - p) / s) + 1)] for n, p, s in zip(shape, patch, stride)]
    for a, b, c in itertools.product(*ranges):
        x = torch.from_numpy(img[a:a + patch[0], b:b + patch[1], c:c + patch[2]][None, None].astype(np.float32))
        with torch.no_grad():
            p = torch.softmax(model(x), 1)[0].numpy()
        if probs is None:
            probs = np.zeros((p.shape[0], *shape), np.float64)
        probs[:, a:a + patch[0], b:b + patch[1], c:c + patch[2]] += p * w
        counts[a:a + patch[0], b:b + patch[1], c:c + patch[2]] += w
    probs /= counts
    return probs[(slice(None), *[slice(l, n - r) for (l, r), n in zip(pads, shape)])]


@pytest.mark.parametrize("shape", [(10, 12, 9), (16, 16, 8), (23, 19, 13)], ids=["smaller", "equal", "not-divisible"])
@pytest.mark.parametrize("weighting", ["uniform", "gaussian"])
def test_equals_naive_loop(shape, weighting):
    torch.manual_seed(0)
    model = Toy().eval()
    image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    ours = sliding_window_predict(model, image, (16, 16, 8), (5, 6, 3), batch_size=3, weighting=weighting, device="cpu")
    ref = naive(model, image, (16, 16, 8), (5, 6, 3), weighting)
    assert ours.shape == (3, *shape) and ours.dtype == np.float32
    assert np.allclose(ours, ref, atol=1e-5)
    assert np.allclose(ours.sum(0), 1, atol=1e-5)


def test_window_starts_flush_with_edge():
    assert window_starts(20, 8, 5) == [0, 5, 10, 12]
    assert window_starts(8, 8, 3) == [0]
    with pytest.raises(ValueError):
        window_starts(5, 8, 3)
