"""training.cpu_amp: bfloat16 autocast for training on CPUs with bfloat16 units (detected),
float32 elsewhere; an explicit value forces either."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from semiseg import precision
from semiseg.precision import cpu_bf16_units, training_autocast_dtype
from semiseg.training import engine
from semiseg.training.engine import TrainConfig, train
from tests.test_training import TINY, tiny_cases  # noqa: F401  (fixture)


@pytest.mark.parametrize(
    ("device", "amp", "cpu_amp", "units", "expected"),
    [
        ("cpu", True, "auto", ["amx_bf16"], torch.bfloat16),
        ("cpu", True, "auto", ["avx512_bf16"], torch.bfloat16),
        ("cpu", True, "auto", [], None),  # emulated bfloat16 would be slower than float32
        ("cpu", False, "bfloat16", [], torch.bfloat16),  # forced; training.amp is CUDA's
        ("cpu", True, "off", ["amx_bf16"], None),
        ("cuda", True, "off", [], torch.float16),
        ("cuda", False, "bfloat16", ["amx_bf16"], None),
        ("mps", True, "bfloat16", ["amx_bf16"], None),
    ],
)
def test_training_autocast_dtype(monkeypatch, device, amp, cpu_amp, units, expected):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: units)
    assert training_autocast_dtype(device, amp, cpu_amp) == expected


def test_bad_cpu_amp_is_rejected():
    with pytest.raises(ValueError, match="cpu_amp must be one of auto, bfloat16, off"):
        training_autocast_dtype("cpu", True, "fp16")
    with pytest.raises(ValueError, match="cpu_amp must be one of"):
        TrainConfig(method="supervised", cpu_amp="yes")


def test_cpu_bf16_units_reads_this_cpu():
    units = cpu_bf16_units()
    assert set(units) <= {"amx_bf16", "avx512_bf16"}
    caps = torch._C._cpu._get_cpu_capability()
    assert bool(units) == bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


@pytest.mark.parametrize("method", ["supervised", "aua_bcl"])
def test_training_runs_the_network_in_bfloat16_and_the_losses_in_float32(tiny_cases, tmp_path, monkeypatch, caplog, method):  # noqa: F811
    """cpu_amp: bfloat16 on the CPU: convolutions under bfloat16 autocast, every logged loss
    finite, and the run's model file loads in float32."""
    lab, unl = tiny_cases
    seen: list[torch.dtype] = []
    real_autocast = engine.autocast

    def recording_autocast(device, enabled=True, dtype=None):
        if enabled:
            seen.append(dtype)
        return real_autocast(device, enabled=enabled, dtype=dtype)

    monkeypatch.setattr(engine, "autocast", recording_autocast)
    conv_dtypes: list[torch.dtype] = []
    real_conv = torch.nn.Conv3d.forward

    def conv_forward(self, x):
        out = real_conv(self, x)
        conv_dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv3d, "forward", conv_forward)
    cfg = TrainConfig(method=method, lambda_c=0.1 if method == "aua_bcl" else 0.0, cpu_amp="bfloat16", **{**TINY, "iterations": 2})
    with caplog.at_level(logging.INFO, logger="semiseg.training"):
        model = train(cfg, lab, unl, tmp_path, device="cpu", progress=False)
    assert seen == [torch.bfloat16, torch.bfloat16]
    # The backbone's convolutions in bfloat16 (a head that the precision module keeps in
    # float32 may add float32 ones).
    assert conv_dtypes[0] == torch.bfloat16 and conv_dtypes.count(torch.bfloat16) > 0.8 * len(conv_dtypes)
    assert "training precision on the CPU: bfloat16 autocast (cpu_amp bfloat16" in caplog.text
    rows = (tmp_path / "losses.csv").read_text(encoding="utf-8").splitlines()
    header = rows[0].split(",")
    values = np.array([[float(v) for v in r.split(",")] for r in rows[1:]])
    assert np.isfinite(values).all(), dict(zip(header, values.T))
    net = engine.load_model(model)
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_off_trains_in_float32(tiny_cases, tmp_path, caplog):  # noqa: F811
    lab, _ = tiny_cases
    cfg = TrainConfig(method="supervised", cpu_amp="off", **{**TINY, "iterations": 1})
    with caplog.at_level(logging.INFO, logger="semiseg.training"):
        train(cfg, lab, [], tmp_path, device="cpu", progress=False)
    assert "training precision on the CPU: float32 (cpu_amp off" in caplog.text
