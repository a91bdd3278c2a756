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


@pytest.mark.parametrize("direction", [None, (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)])
def test_prediction_back_in_raw_geometry(tmp_path, direction):
    import SimpleITK as sitk

    from semiseg.inference import write_prediction_nifti
    from semiseg.io.h5 import read_case
    from semiseg.io.readers import to_xyz_array
    from semiseg.preprocessing import PreprocessingParams, preprocess_case
    from tests.conftest import phantom, write_volume

    kw = {} if direction is None else {"direction": direction}
    image, label, geom = phantom(shape=(48, 40, 16), spacing=(0.7, 0.7, 2.2), origin=(5.0, -12.0, 30.0), **kw)
    img_p = write_volume(tmp_path / "img.nii.gz", image, geom)
    lab_p = write_volume(tmp_path / "lab.nii.gz", label, geom)
    preprocess_case("c", img_p, lab_p, tmp_path / "c.h5", PreprocessingParams(crop_margin=3))
    _, stored_label, attrs = read_case(tmp_path / "c.h5")
    write_prediction_nifti(stored_label, attrs, tmp_path / "pred.nii.gz")
    pred = sitk.ReadImage(str(tmp_path / "pred.nii.gz"))
    raw = sitk.ReadImage(str(img_p))
    assert pred.GetSize() == raw.GetSize()
    assert np.allclose(pred.GetSpacing(), raw.GetSpacing()) and np.allclose(pred.GetOrigin(), raw.GetOrigin())
    assert np.allclose(pred.GetDirection(), raw.GetDirection())
    back = to_xyz_array(pred)
    # Resampled to 1 mm and back: the round trip keeps the object (Dice 0.92 here).
    dice = 2 * np.sum((back > 0) & (label > 0)) / (np.sum(back > 0) + np.sum(label > 0))
    assert dice > 0.9, dice
    with pytest.raises(ValueError, match="stored shape"):
        write_prediction_nifti(stored_label[:-1], attrs, tmp_path / "bad.nii.gz")
    assert not (tmp_path / "bad.nii.gz").exists()


def _vnet_with_statistics(base_filters=4):
    """A small V-Net whose batch norms hold non-trivial running statistics and affine parameters."""
    from semiseg.networks.vnet import SegmentationNet

    torch.manual_seed(0)
    net = SegmentationNet(in_channels=1, num_classes=2, base_filters=base_filters)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def test_fold_batchnorm_same_function_and_original_unchanged():
    from semiseg.inference import fold_batchnorm

    net = _vnet_with_statistics()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.backbone.modules())
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    x = torch.randn(2, 1, 32, 16, 16)
    with torch.no_grad():
        ref, out = net(x, heads=False).logits, folded(x, heads=False).logits
    assert torch.allclose(ref, out, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_vnet_sliding_window_equals_naive_loop_with_the_unfolded_model():
    net = _vnet_with_statistics()
    net.train()  # sliding_window_predict runs an eval-mode copy and leaves this one as it was

    class Logits(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, x):
            return self.n(x, heads=False).logits

    image = np.random.default_rng(2).normal(size=(40, 35, 20)).astype(np.float32)
    ours = sliding_window_predict(net, image, (32, 16, 16), (10, 7, 3), batch_size=2, device="cpu")
    assert net.training
    ref = naive(Logits(net).eval(), image, (32, 16, 16), (10, 7, 3))
    assert np.allclose(ours, ref, atol=1e-5)
    assert np.array_equal(ours.argmax(0), ref.argmax(0))


def test_amp_close_to_float32():
    net = _vnet_with_statistics()
    image = np.random.default_rng(3).normal(size=(32, 16, 16)).astype(np.float32)
    exact = sliding_window_predict(net, image, (32, 16, 16), (8, 8, 8), device="cpu")
    fast = sliding_window_predict(net, image, (32, 16, 16), (8, 8, 8), device="cpu", amp=True)
    assert fast.dtype == np.float32 and fast.shape == exact.shape
    assert np.abs(fast - exact).max() < 0.05
    assert np.allclose(fast.sum(0), 1, atol=1e-5)
